"""Step time of the engines at world size 2 (CPU, gloo) and where a DDP step spends its time.

Run under a 2-process launcher; rank 0 writes the section of docs/BENCHMARKS.md:

    accelerate launch --num_processes 2 --num_machines 1 --multi_gpu --mixed_precision no \
        --dynamo_backend no bench/bench_distributed.py [--model gt:all-MiniLM-L6-v2] [--batch 16]

Engines: DDP, ZeRO-1, ZeRO-2, ZeRO-3, each running the trainer's own `train_step`. The DDP
breakdown times the encoder forward, the contrastive loss with its all-gathers (forward and
the backward down to the embeddings, which contains the reduce-scatter), the encoder
backward (which contains DDP's gradient all-reduce) and the optimizer step.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_step import make_batch  # noqa: E402
from bench.report import write_section  # noqa: E402
from trainer import dist  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.engine import build_accelerator, build_model, build_optimizer, build_scheduler  # noqa: E402
from trainer.loss import mcse_loss  # noqa: E402
from trainer.model import resolve_name  # noqa: E402
from trainer.step import train_step  # noqa: E402


def setup(model_name: str, batch: int, engine: str):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    overrides = [f"model.name_or_path={model_name}", "model.pooler=cls",
                 f"data.global_batch_size={batch * dist.world_size()}", "tracking.backend=none"]
    if engine.startswith("zero"):
        overrides.append(f"distributed.zero_stage={engine[-1]}")
    cfg = load_config(ROOT / "tests/data/dist_base.yaml", overrides)
    acc = build_accelerator(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, 1280)
    opt = build_optimizer(cfg, model)
    sched = build_scheduler(cfg, opt, 10**6)
    model, opt = acc.prepare(model, opt)
    model.train()
    return cfg, acc, model, opt, sched


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        out.append(time.perf_counter() - t0)
    return out


def breakdown(cfg, acc, model, opt, batch, n: int) -> dict[str, float]:
    parts: dict[str, list[float]] = {"encoder forward": [], "loss + all-gathers (fwd + bwd)": [],
                                     "encoder backward + grad all-reduce": [], "optimizer": []}
    B = batch["input_ids"].shape[0]
    for _ in range(n):
        dist.barrier()
        t0 = time.perf_counter()
        out = model(batch)
        t1 = time.perf_counter()
        reps = out.tensors()
        leaves = [r.detach().requires_grad_(True) for r in reps]
        loss = mcse_loss(out.with_tensors(leaves), temperature=0.05, temperature_vl=0.05, lambda_mm=0.01,
                         gather=dist.all_gather_with_grad, offset=acc.process_index * B)["loss"]
        grads = torch.autograd.grad(loss, leaves)
        t2 = time.perf_counter()
        torch.autograd.backward(reps, grads)
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            parts[key].append(dt)
    return {k: statistics.median(v) for k, v in parts.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="gt:all-MiniLM-L6-v2")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_name(args.model))
    rows: list[tuple[str, float]] = []
    split: dict[str, float] = {}
    world = 1
    for engine in ("ddp", "zero1", "zero2", "zero3"):
        cfg, acc, model, opt, sched = setup(args.model, args.batch, engine)
        world = acc.num_processes
        full = make_batch(tok, args.batch * world, 32, 1280)
        r = acc.process_index
        batch = {k: v[r * args.batch:(r + 1) * args.batch].to(acc.device) for k, v in full.items()}
        for _ in range(2):
            train_step(model, opt, sched, batch, cfg, acc)
        step = functools.partial(train_step, model, opt, sched, batch, cfg, acc)
        rows.append((engine, statistics.median(timed(step, args.steps))))
        if engine == "ddp":
            split = breakdown(cfg, acc, model, opt, batch, args.steps)
        acc.free_memory()
    if dist.rank() != 0:
        return
    base = rows[0][1]
    table = "| engine | median step (s) | vs DDP | samples/s (all ranks) |\n| --- | ---: | ---: | ---: |\n"
    table += "".join(f"| {name} | {t:.3f} | {t / base:.2f}x | {args.batch * world / t:.1f} |\n"
                     for name, t in rows)
    total = sum(split.values())
    split_share = split.get("loss + all-gathers (fwd + bwd)", 0.0) / max(total, 1e-12)
    fastest = min(rows, key=lambda r: r[1])
    table2 = "| DDP step part | median (s) | share |\n| --- | ---: | ---: |\n"
    table2 += "".join(f"| {k} | {v:.3f} | {v / total:.1%} |\n" for k, v in split.items())
    body = (f"Model `{args.model}`, {args.batch} sentences per rank x 32 tokens (caption batches, "
            f"1280-d image features), world size {world} on CPU with gloo, the trainer's `train_step`; "
            f"median of {args.steps} steps, barrier-to-barrier.\n\n{table}\n{table2}\n"
            f"The gathers move {world * args.batch} x (384 + 2 x 256 + 256) floats per step and take "
            f"{split_share:.1%} of a DDP step; the encoder's forward and backward dominate. "
            f"Fastest engine here: {fastest[0]} ({fastest[1]:.3f} s, {base / fastest[1]:.2f}x DDP's speed). "
            f"On CPU with gloo these ratios reflect gloo's all-reduce versus reduce-scatter costs, not "
            f"NCCL's; GPU figures belong in their own section.")
    print(body)
    if not args.no_write:
        write_section("distributed", "Engines at world size 2 and the cost of gathered negatives (CPU)", body,
                      "accelerate launch --num_processes 2 --num_machines 1 --multi_gpu --mixed_precision no "
                      "--dynamo_backend no bench/bench_distributed.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
