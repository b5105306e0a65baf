"""The seed sweep's arithmetic and argument parsing (its runs go through the normal entry point,
which the end-to-end tests cover)."""

from __future__ import annotations

import math

import pytest

from trainer.config import ConfigError
from trainer.sweep import collect, mean_std, parse_arm, summarise, table


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
