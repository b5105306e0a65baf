"""The per-record work of ``shard-pairs``, shaped for a process pool with ordered output.

Reading the inputs, downloading (:func:`prefetch`, threads: it is all waiting) and writing
shards happen in the main process; the CPU work in between — reading local image bytes,
header checks, the full decode, perceptual hashing, re-encoding — is done here on *chunks*
of consecutive records. Chunks are cut from
the input order by a fixed size, mapped over ``--workers`` processes, and consumed strictly
in submission order, so the output does not depend on how many workers ran, and global
deduplication can stay a simple sequential pass in the writer.

This module imports no torch/webdataset, so spawned workers start in well under a second.
"""

from __future__ import annotations

import hashlib
import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from data_tools.dedup import image_phash
from data_tools.download import Downloader, DownloadOptions, FetchResult
from data_tools.filters import (
    STORED_FORMATS,
    FilterOptions,
    ImageOptions,
    caption_problem,
    inspect_image,
    normalize_caption,
    reencode_image,
)
from data_tools.sources import Pair

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class PrepareConfig:
    """Everything a worker needs; pickled once per chunk (a few hundred bytes)."""

    filters: FilterOptions = field(default_factory=FilterOptions)
    images: ImageOptions = field(default_factory=ImageOptions)
    download: DownloadOptions = field(default_factory=DownloadOptions)
    phash: bool = True


@dataclass
class Prepared:
    """A record after the worker: either a drop ``reason`` or a ready sample."""

    index: int
    key: str
    source: str
    reason: str | None = None
    detail: str = ""
    captions: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    ext: str = ""
    data: bytes = b""
    width: int = 0
    height: int = 0
    sha256: str = ""
    """Of the original bytes (downloaded or read), before any re-encode: the dedup identity."""
    phash: int | None = None
    clip_score: float | None = None


_DOWNLOADERS: dict[DownloadOptions, Downloader] = {}


def _downloader(opts: DownloadOptions) -> Downloader:
    """One downloader (and thread pool) per process and option set, reused across chunks."""
    dl = _DOWNLOADERS.get(opts)
    if dl is None:
        dl = _DOWNLOADERS[opts] = Downloader(opts)
    return dl


def _caption_verdict(captions: list[str], opts: FilterOptions) -> tuple[list[str], str | None]:
    """(normalised captions that pass, drop reason if none does)."""
    cleaned = [normalize_caption(c) for c in captions]
    good = [c for c in cleaned if caption_problem(c, opts) is None]
    if not good:
        return [], (caption_problem(cleaned[0], opts) if cleaned else "caption_missing")
    return good, None


def _check_captions(pair: Pair, opts: FilterOptions) -> str | None:
    good, reason = _caption_verdict(pair.captions, opts)
    if reason is None:
        pair.captions = good
    return reason


def prefetch(records: Iterable[tuple[int, Pair]], cfg: PrepareConfig,
             window: int = 0) -> Iterator[tuple[int, Pair]]:
    """Download the URL records ahead of the CPU stage, in the main process's threads.

    Network waits are I/O (the GIL is released), so threads here keep ``threads`` requests
    in flight regardless of how many CPU workers run, and a URL that hangs until the timeout
    holds one thread, not a whole chunk of work. Output order is input order; at most
    ``window`` (default 8 x threads) records are buffered. Records whose captions will be
    dropped anyway are not downloaded. A failed fetch becomes the record's drop reason.
    """
    threads = max(1, cfg.download.threads)
    window = window or max(64, 8 * threads)
    dl = Downloader(cfg.download)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="prefetch")
    pending: deque[tuple[int, Pair, Future[FetchResult] | None]] = deque()

    def submit(index: int, pair: Pair) -> None:
        needs = (pair.url is not None and pair.image_bytes is None and pair.error is None
                 and _caption_verdict(pair.captions, cfg.filters)[1] is None)
        pending.append((index, pair, pool.submit(dl.fetch, pair.url) if needs else None))

    def finish(index: int, pair: Pair, fut: Future[FetchResult] | None) -> tuple[int, Pair]:
        if fut is not None:
            res = fut.result()
            if res.reason is None:
                pair.image_bytes = res.data
            else:
                pair.error, pair.meta = res.reason, {"detail": pair.url}
        return index, pair

    it = iter(records)
    try:
        for index, pair in it:
            submit(index, pair)
            while len(pending) >= window:
                yield finish(*pending.popleft())
        while pending:
            yield finish(*pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def prepare_chunk(cfg: PrepareConfig, chunk: list[tuple[int, Pair]]) -> list[Prepared]:
    """Captions first (cheap, and saves downloading images whose caption is dropped anyway),
    then all the chunk's downloads concurrently, then the image work record by record."""
    out: list[Prepared] = []
    todo: list[tuple[Prepared, Pair]] = []
    for index, pair in chunk:
        rec = Prepared(index=index, key=pair.key, source=pair.source)
        out.append(rec)
        if pair.error:
            rec.reason, rec.detail = pair.error, str(pair.meta.get("detail", ""))
            continue
        rec.reason = _check_captions(pair, cfg.filters)
        if rec.reason is None:
            todo.append((rec, pair))
    urls = [pair.url for _, pair in todo if pair.url is not None and pair.image_bytes is None]
    fetched = iter(_downloader(cfg.download).fetch_many(urls)) if urls else iter(())
    for rec, pair in todo:
        data = pair.image_bytes
        if data is None and pair.url is not None:
            res = next(fetched)
            if res.reason is not None:
                rec.reason, rec.detail = res.reason, pair.url
                continue
            data = res.data
        elif data is None:
            try:
                data = Path(pair.image_path or "").read_bytes()
            except OSError as exc:
                rec.reason, rec.detail = "image_missing", f"{pair.image_path}: {exc.strerror or exc}"
                continue
        _prepare_image(rec, pair, data or b"", cfg)
    return out


def _prepare_image(rec: Prepared, pair: Pair, data: bytes, cfg: PrepareConfig) -> None:
    info, reason, img = inspect_image(data, cfg.filters)
    if reason is not None or info is None:
        rec.reason = reason or "image_undecodable"
        return
    rec.sha256 = hashlib.sha256(data).hexdigest()
    meta = dict(pair.meta)
    if pair.url is not None:
        meta["url"] = pair.url
    stored, ext, width, height = data, info.format, info.width, info.height
    if img is not None:
        try:
            if cfg.phash:
                rec.phash = image_phash(img)
            redone = reencode_image(img, info, cfg.images)
        except Exception:  # a decoder that loaded yet fails on convert(): treat as corrupt
            rec.reason = "image_undecodable"
            return
        if redone is not None:
            stored, new = redone
            ext, width, height = new.format, new.width, new.height
            if (width, height) != (info.width, info.height):
                meta["original_width"], meta["original_height"] = info.width, info.height
    elif ext not in STORED_FORMATS:
        rec.reason = "image_format_unsupported"  # needs a decode to convert; verify_decode is off
        return
    rec.captions, rec.meta = pair.captions, meta
    rec.ext, rec.data, rec.width, rec.height = ext, stored, width, height


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, window: int = 0) -> Iterator[R]:
    """``map(fn, items)`` over ``workers`` processes, results in input order, with at most
    ``window`` (default 2*workers) items in flight, so a fast reader never buffers the whole
    input and a slow chunk only delays, never reorders, what follows it.

    ``workers <= 1`` runs in this process: no pickling, same results.
    """
    if workers <= 1:
        for item in items:
            yield fn(item)
        return
    window = window or 2 * workers
    # spawn, not fork: the parent may hold torch/CUDA state and threads (tqdm, downloads).
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    pending: deque[Future[R]] = deque()
    it = iter(items)
    try:
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                break
        while pending:
            result = pending.popleft().result()
            for item in it:
                pending.append(pool.submit(fn, item))
                break
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
