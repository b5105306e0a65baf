from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from trainer.evaluate import EvalDataError, evaluate_tasks, load_task, main, results_markdown


def bag_of_letters(sentences: list[str]) -> np.ndarray:
    """A deterministic toy encoder: letter counts."""
    out = np.zeros((len(sentences), 26))
    for i, s in enumerate(sentences):
        for ch in s.lower():
            if "a" <= ch <= "z":
                out[i, ord(ch) - 97] += 1
    return out


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture()
def fake_senteval(tmp_path: Path) -> Path:
    root = tmp_path / "senteval"
    year = root / "STS13-en-test"
    year.mkdir(parents=True)
    subsets = {
        "FNWN": [("a cat sat", "a cat  sat", "5"), ("dogs run fast", "cats sleep", "1"), ("x y", "y z", ""),
                 ("blue sky", "blue  sea", "3")],
        "headlines": [("stocks fall", "stocks drop", "4"), ("rain today", "sun tomorrow", "0.5"),
                      ("big news", "big  news", "5")],
        "OnWN": [("alpha beta", "beta gamma", "2"), ("one two", "one two", "5"), ("red", "green", "0")],
    }
    for name, rows in subsets.items():
        (year / f"STS.input.{name}.txt").write_text("".join(f"{a}\t{b}\n" for a, b, _ in rows))
        (year / f"STS.gs.{name}.txt").write_text("".join(f"{g}\n" for _, _, g in rows))
    stsb = root / "STSBenchmark"
    stsb.mkdir()
    (stsb / "sts-dev.csv").write_text(
        'main-captions\tMSRvid\t2012test\t0001\t5.0\ta "quoted" man\ta "quoted"  man\n'
        "main-news\tx\t2012\t0002\t1.0\tnothing alike\tcompletely different\tsource1\tsource2\n"
        "main-news\tx\t2012\t0003\t2.5\tsome overlap here\tsome other words\n")
    return root


def test_sts_year_all_wmean_and_subsets(fake_senteval: Path) -> None:
    res = evaluate_tasks(bag_of_letters, fake_senteval, ["sts13"])["sts13"]
    subsets = load_task(fake_senteval, "sts13")
    assert [len(s.gold) for s in subsets] == [3, 3, 3]  # the pair without gold is dropped
    assert subsets[0].s2[0] == "a cat sat"  # SentEval's whitespace normalisation
    preds, golds, per = [], [], {}
    for s in subsets:
        enc1, enc2 = bag_of_letters(s.s1), bag_of_letters(s.s2)
        p = np.array([cos(a, b) for a, b in zip(enc1, enc2, strict=True)])
        per[s.name] = spearmanr(p, s.gold).statistic * 100
        preds.append(p)
        golds.append(s.gold)
    assert res["spearman"] == pytest.approx(spearmanr(np.concatenate(preds), np.concatenate(golds)).statistic * 100)
    assert res["wmean"] == pytest.approx(np.mean(list(per.values())))  # equal sizes here
    assert {k: v["spearman"] for k, v in res["subsets"].items()} == pytest.approx(per)
    assert res["n"] == 9


def test_stsb_reads_tabs_quotes_and_extra_columns(fake_senteval: Path) -> None:
    (sub,) = load_task(fake_senteval, "stsb_dev")
    assert sub.s1[0] == 'a "quoted" man' and sub.s2[0] == 'a "quoted" man'
    assert list(sub.gold) == [5.0, 1.0, 2.5]


def test_missing_data_says_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(EvalDataError, match=r"nowhere: STS data folder not found; get .* `webmcse-data fetch-eval-data"):
        load_task(tmp_path / "nowhere", "stsb_dev")
    (tmp_path / "s").mkdir()
    with pytest.raises(EvalDataError, match=r"STSBenchmark/sts-test\.csv: not found"):
        load_task(tmp_path / "s", "stsb_test")


def test_results_markdown_lists_every_task(fake_senteval: Path) -> None:
    res = evaluate_tasks(bag_of_letters, fake_senteval, ["sts13", "stsb_dev"])
    md = results_markdown(res, "toy")
    assert "| sts13 |" in md and "| stsb_dev |" in md and md.startswith("### toy")


def test_cli_rejects_unknown_task_before_loading_a_model(capsys: pytest.CaptureFixture) -> None:
    assert main(["--model", "unused", "--tasks", "sts99"]) == 2
    assert "unknown sts99" in capsys.readouterr().err


@pytest.mark.slow
def test_minilm_reproduces_published_stsb_figures(sts_dir: Path) -> None:
    """all-MiniLM-L6-v2, mean pooling: STS-B dev 86.72 and test 82.03 (MTEB)."""
    from transformers import AutoTokenizer

    from trainer.evaluate import make_encoder
    from trainer.model import MCSEModel, resolve_name

    path = resolve_name("gt:all-MiniLM-L6-v2")
    model = MCSEModel.from_pretrained_encoder(path, image_dim=0)
    enc = make_encoder(model, AutoTokenizer.from_pretrained(path), "mean", progress=False)
    res = evaluate_tasks(enc, sts_dir, ["stsb_dev", "stsb_test"])
    assert res["stsb_dev"]["spearman"] == pytest.approx(86.72, abs=0.01)
    assert res["stsb_test"]["spearman"] == pytest.approx(82.03, abs=0.01)
