"""What a run tells its user without any tracking server: the console and the run folder, a
text-only run described as one, evaluation switched off entirely, and a results table that
shows only what exists."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from trainer.data import Schedule, Source
from trainer.run import main


def test_schedule_describes_what_the_steps_get() -> None:
    from trainer.config import DataConfig

    text = Source("wiki", "text", "w", 1.0, ["a.tar"], 640)
    pairs = Source("coco", "pairs", "c", 1.0, ["b.tar"], 128)
    cfg = DataConfig(global_batch_size=64)
    assert Schedule.build([text], cfg, 64, 0).describe() == "text batches only"
    assert Schedule.build([pairs], cfg, 64, 0).describe() == "caption batches only"
    assert Schedule.build([text, pairs], cfg, 64, 0).describe() == "a caption batch every 5 steps"
    ratio = DataConfig(global_batch_size=64, schedule="ratio", caption_ratio=0.25)
    assert Schedule.build([text, pairs], ratio, 64, 0).describe() == "caption batches on 25% of steps"


def test_a_run_without_tracking_or_evaluation_still_reports_every_log_step(
        tmp_path: Path, tiny_bert: Path, sample_datasets: dict[str, Path], capfd: pytest.CaptureFixture) -> None:
    cfg = {
        "data": {"sources": [{"name": "wiki", "kind": "text", "path": str(sample_datasets["text"])}],
                 "global_batch_size": 8, "max_len": 16, "num_workers": 0},
        "model": {"name_or_path": str(tiny_bert), "pooler": "cls", "proj_dim": 16},
        "train": {"max_steps": 8, "log_every": 4, "output_dir": str(tmp_path / "runs"), "run_name": "quiet",
                  "save_best": False, "save_final": False},
        # No STS data anywhere: nothing may need it when nothing is evaluated.
        "eval": {"sts_dir": str(tmp_path / "no_such_folder"), "dev_task": "", "final_tasks": [],
                 "align_uniform": False},
        "tracking": {"backend": "none"},
    }
    path = tmp_path / "quiet.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(path)]) == 0
    # The console (the trainer logs to stderr on rank 0) carries the layout and a line per log step.
    messages = re.findall(r"webmcse\.train: ([^\r\n]*)", capfd.readouterr().err)
    assert any("text batches only" in m for m in messages)
    steps = [m for m in messages if m.startswith(("step 4/8:", "step 8/8:"))]
    assert len(steps) == 2 and all("samples_per_s" in m and "data_wait_frac" in m and "lr" in m for m in steps)

    run = tmp_path / "runs" / "quiet"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [4, 8]
    assert all(x["samples_per_s"] > 0 and "loss_simcse" in x and "loss_mm" not in x for x in lines)
    results = json.loads((run / "results.json").read_text())
    assert results["exported"]["which"] == "last step (8; no evaluation during training)"
    assert (run / "final" / "model.safetensors").is_file()  # the run's model, whatever save_final says
    table = (run / "results.md").read_text()
    assert "best checkpoint" not in table and "Exported model:" in table and "last step" in table
