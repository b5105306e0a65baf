"""Tokenisation stays off the training step's critical path.

With DataLoader workers it runs in the worker processes; with data.num_workers=0 a background
thread of the training process reads, decodes and tokenises a few batches ahead. The thread
must not change what the stream yields (order, positions, skipped counts) nor hide its errors.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from trainer.config import DataConfig, SourceConfig
from trainer.data import BatchStreams, DataError, SourceStream, open_source, source_seed


@pytest.fixture(scope="module")
def tokenizer(tiny_bert: Path):
    return AutoTokenizer.from_pretrained(tiny_bert)


def test_without_workers_a_thread_tokenises_ahead_and_the_stream_is_unchanged(sample_datasets, tokenizer) -> None:
    source = open_source(SourceConfig(path=str(sample_datasets["text"]), kind="text", name="t"), 0)
    cfg = DataConfig(global_batch_size=16, num_workers=0, shuffle_shards=2)

    callers: list[str] = []
    real_call = type(tokenizer).__call__

    class Spy(type(tokenizer)):  # records which thread tokenises
        def __call__(self, *a, **k):
            callers.append(threading.current_thread().name)
            return real_call(self, *a, **k)

    spy = Spy.from_pretrained(tokenizer.name_or_path)
    streams = BatchStreams([source], spy, cfg, seed=3, rank=0, world=1, image_dim=0)
    got = [streams.next("t") for _ in range(6)]
    assert callers and all(name.startswith("webmcse-data-") for name in callers), callers
    assert threading.current_thread().name not in callers

    # The same batches, in the same order, as the synchronous stream of that source.
    reference = iter(SourceStream(source, tokenizer, cfg, seed=source_seed(3, 0), rank=0, world=1))
    for batch in got:
        want = next(reference)
        assert batch["keys"] == want["keys"]
        assert torch.equal(batch["input_ids"], want["input_ids"])
    state = streams.state()["t"]
    assert state["next_worker"] == 0 and list(state["positions"]) == ["0"]
    assert streams.skipped == 0


def test_without_workers_stream_errors_reach_the_training_loop(tmp_path: Path, sample_datasets, tokenizer,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    source = open_source(SourceConfig(path=str(sample_datasets["text"]), kind="text", name="t"), 0)
    cfg = DataConfig(global_batch_size=16, num_workers=0, shuffle_shards=2)

    def broken(self, epoch, slot, n_slots, window, shuffle, counter):
        raise DataError("source t: shard 000000.tar vanished")

    monkeypatch.setattr(SourceStream, "_window", broken)
    streams = BatchStreams([source], tokenizer, cfg, seed=3, rank=0, world=1, image_dim=0)
    for _ in range(2):  # raised on the consumer's side, and again on every later call
        with pytest.raises(DataError, match="vanished"):
            streams.next("t")


def test_the_data_thread_stops_when_its_stream_is_dropped(sample_datasets, tokenizer) -> None:
    import gc
    import time

    source = open_source(SourceConfig(path=str(sample_datasets["text"]), kind="text", name="gone"), 0)
    cfg = DataConfig(global_batch_size=16, num_workers=0, shuffle_shards=2)
    streams = BatchStreams([source], tokenizer, cfg, seed=3, rank=0, world=1, image_dim=0)
    streams.next("gone")
    assert any(t.name == "webmcse-data-gone" for t in threading.enumerate())
    del streams
    gc.collect()
    deadline = time.monotonic() + 10
    while any(t.name == "webmcse-data-gone" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(t.name == "webmcse-data-gone" for t in threading.enumerate())
