"""Streaming training data: WebDataset pipelines per source and the batch-type schedule.

Each source (a shard folder written by data_tools) becomes an endless per-rank stream of
fixed-size, tokenised batches. Endless matters: every rank runs the number of steps the
schedule says, never "until its loader runs dry", so uneven shards cannot make one rank
stop early and leave the others waiting in a collective forever.

Order inside a stream: the shard list is shuffled with a seed that depends on (seed, source,
epoch) *before* it is split by rank and then by worker; a seeded buffer shuffles samples;
only the expected members (txt, json, emb.npy) are decoded; bad samples are skipped and
counted, and each batch carries its worker's running count so the trainer can report it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import _shuffle
from webdataset.tariterators import group_by_keys, tar_file_expander

from trainer.config import DataConfig, SourceConfig

log = logging.getLogger("webmcse.data")

_URL_SCHEME = ("s3://", "gs://", "gcs://", "az://", "abfs://", "http://", "https://", "hf://")


class DataError(ValueError):
    """A training source that cannot be used; the message names it and the fix."""


@dataclass
class Source:
    """A shard folder as the trainer sees it: trusted shard list and counts from the manifest."""

    name: str
    kind: str
    path: str
    weight: float
    shards: list[str]
    n_samples: int
    image_dim: int = 0
    manifest_sha256: str = ""
    manifest: dict[str, Any] = field(default_factory=dict, repr=False)


def _read_text(url: str) -> str:
    if url.startswith(_URL_SCHEME):
        import fsspec

        with fsspec.open(url, "rt", encoding="utf-8") as fh:
            return fh.read()
    return Path(url).read_text(encoding="utf-8")


def open_source(cfg: SourceConfig, index: int) -> Source:
    """Read a source's manifest; refuse anything that could run code or is incomplete."""
    where = f"data.sources.{index}.path"
    path = cfg.path.rstrip("/")
    if path.startswith("pipe:") or ("://" in path and not path.startswith(_URL_SCHEME)):
        raise DataError(f"{where}={cfg.path!r}: only local folders and {', '.join(_URL_SCHEME)} "
                        f"URLs are read (pipe: and unknown schemes are refused)")
    manifest_url = f"{path}/manifest.json"
    try:
        text = _read_text(manifest_url)
    except FileNotFoundError:
        raise DataError(f"{where}={cfg.path!r}: no manifest.json there; build the folder with "
                        f"`webmcse-data shard-pairs` / `shard-text` first") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{manifest_url}: unreadable manifest ({exc.msg}); rebuild the dataset") from None
    kind = manifest.get("kind")
    if kind != cfg.kind:
        raise DataError(f"{where}: manifest says kind {kind!r} but the source is declared "
                        f"kind={cfg.kind!r}; fix data.sources.{index}.kind")
    shards = [s for s in manifest.get("shards", []) if s.get("n_samples", 0) > 0]
    if not shards:
        raise DataError(f"{manifest_url}: lists no non-empty shards")
    image_dim = 0
    if kind == "pairs":
        enc = manifest.get("image_encoder")
        if not enc:
            raise DataError(f"{manifest_url}: pairs without image features; run "
                            f"`webmcse-data embed {cfg.path}` first")
        image_dim = int(enc["dim"])
    for s in shards:
        name = s["name"]
        if "/" in name or name.startswith(".") or not name.endswith(".tar"):
            raise DataError(f"{manifest_url}: suspicious shard name {name!r}")
    return Source(
        name=cfg.name or Path(path).name,
        kind=kind,
        path=path,
        weight=cfg.weight,
        shards=[f"{path}/{s['name']}" for s in shards],
        n_samples=sum(int(s["n_samples"]) for s in shards),
        image_dim=image_dim,
        manifest_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        manifest=manifest,
    )


# ------------------------------------------------------------------------------ schedule


@dataclass
class Schedule:
    """Which source feeds each global step, as a pure function of the step.

    Every rank evaluates the same function, so all ranks run the same batch type at the same
    step without any communication (a caption batch on one rank and a text batch on another
    would run different collectives and hang).
    """

    text: list[Source]
    pairs: list[Source]
    mode: str
    caption_every: int
    caption_ratio: float
    steps_per_epoch: int
    seed: int

    @classmethod
    def build(cls, sources: list[Source], cfg: DataConfig, global_batch: int, seed: int) -> Schedule:
        text = [s for s in sources if s.kind == "text"]
        pairs = [s for s in sources if s.kind == "pairs"]
        n_text = sum(s.n_samples for s in text) // global_batch
        n_pair = sum(s.n_samples for s in pairs) // global_batch
        for s in sources:
            if s.n_samples < global_batch:
                raise DataError(f"source {s.name} ({s.path}) has {s.n_samples} samples, fewer than "
                                f"one global batch ({global_batch}); lower data.batch_size or add data")
        k = cfg.caption_every
        if cfg.schedule == "mcse":
            if not text:
                k, steps = 1, n_pair
            elif not pairs:
                k, steps = 0, n_text
            else:
                k = k or max(1, n_text // max(1, n_pair))
                steps = n_text + n_pair
        else:
            r = cfg.caption_ratio
            steps = n_pair if r >= 1 or not text else max(1, math.floor(n_text / (1 - r)))
        return cls(text, pairs, cfg.schedule, k, cfg.caption_ratio, max(1, steps), seed)

    def is_caption(self, step: int) -> bool:
        if not self.pairs:
            return False
        if not self.text:
            return True
        if self.mode == "mcse":
            return (step % self.steps_per_epoch) % self.caption_every == 0
        r = self.caption_ratio
        return math.floor((step + 1) * r) > math.floor(step * r)

    def source_at(self, step: int) -> Source:
        pool = self.pairs if self.is_caption(step) else self.text
        if len(pool) == 1:
            return pool[0]
        rng = random.Random(self.seed * 1_000_003 + step)
        return rng.choices(pool, weights=[s.weight for s in pool])[0]


# ------------------------------------------------------------------------------ streams


def _open_stream(url: str) -> Any:
    if url.startswith(_URL_SCHEME):
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url, "rb")


class SkipCounter:
    """webdataset exception handler that skips the bad sample and counts it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        if self.count <= 3:
            log.warning("%s: skipped a corrupt sample (%s: %s)", self.name, type(exn).__name__,
                        str(exn)[:200])
        return True


def _tar_samples(urls: list[str], handler: SkipCounter) -> Iterator[dict[str, Any]]:
    def opened() -> Iterator[dict[str, Any]]:
        for url in urls:
            try:
                yield {"url": url, "stream": _open_stream(url)}
            except Exception as exn:
                handler(exn)

    files = tar_file_expander(opened(), handler=handler)
    return group_by_keys(files, handler=handler)


def _seed(*parts: Any) -> int:
    return zlib.crc32(":".join(map(str, parts)).encode())


class SourceStream(IterableDataset):
    """Endless per-rank stream of collated batches from one source."""

    def __init__(self, source: Source, tokenizer: Any, cfg: DataConfig, *, seed: int, rank: int,
                 world: int, image_dim: int = 0) -> None:
        super().__init__()
        self.source = source
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.seed = seed
        self.rank = rank
        self.world = world
        self.image_dim = image_dim

    def _epoch_urls(self, epoch: int, slot: int, n_slots: int) -> tuple[list[str], bool]:
        """This (rank, worker) slot's shards for an epoch, and whether to split by sample.

        With at least one shard per slot, shards are dealt out after a (seed, epoch) shuffle.
        With fewer shards than slots every slot reads all shards and keeps every n-th
        sample, so small datasets still work on many ranks/workers without duplicates.
        """
        urls = list(self.source.shards)
        random.Random(_seed(self.seed, self.source.name, epoch)).shuffle(urls)
        if len(urls) >= n_slots:
            return urls[slot::n_slots], False
        return urls, True

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        slot, n_slots = self.rank * nw + wid, self.world * nw
        counter = SkipCounter(self.source.name)
        epoch = 0
        while True:
            urls, by_sample = self._epoch_urls(epoch, slot, n_slots)
            samples: Iterator[dict[str, Any]] = _tar_samples(urls, counter)
            if by_sample:
                samples = (s for i, s in enumerate(samples) if i % n_slots == slot)
            decoded = self._decoded(samples, counter, epoch)
            if self.cfg.shuffle_buffer > 1:
                decoded = _shuffle(decoded, bufsize=self.cfg.shuffle_buffer,
                                   initial=min(self.cfg.shuffle_buffer, 100),
                                   rng=random.Random(_seed(self.seed, self.source.name, epoch, slot)))
            batch: list[dict[str, Any]] = []
            produced = False
            for sample in decoded:
                batch.append(sample)
                if len(batch) == self.cfg.batch_size:
                    yield self._collate(batch, counter.count, wid)
                    produced = True
                    batch = []
            if not produced and epoch > 0:
                raise DataError(f"source {self.source.name}: a whole pass over its shards gave no "
                                f"batch for rank {self.rank} worker {wid} ({counter.count} corrupt "
                                f"samples skipped); the data is unusable or too small")
            epoch += 1

    def _decoded(self, samples: Iterator[dict[str, Any]], counter: SkipCounter,
                 epoch: int) -> Iterator[dict[str, Any]]:
        for raw in samples:
            try:
                yield self._decode(raw, epoch)
            except Exception as exn:
                counter(exn)

    def _decode(self, raw: dict[str, Any], epoch: int) -> dict[str, Any]:
        """Only the members we expect are touched; nothing is unpickled, ever."""
        key = raw["__key__"]
        text = raw["txt"].decode("utf-8") if "txt" in raw else None
        out: dict[str, Any] = {"key": key}
        if self.source.kind == "pairs":
            captions = [text] if text else []
            if "json" in raw:
                meta = json.loads(raw["json"])
                captions = [c for c in meta.get("captions", []) if isinstance(c, str)] or captions
            if not captions:
                raise ValueError(f"{key}: no caption")
            if self.cfg.caption_choice == "random" and len(captions) > 1:
                text = captions[random.Random(_seed(self.seed, epoch, key)).randrange(len(captions))]
            else:
                text = captions[0]
            if "emb.npy" not in raw:
                raise ValueError(f"{key}: no emb.npy image feature")
            emb = np.load(io.BytesIO(raw["emb.npy"]), allow_pickle=False)
            if emb.shape != (self.image_dim,):
                raise ValueError(f"{key}: image feature shape {emb.shape}, expected ({self.image_dim},)")
            if not np.isfinite(emb).all():
                raise ValueError(f"{key}: non-finite image feature")
            out["emb"] = emb.astype(np.float32)
        if not text:
            raise ValueError(f"{key}: empty text")
        out["text"] = text
        return out

    def _collate(self, samples: list[dict[str, Any]], skipped: int, wid: int) -> dict[str, Any]:
        toks = self.tokenizer([s["text"] for s in samples], max_length=self.cfg.max_len,
                              truncation=True, padding="longest", return_tensors="pt")
        batch: dict[str, Any] = {k: v for k, v in toks.items()
                                 if k in ("input_ids", "attention_mask", "token_type_ids")}
        if self.source.kind == "pairs":
            batch["image_emb"] = torch.from_numpy(np.stack([s["emb"] for s in samples]))
        batch["keys"] = [s["key"] for s in samples]
        batch["skipped"] = (wid, skipped)
        return batch


def _keep_meta(batch: Any) -> Any:
    return batch


class BatchStreams:
    """One DataLoader per source; ``next(name)`` returns that source's next batch."""

    def __init__(self, sources: list[Source], tokenizer: Any, cfg: DataConfig, *, seed: int,
                 rank: int, world: int, image_dim: int) -> None:
        self._iters: dict[str, Iterator[dict[str, Any]]] = {}
        self._skipped: dict[tuple[str, int], int] = {}
        for i, src in enumerate(sources):
            ds = SourceStream(src, tokenizer, cfg, seed=seed + 7919 * i, rank=rank, world=world,
                              image_dim=image_dim)
            loader = DataLoader(ds, batch_size=None, num_workers=cfg.num_workers,
                                collate_fn=_keep_meta, persistent_workers=cfg.num_workers > 0,
                                prefetch_factor=4 if cfg.num_workers > 0 else None)
            self._iters[src.name] = iter(loader)

    def next(self, name: str) -> dict[str, Any]:
        batch = next(self._iters[name])
        wid, skipped = batch.pop("skipped")
        self._skipped[(name, int(wid))] = int(skipped)
        return batch

    @property
    def skipped(self) -> int:
        """Corrupt samples skipped so far on this rank (all sources, all workers)."""
        return sum(self._skipped.values())
