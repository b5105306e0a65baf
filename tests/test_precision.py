"""Mixed precision, gradient checkpointing and torch.compile through the trainer's own step.

bf16 autocast and gradient checkpointing run on CPU, so CI checks them; fp16 (loss scaling)
and compile-on-GPU need CUDA and are marked `gpu` (skipped where there is none)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from trainer.config import load_config
from trainer.engine import build_accelerator, build_model, build_optimizer, build_scheduler
from trainer.step import train_step

from .conftest import ROOT


def batch(tokenizer, n: int = 8) -> dict[str, torch.Tensor]:
    lines = [ln for ln in (ROOT / "sample/wiki1m/wiki1m_first5000.txt").read_text().splitlines() if ln.strip()]
    toks = tokenizer(lines[:n], max_length=24, truncation=True, padding="max_length", return_tensors="pt")
    g = torch.Generator().manual_seed(0)
    return {"input_ids": toks["input_ids"], "attention_mask": toks["attention_mask"],
            "image_emb": torch.randn(n, 12, generator=g)}


def run(tiny_bert: Path, steps: int = 3, **options: str) -> tuple[list[float], dict[str, torch.Tensor], object]:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    overrides = [f"model.name_or_path={tiny_bert}", "model.pooler=cls", "data.global_batch_size=8", "model.proj_dim=16",
                 "tracking.backend=none", "optim.lr=1e-3", *(f"{k}={v}" for k, v in options.items())]
    cfg = load_config(ROOT / "tests/data/dist_base.yaml", overrides)
    acc = build_accelerator(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, 12)
    opt = build_optimizer(cfg, model)
    sched = build_scheduler(cfg, opt, 100)
    model, opt = acc.prepare(model, opt)
    model.train()
    data = {k: v.to(acc.device) for k, v in batch(AutoTokenizer.from_pretrained(tiny_bert)).items()}
    losses = []
    for _ in range(steps):
        torch.manual_seed(1)  # same dropout masks in every variant
        result = train_step(model, opt, sched, data, cfg, acc)
        losses.append(float(result.losses["loss"]))
    weights = {k: v.detach().float().cpu().clone() for k, v in acc.unwrap_model(model).state_dict().items()}
    acc.trained_model = acc.unwrap_model(model)  # for the tests' own checks
    return losses, weights, acc


def test_bf16_autocast_trains_close_to_fp32(tiny_bert: Path) -> None:
    ref_losses, ref_w, _ = run(tiny_bert)
    losses, w, acc = run(tiny_bert, **{"train.precision": "bf16"})
    assert acc.mixed_precision == "bf16"
    assert all(torch.isfinite(torch.tensor(losses)))
    # bf16 changes the arithmetic (so the numbers differ) but not the training.
    assert losses != ref_losses
    assert losses == pytest.approx(ref_losses, rel=0.05)
    assert all(v.dtype == torch.float32 for v in w.values())  # master weights stay fp32
    delta = sum((w[k] - ref_w[k]).abs().max().item() for k in w)
    assert delta > 0


def test_gradient_checkpointing_gives_the_same_step(tiny_bert: Path) -> None:
    ref_losses, ref_w, _ = run(tiny_bert)
    losses, w, acc = run(tiny_bert, **{"train.grad_checkpointing": "true"})
    enc = acc.trained_model.encoder
    name = "is_activation_checkpointing" if hasattr(type(enc), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"  # renamed in transformers 5
    assert getattr(enc, name)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert all(torch.allclose(w[k], ref_w[k], atol=1e-6) for k in w)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_gpu(tiny_bert: Path, precision: str) -> None:
    ref_losses, _, _ = run(tiny_bert, steps=5)
    losses, _, acc = run(tiny_bert, steps=5, **{"train.precision": precision})
    assert acc.device.type == "cuda" and acc.mixed_precision == precision
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses == pytest.approx(ref_losses, rel=0.05)


@pytest.mark.gpu
def test_compile_on_gpu_matches_eager(tiny_bert: Path) -> None:
    ref_losses, _, _ = run(tiny_bert, steps=3)
    losses, _, _ = run(tiny_bert, steps=3, **{"train.compile": "true"})
    assert losses == pytest.approx(ref_losses, rel=1e-3)
