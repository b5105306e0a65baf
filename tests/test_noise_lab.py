"""`webmcse-data split` and `webmcse-data corrupt` (the noise lab) on hand-built datasets whose
right answers are known in advance: which images are held out, which captions were corrupted,
from where, and which image is each image's nearest neighbour."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from data_tools.__main__ import main as cli
from data_tools.noise import corrupt
from data_tools.shards import DatasetError, ShardWriter, load_manifest, read_shard, shard_dicts, write_manifest
from data_tools.split import split_pairs

N_IMAGES, N_CAPS, DIM = 24, 5, 8


def _npy(vec: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, vec.astype(np.float16))
    return buf.getvalue()


def nearest_of(i: int) -> int:
    """By construction below: images come in pairs (0,1), (2,3), ... pointing the same way."""
    return i ^ 1


@pytest.fixture()
def pairs(tmp_path: Path) -> Path:
    out = tmp_path / "pairs"
    w = ShardWriter(out, max_count=7)
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(N_IMAGES // 2, DIM))
    for i in range(N_IMAGES):
        feat = directions[i // 2] * 10 + rng.normal(scale=0.05, size=DIM)  # pair partner is nearest
        caps = [f"image {i} caption {j} with distinct words" for j in range(N_CAPS)]
        w.write({"__key__": f"img{i:03d}", "jpg": bytes([i]) * 50, "txt": caps[0],
                 "json": json.dumps({"captions": caps, "source": "test"}), "emb.npy": _npy(feat)})
    write_manifest(out, {"kind": "pairs", "shards": shard_dicts(w.close()),
                         "image_encoder": {"name": "test", "dim": DIM}})
    return out


def samples(folder: Path) -> dict[str, dict]:
    m = load_manifest(folder)
    return {s["__key__"]: s for sh in m["shards"] for s in read_shard(folder / sh["name"])}


# ----------------------------------------------------------------------------------- split


def test_split_holds_out_the_keys_with_the_smallest_seeded_hash(pairs: Path, tmp_path: Path) -> None:
    summary = split_pairs(pairs, tmp_path / "train", tmp_path / "held", holdout=5, seed=3, progress=False)
    keys = [f"img{i:03d}" for i in range(N_IMAGES)]
    expected = set(sorted(keys, key=lambda k: hashlib.sha256(f"3:{k}".encode()).hexdigest())[:5])
    train, held = samples(tmp_path / "train"), samples(tmp_path / "held")
    assert set(held) == expected and set(train) == set(keys) - expected
    assert (summary.train, summary.heldout) == (19, 5)
    source = samples(pairs)
    for key, s in {**train, **held}.items():  # members copied byte for byte
        for ext in ("jpg", "txt", "json", "emb.npy"):
            assert s[ext] == source[key][ext]
    man = load_manifest(tmp_path / "held")
    assert man["split"]["role"] == "heldout" and man["split"]["holdout"] == 5
    assert man["image_encoder"] == {"name": "test", "dim": DIM}  # features stay usable


def test_split_fraction_and_refusals(pairs: Path, tmp_path: Path) -> None:
    split_pairs(pairs, tmp_path / "a", tmp_path / "b", holdout=0.25, progress=False)
    assert len(samples(tmp_path / "b")) == 6
    with pytest.raises(DatasetError, match="hold out at least one"):
        split_pairs(pairs, tmp_path / "c", tmp_path / "d", holdout=N_IMAGES, progress=False)
    with pytest.raises(DatasetError, match="overlaps the input dataset"):
        split_pairs(pairs, pairs / "train", tmp_path / "e", holdout=2, progress=False)
    with pytest.raises(DatasetError, match="exists and is not empty; pass --overwrite"):
        split_pairs(pairs, tmp_path / "a", tmp_path / "f", holdout=2, progress=False)


# ----------------------------------------------------------------------------------- noise lab


def test_corruption_is_deterministic_and_its_ground_truth_exact(pairs: Path, tmp_path: Path) -> None:
    s1 = corrupt(pairs, tmp_path / "n1", p=0.4, seed=7, progress=False)
    corrupt(pairs, tmp_path / "n2", p=0.4, seed=7, progress=False)
    corrupt(pairs, tmp_path / "n3", p=0.4, seed=8, progress=False)
    shas = [[s["sha256"] for s in load_manifest(tmp_path / n)["shards"]] for n in ("n1", "n2", "n3")]
    assert shas[0] == shas[1] and shas[0] != shas[2]

    total = N_IMAGES * N_CAPS
    n_bad = round(0.4 * total)
    clean = {f"img{i:03d}": [f"image {i} caption {j} with distinct words" for j in range(N_CAPS)]
             for i in range(N_IMAGES)}
    tally = {"none": 0, "swap": 0, "generic": 0, "near": 0}
    for key, s in samples(tmp_path / "n1").items():
        meta = json.loads(s["json"])
        assert meta["clean_captions"] == clean[key]
        assert s["txt"].decode() == meta["captions"][0]
        i = int(key[3:])
        for cap, label, src, orig in zip(meta["captions"], meta["noise"], meta["noise_from"], clean[key], strict=True):
            tally[label] += 1
            if label == "none":
                assert cap == orig and src is None
            elif label == "swap":
                assert src != key and cap in clean[src]
            elif label == "near":
                assert src == f"img{nearest_of(i):03d}" and cap in clean[src]
            else:
                assert src is None and all(cap not in caps for caps in clean.values())
    assert sum(v for k, v in tally.items() if k != "none") == n_bad
    assert max(tally["swap"], tally["generic"], tally["near"]) - min(tally["swap"], tally["generic"], tally["near"]) <= 1
    man = load_manifest(tmp_path / "n1")
    assert man["noise"]["counts"] == tally == s1.counts
    assert man["noise"]["p"] == 0.4 and man["noise"]["captions"] == total


def test_full_swap_moves_every_caption_to_another_image(pairs: Path, tmp_path: Path) -> None:
    """p = 1, swap only: MCSE's shuffled-image control. Every caption of the dataset is used
    exactly once, and never on its own image."""
    corrupt(pairs, tmp_path / "shuffled", p=1.0, kinds=("swap",), seed=0, progress=False)
    seen = []
    for key, s in samples(tmp_path / "shuffled").items():
        meta = json.loads(s["json"])
        assert meta["noise"] == ["swap"] * N_CAPS
        assert all(src != key for src in meta["noise_from"])
        assert not set(meta["captions"]) & set(meta["clean_captions"])
        seen += meta["captions"]
    assert sorted(seen) == sorted(f"image {i} caption {j} with distinct words"
                                  for i in range(N_IMAGES) for j in range(N_CAPS))


def test_p_zero_changes_no_caption(pairs: Path, tmp_path: Path) -> None:
    corrupt(pairs, tmp_path / "clean", p=0.0, progress=False)
    for s in samples(tmp_path / "clean").values():
        meta = json.loads(s["json"])
        assert meta["captions"] == meta["clean_captions"] and set(meta["noise"]) == {"none"}


def test_near_needs_features_and_bad_arguments_are_one_line(pairs: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    bare = tmp_path / "bare"
    w = ShardWriter(bare, max_count=10)
    for i in range(4):
        w.write({"__key__": f"k{i}", "jpg": b"x", "txt": f"caption {i}"})
    write_manifest(bare, {"kind": "pairs", "shards": shard_dicts(w.close())})
    with pytest.raises(DatasetError, match=r"sample k0 has no emb.npy.*run `webmcse-data embed"):
        corrupt(bare, tmp_path / "out", p=0.5, kinds=("near",), progress=False)
    corrupt(bare, tmp_path / "out2", p=0.5, kinds=("swap", "generic"), progress=False)  # no features needed
    assert cli(["corrupt", str(pairs), "--out", str(tmp_path / "x"), "--p", "1.5"]) == 2
    assert cli(["corrupt", str(pairs), "--out", str(tmp_path / "y"), "--p", "0.2", "--kinds", "typo"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert errors == ["error: --p 1.5: the fraction of corrupted captions must be in [0, 1]",
                      "error: --kinds typo: choose from swap, generic, near"]


# ----------------------------------------------------------------------------------- scoring


def test_detection_report_by_hand() -> None:
    from data_tools.score import detection_report

    labels = ["none", "swap", "swap", "generic", "none", "near"]
    flagged = [True, True, False, True, False, False]
    rep = detection_report(flagged, labels)
    assert rep["all"] == {"precision": 2 / 3, "recall": 2 / 4, "noisy": 4, "flagged": 3}
    # per kind: the other kinds are set aside (swap: pool = none, swap, swap, none)
    assert rep["swap"] == {"precision": 1 / 2, "recall": 1 / 2, "noisy": 2, "flagged": 2}
    assert rep["generic"]["precision"] == 1 / 2 and rep["generic"]["recall"] == 1.0
    assert rep["near"]["recall"] == 0.0


def test_score_pairs_keeps_the_best_captions_with_their_ground_truth(pairs: Path, tmp_path: Path,
                                                                    tiny_bert: Path) -> None:
    import torch

    from data_tools.score import score_pairs
    from trainer.model import MCSEModel

    torch.manual_seed(0)
    model = MCSEModel.from_pretrained_encoder(str(tiny_bert), image_dim=DIM, proj_dim=8)
    from transformers import AutoTokenizer

    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir, tokenizer=AutoTokenizer.from_pretrained(str(tiny_bert)))
    corrupt(pairs, tmp_path / "noisy", p=0.4, seed=1, progress=False)
    summary = score_pairs(tmp_path / "noisy", tmp_path / "kept", model_dir, top_fraction=0.6, progress=False)
    total = N_IMAGES * N_CAPS
    assert summary.captions == total and summary.kept == round(0.6 * total)
    kept_scores = []
    for s in samples(tmp_path / "kept").values():
        meta = json.loads(s["json"])
        assert len(meta["captions"]) == len(meta["noise"]) == len(meta["clean_captions"]) >= 1
        scores = meta["caption_scores"]
        kept_scores += [x for x in scores if x >= summary.threshold - 1e-5]
        assert len([x for x in scores if x >= summary.threshold - 1e-5]) == len(meta["captions"])
    assert len(kept_scores) == summary.kept
    man = load_manifest(tmp_path / "kept")["score_filter"]
    assert man["kept"] == summary.kept and set(man["detection"]) == {"all", "swap", "generic", "near"}
    assert man["detection"]["all"]["noisy"] == round(0.4 * total)


def test_margin_scores_are_own_cosine_minus_the_best_other_image(pairs: Path, tmp_path: Path,
                                                                 tiny_bert: Path) -> None:
    """Every stored score equals cos(caption, own image) - max over the other images (all 24
    are the reference set here), computed here from the model's two grounding encoders."""
    import torch
    from transformers import AutoTokenizer

    from data_tools.score import score_pairs
    from trainer.model import MCSEModel

    torch.manual_seed(1)
    model = MCSEModel.from_pretrained_encoder(str(tiny_bert), image_dim=DIM, proj_dim=8).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_bert))
    model.save_pretrained(tmp_path / "model", tokenizer=tok)
    score_pairs(pairs, tmp_path / "kept", tmp_path / "model", top_fraction=1.0, progress=False)
    src = samples(pairs)
    keys = sorted(src)
    feats = torch.stack([torch.from_numpy(np.load(io.BytesIO(src[k]["emb.npy"])).astype(np.float32)) for k in keys])
    with torch.no_grad():
        img = model.grounding_image(feats)
        for i, key in enumerate(keys):
            caps = json.loads(src[key]["json"])["captions"]
            txt = model.grounding_text(dict(tok(caps, padding=True, return_tensors="pt")))
            sims = txt @ img.T
            own = sims[:, i].clone()
            sims[:, i] = -float("inf")
            want = (own - sims.max(1).values).tolist()
            got = json.loads(samples(tmp_path / "kept")[key]["json"])["caption_scores"]
            assert got == pytest.approx(want, abs=2e-5), key


def test_oracle_filter_keeps_exactly_the_clean_captions(pairs: Path, tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from oracle_filter import oracle_filter

    corrupt(pairs, tmp_path / "noisy", p=0.4, seed=3, progress=False)
    counts = oracle_filter(tmp_path / "noisy", tmp_path / "oracle")
    kept = samples(tmp_path / "oracle")
    # Built from the fixture, not from the lab's labels: caption j of image i reads
    # "image {i} caption {j} ...", so a clean caption names its own image.
    total = 0
    for key, s in kept.items():
        meta = json.loads(s["json"])
        i = int(key[3:])
        assert meta["captions"] and all(c.startswith(f"image {i} caption ") for c in meta["captions"])
        assert s["txt"].decode() == meta["captions"][0] and set(meta["noise"]) == {"none"}
        total += len(meta["captions"])
    noisy = samples(tmp_path / "noisy")
    clean_in_noisy = sum(c.startswith(f"image {int(k[3:])} caption ") for k, s in noisy.items()
                         for c in json.loads(s["json"])["captions"])
    assert total == counts["kept"] == clean_in_noisy
    assert counts["dropped"] == round(0.4 * N_IMAGES * N_CAPS)
