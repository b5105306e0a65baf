"""Misconfigurations through the real entry point: each ends the run before training with exit
code 2 and one line on stderr that names the key or file and says what to do."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trainer.run import main

from .conftest import SAMPLE


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path, sample_datasets: dict[str, Path]) -> Path:
    cfg = {
        "data": {"sources": [{"name": "wiki", "kind": "text", "path": str(sample_datasets["text"])},
                             {"name": "coco", "kind": "pairs", "path": str(sample_datasets["pairs"])}],
                 "caption_every": 3, "global_batch_size": 8, "num_workers": 0, "max_len": 16},
        "model": {"name_or_path": str(tiny_bert), "pooler": "mean", "proj_dim": 16},
        "train": {"max_steps": 2, "log_every": 1},
        "eval": {"sts_dir": str(SAMPLE / "senteval"), "every_steps": 0, "at_start": False, "pooler": "mean",
                 "final_tasks": ["stsb_dev"], "align_uniform": False},
        "tracking": {"backend": "none"},
    }
    path = tmp_path_factory.mktemp("misconfig") / "base.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def with_checkpoint(runs: Path) -> None:
    ckpt = runs / "taken" / "checkpoints" / "step_00000005"
    ckpt.mkdir(parents=True)
    (ckpt / "COMMITTED").write_text('{"step": 5, "files": {}}')


CASES = [
    # (id, overrides, expected fragment of the one error line)
    ("unknown key", ["optim.lrr=1e-5"], "optim.lrr: unknown key (did you mean optim.lr?)"),
    ("zero stage 4", ["distributed.zero_stage=4"], "distributed.zero_stage: must be 0, 1, 2 or 3"),
    ("per-device batch key of old configs", ["data.batch_size=8"],
     "data.batch_size: replaced by data.global_batch_size"),
    ("trained BatchNorm tower with gradient caching",
     ["model.image_tower=efficientnet_lite0", "model.train_image_tower=true", "data.max_device_batch=4"],
     "efficientnet_lite0 has BatchNormAct2d layers, whose batch statistics make chunked training inexact"),
    ("selection by retrieval without held-out pairs", ["eval.select_by=t2i_R@10"],
     "eval.select_by: t2i_R@10 needs eval.retrieval_path"),
    ("missing data path", ["data.sources.1.path=/nonexistent/pairs"],
     "data.sources.1.path='/nonexistent/pairs': no manifest.json there"),
    ("pipe url", ["data.sources.0.path=pipe:curl http://x"], "pipe: locations run shell commands"),
    ("too many slots for the data", ["data.global_batch_size=64", "data.num_workers=4"],
     "cannot give each of 1 rank(s) x 4 worker(s) one batch of 64"),
    ("missing eval data", ["eval.sts_dir=/nonexistent/senteval"], "/nonexistent/senteval: STS data folder not found"),
    ("missing deepspeed config", ["distributed.deepspeed_config=/nonexistent/ds.json"],
     "distributed.deepspeed_config=/nonexistent/ds.json: file not found"),
    ("missing model", ["model.name_or_path=/nonexistent/model"], "model.name_or_path=/nonexistent/model"),
    ("resume never on a used folder", ["train.resume=never", "train.run_name=taken"], "train.resume=never"),
]


def test_global_batch_the_world_size_does_not_divide_is_one_line(base: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "3")  # as `accelerate launch --num_processes 3` sets it
    code = main(["--config", str(base), f"train.output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip().splitlines()[-1] == (
        "config error: data.global_batch_size=8 cannot be split evenly over 3 processes (every rank needs the "
        "same batch); use 6 or 9, or another process count")


@pytest.mark.parametrize(("overrides", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_misconfiguration_is_one_clear_line(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                             overrides: list[str], fragment: str) -> None:
    runs = tmp_path / "runs"
    with_checkpoint(runs)
    code = main(["--config", str(base), f"train.output_dir={runs}", *overrides])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith(("error: ", "config error: "))]
    assert code == 2
    assert len(errors) == 1 and fragment in errors[0], err
    assert "Traceback" not in err
    assert "Loading weights" not in err or "model" in fragment  # input checks come before the model
    assert not (runs / "taken" / "final").exists()
