"""Checkpoint commit, rotation, verification and fallback, on a small torch model with a
single-process stand-in for the accelerator (the real multi-rank path runs in
tests/test_reliability.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from trainer.checkpoint import (
    COMMIT_MARKER,
    CheckpointError,
    committed_checkpoints,
    full_weights,
    load_checkpoint,
    save_checkpoint,
    verify,
)
from trainer.config import Config
from trainer.train import _choose_checkpoint


class OneProcess:
    """What save/load_checkpoint use of an Accelerator, for one process without DeepSpeed."""

    process_index = 0
    num_processes = 1
    is_main_process = True
    state = SimpleNamespace(deepspeed_plugin=None)

    def get_state_dict(self, model: torch.nn.Module, unwrap: bool = True) -> dict[str, torch.Tensor]:
        return model.state_dict()

    def unwrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model


def make(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def train_some(model: torch.nn.Module, opt: torch.optim.Optimizer, sched, steps: int) -> None:
    for _ in range(steps):
        loss = model(torch.randn(16, 4)).pow(2).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def save(run_dir: Path, step: int, model, opt, sched, keep: int = 3) -> Path:
    return save_checkpoint(run_dir, step, OneProcess(), model, opt, sched, {"step": step},
                           {"epoch": 0, "emitted": step}, keep=keep, barrier=lambda: None)


def cfg(resume: str = "auto") -> Config:
    c = Config()
    c.train.resume = resume
    return c


def flip_byte(path: Path, offset: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_round_trip_restores_model_optimizer_schedule_and_data_position(tmp_path: Path) -> None:
    model, opt, sched = make(0)
    train_some(model, opt, sched, 3)
    ckpt = save(tmp_path, 3, model, opt, sched)
    assert ckpt.name == "step_00000003" and (ckpt / COMMIT_MARKER).is_file()
    assert set(verify(ckpt)["files"]) >= {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json",
                                          "data_rank0.json", "rng_rank0.pt"}
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    train_some(model, opt, sched, 2)  # the continuation the restored copy must reproduce

    other, other_opt, other_sched = make(1)
    state, data, rng = load_checkpoint(ckpt, OneProcess(), other, other_opt, other_sched)
    assert state == {"step": 3} and data == {"epoch": 0, "emitted": 3} and rng is not None
    assert all(torch.equal(other.state_dict()[k], v) for k, v in expected.items())
    assert other_sched.last_epoch == 3
    assert other_opt.state_dict()["state"][0]["step"] == 3
    assert all(torch.equal(full_weights(ckpt)[k], v) for k, v in expected.items())


def test_rotation_keeps_the_newest_and_ignores_half_written_folders(tmp_path: Path) -> None:
    model, opt, sched = make(0)
    for step in (5, 10, 15):
        save(tmp_path, step, model, opt, sched, keep=2)
    root = tmp_path / "checkpoints"
    assert [p.name for p in committed_checkpoints(tmp_path)] == ["step_00000015", "step_00000010"]
    # A crash mid-save leaves a temp folder, and one without a marker under its final name.
    (root / ".step_00000020.tmp").mkdir()
    (root / "step_00000025").mkdir()
    (root / "step_00000025" / "model.safetensors").write_bytes(b"partial")
    assert _choose_checkpoint(cfg(), tmp_path).name == "step_00000015"
    save(tmp_path, 20, model, opt, sched, keep=2)  # the next commit cleans the temp folder
    assert not (root / ".step_00000020.tmp").exists()
    assert [p.name for p in committed_checkpoints(tmp_path)] == ["step_00000020", "step_00000015"]


def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path, caplog) -> None:
    model, opt, sched = make(0)
    for step in (5, 10):
        train_some(model, opt, sched, 1)
        save(tmp_path, step, model, opt, sched)
    bad = tmp_path / "checkpoints" / "step_00000010" / "model.safetensors"
    flip_byte(bad)
    with pytest.raises(CheckpointError, match="model.safetensors: content does not match"):
        verify(bad.parent)
    with caplog.at_level(logging.ERROR, logger="webmcse.train"):
        assert _choose_checkpoint(cfg(), tmp_path).name == "step_00000005"
    assert "cannot resume from step_00000010" in caplog.text and "model.safetensors" in caplog.text


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "marker"])
def test_every_checkpoint_damaged_is_one_clear_error(tmp_path: Path, damage: str) -> None:
    model, opt, sched = make(0)
    for step in (5, 10):
        save(tmp_path, step, model, opt, sched)
    for ckpt in committed_checkpoints(tmp_path):
        target = ckpt / "optimizer.pt"
        if damage == "flip":
            flip_byte(target)
        elif damage == "truncate":
            target.write_bytes(target.read_bytes()[:100])
        elif damage == "delete":
            target.unlink()
        else:
            (ckpt / COMMIT_MARKER).write_text("{not json")
    with pytest.raises(CheckpointError, match="every checkpoint is damaged .*step_00000010, step_00000005"):
        _choose_checkpoint(cfg(), tmp_path)


def test_resume_modes(tmp_path: Path) -> None:
    assert _choose_checkpoint(cfg(), tmp_path) is None  # a new run
    model, opt, sched = make(0)
    for step in (5, 10):
        save(tmp_path, step, model, opt, sched)
    with pytest.raises(CheckpointError, match="train.resume=never"):
        _choose_checkpoint(cfg("never"), tmp_path)
    older = tmp_path / "checkpoints" / "step_00000005"
    assert _choose_checkpoint(cfg(str(older)), tmp_path) == older
    flip_byte(older / "scheduler.pt")
    with pytest.raises(CheckpointError, match="scheduler.pt"):  # an explicit choice is never replaced
        _choose_checkpoint(cfg(str(older)), tmp_path)
