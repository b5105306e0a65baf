"""Multi-process equivalence check, run by tests/test_distributed.py through `accelerate launch`.

Every scenario builds the trainer's real engine (trainer.engine.build_accelerator with DDP or
DeepSpeed ZeRO-N), runs the trainer's real step (trainer.step.train_step, with or without
gradient caching) on this rank's slice of a fixed global batch, and compares the updated
weights with one process that holds the whole global batch and applies the same optimizer
step to the same model. SGD with lr=1 makes the update equal to the gradient, so any error in
scale (DeepSpeed/DDP averaging, gradient caching's 1/K) or in cross-rank terms shows up.

    accelerate launch --num_processes 2 ... tests/dist_worker.py TINY_MODEL_DIR OUT.json SCENARIO...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer import dist
from trainer.config import load_config
from trainer.engine import (
    build_accelerator,
    build_model,
    build_scheduler,
    full_state_dict,
    unsharded_construction,
)
from trainer.loss import mcse_loss
from trainer.step import train_step

B = 4  # rows per rank
L = 10  # tokens per sentence
IMAGE_DIM = 12


def global_batch(world: int, caption: bool, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = world * B
    ids = torch.randint(1000, 5000, (n, L), generator=g)
    ids[:, 0] = 101
    mask = torch.ones(n, L, dtype=torch.long)
    lengths = torch.randint(4, L + 1, (n,), generator=g)
    for i, length in enumerate(lengths.tolist()):
        mask[i, length:] = 0
        ids[i, length:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if caption:
        batch["image_emb"] = torch.randn(n, IMAGE_DIM, generator=g, dtype=dtype)
    return batch


def scenario_config(model_dir: str, name: str) -> tuple[list[str], dict]:
    """Overrides and options for one scenario name like `zero2+cache+tau+text`."""
    parts = name.split("+")
    engine = parts[0]
    opts = {"cache": "cache" in parts, "tau": "tau" in parts, "text": "text" in parts,
            "adamw20": "adamw20" in parts, "sym": "sym" in parts, "clip": "clip" in parts,
            "robust": "robust" in parts}
    overrides = [f"model.name_or_path={model_dir}", "model.dropout=0", "model.proj_dim=8",
                 f"data.global_batch_size={B * dist.world_size()}",
                 f"data.max_device_batch={2 if opts['cache'] else 0}",
                 f"optim.grad_clip={0.5 if opts['clip'] else 0}", "loss.lambda_mm=0.3",
                 f"loss.learnable_temperature={opts['tau']}", f"loss.symmetric={opts['sym']}",
                 "optim.schedule=linear", "optim.lr=1e-3", "optim.weight_decay=0.01",
                 f"loss.robust_drop={0.25 if opts['robust'] else 0}"]
    if engine.startswith("zero"):
        overrides.append(f"distributed.zero_stage={engine[-1]}")
    return overrides, opts


def run(model_dir: str, name: str) -> dict:
    overrides, opts = scenario_config(model_dir, name)
    # ZeRO-3 partitions the encoder while it is built, so it cannot be cast to float64 after.
    dtype = torch.float32 if "fp32" in name.split("+") else torch.float64
    cfg = load_config(Path(__file__).parent / "data" / "dist_base.yaml", overrides)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    acc = build_accelerator(cfg)
    world, rank = acc.num_processes, acc.process_index
    steps = 20 if opts["adamw20"] else 1

    torch.manual_seed(0)
    model = build_model(cfg, IMAGE_DIM).to(dtype)

    def make_opt(m: torch.nn.Module) -> torch.optim.Optimizer:
        if opts["adamw20"]:
            from trainer.engine import build_optimizer

            return build_optimizer(cfg, m)
        return torch.optim.SGD(m.parameters(), lr=1.0)

    optimizer = make_opt(model)
    scheduler = build_scheduler(cfg, optimizer, steps) if opts["adamw20"] else None
    model, optimizer = acc.prepare(model, optimizer)

    # The reference: the same weights in one ordinary process (rank 0), never sharded.
    initial = full_state_dict(acc, model)
    reference = ref_opt = ref_sched = None
    if acc.is_main_process:
        with unsharded_construction(acc):
            reference = build_model(cfg, IMAGE_DIM, pretrained=False).to(dtype)
        reference.load_state_dict(initial)
        initial = {k: v.to(dtype) for k, v in initial.items()}
        ref_opt = make_opt(reference)
        ref_sched = build_scheduler(cfg, ref_opt, steps) if opts["adamw20"] else None

    losses, ref_losses, keeps, ref_keeps = [], [], [], []
    for step in range(steps):
        full = global_batch(world, caption=not opts["text"], seed=100 + step, dtype=dtype)
        mine = {k: v[rank * B:(rank + 1) * B].to(acc.device) for k, v in full.items()}
        if opts["robust"]:  # record which local pairs the robust loss kept, on every rank
            import trainer.step as step_mod

            real = step_mod.mcse_loss

            def spy(*a, _real=real, **k):
                out = _real(*a, **k)
                if "_keep" in out:
                    keeps.append(dist.all_gather_no_grad(out["_keep"].to(torch.int64)).tolist())
                return out

            step_mod.mcse_loss = spy
        result = train_step(model, optimizer, scheduler, mine, cfg, acc)
        if opts["robust"]:
            step_mod.mcse_loss = real
        losses.append(dist.all_reduce_sum(result.losses["loss"]) / world)

        if reference is None:
            continue
        # One process, whole global batch: the definition of the right answer.
        reference.train()
        out = reference(full)
        ref = mcse_loss(out, temperature=cfg.loss.temperature, temperature_vl=cfg.loss.temperature_vl,
                        lambda_mm=cfg.loss.lambda_mm, symmetric=cfg.loss.symmetric,
                        robust_drop=cfg.loss.robust_drop)
        if "_keep" in ref:
            ref_keeps.append(ref["_keep"].to(torch.int64).tolist())
        ref["loss"].backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), cfg.optim.grad_clip)
        ref_opt.step()
        if ref_sched is not None:
            ref_sched.step()
        ref_opt.zero_grad(set_to_none=True)
        ref_losses.append(float(ref["loss"].detach()))

    state = full_state_dict(acc, model)
    report: dict = {"scenario": name, "world": world}
    if acc.is_main_process:
        ref_state = reference.state_dict()
        # Errors are measured against the size of the reference update (all tensors), so
        # parameters whose true gradient is zero (attention key biases) do not divide by ~0.
        update = max(float((v - initial[k]).abs().max()) for k, v in ref_state.items())
        scale = max(float(v.abs().max()) for v in ref_state.values())
        worst, worst_name, n = 0.0, "", 0
        for key, value in ref_state.items():
            err = float((state[key].to(value.dtype) - value).abs().max())
            n += 1
            if err > worst:
                worst, worst_name = err, key
        report.update({"update": update, "param_scale": scale, "loss": losses, "ref_loss": ref_losses,
                       "max_abs_err": worst, "worst": worst_name,
                       "n_tensors": n, "dtype": str(dtype)})
        report["has_tau"] = any(k.endswith("log_inv_tau") for k in state)
        report["keeps"], report["ref_keeps"] = keeps, ref_keeps
    acc.free_memory()
    dist.barrier()
    return report


def main() -> None:
    model_dir, out = sys.argv[1], Path(sys.argv[2])
    reports = [run(model_dir, name) for name in sys.argv[3:]]
    if dist.rank() == 0:
        out.write_text(json.dumps(reports, indent=1))


if __name__ == "__main__":
    main()
