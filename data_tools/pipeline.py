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

import ctypes
import hashlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from data_tools.dedup import image_phash
from data_tools.download import Downloader, DownloadOptions, FetchResult
from data_tools.filters import (
    FilterOptions,
    ImageOptions,
    caption_problem,
    encode_image,
    inspect_image,
    normalize_caption,
    resize_image,
)
from data_tools.sources import Pair

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger("webmcse.data")


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

    pos: tuple[int, int]
    """The record's global input position (see data_tools.sources)."""
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


MAX_READ_AHEAD = 8192
"""Records downloaded ahead at most (x the mean image size in memory: ~1.2 GB at 150 kB)."""


@dataclass
class PrefetchStats:
    """How the downloads fed the pipeline: read by the end-of-run summary and the warning
    that the settings starve the workers."""

    in_flight: int = 0
    window: int = 0
    started: float = field(default_factory=time.monotonic)
    waited: float = 0.0
    """Seconds the pipeline stood still waiting for the download at the head of the input
    order (the workers run dry once their queued chunks are done)."""
    net: dict[str, int] = field(default_factory=dict)

    def starved(self, now: float | None = None) -> str | None:
        """A one-line warning when downloads held the pipeline up for at least a quarter of
        the run (and a second), naming the settings that fix it; else None."""
        elapsed = (now or time.monotonic()) - self.started
        if self.waited < 1.0 or self.waited < 0.25 * elapsed:
            return None
        return (f"downloads starved the pipeline: it waited {self.waited:.1f} s of {elapsed:.1f} s for images "
                f"with {self.in_flight} requests in flight (--download-threads x --workers) and {self.window} "
                f"records read ahead; raise --download-threads (it counts per worker process, like "
                f"img2dataset's --thread_count) or lower --timeout")


def prefetch(records: Iterable[Pair], cfg: PrepareConfig, in_flight: int = 0, window: int = 0,
             stats: PrefetchStats | None = None) -> Iterator[Pair]:
    """Download the URL records ahead of the CPU stage, in the main process's threads.

    Network waits are I/O (the GIL is released), so ``in_flight`` threads here (default
    ``download.threads``) keep that many requests going whatever the CPU workers do, and a
    URL that hangs until the timeout holds one thread, not a chunk of work. Output order is
    input order; ``window`` records (default 16 x in_flight, at most :data:`MAX_READ_AHEAD`)
    are read ahead, so a URL that stalls until the timeout has usually finished failing
    before it reaches the head.
    Records whose captions will be dropped anyway are not downloaded. A failed fetch
    becomes the record's drop reason. One :class:`Downloader` serves every thread: its
    kept-alive connections and resolved host names are shared.
    """
    threads = max(1, in_flight or cfg.download.threads)
    window = window or max(64, min(16 * threads, MAX_READ_AHEAD))
    st = stats if stats is not None else PrefetchStats()
    st.in_flight, st.window, st.started = threads, window, time.monotonic()
    dl = Downloader(cfg.download)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="prefetch")
    pending: deque[tuple[Pair, Future[FetchResult] | None]] = deque()

    def submit(pair: Pair) -> None:
        try:
            needs = (pair.url is not None and pair.image_bytes is None and pair.error is None
                     and _caption_verdict(pair.captions, cfg.filters)[1] is None)
        except Exception:  # the worker meets the same caption again and names the error
            needs = False
        pending.append((pair, pool.submit(dl.fetch, pair.url) if needs else None))

    def finish(pair: Pair, fut: Future[FetchResult] | None) -> Pair:
        if fut is not None:
            if not fut.done():
                t0 = time.monotonic()
                res = fut.result()
                st.waited += time.monotonic() - t0
            else:
                res = fut.result()
            if res.reason is None:
                pair.image_bytes = res.data
            else:
                pair.error, pair.meta = res.reason, {"detail": pair.url}
        return pair

    it = iter(records)
    try:
        for pair in it:
            submit(pair)
            while len(pending) >= window:
                yield finish(*pending.popleft())
        while pending:
            yield finish(*pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        dl.close()
        st.net = dl.stats.to_dict()


def prepare_chunk(cfg: PrepareConfig, chunk: list[Pair]) -> list[Prepared]:
    """Captions first (cheap, and saves downloading images whose caption is dropped anyway),
    then all the chunk's downloads concurrently, then the image work record by record.

    No record can fail the chunk: an exception while handling one record (a decoder bug,
    an odd image mode) drops that record as ``worker_error`` with the exception named.
    """
    out: list[Prepared] = []
    todo: list[tuple[Prepared, Pair]] = []
    for pair in chunk:
        rec = Prepared(pos=pair.pos, key=pair.key, source=pair.source)
        out.append(rec)
        if pair.error:
            rec.reason, rec.detail = pair.error, str(pair.meta.get("detail", ""))
            continue
        try:
            rec.reason = _check_captions(pair, cfg.filters)
        except Exception as exc:
            rec.reason, rec.detail = "worker_error", f"{type(exc).__name__}: {exc}"
        if rec.reason is None:
            todo.append((rec, pair))
    urls = [pair.url for _, pair in todo if pair.url is not None and pair.image_bytes is None]
    fetched = iter(_downloader(cfg.download).fetch_many(urls)) if urls else iter(())
    for rec, pair in todo:
        try:
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
                except FileNotFoundError as exc:
                    rec.reason, rec.detail = "image_missing", f"{pair.image_path}: {exc.strerror or exc}"
                    continue
                except OSError as exc:  # permissions, a folder, an I/O error of the disk
                    rec.reason, rec.detail = "image_unreadable", f"{pair.image_path}: {exc.strerror or exc}"
                    continue
            _prepare_image(rec, pair, data or b"", cfg)
        except Exception as exc:
            rec.reason, rec.detail = "worker_error", f"{type(exc).__name__}: {exc}"
            rec.data = b""
    return out


def rescue_chunk(fn: Callable[[list[Pair]], list[Prepared]], chunk: list[Pair],
                 exc: BaseException) -> list[Prepared]:
    """A chunk whose worker process died (or failed as a whole): each record again through
    ``fn``, alone, in a fresh process, so only a record that kills its process is lost —
    dropped as ``worker_crashed`` with its location. Costs a process start per record, and
    only ever runs for chunks that crashed."""
    log.warning("chunk at %s failed in its worker (%s: %s); retrying its %d record(s) one by one",
                chunk[0].source if chunk else "?", type(exc).__name__, exc, len(chunk))
    out: list[Prepared] = []
    for pair in chunk:
        try:
            out.extend(isolate(fn, [pair]))
        except Exception as again:
            out.append(Prepared(pos=pair.pos, key=pair.key, source=pair.source, reason="worker_crashed",
                                detail=f"its worker process died ({type(again).__name__}: {again})"))
    return out


def _prepare_image(rec: Prepared, pair: Pair, data: bytes, cfg: PrepareConfig) -> None:
    """Header checks, one decode (at a reduced scale when the output allows), sha256 of the
    original bytes, phash of the image as scaled for the output (before any crop or pad;
    the original when nothing is scaled), then crop/pad and one JPEG encode if needed. The
    image is left undecoded only with ``verify_decode`` off when the original bytes are
    stored as they are (inspect_image decodes whenever pixels are needed)."""
    info, reason, img = inspect_image(data, cfg.filters, cfg.images)
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
            scaled, geo = resize_image(img, info, cfg.images)
            if cfg.phash:
                rec.phash = image_phash(scaled)
            redone = encode_image(scaled, info, geo, cfg.images)
        except Exception:  # a decoder that loaded yet fails on convert(): treat as corrupt
            rec.reason = "image_undecodable"
            return
        if redone is not None:
            stored, new = redone
            ext, width, height = new.format, new.width, new.height
            if (width, height) != (info.width, info.height):
                meta["original_width"], meta["original_height"] = info.width, info.height
    rec.captions, rec.meta = pair.captions, meta
    rec.ext, rec.data, rec.width, rec.height = ext, stored, width, height


# --- worker processes ------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Worker initializer: end this process when ``parent_pid`` goes away, even by SIGKILL.

    A killed parent cannot shut its pool down, and ProcessPoolExecutor workers would finish
    their queued chunks (tens of seconds of CPU) before noticing. On Linux the kernel does
    it (``prctl(PR_SET_PDEATHSIG, SIGKILL)``); elsewhere a thread polls the parent id. The
    check after prctl covers a parent that died while this process was starting.
    """
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent_pid:
        os._exit(1)
    if not armed:
        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def start_worker(parent_pid: int) -> None:
    """Worker initializer: :func:`die_with_parent`, and one BLAS thread. Each worker handles
    one image at a time and the pool is the parallelism; OpenBLAS would otherwise spread
    the phash's matrix products over every core and spin-wait there (measured: ~50% more
    CPU for the same products)."""
    from threadpoolctl import threadpool_limits

    die_with_parent(parent_pid)
    threadpool_limits(1)


def _pool(workers: int) -> ProcessPoolExecutor:
    # spawn, not fork: the parent may hold torch/CUDA state and threads (tqdm, downloads).
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=start_worker, initargs=(os.getpid(),))


def isolate(fn: Callable[[T], R], item: T) -> R:
    """``fn(item)`` in a fresh one-process pool; raises BrokenProcessPool if it dies there."""
    pool = _pool(1)
    try:
        return pool.submit(fn, item).result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, window: int = 0,
                on_crash: Callable[[T, BaseException], R] | None = None) -> Iterator[R]:
    """``map(fn, items)`` over ``workers`` processes, results in input order, with at most
    ``window`` (default 2*workers) items in flight, so a fast reader never buffers the whole
    input and a slow chunk only delays, never reorders, what follows it.

    A worker that dies (a decoder segfault, the OOM killer) breaks the whole pool: the pool
    is restarted, the items in flight are submitted again, and the item at the head — the
    one the caller waits for — goes to ``on_crash(item, exc)``, which gives its result
    (typically :func:`isolate` per record); without ``on_crash`` the error propagates. The
    same happens to an item whose ``fn`` raises. ``workers <= 1`` runs in this process: no
    pickling, same results, and no protection from crashes.
    """
    if workers <= 1:
        for item in items:
            yield fn(item)
        return
    window = window or 2 * workers
    pool = _pool(workers)
    pending: deque[tuple[T, Future[R]]] = deque()
    it = iter(items)
    breaks = 0  # pool restarts since the last result a pool delivered

    def submit(item: T) -> Future[R]:
        try:
            return pool.submit(fn, item)
        except BrokenProcessPool as exc:  # broke while we were submitting: handled at the head
            fut: Future[R] = Future()
            fut.set_exception(exc)
            return fut

    def fill() -> None:
        while len(pending) < window:
            nxt = next(it, _END)
            if nxt is _END:
                return
            pending.append((nxt, submit(nxt)))  # type: ignore[arg-type]

    try:
        fill()
        while pending:
            item, fut = pending.popleft()
            try:
                result = fut.result()
                breaks = 0
            except BrokenProcessPool as exc:
                if on_crash is None:
                    raise
                breaks += 1
                if breaks > 3:
                    raise RuntimeError(f"worker processes keep dying before finishing any work ({exc}); "
                                       f"run with --workers 1 to see why") from None
                log.warning("a worker process died; restarting the pool and isolating the work it held")
                pool.shutdown(wait=True, cancel_futures=True)
                pool = _pool(workers)
                again = list(pending)
                pending.clear()
                for other, _ in again:
                    pending.append((other, submit(other)))
                result = on_crash(item, exc)
            except Exception as exc:
                if on_crash is None:
                    raise
                result = on_crash(item, exc)
            fill()
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_END = object()
