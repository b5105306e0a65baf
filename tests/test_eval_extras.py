"""Alignment/uniformity, retrieval and the sentence-transformers export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.evaluate import alignment_uniformity, evaluate_tasks, make_encoder, recall_at_k, retrieval

from .test_evaluate import bag_of_letters, fake_senteval  # noqa: F401 - fixture


def test_recall_at_k_by_hand() -> None:
    # 3 images; captions 0,1 -> image 0, caption 2 -> image 1, caption 3 -> image 2
    sims = np.array([[0.9, 0.1, 0.0],   # right (rank 0)
                     [0.2, 0.8, 0.5],   # image 0 ranked 3rd (0.8 and 0.5 are above 0.2)
                     [0.1, 0.7, 0.3],   # right
                     [0.6, 0.2, 0.4]])  # image 2 ranked 2nd
    owner = np.array([0, 0, 1, 2])
    r = recall_at_k(sims, owner, ks=(1, 2, 3))
    assert r["t2i_R@1"] == pytest.approx(50.0)  # captions 0 and 2
    assert r["t2i_R@2"] == pytest.approx(75.0)  # + caption 3
    assert r["t2i_R@3"] == pytest.approx(100.0)
    # image 0: best own caption 0 (0.9) is the top of its column -> rank 0
    # image 1: own caption 2 (0.7) below caption 1 (0.8) -> rank 1
    # image 2: own caption 3 (0.4) below caption 1 (0.5) -> rank 1
    assert r["i2t_R@1"] == pytest.approx(100 / 3)
    assert r["i2t_R@2"] == pytest.approx(100.0)


def test_alignment_and_uniformity_match_their_definitions(fake_senteval: Path) -> None:  # noqa: F811
    au = alignment_uniformity(bag_of_letters, fake_senteval)
    from trainer.evaluate import load_task

    (sub,) = load_task(fake_senteval, "stsb_dev")
    unique = sorted(set(sub.s1) | set(sub.s2))
    v = bag_of_letters(unique)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    idx = {s: i for i, s in enumerate(unique)}
    pos = [(idx[a], idx[b]) for a, b, g in zip(sub.s1, sub.s2, sub.gold, strict=True) if g >= 4]
    assert au["positive_pairs"] == len(pos) == 1
    assert au["alignment"] == pytest.approx(np.mean([np.sum((v[a] - v[b]) ** 2) for a, b in pos]))
    pairs = [(i, j) for i in range(len(v)) for j in range(i + 1, len(v))]
    want = np.log(np.mean([np.exp(-2 * np.sum((v[i] - v[j]) ** 2)) for i, j in pairs]))
    assert au["uniformity"] == pytest.approx(want)


@pytest.fixture(scope="module")
def trained_like(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory):
    """A tiny MCSE model with non-trivial heads, exported in HF + sentence-transformers layout."""
    from transformers import AutoTokenizer

    from trainer.model import MCSEModel

    torch.manual_seed(0)
    model = MCSEModel.from_pretrained_encoder(str(tiny_bert), image_dim=1280, proj_dim=16)
    return model, AutoTokenizer.from_pretrained(tiny_bert), tmp_path_factory.mktemp("exports")


@pytest.mark.parametrize("pooler", ["mean", "cls_before_pooler", "cls"])
def test_export_loads_in_sentence_transformers_with_equal_scores(trained_like, pooler: str, sts_dir: Path) -> None:
    from sentence_transformers import SentenceTransformer

    model, tok, root = trained_like
    folder = root / pooler
    model.save_pretrained(folder, tok, extra={"eval_pooler": pooler})
    st = SentenceTransformer(str(folder), device="cpu")
    ours = make_encoder(model, tok, pooler, progress=False)
    sentences = ["A man is playing a guitar.", "Two dogs run along the beach .", "a b c"]
    np.testing.assert_allclose(st.encode(sentences, convert_to_numpy=True), ours(sentences), rtol=1e-4, atol=1e-5)

    def st_encode(batch: list[str]) -> np.ndarray:
        return st.encode(batch, batch_size=128, convert_to_numpy=True)

    a = evaluate_tasks(ours, sts_dir, ["stsb_dev"])["stsb_dev"]["spearman"]
    b = evaluate_tasks(st_encode, sts_dir, ["stsb_dev"])["stsb_dev"]["spearman"]
    assert a == pytest.approx(b, abs=0.01)


def test_avg_first_last_is_not_exported_to_sentence_transformers(trained_like, caplog) -> None:
    model, tok, root = trained_like
    folder = root / "afl"
    model.save_pretrained(folder, tok, extra={"eval_pooler": "avg_first_last"})
    assert not (folder / "modules.json").exists()
    assert "no sentence-transformers equivalent" in caplog.text


def test_retrieval_on_held_out_pairs(trained_like, sample_datasets: dict[str, Path]) -> None:
    model, tok, _ = trained_like
    r = retrieval(model, tok, str(sample_datasets["pairs"]), max_images=40)
    assert r["images"] == 40 and r["captions"] == 200  # five captions per photo
    for way in ("t2i", "i2t"):
        values = [r[f"{way}_R@{k}"] for k in (1, 5, 10)]
        assert values == sorted(values) and values[0] >= 0 and values[-1] <= 100
    # an untrained model is near chance, far below perfect
    assert r["t2i_R@1"] < 50
