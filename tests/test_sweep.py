"""The seed sweep's arithmetic and argument parsing (its runs go through the normal entry point,
which the end-to-end tests cover)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from trainer.config import ConfigError
from trainer.sweep import collect, mean_std, parse_arm, summarise, table

ROOT = Path(__file__).resolve().parents[1]


def test_arms_parse_with_list_values() -> None:
    arm = parse_arm("noise40:data.sources.1.path=data/x,eval.final_tasks=[stsb_dev,stsb_test],loss.lambda_mm=0")
    assert arm.name == "noise40"
    assert arm.overrides == ["data.sources.1.path=data/x", "eval.final_tasks=[stsb_dev,stsb_test]",
                             "loss.lambda_mm=0"]
    assert parse_arm("mcse").overrides == []
    with pytest.raises(ConfigError, match="expected NAME"):
        parse_arm("bad name:x=1")


def test_mean_and_sample_std_by_hand() -> None:
    m, s = mean_std([84.0, 85.0, 86.5])
    assert m == pytest.approx(85.1666666667)
    assert s == pytest.approx(math.sqrt(((84 - m) ** 2 + (85 - m) ** 2 + (86.5 - m) ** 2) / 2))
    assert mean_std([3.0]) == (3.0, 0.0)


def test_collect_summarise_and_table() -> None:
    run = {"final": {"stsb_dev": {"spearman": 84.0}}, "retrieval": {"t2i_R@10": 70.0, "images": 100},
           "alignment_uniformity": {"alignment": 0.2, "uniformity": -2.0, "sentences": 10}}
    assert collect(run) == {"stsb_dev": 84.0, "t2i_R@10": 70.0, "alignment": 0.2, "uniformity": -2.0}
    per_run = {"a": {0: {"stsb_dev": 84.0}, 1: {"stsb_dev": 86.0}}, "b": {0: {"stsb_dev": 80.0, "x": 1.0}}}
    summary = summarise(per_run)
    assert summary["a"]["stsb_dev"] == {"mean": 85.0, "std": pytest.approx(math.sqrt(2)), "n": 2}
    text = table(summary, [0, 1])
    assert "| stsb_dev | 85.00 ± 1.41 | 80.00 ± 0.00 |" in text and "| x |  | 1.00 ± 0.00 |" in text
    assert "| seeds run | 2 | 1 |" in text


def test_report_only_tables_the_finished_runs_and_launches_nothing(tmp_path, capsys) -> None:
    from trainer.sweep import main

    for run, dev in (("t-a-s0", 84.0), ("t-a-s1", 86.0), ("t-b-s1", 80.0)):  # t-b-s0 never finished
        (tmp_path / run).mkdir()
        (tmp_path / run / "results.json").write_text(json.dumps({"final": {"stsb_dev": {"spearman": dev}}}))
    code = main(["--config", str(ROOT / "configs/quickstart.yaml"), "--seeds", "0,1", "--name", "t",
                 "--launcher", "false", "--report-only", "--arm", "a", "--arm", "b",
                 f"train.output_dir={tmp_path}", "tracking.backend=none"])
    out = capsys.readouterr().out
    assert code == 0
    assert "b seed 0 has not finished" in out
    got = json.loads((tmp_path / "sweeps/t/sweep.json").read_text())
    assert got["summary"]["a"]["stsb_dev"]["mean"] == 85.0 and got["summary"]["b"]["stsb_dev"]["n"] == 1
    assert "| seeds run | 2 | 1 |" in (tmp_path / "sweeps/t/sweep.md").read_text()
