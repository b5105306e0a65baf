"""Exact distributed contrastive gradients, proven against one process holding the global batch.

The multi-process scenarios run the trainer's real engine and step in `accelerate launch`ed
gloo processes (tests/dist_worker.py); the single-process tests check gradient caching's RNG
replay, gradient checkpointing and mixed precision in-process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.config import load_config
from trainer.loss import mcse_loss

from .conftest import ROOT, make_tiny_bert
from .dist_worker import IMAGE_DIM, global_batch, scenario_config

# Every DDP scenario runs before the first DeepSpeed one: an engine built by DeepSpeed leaves
# process-wide state behind after which float64 steps agree with one process only to ~1e-7
# (measured: plain DDP right after ZeRO-1), and the DDP scenarios are checked to float64 rounding.
WORLD2 = ["ddp", "ddp+text", "ddp+cache+tau", "ddp+cache+sym+clip", "ddp+adamw20", "ddp+robust",
          "ddp+cache+robust+sym", "zero1", "zero2", "zero3+fp32", "zero2+cache+tau", "zero3+cache+tau+fp32",
          "zero2+text", "zero1+adamw20"]
WORLD4 = ["ddp", "ddp+cache+tau+text", "ddp+robust", "zero2+cache+tau"]


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny16"), hidden=16)


def launch(world: int, model_dir: Path, out: Path, scenarios: list[str]) -> dict[str, dict]:
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--num_processes", str(world), "--num_machines", "1", "--multi_gpu",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "tests" / "dist_worker.py"),
           str(model_dir), str(out), *scenarios]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return {r["scenario"]: r for r in json.loads(out.read_text())}


@pytest.fixture(scope="module")
def world2(tiny16: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    return launch(2, tiny16, tmp_path_factory.mktemp("w2") / "out.json", WORLD2)


@pytest.fixture(scope="module")
def world4(tiny16: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    return launch(4, tiny16, tmp_path_factory.mktemp("w4") / "out.json", WORLD4)


def check(report: dict) -> None:
    """DDP in float64 must be exact to rounding; DeepSpeed keeps float32 master weights, so
    its error is bounded by float32 rounding of the weights. A wrong gradient scale or a
    missing cross-rank term would be of the order of the update itself."""
    exact = report["scenario"].startswith("ddp") and "float64" in report["dtype"]
    assert report["loss"] == pytest.approx(report["ref_loss"], rel=1e-12 if exact else 1e-5)
    update, err = report["update"], report["max_abs_err"]
    assert update > 0
    if report["scenario"].startswith("ddp"):
        assert err <= 1e-9 * update, {k: v for k, v in report.items() if k not in ("keeps", "ref_keeps")}
    elif "adamw20" in report["scenario"]:
        # 20 AdamW steps: float32 rounding of the master weights, amplified by Adam's
        # normalisation of small gradients (SGD scenarios check the gradient scale exactly).
        assert err <= 1e-3 * update, report
    else:
        assert err <= 1e-5 * update + 4e-7 * report["param_scale"], report
    assert report["n_tensors"] >= 40


@pytest.mark.slow
@pytest.mark.parametrize("scenario", WORLD2)
def test_world2_equals_one_process(world2: dict[str, dict], scenario: str) -> None:
    report = world2[scenario]
    check(report)
    assert report["world"] == 2
    assert report["has_tau"] == ("tau" in scenario)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", WORLD4)
def test_world4_equals_one_process(world4: dict[str, dict], scenario: str) -> None:
    check(world4[scenario])
    assert world4[scenario]["world"] == 4


@pytest.mark.slow
def test_robust_loss_drops_the_same_pairs_on_every_rank(world2: dict[str, dict], world4: dict[str, dict]) -> None:
    """The dropped pairs, gathered from every rank, are exactly those one process holding the
    global batch drops (and the updates match: test_world*_equals_one_process)."""
    for report in (world2["ddp+robust"], world2["ddp+cache+robust+sym"], world4["ddp+robust"]):
        (keep,), (ref,) = report["keeps"], report["ref_keeps"]
        assert keep == ref and 0 < ref.count(0) < len(ref)
        assert ref.count(0) == int(0.25 * len(ref))


# ------------------------------------------------------------------ single process


@pytest.fixture()
def fresh_accelerator():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _setup(model_dir: Path, extra: list[str], dtype: torch.dtype = torch.float64):
    from trainer.engine import build_accelerator, build_model

    overrides, _ = scenario_config(str(model_dir), "ddp")
    cfg = load_config(ROOT / "tests" / "data" / "dist_base.yaml", [*overrides, "data.global_batch_size=8", *extra])
    acc = build_accelerator(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, IMAGE_DIM).to(dtype)
    return cfg, acc, model


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_cache_equals_big_batch_including_temperature(tiny16: Path, fresh_accelerator) -> None:
    from trainer.step import forward_backward

    batch = global_batch(2, caption=True, seed=5, dtype=torch.float64)  # 8 rows
    cfg, acc, model = _setup(tiny16, ["loss.learnable_temperature=true", "data.max_device_batch=2"])
    plain_cfg = load_config(ROOT / "tests" / "data" / "dist_base.yaml",
                            [*scenario_config(str(tiny16), "ddp")[0], "data.global_batch_size=8",
                             "loss.learnable_temperature=true"])
    ref = _copy(model)
    losses, ran = forward_backward(model, batch, cfg, acc)  # K = 4 chunks
    assert ran
    with acc.autocast():
        ref_losses = mcse_loss(ref(batch), temperature=0.05, temperature_vl=0.05, lambda_mm=plain_cfg.loss.lambda_mm)
    ref_losses["loss"].backward()
    got, want = _grads(model), _grads(ref)
    assert set(got) == set(want) and "log_inv_tau" in got
    assert losses["loss"] == pytest.approx(float(ref_losses["loss"].detach()), rel=1e-12)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12, msg=name)
    # The temperature gradient is the big-batch one, not K times it.
    torch.testing.assert_close(got["log_inv_tau"], want["log_inv_tau"], rtol=1e-9, atol=0)


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


def test_grad_cache_replays_dropout_masks(tiny16: Path, fresh_accelerator, monkeypatch: pytest.MonkeyPatch) -> None:
    """With dropout on, the cached gradient equals the one of encoding the same chunks with a
    graph in the same order (same masks); without replaying the RNG state it would not."""
    from trainer import step

    batch = global_batch(2, caption=True, seed=6, dtype=torch.float64)
    cfg, acc, model = _setup(tiny16, ["model.dropout=0.2", "data.max_device_batch=4"])
    model.train()
    ref = _copy(model)

    torch.manual_seed(123)
    step.forward_backward(model, batch, cfg, acc)
    got = _grads(model)

    torch.manual_seed(123)
    outs = [ref(part) for part in step._chunks(batch, 4)]
    joined = outs[0].with_tensors([torch.cat([o.tensors()[i] for o in outs]) for i in range(len(outs[0].tensors()))])
    mcse_loss(joined, temperature=0.05, temperature_vl=0.05, lambda_mm=cfg.loss.lambda_mm)["loss"].backward()
    want = _grads(ref)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12, msg=name)

    # Sensitivity: the same computation without the replay gives different gradients.
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(step, "_set_rng_state", lambda state, device: None)
    torch.manual_seed(123)
    step.forward_backward(model, batch, cfg, acc)
    broken = _grads(model)
    assert any(not torch.allclose(broken[n], want[n], rtol=1e-6, atol=1e-9) for n in want)


def test_gradient_checkpointing_gives_the_same_gradients(tiny16: Path, fresh_accelerator) -> None:
    from trainer.step import forward_backward

    batch = global_batch(2, caption=True, seed=7, dtype=torch.float64)
    cfg, acc, model = _setup(tiny16, ["model.dropout=0.1"])
    cfg_ckpt, _, model_ckpt = _setup(tiny16, ["model.dropout=0.1", "train.grad_checkpointing=true"])
    model.train()
    model_ckpt.train()
    assert model_ckpt.encoder.is_activation_checkpointing
    torch.manual_seed(9)
    forward_backward(model, batch, cfg, acc)
    torch.manual_seed(9)
    forward_backward(model_ckpt, batch, cfg_ckpt, acc)
    got, want = _grads(model_ckpt), _grads(model)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12, msg=name)


def test_bf16_autocast_step_is_finite_and_close_to_fp32(tiny16: Path, fresh_accelerator) -> None:
    from trainer.step import forward_backward

    batch = global_batch(2, caption=True, seed=8, dtype=torch.float32)
    cfg, acc, model = _setup(tiny16, ["train.precision=bf16"], dtype=torch.float32)
    assert acc.mixed_precision == "bf16"
    ref = _copy(model)
    loss = forward_backward(model, batch, cfg, acc)[0]["loss"]
    ref_loss = mcse_loss(ref(batch), temperature=0.05, temperature_vl=0.05, lambda_mm=cfg.loss.lambda_mm)["loss"]
    assert torch.isfinite(torch.tensor(loss)) and loss == pytest.approx(float(ref_loss.detach()), rel=0.05)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
