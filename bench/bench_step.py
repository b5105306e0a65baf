"""Trainer step vs a bare PyTorch loop on the same model and batch (one process).

The trainer's step (`trainer.step.train_step` on an Accelerate-prepared model: MCSE loss with
the gather hook, clipping, AdamW, LR schedule) is timed against a hand-written loop that does
the same forward, loss, backward, clipping and AdamW update with nothing around it, on the
same model as the trainer builds it (packed encoder, fused AdamW): the ratio is the trainer's
own overhead (goal <= 1.05). A third loop is the same hand-written loop with PyTorch's
defaults (padded encoder, AdamW's for-loop on CPU), what a plain script gets. Steps are
interleaved in blocks so that machine noise hits all alike.

    python bench/bench_step.py [--model gt:all-MiniLM-L6-v2] [--batch 32] [--steps 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import write_section  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.engine import build_accelerator, build_model, build_optimizer, build_scheduler  # noqa: E402
from trainer.model import resolve_name  # noqa: E402
from trainer.step import train_step  # noqa: E402


def make_batch(tokenizer, batch: int, max_len: int, image_dim: int) -> dict[str, torch.Tensor]:
    text = (ROOT / "sample/wiki1m/wiki1m_first5000.txt").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # Padded to the longest sentence, as the trainer's collation does.
    toks = tokenizer(lines[:batch], max_length=max_len, truncation=True, padding="longest",
                     return_tensors="pt")
    g = torch.Generator().manual_seed(0)
    return {"input_ids": toks["input_ids"], "attention_mask": toks["attention_mask"],
            "image_emb": torch.randn(batch, image_dim, generator=g)}


def bare_step(model, opt, batch, tau: float, lam: float, clip: float) -> None:
    B = batch["input_ids"].shape[0]
    ids = torch.cat([batch["input_ids"]] * 2)
    mask = torch.cat([batch["attention_mask"]] * 2)
    hidden = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    pooled = hidden[:, 0]
    z = torch.tanh(model.mlp.dense(pooled))
    z1, z2 = F.normalize(z[:B], dim=-1), F.normalize(z[B:], dim=-1)
    labels = torch.arange(B)
    loss = F.cross_entropy(z1 @ z2.T / tau, labels)
    g = F.normalize(torch.tanh(model.text_head.dense(pooled)), dim=-1)
    v = F.normalize(torch.tanh(model.image_head.dense(batch["image_emb"])), dim=-1)
    mm = (F.cross_entropy(g[:B] @ v.T / tau, labels) + F.cross_entropy(g[B:] @ v.T / tau, labels)) / 2
    (loss + lam * mm).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="gt:all-MiniLM-L6-v2")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--block", type=int, default=5)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    from transformers import AutoTokenizer

    cfg = load_config(ROOT / "tests/data/dist_base.yaml",
                      [f"model.name_or_path={args.model}", "model.pooler=cls",
                       f"data.global_batch_size={args.batch}", "tracking.backend=none"])
    tok = AutoTokenizer.from_pretrained(resolve_name(args.model))
    batch = make_batch(tok, args.batch, args.max_len, 1280)

    acc = build_accelerator(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, 1280)
    opt = build_optimizer(cfg, model)
    sched = build_scheduler(cfg, opt, 10**6)
    model, opt = acc.prepare(model, opt)
    model.train()
    torch.manual_seed(0)
    bare = build_model(cfg, 1280)
    bare.train()
    bare_opt = build_optimizer(cfg, bare)
    torch.manual_seed(0)
    plain = build_model(cfg, 1280)
    plain.encoder.forward = plain.encoder._webmcse_padded_forward  # the encoder's own forward
    plain.train()
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=cfg.optim.lr)  # PyTorch's default kernel

    def trainer_step() -> None:
        train_step(model, opt, sched, batch, cfg, acc)

    def bare_loop() -> None:
        bare_step(bare, bare_opt, batch, cfg.loss.temperature, cfg.loss.lambda_mm, cfg.optim.grad_clip)

    def plain_loop() -> None:
        bare_step(plain, plain_opt, batch, cfg.loss.temperature, cfg.loss.lambda_mm, cfg.optim.grad_clip)

    loops = (("trainer", trainer_step), ("bare", bare_loop), ("plain", plain_loop))
    for _, fn in loops:  # warm-up
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name, _ in loops}
    for _ in range(max(1, args.steps // args.block)):
        for name, fn in loops:
            for _ in range(args.block):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["trainer"] / med["bare"]
    real = float(batch["attention_mask"].float().mean())
    body = (f"Model `{args.model}`, batch {args.batch} sentences x {args.max_len} tokens, padded to the longest "
            f"({100 * real:.0f}% of the positions are real tokens; two dropout views = {2 * args.batch} "
            f"sequences), caption batch with 1280-d image features, AdamW, clipping, one process on CPU "
            f"({torch.get_num_threads()} torch threads); median of {len(times['trainer'])} steps each, "
            f"interleaved in blocks of {args.block}.\n\n"
            f"| loop | encoder forward | AdamW kernel | median step (s) | samples/s |\n"
            f"| --- | --- | --- | ---: | ---: |\n"
            f"| bare PyTorch, as webmcse builds the model | packed (real tokens only) | fused | {med['bare']:.3f} | "
            f"{args.batch / med['bare']:.1f} |\n"
            f"| webmcse `train_step` | packed (real tokens only) | fused | {med['trainer']:.3f} | "
            f"{args.batch / med['trainer']:.1f} |\n"
            f"| bare PyTorch with PyTorch's defaults | padded | for-loop | {med['plain']:.3f} | "
            f"{args.batch / med['plain']:.1f} |\n\n"
            f"Ratio trainer / bare: **{ratio:.3f}** (goal <= 1.05). The trainer against a plain hand-written "
            f"loop: {med['plain'] / med['trainer']:.2f}x its samples/s. Other work may have shared this 2-core "
            f"machine while it was measured; blocks are interleaved so that it slows every loop alike.")
    print(body)
    if not args.no_write:
        write_section("step", "Trainer step vs bare PyTorch loop (CPU, one process)", body,
                      "flock /tmp/webmcse-heavy.lock python bench/bench_step.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
