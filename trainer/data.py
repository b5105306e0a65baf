"""Streaming training data: WebDataset shard streams per source, the batch-type schedule, and
the data position that makes a resumed run consume exactly what the uninterrupted run would.

**Endless per-rank streams.** Each source (a shard folder written by data_tools) becomes an
endless stream of fixed-size, tokenised batches on every rank. The trainer draws as many
batches as the schedule says, never "until a loader runs dry", so uneven shards can never make
one rank stop early and leave the others waiting in a collective.

**Order.** For epoch e, the shard list is shuffled with a seed of (seed, source, e) *before*
it is dealt out to the (rank, worker) slots, each shard to the slot with the fewest samples so
far (manifest counts), so slots differ by less than one shard. Every slot then emits exactly
the same number of batches that epoch (the smallest slot's), so all slots stay in the same
epoch and no sample appears twice within an epoch, whatever the shard sizes; the few samples
a larger slot leaves over are seen in other epochs, which deal the shards differently. A slot
reads its shards in windows of
``data.shuffle_shards`` shards, shuffles each window's samples with a seed of (seed, source,
e, slot, window), and emits them in order; batches are consecutive runs of B samples across
window and epoch boundaries. With fewer shards than slots, every slot reads all shards and
keeps every n-th sample, so small datasets work on many ranks and workers without duplicates.

**Position.** Because the order depends only on seeds and shard contents, a slot's position
is three integers: (epoch, window, offset into the shuffled window). A resumed stream starts
reading at that window and skips ``offset`` samples: the consumed part of the epoch is never
read again. Each batch carries its slot's position; the trainer keeps the latest per slot and
stores it in the checkpoint, together with which worker must come next (DataLoader workers are
consumed round-robin, so the resumed loader is rotated to continue the same sequence).

**Safety.** Only the expected members are read (txt, json, emb.npy, or image files) and
nothing is ever unpickled; shard locations are local paths or fsspec URLs (s3://, gs://, ...),
never `pipe:` commands. Bad samples are skipped and counted; each batch carries its slot's
running count for the training metrics.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import random
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys

from trainer.config import DataConfig, SourceConfig

log = logging.getLogger("webmcse.data")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_IMAGE_PIXELS = 50_000_000


class DataError(ValueError):
    """A training source that cannot be used; the message names it and the fix."""


@dataclass(frozen=True)
class ShardRecord:
    """A shard's manifest entry, as the reader checks it (0 / empty: not recorded)."""

    n_samples: int
    bytes: int = 0
    sha256: str = ""


@dataclass
class Source:
    """A shard folder as the trainer sees it: trusted shard list and counts from the manifest."""

    name: str
    kind: str
    path: str
    weight: float
    shards: list[str]
    n_samples: int
    shard_sizes: list[int] = field(default_factory=list)
    records: list[ShardRecord] = field(default_factory=list)
    image_dim: int = 0
    manifest_sha256: str = ""
    manifest: dict[str, Any] = field(default_factory=dict, repr=False)


def _scheme(path: str) -> str:
    return path.split("://", 1)[0] if "://" in path else ""


def _check_location(path: str, where: str) -> None:
    if path.startswith("pipe:"):
        raise DataError(f"{where}={path!r}: pipe: locations run shell commands and are refused; "
                        f"use a local folder or an fsspec URL such as s3://bucket/prefix")
    scheme = _scheme(path)
    if scheme and scheme != "file":
        import fsspec

        if scheme not in fsspec.available_protocols():
            raise DataError(f"{where}={path!r}: unknown URL scheme {scheme!r}")
        try:
            fsspec.get_filesystem_class(scheme)
        except ImportError as exc:
            raise DataError(f"{where}={path!r}: reading {scheme}:// needs an extra package "
                            f"({exc}); e.g. pip install 'webmcse[s3]'") from None


def _read_text(url: str) -> str:
    if _scheme(url):
        import fsspec

        with fsspec.open(url, "rt", encoding="utf-8") as fh:
            return fh.read()
    return Path(url).read_text(encoding="utf-8")


def _open_stream(url: str) -> Any:
    if _scheme(url):
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url, "rb")


def open_source(cfg: SourceConfig, index: int) -> Source:
    """Read a source's manifest; refuse anything that could run code or is incomplete."""
    where = f"data.sources.{index}.path"
    path = cfg.path.rstrip("/")
    _check_location(path, where)
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
    for s in shards:
        name = s["name"]
        if "/" in name or "\\" in name or name.startswith(".") or not name.endswith(".tar"):
            raise DataError(f"{manifest_url}: suspicious shard name {name!r}")
    image_dim = 0
    if kind == "pairs":
        enc = manifest.get("image_encoder")
        image_dim = int(enc["dim"]) if enc else 0
    return Source(
        name=cfg.name or Path(path).name,
        kind=kind,
        path=path,
        weight=cfg.weight,
        shards=[f"{path}/{s['name']}" for s in shards],
        n_samples=sum(int(s["n_samples"]) for s in shards),
        shard_sizes=[int(s["n_samples"]) for s in shards],
        records=[ShardRecord(int(s["n_samples"]), int(s.get("bytes") or 0), str(s.get("sha256") or ""))
                 for s in shards],
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
                                f"one global batch ({global_batch}); lower data.global_batch_size or add data")
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

    def describe(self) -> str:
        """What the schedule does, in words, for the run log."""
        if not self.pairs:
            return "text batches only"
        if not self.text:
            return "caption batches only"
        if self.mode == "mcse":
            return f"a caption batch every {self.caption_every} steps"
        return f"caption batches on {self.caption_ratio:.0%} of steps"

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


class SkipCounter:
    """webdataset exception handler that skips the bad sample and counts it."""

    def __init__(self, name: str, start: int = 0) -> None:
        self.name = name
        self.count = start

    def __call__(self, exn: BaseException) -> bool:
        self.count += 1
        if self.count <= 3:
            log.warning("%s: skipped a corrupt sample (%s: %s)", self.name, type(exn).__name__,
                        str(exn)[:200])
        return True

    def skip_shard(self, message: str, n_samples: int) -> None:
        """A whole shard is distrusted: every sample it should hold counts as skipped."""
        self.count += n_samples
        log.warning("%s: skipped a shard of %d samples: %s", self.name, n_samples, message)


@dataclass(frozen=True)
class ReadLimits:
    """What a shard may contain before it is distrusted (see DataConfig's fields of the same
    names). Defaults suit evaluation readers that have no config."""

    max_text_bytes: int = 1 << 20
    max_image_bytes: int = 32 << 20
    verify_shards: str = "size"
    strict: bool = False

    @classmethod
    def of(cls, cfg: DataConfig) -> ReadLimits:
        return cls(cfg.max_text_bytes, cfg.max_image_bytes, cfg.verify_shards, cfg.strict)

    def member_limit(self, ext: str) -> int:
        return self.max_image_bytes if ext in IMAGE_EXTS else self.max_text_bytes


class OversizedMember(ValueError):
    """A member larger than its field's limit: its sample is dropped and counted, its bytes
    are never read into memory (a tiny compressed member can claim gigabytes)."""


def _check_shard(url: str, expect: ShardRecord, limits: ReadLimits) -> str | None:
    """Why the shard disagrees with its manifest entry, or None. Size is one stat; sha256
    reads the whole shard once more (from the page cache for local files)."""
    if limits.verify_shards == "none" or not expect.bytes:
        return None
    if _scheme(url):
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        size = int(fs.info(path)["size"])
    else:
        size = Path(url).stat().st_size
    if size != expect.bytes:
        return f"{size} bytes, the manifest records {expect.bytes}"
    if limits.verify_shards == "sha256" and expect.sha256:
        h = hashlib.sha256()
        with _open_stream(url) as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != expect.sha256:
            return f"sha256 {h.hexdigest()[:12]}..., the manifest records {expect.sha256[:12]}..."
    return None


def _tar_members(stream: Any, url: str, wanted: set[str], limits: ReadLimits,
                 counter: SkipCounter) -> Iterator[dict[str, Any]]:
    """The wanted members of a plain (uncompressed) tar, each checked against its size limit
    from the header before its data is read; anything else is skipped without reading it."""
    import tarfile

    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                name = info.name
                if not info.isfile() or name.startswith("/") or ".." in name.split("/"):
                    continue
                base = name.rsplit("/", 1)[-1]
                ext = base.split(".", 1)[1].lower() if "." in base else ""
                if ext not in wanted:
                    continue
                limit = limits.member_limit(ext)
                if info.size > limit:
                    yield {"fname": name, "data": OversizedMember(
                        f"{url}: member {name} is {info.size} bytes, over the {limit}-byte limit for .{ext} "
                        f"(data.max_{'image' if ext in IMAGE_EXTS else 'text'}_bytes)"), "__url__": url}
                    continue
                fh = tar.extractfile(info)
                yield {"fname": name, "data": fh.read() if fh is not None else b"", "__url__": url}
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exn:
        counter(ValueError(f"{url}: unreadable from this point ({type(exn).__name__}: {exn}); a truncated or "
                           f"non-tar shard (shards are plain tars)"))


def read_tar(url: str, members: tuple[str, ...], counter: SkipCounter, limits: ReadLimits = ReadLimits(),
             expect: ShardRecord | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard with only the wanted members read; bad ones are counted. A
    shard that disagrees with its manifest entry is skipped whole and its samples counted (or,
    with data.strict, stops the run naming it)."""
    if expect is not None:
        try:
            problem = _check_shard(url, expect, limits)
        except OSError as exn:
            problem = f"cannot be read ({exn})"
        if problem:
            msg = (f"{url}: {problem}; the shard changed after its manifest was written (rebuild it, or find "
                   f"the bad copy with `webmcse-data verify`)")
            if limits.strict:
                raise DataError(msg + "; data.strict=true stops here")
            counter.skip_shard(msg, expect.n_samples)
            return
    try:
        stream = _open_stream(url)
    except Exception as exn:
        counter(exn)
        return
    with stream:
        yield from group_by_keys(_tar_members(stream, url, set(members), limits, counter), handler=counter)


def _seed(*parts: Any) -> int:
    return zlib.crc32(":".join(map(str, parts)).encode())


@dataclass
class Position:
    """Where a (rank, worker) slot stands: the next sample is ``offset`` into the shuffled
    window ``window`` of epoch ``epoch`` (in a re-dealt epoch, ``window`` counts the slot's
    segments and ``offset`` indexes the segment's window), after ``emitted`` samples of that epoch.
    ``read_skips`` counts corrupt samples in the windows *before* this one (the current window
    is re-read on resume and counts its own again); ``image_skips`` counts undecodable images
    of batches already handed out."""

    epoch: int = 0
    window: int = 0
    offset: int = 0
    emitted: int = 0
    read_skips: int = 0
    image_skips: int = 0

    def as_list(self) -> list[int]:
        return [self.epoch, self.window, self.offset, self.emitted, self.read_skips, self.image_skips]


@dataclass
class EpochPlan:
    """One slot's part of an epoch: its windows (lists of shard indices), whether shards are
    split by sample, and how many samples every slot emits this epoch."""

    windows: list[list[int]]
    by_sample: bool
    budget: int
    bases: dict[int, int] = field(default_factory=dict)
    """By-sample split: index of each shard's first sample in the epoch's sample order."""
    dropped: int = 0
    """Samples no slot emits this epoch (the larger slots' surplus over the budget)."""


def plan_epoch(sizes: list[int], seed: int, name: str, epoch: int, slot: int, n_slots: int,
               batch_size: int, window: int) -> EpochPlan:
    """The deterministic plan of an epoch (the same on every rank and worker)."""
    order = list(range(len(sizes)))
    random.Random(_seed(seed, name, epoch)).shuffle(order)
    bases: dict[int, int] = {}
    if len(order) < n_slots:  # fewer shards than slots: every slot keeps every n-th sample
        budget = (sum(sizes) // n_slots) // batch_size * batch_size
        mine = order
        by_sample = True
        start = 0
        for sid in order:
            bases[sid] = start
            start += sizes[sid]
    else:
        load = [0] * n_slots
        dealt: list[list[int]] = [[] for _ in range(n_slots)]
        for sid in order:
            target = min(range(n_slots), key=lambda s: (load[s], s))
            dealt[target].append(sid)
            load[target] += sizes[sid]
        budget = min(load) // batch_size * batch_size
        mine = dealt[slot]
        by_sample = False
    w = max(1, window)
    return EpochPlan([mine[i:i + w] for i in range(0, len(mine), w)], by_sample, budget, bases,
                     sum(sizes) - budget * n_slots)


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) of one shuffled window of an epoch as dealt to ``slot`` of a
    layout with ``n_slots`` slots and windows of ``shuffle`` shards. A re-dealt epoch gives each
    new slot a list of these: the unread rest of the old slots' windows."""

    n_slots: int
    slot: int
    window: int
    start: int
    stop: int
    shuffle: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def as_list(self) -> list[int]:
        return [self.n_slots, self.slot, self.window, self.start, self.stop, self.shuffle]


@dataclass(frozen=True)
class Layout:
    """How a source's epochs are dealt: slots (ranks x workers), per-device batch, window."""

    world: int
    workers: int
    batch: int
    shuffle: int

    @property
    def n_slots(self) -> int:
        return self.world * self.workers

    def as_dict(self) -> dict[str, int]:
        return {"world": self.world, "workers": self.workers, "batch": self.batch, "shuffle_shards": self.shuffle}

    @classmethod
    def of(cls, saved: dict[str, Any], default_batch: int, default_shuffle: int) -> Layout:
        return cls(int(saved["world"]), int(saved["workers"]), int(saved.get("batch", default_batch)),
                   int(saved.get("shuffle_shards", default_shuffle)))


def window_sizes(plan: EpochPlan, sizes: list[int], slot: int, n_slots: int) -> list[int]:
    """Samples in each of a slot's windows by manifest counts (exact unless samples are corrupt)."""
    out = []
    for shard_ids in plan.windows:
        n = 0
        for sid in shard_ids:
            if plan.by_sample:
                base = plan.bases.get(sid, 0)
                n += sum(1 for i in range(sizes[sid]) if (base + i) % n_slots == slot)
            else:
                n += sizes[sid]
        out.append(n)
    return out


def remaining_segments(sizes: list[int], seed: int, name: str, epoch: int, slot: int, layout: Layout,
                       pos: Position, explicit: list[list[Segment]] | None) -> list[Segment]:
    """What a slot of ``layout`` had still to read of ``epoch`` at ``pos``, as segments."""
    if pos.epoch > epoch:
        return []
    if pos.epoch < epoch:
        pos = Position(epoch=epoch)
    if explicit is not None:
        segs = explicit[slot]
        if pos.window >= len(segs):
            return []
        first = segs[pos.window]
        head = Segment(first.n_slots, first.slot, first.window, max(first.start, pos.offset), first.stop,
                       first.shuffle)
        return [seg for seg in (head, *segs[pos.window + 1:]) if seg.size > 0]
    plan = plan_epoch(sizes, seed, name, epoch, slot, layout.n_slots, layout.batch, max(1, layout.shuffle))
    left = plan.budget - pos.emitted
    out = []
    counts = window_sizes(plan, sizes, slot, layout.n_slots)
    for w in range(pos.window, len(plan.windows)):
        if left <= 0:
            break
        start = pos.offset if w == pos.window else 0
        take = min(counts[w] - start, left)
        if take > 0:
            out.append(Segment(layout.n_slots, slot, w, start, start + take, layout.shuffle))
            left -= take
    return out


def deal_segments(remaining: list[Segment], n_slots: int, batch: int) -> tuple[list[list[Segment]], int, int]:
    """Split the concatenated remaining samples into equal, batch-aligned contiguous shares, one
    per new slot: (shares, samples per slot, samples left over for this epoch)."""
    total = sum(seg.size for seg in remaining)
    share = (total // n_slots) // batch * batch
    out: list[list[Segment]] = [[] for _ in range(n_slots)]
    k, room = 0, share
    for seg in remaining:
        start = seg.start
        while start < seg.stop and k < n_slots:
            if room == 0:
                k, room = k + 1, share
                continue
            take = min(seg.stop - start, room)
            out[k].append(Segment(seg.n_slots, seg.slot, seg.window, start, start + take, seg.shuffle))
            start += take
            room -= take
        if k >= n_slots or share == 0:
            break
    return out, share, total - share * n_slots


def redeal(source: Source, seed: int, old_layout: Layout, old_positions: dict[int, Position],
           old_spec: dict[int, list[list[Segment]]], new_layout: Layout) -> tuple[dict[int, list[list[Segment]]],
                                                                                  dict[int, dict[str, int]]]:
    """The epochs in progress under ``old_layout`` re-dealt to ``new_layout``: for each epoch from
    the earliest any old slot is in to the latest any has entered (or that was already re-dealt),
    the unread samples of every old slot, concatenated in slot order and split into equal shares.
    Nothing read before is dealt again, so no sample repeats within an epoch; what does not fill
    a batch in every new slot is left over for the epoch, as in any epoch. ``old_positions`` maps
    every old global slot to its position (a slot never consumed is at the start of epoch 0)."""
    positions = [old_positions.get(s, Position()) for s in range(old_layout.n_slots)]
    first = min(p.epoch for p in positions)
    last = max([p.epoch for p in positions] + [e for e in old_spec if e >= first])
    spec: dict[int, list[list[Segment]]] = {}
    report: dict[int, dict[str, int]] = {}
    for epoch in range(first, last + 1):
        rest: list[Segment] = []
        for slot, pos in enumerate(positions):
            rest += remaining_segments(source.shard_sizes, seed, source.name, epoch, slot, old_layout, pos,
                                       old_spec.get(epoch))
        shares, share, left = deal_segments(rest, new_layout.n_slots, new_layout.batch)
        spec[epoch] = shares
        report[epoch] = {"remaining": sum(seg.size for seg in rest), "per_slot": share, "left_over": left}
    return spec, report


def safe_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Any:
    """Decode an image after checking its declared size (a decompression bomb never decodes)."""
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ValueError(f"image refused before decoding: {exc}") from None
        w, h = img.size
        if w * h > max_pixels:
            raise ValueError(f"image of {w}x{h} pixels exceeds the {max_pixels} pixel limit")
        return img.convert("RGB")


class SourceStream(IterableDataset):
    """Endless per-rank stream of collated batches from one source."""

    def __init__(self, source: Source, tokenizer: Any, cfg: DataConfig, *, seed: int, rank: int,
                 world: int, image_dim: int = 0, image_transform: Callable[[Any], torch.Tensor] | None = None,
                 start: dict[int, Position] | None = None, rotation: int = 0,
                 spec: dict[int, list[list[Segment]]] | None = None) -> None:
        super().__init__()
        self.source = source
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.seed = seed
        self.rank = rank
        self.world = world
        self.image_dim = image_dim
        self.image_transform = image_transform
        self.start = start or {}
        self.rotation = rotation
        self.spec = spec or {}
        self.batch_size = device_batch(cfg, world)
        self.limits = ReadLimits.of(cfg)
        if source.kind == "text":
            self.members: tuple[str, ...] = ("txt",)
        elif image_transform is not None:
            self.members = ("txt", "json", *IMAGE_EXTS)
        else:
            self.members = ("txt", "json", "emb.npy")

    # -- the deterministic sample order -------------------------------------------------

    def _window(self, epoch: int, slot: int, n_slots: int, window: int, shuffle: int,
                counter: SkipCounter) -> list[dict[str, Any]]:
        """Every usable sample of one window of ``slot`` (of a layout with ``n_slots`` slots and
        windows of ``shuffle`` shards) in epoch ``epoch``, in its shuffled order. A function of
        those numbers alone, so any later layout can read the rest of an old slot's window."""
        plan = plan_epoch(self.source.shard_sizes, self.seed, self.source.name, epoch, slot, n_slots, 1,
                          max(1, shuffle))
        out: list[dict[str, Any]] = []
        for sid in plan.windows[window]:
            base = plan.bases.get(sid, 0)
            record = self.source.records[sid] if self.source.records else None
            for idx, raw in enumerate(read_tar(self.source.shards[sid], self.members, counter, self.limits, record)):
                if plan.by_sample and (base + idx) % n_slots != slot:
                    continue
                try:
                    out.append(self._decode(raw, epoch))
                except Exception as exn:
                    counter(exn)
        if shuffle > 0:
            random.Random(_seed(self.seed, self.source.name, epoch, slot, window)).shuffle(out)
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        lw = (wid + self.rotation) % nw  # logical worker: survives a rotated restart
        slot, n_slots = self.rank * nw + lw, self.world * nw
        pos = Position(**vars(self.start.get(lw, Position())))
        reads = SkipCounter(self.source.name, pos.read_skips)
        images = SkipCounter(self.source.name, pos.image_skips)
        batch: list[dict[str, Any]] = []
        empty_epochs = 0
        short_warned = False
        shuffle = self.cfg.shuffle_shards
        while True:
            # An epoch is either dealt by the plan (windows of this slot, read until the budget)
            # or, after a change of layout, re-dealt (segments of old slots' windows).
            segments = self.spec[pos.epoch][slot] if pos.epoch in self.spec else None
            if segments is None:
                plan = plan_epoch(self.source.shard_sizes, self.seed, self.source.name, pos.epoch, slot, n_slots,
                                  self.batch_size, max(1, shuffle))
                units = [Segment(n_slots, slot, w, 0, 1 << 62, shuffle) for w in range(len(plan.windows))]
                budget = plan.budget
            else:
                units, budget = segments, sum(seg.size for seg in segments)
            produced = False
            while pos.window < len(units) and pos.emitted < budget:
                unit = units[pos.window]
                pos.read_skips = reads.count
                samples = self._window(pos.epoch, unit.slot, unit.n_slots, unit.window, unit.shuffle, reads)
                pos.offset = max(pos.offset, unit.start)
                end = min(unit.stop, len(samples))
                while pos.offset < end and pos.emitted < budget:
                    batch.append(samples[pos.offset])
                    pos.offset += 1
                    pos.emitted += 1
                    produced = True
                    if len(batch) == self.batch_size:
                        out = self._collate(batch, images)
                        pos.image_skips = images.count
                        out["pos"] = (lw, *pos.as_list())
                        out["skipped"] = reads.count + images.count
                        yield out
                        batch = []
                if pos.offset >= end:
                    pos.window, pos.offset = pos.window + 1, 0
            if pos.emitted < budget and not short_warned:
                short_warned = True
                log.warning("source %s: worker %d of rank %d ran out of samples %d short of its epoch "
                            "budget (corrupt samples?); it continues with its next epoch", self.source.name,
                            lw, self.rank, budget - pos.emitted)
            pos.epoch, pos.window, pos.offset, pos.emitted = pos.epoch + 1, 0, 0, 0
            empty_epochs = 0 if produced or budget == 0 else empty_epochs + 1
            if empty_epochs >= 2:
                raise DataError(f"source {self.source.name}: two whole passes gave no usable sample to "
                                f"rank {self.rank} worker {lw} ({reads.count} corrupt samples skipped); "
                                f"the data is unusable")

    # -- decoding and collation ----------------------------------------------------------

    def _decode(self, raw: dict[str, Any], epoch: int) -> dict[str, Any]:
        """Only the members we expect are touched; nothing is unpickled, ever."""
        key = raw["__key__"]
        for value in raw.values():
            if isinstance(value, OversizedMember):
                raise value
        text = raw["txt"].decode("utf-8") if "txt" in raw else None
        out: dict[str, Any] = {"key": key}
        if self.source.kind == "pairs":
            captions = [text] if text else []
            if "json" in raw:
                meta = json.loads(raw["json"])
                captions = [c for c in meta.get("captions", []) if isinstance(c, str) and c] or captions
            if not captions:
                raise ValueError(f"{key}: no caption")
            index = self._caption_index(key, epoch, len(captions))
            text = captions[index]
            noise = meta.get("noise") if "json" in raw else None
            if isinstance(noise, list) and len(noise) == len(captions):
                out["noisy"] = noise[index] != "none"  # the noise lab's ground truth, for the logs
            if self.image_transform is not None:
                ext = next((e for e in IMAGE_EXTS if e in raw), None)
                if ext is None:
                    raise ValueError(f"{key}: no image member")
                out["image_bytes"] = raw[ext]  # decoded at collation, after shuffling
            else:
                if "emb.npy" not in raw:
                    raise ValueError(f"{key}: no emb.npy image feature")
                emb = np.load(io.BytesIO(raw["emb.npy"]), allow_pickle=False)
                if emb.shape != (self.image_dim,):
                    raise ValueError(f"{key}: image feature shape {emb.shape}, expected ({self.image_dim},)")
                if not np.isfinite(emb).all():
                    raise ValueError(f"{key}: non-finite image feature")
                out["emb"] = emb
        if not text:
            raise ValueError(f"{key}: empty text")
        out["text"] = text
        return out

    def _caption_index(self, key: str, epoch: int, n: int) -> int:
        """once: a fixed draw per (seed, key) for the whole run; epoch: a new draw every epoch."""
        if n == 1 or self.cfg.caption_choice == "first":
            return 0
        parts = (self.seed, key) if self.cfg.caption_choice == "once" else (self.seed, epoch, key)
        return random.Random(_seed(*parts)).randrange(n)

    def _collate(self, samples: list[dict[str, Any]], image_skips: SkipCounter) -> dict[str, Any]:
        toks = self.tokenizer([s["text"] for s in samples], max_length=self.cfg.max_len,
                              truncation=True, padding="longest", return_tensors="pt")
        batch: dict[str, Any] = {k: v for k, v in toks.items()
                                 if k in ("input_ids", "attention_mask", "token_type_ids")}
        if self.source.kind == "pairs":
            if self.image_transform is not None:
                images = []
                for s in samples:
                    try:
                        images.append(self.image_transform(safe_image(s["image_bytes"])))
                    except Exception as exn:  # a corrupt image: reuse a neighbour, count it
                        image_skips(exn)
                        images.append(None)
                good = [im for im in images if im is not None]
                if not good:
                    raise DataError(f"source {self.source.name}: a whole batch of undecodable images")
                batch["image"] = torch.stack([im if im is not None else good[0] for im in images])
            else:
                batch["image_emb"] = torch.from_numpy(np.stack([s["emb"] for s in samples]).astype(np.float32))
        if self.source.kind == "pairs" and all("noisy" in s for s in samples):
            batch["noisy"] = torch.tensor([s["noisy"] for s in samples], dtype=torch.bool)
        batch["keys"] = [s["key"] for s in samples]
        return batch


def source_seed(seed: int, index: int) -> int:
    """The data-order seed of the index-th source (distinct per source, stable across runs)."""
    return seed + 7919 * index


def check_layouts(sources: list[Source], cfg: DataConfig, world: int, seed: int) -> None:
    """Fail before any model is loaded when a source cannot feed every (rank, worker) slot."""
    for i, src in enumerate(sources):
        check_layout(src, world, cfg.num_workers, device_batch(cfg, world), source_seed(seed, i))


def device_batch(cfg: DataConfig, world: int) -> int:
    """Sentences per rank per step (the config's global batch split over the ranks)."""
    return cfg.global_batch_size // world


def check_layout(source: Source, world: int, workers: int, batch_size: int, seed: int) -> EpochPlan:
    """Epoch 0's plan for slot 0, after checking that every slot gets at least one batch."""
    n_slots = world * max(1, workers)
    plan = plan_epoch(source.shard_sizes, seed, source.name, 0, 0, n_slots, batch_size, 1)
    if plan.budget == 0:
        raise DataError(f"source {source.name} ({source.path}): {source.n_samples} samples in "
                        f"{len(source.shards)} shards cannot give each of {world} rank(s) x {max(1, workers)} "
                        f"worker(s) one batch of {batch_size}; lower data.num_workers or data.global_batch_size")
    if plan.dropped > 0.1 * source.n_samples:
        log.warning("source %s: %d shards are too few or too uneven for %d slots (ranks x workers): %.0f%% of "
                    "the samples wait for a later epoch each epoch; more, smaller shards fix this",
                    source.name, len(source.shards), n_slots, 100 * plan.dropped / source.n_samples)
    return plan


def _keep(batch: Any) -> Any:
    return batch


class _ThreadPrefetch:
    """Runs a batch iterator in one background thread, a few batches ahead.

    With data.num_workers=0 there is no worker process, and reading, decoding and tokenising
    would run on the main process between steps. Here they run beside the step instead: the
    tokeniser and the step's kernels release the GIL. The stream's order, its data positions
    (each batch carries its own) and its exceptions are those of the synchronous iterator; the
    stream draws nothing from torch's global RNG (sample order is seeded per window, image
    preprocessing is deterministic), so the step's dropout masks are untouched.
    """

    def __init__(self, it: Iterator[dict[str, Any]], depth: int, name: str) -> None:
        import queue
        import threading
        import weakref

        self._queue: Any = queue.Queue(maxsize=depth)
        stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(it, self._queue, stop), daemon=True,
                                        name=f"webmcse-data-{name}")
        self._thread.start()
        # The thread holds no reference to this object: once the stream is dropped, it stops.
        weakref.finalize(self, stop.set)

    @staticmethod
    def _fill(it: Iterator[dict[str, Any]], out: Any, stop: Any) -> None:
        import queue

        while not stop.is_set():
            try:
                item: Any = ("batch", next(it))
            except BaseException as exc:  # handed to the consumer, raised there
                item = ("error", exc)
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.5)
                    break
                except queue.Full:
                    continue
            if item[0] == "error":
                return

    def __iter__(self) -> _ThreadPrefetch:
        return self

    def __next__(self) -> dict[str, Any]:
        kind, value = self._queue.get()
        if kind == "error":
            self._queue.put((kind, value))  # every later call fails the same way
            raise value
        return value


class BatchStreams:
    """One DataLoader per source; ``next(name)`` returns that source's next batch.

    Tracks the data position of every (source, logical worker) from the batches actually
    consumed, which :meth:`state` returns for the checkpoint. The constructor restores it:
    ``state`` is this rank's saved state; when the layout changed (world size, workers,
    per-device batch or window), ``all_states`` must hold every old rank's state, and the epochs
    in progress are re-dealt to the new slots (:func:`redeal`) so they continue exactly.
    """

    def __init__(self, sources: list[Source], tokenizer: Any, cfg: DataConfig, *, seed: int, rank: int,
                 world: int, image_dim: int, image_transform: Callable[[Any], torch.Tensor] | None = None,
                 state: dict[str, Any] | None = None, all_states: list[dict[str, Any]] | None = None) -> None:
        self.nw = max(1, cfg.num_workers)
        self.world = world
        self.rank = rank
        self.layout = Layout(world, self.nw, device_batch(cfg, world), cfg.shuffle_shards)
        self._iters: dict[str, Iterator[dict[str, Any]]] = {}
        self._pos: dict[str, dict[int, list[int]]] = {}
        self._skipped: dict[tuple[str, int], int] = {}
        self._carried: dict[str, int] = {}
        self._rotation: dict[str, int] = {}
        self._consumed: dict[str, int] = {}
        self._spec: dict[str, dict[int, list[list[Segment]]]] = {}
        self.last_epoch: dict[str, int] = {}
        """Per source, the data epoch of the batch :meth:`next` returned last."""
        self.redealt: dict[str, dict[int, dict[str, int]]] = {}
        """Per source, the epochs re-dealt at this start and their counts (empty otherwise)."""
        for i, src in enumerate(sources):
            positions, spec, rotation = self._restore(src, source_seed(seed, i), state or {}, all_states)
            self._pos[src.name] = {lw: p.as_list() for lw, p in positions.items()}
            self._spec[src.name] = spec
            self._rotation[src.name] = rotation
            self._consumed[src.name] = 0
            check_layout(src, world, cfg.num_workers, device_batch(cfg, world), source_seed(seed, i))
            ds = SourceStream(src, tokenizer, cfg, seed=source_seed(seed, i), rank=rank, world=world,
                              image_dim=image_dim, image_transform=image_transform, start=positions,
                              rotation=rotation, spec=spec)
            loader = DataLoader(ds, batch_size=None, num_workers=cfg.num_workers, collate_fn=_keep,
                                persistent_workers=cfg.num_workers > 0,
                                prefetch_factor=4 if cfg.num_workers > 0 else None)
            # Tokenisation never runs on the step's critical path: in the worker processes, or
            # without workers in a background thread of this process.
            self._iters[src.name] = iter(loader) if cfg.num_workers > 0 else \
                _ThreadPrefetch(iter(loader), depth=4, name=src.name)

    @staticmethod
    def _spec_of(saved: dict[str, Any]) -> dict[int, list[list[Segment]]]:
        return {int(e): [[Segment(*seg) for seg in slot] for slot in slots]
                for e, slots in saved.get("spec", {}).items()}

    def _restore(self, src: Source, seed: int, state: dict[str, Any], all_states: list[dict[str, Any]] | None
                 ) -> tuple[dict[int, Position], dict[int, list[list[Segment]]], int]:
        """(this rank's slot positions by logical worker, re-dealt epochs, worker rotation)."""
        if not state.get(src.name) and all_states:
            state = all_states[0]  # a rank the old layout did not have: any old rank's record will do
        saved = state.get(src.name)
        if not saved:
            return {}, {}, 0
        meta = state.get("_layout", {})
        old = Layout.of(meta, self.layout.batch, self.layout.shuffle) if meta else self.layout
        if old == self.layout:
            positions = {int(k): Position(*v) for k, v in saved.get("positions", {}).items()}
            return positions, self._spec_of(saved), int(saved.get("next_worker", 0))
        if not all_states or len(all_states) != old.world:
            raise DataError(f"source {src.name}: the checkpoint's data position was saved with {old.world} rank(s); "
                            f"resuming with another layout needs every rank's data_rank*.json of that checkpoint")
        # Every old slot's position, by global slot id (rank * workers + logical worker).
        old_positions: dict[int, Position] = {}
        for r, st in enumerate(all_states):
            for lw, p in st.get(src.name, {}).get("positions", {}).items():
                old_positions[r * old.workers + int(lw)] = Position(*p)
        carried = sum(p.read_skips + p.image_skips for p in old_positions.values())
        self._carried[src.name] = carried if self.rank == 0 else 0
        old_spec: dict[int, list[list[Segment]]] = {}
        for st in all_states:  # ranks ahead by an epoch no longer keep the one behind them
            old_spec.update(self._spec_of(st.get(src.name, {})))
        spec, report = redeal(src, seed, old, old_positions, old_spec, self.layout)
        self.redealt[src.name] = report
        first = min(spec)
        if self.rank == 0:
            for epoch, r in report.items():
                log.warning("source %s: epoch %d re-dealt from %d slots (%d rank(s) x %d worker(s), batch %d) to %d "
                            "(%d x %d, batch %d): %d unread samples, %d to each slot, %d left over", src.name, epoch,
                            old.n_slots, old.world, old.workers, old.batch, self.layout.n_slots, self.layout.world,
                            self.layout.workers, self.layout.batch, r["remaining"], r["per_slot"], r["left_over"])
        positions = {lw: Position(epoch=first) for lw in range(self.nw)}
        return positions, spec, 0

    def next(self, name: str) -> dict[str, Any]:
        batch = next(self._iters[name])
        lw, *pos = batch.pop("pos")
        self._pos[name][int(lw)] = [int(x) for x in pos]
        self.last_epoch[name] = int(pos[0])
        self._skipped[(name, int(lw))] = int(batch.pop("skipped"))
        self._consumed[name] += 1
        return batch

    def state(self) -> dict[str, Any]:
        """This rank's data position: per source, per logical worker, who comes next, and the
        re-dealt epochs still ahead (the same on every rank)."""
        out: dict[str, Any] = {"_layout": self.layout.as_dict()}
        for name, positions in self._pos.items():
            nxt = (self._rotation[name] + self._consumed[name]) % self.nw
            current = min((p[0] for p in positions.values()), default=0)
            spec = {str(e): [[seg.as_list() for seg in slot] for slot in slots]
                    for e, slots in self._spec[name].items() if e >= current}
            out[name] = {"positions": {str(k): v for k, v in sorted(positions.items())}, "next_worker": nxt,
                         "spec": spec}
        return out

    @property
    def skipped(self) -> int:
        """Corrupt samples skipped so far on this rank (all sources, all workers, and on rank 0 those
        counted before a change of layout)."""
        return sum(self._skipped.values()) + sum(self._carried.values())
