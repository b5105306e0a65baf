"""The data_tools verbs: shard-pairs, shard-text, embed (filter-clip lives in clip_filter.py,
verify and stats in check.py, fetch-eval-data in evaldata.py, merge in parts.py).

Each verb streams its input once, shows a progress bar, counts every dropped record by
reason (with the first record locations per reason), and ends with a summary. Output goes
through :mod:`data_tools.shards`, so shards are atomic and the manifest is written last.
No single record can stop a run: whatever goes wrong with one record is a counted drop;
only ``--strict`` stops, naming the file and line.
"""

from __future__ import annotations

import io
import json
import logging
import math
import shutil
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from data_tools.dedup import NEAR_DUP_DEFAULT, DedupMode, NearDupIndex, SeenSet, identity_digest, phash_hex, sha256_hex
from data_tools.download import DownloadOptions, requests_in_flight
from data_tools.filters import DropCounter, FilterOptions, ImageOptions, normalize_caption
from data_tools.pipeline import (
    PrefetchStats,
    PrepareConfig,
    Prepared,
    ordered_map,
    prefetch,
    prepare_chunk,
    rescue_chunk,
)
from data_tools.shards import (
    CLIP_STATE,
    EMBED_STATE,
    MANIFEST,
    PARTS_DIR,
    SHARD_STATE,
    SIZES,
    DatasetError,
    ShardWriter,
    atomic_write_json,
    file_sha256,
    load_manifest,
    read_shard,
    shard_dicts,
    write_manifest,
)
from data_tools.sources import (
    STRICT_READ_REASONS,
    InputError,
    ReadNotes,
    check_inputs,
    clean_key,
    partition,
    read_pairs,
    read_sentences,
)

if TYPE_CHECKING:
    from data_tools.clip_filter import ClipOptions
    from data_tools.evalfilter import EvalFilter

log = logging.getLogger("webmcse.data")
TOOL = "webmcse-data"
_WARN_LIMIT = 5  # per-record warnings shown before only counting
EXAMPLES = 3  # drop examples (record locations) kept per reason in the manifest

#: Every reason --strict stops at: malformed input records and failures of the tool itself
#: (not content filters such as image_too_small, nor the web's own 404s).
STRICT_REASONS = (*STRICT_READ_REASONS, "text_unencodable", "worker_error", "worker_crashed")


@dataclass
class Summary:
    kind: str
    out_dir: Path
    seen: int
    written: int
    dropped: dict[str, int]
    n_shards: int

    def render(self) -> str:
        lines = [f"{self.kind}: {self.written} of {self.seen} records written to "
                 f"{self.n_shards} shard(s) in {self.out_dir}"]
        for reason, n in sorted(self.dropped.items(), key=lambda kv: -kv[1]):
            lines.append(f"  dropped {n:>8}  {reason}")
        return "\n".join(lines)


# --- output folder safety ---------------------------------------------------------------------


def check_no_overlap(inputs: Iterable[str | Path | None], out: str | Path) -> None:
    """Refuse, before anything is written, an output folder that is an input, lies inside an
    input folder, or holds an input: ``--overwrite``/``--resume`` delete tars and manifests
    in the output folder, and an img2dataset input *is* a folder of tars."""
    o = Path(out).resolve()
    for item in inputs:
        if item is None:
            continue
        p = Path(item).resolve()
        if p == o or (p.is_dir() and p in o.parents) or o in p.parents:
            raise InputError(f"--out {out} overlaps the input {item}; choose an output folder outside every "
                             f"input (nothing was written)")


def _ours(folder: Path) -> bool:
    return (folder / MANIFEST).is_file() or (folder / SHARD_STATE).is_file()


def _clear(out: Path) -> None:
    """Delete what our verbs write in ``out`` (and only that)."""
    for p in list(out.glob("*.tar")) + list(out.glob(".*.tmp")) + list(out.glob("*.index.parquet")):
        p.unlink()
    for name in (MANIFEST, SIZES, EMBED_STATE, SHARD_STATE, CLIP_STATE, "part.json"):
        (out / name).unlink(missing_ok=True)
    if (out / PARTS_DIR).is_dir():
        shutil.rmtree(out / PARTS_DIR)


def _prepare_out(out_dir: Path, overwrite: bool) -> None:
    tars = list(out_dir.glob("*.tar")) if out_dir.is_dir() else []
    if _ours(out_dir) or (out_dir / "part.json").is_file() or (out_dir / PARTS_DIR).is_dir():
        if not overwrite:
            raise InputError(f"{out_dir}: already holds a dataset; pass --overwrite to replace it "
                             f"or choose another --out folder")
        _clear(out_dir)
    elif tars:
        raise InputError(f"{out_dir}: holds {len(tars)} tar file(s) but no webmcse manifest or run state (another "
                         f"tool's output?); choose an empty or new --out folder (nothing was deleted)")
    out_dir.mkdir(parents=True, exist_ok=True)


class _Warner:
    """Warn about the first few bad records with their location, then only count."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, where: str, reason: str, detail: str = "") -> None:
        self.n += 1
        if self.n <= _WARN_LIMIT:
            log.warning("%s: skipped (%s%s)", where, reason, f": {detail}" if detail else "")
        elif self.n == _WARN_LIMIT + 1:
            log.warning("further skipped records are only counted (see the summary)")


def _unique_key(key: str, keys: SeenSet) -> str:
    candidate, n = key, 1
    while keys.check_and_add(candidate):
        candidate = f"{key}_{n}"
        n += 1
    return candidate


class Examples:
    """The first :data:`EXAMPLES` record locations per drop reason, by input position, so
    the parts of a partitioned run combine into exactly what one machine records."""

    def __init__(self, saved: dict[str, list[Any]] | None = None) -> None:
        self.by_reason: dict[str, list[tuple[tuple[int, int], str]]] = {
            r: [((int(p[0]), int(p[1])), s) for p, s in items] for r, items in (saved or {}).items()}

    def add(self, reason: str, pos: tuple[int, int], source: str) -> None:
        # A file name that is not UTF-8 is shown with backslash escapes (readable, writable JSON).
        source = source.encode("utf-8", "backslashreplace").decode("utf-8")
        items = self.by_reason.setdefault(reason, [])
        if len(items) < EXAMPLES:
            items.append((pos, source))
        elif pos < items[-1][0]:
            items[-1] = (pos, source)
            items.sort()

    def merge(self, other: Examples) -> None:
        for reason, items in other.by_reason.items():
            for pos, source in items:
                self.add(reason, pos, source)

    def to_state(self) -> dict[str, list[Any]]:
        return {r: [[list(p), s] for p, s in items] for r, items in self.by_reason.items()}

    def to_manifest(self) -> dict[str, list[str]]:
        return {r: [s for _, s in sorted(items)] for r, items in self.by_reason.items()}


class _DedupState:
    """Everything the ordered writer remembers across the dataset: exact identities, the
    near-duplicate index and the keys in use. Identities are recorded only when a sample is
    *written*, so the state after shard k can be rebuilt from shards 0..k alone (resume).
    The merge of a partitioned run replays the very same state over the parts' indexes."""

    def __init__(self, mode: DedupMode, near_distance: int | None) -> None:
        self.mode = mode
        self.ids = SeenSet()
        self.keys = SeenSet()
        self.near = NearDupIndex(near_distance) if near_distance is not None else None

    def problem(self, ident: bytes | None, phash: int | None) -> str | None:
        if ident is not None and self.ids.has_digest(ident):
            return "duplicate"
        if self.near is not None and phash is not None and self.near.find(phash) is not None:
            return "near_duplicate"
        return None

    def commit(self, ident: bytes | None, phash: int | None) -> None:
        if ident is not None:
            self.ids.add_digest(ident)
        if self.near is not None and phash is not None:
            self.near.add(phash)

    def unique_key(self, key: str) -> str:
        return _unique_key(key, self.keys)

    def replay(self, folder: Path, shard_names: list[str]) -> None:
        """Rebuild the state from completed shards (``--resume``)."""
        for name in shard_names:
            for sample in read_shard(folder / name):
                meta = json.loads(sample["json"])
                phash = meta.get("phash")
                self.commit(identity_digest(self.mode, meta["sha256"], meta["captions"]),
                            int(phash, 16) if phash else None)
                self.keys.add(sample["__key__"])


def _fingerprint(inputs: list[str | Path], options: dict[str, Any]) -> str:
    """What must not change between a killed run and its --resume (workers may)."""
    blob = json.dumps({"inputs": [str(Path(p).resolve()) for p in inputs], **options}, sort_keys=True, default=str)
    return sha256_hex(blob.encode("utf-8"))


def _start_or_resume(out: Path, overwrite: bool, resume: bool, fingerprint: str) -> dict[str, Any] | None:
    """Prepare ``out``. Returns the saved state of an interrupted run to continue, or None.

    Completed shards listed in the state (and still byte-identical) are kept; anything else
    our run wrote — the temp file of the shard in progress, a shard renamed just before the
    kill but not yet recorded — is deleted and redone, which reproduces it exactly. A folder
    with tars but neither a state nor a manifest is not ours and is never touched.
    """
    if not resume:
        _prepare_out(out, overwrite)
        return None
    state_path = out / SHARD_STATE
    state: dict[str, Any] | None = None
    if state_path.is_file():
        state = json.loads(state_path.read_text(encoding="utf-8"))
        if state.get("fingerprint") != fingerprint:
            raise InputError(f"{state_path}: the interrupted run used other inputs or options; rerun "
                             f"with the same ones, or use --overwrite to start over")
        for entry in state["shards"]:
            path = out / entry["name"]
            if not path.is_file() or path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
                raise InputError(f"{path}: missing or changed since the interrupted run wrote it; "
                                 f"use --overwrite to start over")
        keep = {entry["name"] for entry in state["shards"]}
        keep |= {entry["index"] for entry in state["shards"] if entry.get("index")}
    elif (out / MANIFEST).is_file() or (out / "part.json").is_file():
        return {"complete": True}
    elif out.is_dir() and any(out.glob("*.tar")):
        raise InputError(f"{out}: holds tar files but no {SHARD_STATE} (not an interrupted shard-pairs run); "
                         f"nothing to resume there — choose an empty or new --out folder (nothing was deleted)")
    else:
        out.mkdir(parents=True, exist_ok=True)
        return None
    for tmp in out.glob(".*.tmp"):
        tmp.unlink()
    for p in list(out.glob("*.tar")) + list(out.glob("*.index.parquet")):
        if p.name not in keep:
            p.unlink()
    return state


def _dataset_fields(inputs: list[str | Path], input_format: str, opts: FilterOptions, dedup: DedupMode,
                    near: int | None, clip: ClipOptions | None, img_opts: ImageOptions, dl_opts: DownloadOptions,
                    evalf: EvalFilter | None, group: bool, allow_outside: bool, fingerprint: str) -> dict[str, Any]:
    """The manifest fields that depend only on the inputs and options (the same for one
    machine and for the merge of a partitioned run)."""
    return {
        "kind": "pairs",
        "tool": TOOL,
        "inputs": [str(p) for p in inputs],
        "input_format": input_format,
        "filters": {**opts.to_dict(), "dedup": dedup, "near_dup_distance": near,
                    "group_by_image": group, "allow_outside_paths": allow_outside,
                    "eval": evalf.describe if evalf else None,
                    "clip": ({"model": clip.model, "pretrained": clip.pretrained, "threshold": clip.threshold,
                              "top_fraction": clip.top_fraction} if clip else None)},
        "images": img_opts.to_dict(),
        "download": dl_opts.to_dict(),
        "image_encoder": None,
        "fingerprint": fingerprint,
    }


def shard_pairs(
    inputs: list[str | Path],
    out_dir: str | Path,
    *,
    image_col: str | None = None,
    caption_col: str | None = None,
    key_col: str | None = None,
    input_format: str = "auto",
    image_root: str | Path | None = None,
    strict: bool = False,
    filters: FilterOptions | None = None,
    dedup: DedupMode = "image",
    near_dup_distance: int | None = NEAR_DUP_DEFAULT,
    images: ImageOptions | None = None,
    download: DownloadOptions | None = None,
    clip: ClipOptions | None = None,
    workers: int = 1,
    chunk_size: int = 64,
    max_count: int = 10_000,
    max_bytes: int = 1 << 30,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    group_by_image: bool = True,
    allow_outside_paths: bool = False,
    eval_sts: str | Path | None = None,
    eval_images: str | Path | None = None,
    eval_near_dup_distance: int = NEAR_DUP_DEFAULT,
    part: int | None = None,
    parts: int | None = None,
) -> Summary:
    """Images + captions (tables of paths or URLs, folders, img2dataset output, COCO json)
    -> clean, globally deduplicated pair shards.

    Records flow in input order through :func:`data_tools.pipeline.prepare_chunk` (in
    ``workers`` processes) and then through one ordered writer that does the global exact
    and near-duplicate checks, so the shards are byte-identical for any ``workers``.
    With ``resume`` a killed run continues after its last completed shard.

    With ``part``/``parts`` this process handles only the records whose image reference
    hashes to ``part`` (see :mod:`data_tools.parts`): it writes that part's shards and
    identity index under ``OUT/parts/`` and leaves dedup and keys to ``merge``.
    """
    out = Path(out_dir)
    opts = filters or FilterOptions()
    img_opts = images or ImageOptions()
    dl_opts = download or DownloadOptions()
    near = near_dup_distance if (near_dup_distance is not None and near_dup_distance >= 0
                                 and dedup == "image") else None
    if workers < 1 or chunk_size < 1 or max_count < 1:
        raise InputError(f"--workers ({workers}), --chunk-size ({chunk_size}) and --shard-size ({max_count}) "
                         f"must be at least 1")
    if (part is None) != (parts is None) or (parts is not None and not (parts >= 1 and 0 <= part < parts)):
        raise InputError(f"--part {part} --parts {parts}: give both, with 0 <= part < parts")
    if eval_images is not None and not opts.verify_decode:
        raise InputError("--eval-images compares decoded images (phash); it cannot be used with --no-verify-decode")
    check_no_overlap([*inputs, image_root, eval_sts, eval_images], out)
    check_inputs(inputs, image_col, caption_col, key_col, input_format=input_format)
    from data_tools.evalfilter import EvalFilter

    evalf = EvalFilter.load(eval_sts, eval_images, eval_near_dup_distance)
    options = {"image_col": image_col, "caption_col": caption_col, "key_col": key_col,
               "input_format": input_format, "image_root": str(image_root) if image_root else None,
               "filters": {**opts.to_dict(), "dedup": dedup, "near_dup_distance": near},
               "images": img_opts.to_dict(), "clip": clip.to_dict() if clip else None,
               "chunk_size": chunk_size, "max_count": max_count, "max_bytes": max_bytes,
               "group_by_image": group_by_image, "allow_outside_paths": allow_outside_paths,
               "eval": evalf.describe["digest"] if evalf else None}
    fingerprint = _fingerprint(inputs, options)
    fields = _dataset_fields(inputs, input_format, opts, dedup, near, clip, img_opts, dl_opts, evalf,
                             group_by_image, allow_outside_paths, fingerprint)
    part_mode = parts is not None
    if part_mode:
        from data_tools import parts as partlib

        assert part is not None and parts is not None
        folder = partlib.prepare_part(out, part, parts, fingerprint, overwrite)
        if folder is None:  # merged already: the parts are gone and nothing is left to do
            m = load_manifest(out)
            c = m.get("counts", {})
            log.info("%s: the partitioned run is merged already; nothing to do", out)
            return Summary("pairs", out, c.get("seen", 0), m["n_samples"], c.get("dropped", {}), len(m["shards"]))
    else:
        folder = out
    state = _start_or_resume(folder, overwrite, resume, fingerprint)
    if state is not None and state.get("complete"):
        return _already_complete(folder, fingerprint, clip, progress, part_mode)
    state = state or {}
    done_shards: list[dict[str, Any]] = state.get("shards", [])
    start = tuple(state["consumed"]) if state.get("consumed") is not None else None
    drops = DropCounter(state.get("dropped", {}))
    examples = Examples(state.get("examples"))
    dd = _DedupState("none" if part_mode else dedup, None if part_mode else near)
    index = partlib.IndexWriter(folder, dedup) if part_mode else None
    if done_shards:
        log.info("%s: resuming after %d completed shard(s), input record %s", folder, len(done_shards), start)
        if index is not None:
            index.replay_keys(dd.keys, [s["index"] for s in done_shards])
        else:
            dd.replay(folder, [s["name"] for s in done_shards])
    written = sum(s["n_samples"] for s in done_shards)
    seen = int(state.get("seen", 0))
    eval_removed = int(state.get("eval_captions_removed", 0))
    if evalf is not None:
        evalf.captions_removed = eval_removed
    scorer = None
    if clip is not None:
        from data_tools.clip_filter import ClipScorer

        scorer = ClipScorer(clip)
    notes = ReadNotes()
    warn = _Warner()
    writer = ShardWriter(folder, max_count=max_count, max_bytes=max_bytes, start_index=len(done_shards))
    # The phash is computed only where something compares it: near dedup (here or in the
    # merge of a partitioned run) and the held-out photo filter.
    cfg = PrepareConfig(filters=opts, images=img_opts, download=dl_opts,
                        phash=near is not None or (evalf is not None and evalf.photos is not None))
    records = read_pairs(inputs, image_col, caption_col, key_col, input_format=input_format,
                         image_root=image_root, strict=strict, notes=notes, group=group_by_image,
                         allow_outside=allow_outside_paths,
                         select=partition(part, parts) if part_mode else None)  # type: ignore[arg-type]
    fetch_stats = PrefetchStats()
    todo = prefetch((p for p in records if start is None or p.pos > start), cfg,
                    in_flight=requests_in_flight(dl_opts, workers), stats=fetch_stats)
    bar = tqdm(desc="shard-pairs" + (f" part {part}/{parts}" if part_mode else ""), unit=" pairs",
               initial=seen, disable=not progress)

    def save_state(consumed: tuple[int, int] | None) -> None:
        new = shard_dicts(writer.shards)
        if index is not None:
            for entry in new:
                entry["index"] = index.name_for(entry["name"])
        atomic_write_json(folder / SHARD_STATE, {
            "fingerprint": fingerprint, "consumed": list(consumed) if consumed else None, "seen": seen,
            "dropped": dict(drops), "examples": examples.to_state(),
            "eval_captions_removed": evalf.captions_removed if evalf else 0, "shards": done_shards + new})

    save_state(start)  # from now on the folder is recognisably an interrupted run of ours
    try:
        prepare = partial(prepare_chunk, cfg)
        for chunk in ordered_map(prepare, _batches(todo, chunk_size), workers, on_crash=partial(rescue_chunk, prepare)):
            if evalf is not None:
                for rec in chunk:
                    if rec.reason is None:
                        rec.captions, rec.reason = evalf.check(rec.captions, rec.phash)
            if scorer is not None:
                _clip_chunk(scorer, chunk, clip)
            for rec in chunk:
                seen += 1
                reason = rec.reason
                payload = _payload(rec) if reason is None else None
                if reason is None and payload is None:
                    reason = "text_unencodable"
                    rec.detail = "a caption or column holds text that is not valid Unicode (lone surrogate)"
                ident = None
                if reason is None and not part_mode:
                    ident = identity_digest(dedup, rec.sha256, rec.captions)
                    reason = dd.problem(ident, rec.phash)
                if reason is not None:
                    if strict and reason in STRICT_REASONS:
                        raise InputError(f"{rec.source}: {reason}{': ' + rec.detail if rec.detail else ''} "
                                         f"(--strict; drop the flag to skip and count such records)")
                    drops.drop(reason)
                    examples.add(reason, rec.pos, rec.source)
                    warn(rec.source, reason, rec.detail)
                    continue
                assert payload is not None
                dd.commit(ident, rec.phash)
                key = dd.unique_key(rec.key)
                n_done = len(writer.shards)
                writer.write({"__key__": key, **payload})
                if index is not None:
                    index.add(rec, key)
                written += 1
                if len(writer.shards) > n_done:
                    if index is not None:
                        index.flush(writer.shards[-1].name)
                    save_state(rec.pos)
            bar.update(len(chunk))
        writer.close()
        if index is not None and writer.shards and not index.flushed(writer.shards[-1].name):
            index.flush(writer.shards[-1].name)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    _report_downloads(fetch_stats)
    shards = done_shards + shard_dicts(writer.shards)
    if index is not None:
        for entry in shards:
            entry.setdefault("index", index.name_for(entry["name"]))
    counts = {"seen": seen, "written": written, "dropped": dict(drops)}
    extra_notes = {**notes.to_dict(), "eval_captions_removed": evalf.captions_removed if evalf else 0}
    if part_mode:
        partlib.write_part_manifest(folder, {
            "part": part, "parts": parts, "fingerprint": fingerprint, "dataset": fields, "counts": counts,
            "examples": examples.to_state(), "notes": extra_notes, "shards": shards,
            "clip_top_fraction": clip.top_fraction if clip else None})
        (folder / SHARD_STATE).unlink(missing_ok=True)
        return Summary("pairs-part", folder, seen, written, dict(drops), len(shards))
    if written == 0:
        (folder / SHARD_STATE).unlink(missing_ok=True)
        ex = examples.to_manifest()
        raise InputError(f"{', '.join(map(str, inputs))}: no usable pairs "
                         f"({sum(drops.values())} dropped: {dict(drops)}; e.g. "
                         f"{'; '.join(v[0] for v in ex.values())})")
    write_manifest(out, {**fields, "counts": counts, "drop_examples": examples.to_manifest(),
                         "notes": extra_notes, "shards": shards})
    (out / SHARD_STATE).unlink(missing_ok=True)
    summary = Summary("pairs", out, seen, written, dict(drops), len(shards))
    if clip is not None and clip.top_fraction is not None:
        from data_tools.clip_filter import filter_clip

        fs = filter_clip(out, top_fraction=clip.top_fraction, progress=progress)
        for k, v in fs.dropped.items():
            summary.dropped[k] = summary.dropped.get(k, 0) + v
        summary.written, summary.n_shards = fs.written, fs.n_shards
    return summary


def _report_downloads(st: PrefetchStats) -> None:
    net = st.net
    if not net.get("requests"):
        return
    log.info("downloads: %d requests in %d connections (%d on kept-alive ones), %d host lookups (%d cached), "
             "%d requests in flight", net["requests"], net["connections"], net["reused"], net["dns_lookups"],
             net["dns_cached"], st.in_flight)
    warning = st.starved()
    if warning:
        log.warning(warning)


def _already_complete(folder: Path, fingerprint: str, clip: ClipOptions | None, progress: bool,
                      part_mode: bool) -> Summary:
    if part_mode:
        from data_tools.parts import load_part_manifest

        pm = load_part_manifest(folder)
        if pm.get("fingerprint") != fingerprint:
            raise InputError(f"{folder}: complete, but built from other inputs or options; use --overwrite to "
                             f"rebuild it or choose another --out")
        c = pm["counts"]
        log.info("%s: part already complete; nothing to resume", folder)
        return Summary("pairs-part", folder, c["seen"], c["written"], c["dropped"], len(pm["shards"]))
    m = load_manifest(folder)
    if m.get("fingerprint") not in (None, fingerprint):
        raise InputError(f"{folder}: complete, but built from other inputs or options; use --overwrite "
                         f"to rebuild it or choose another --out")
    if clip is not None and clip.top_fraction is not None \
            and (m.get("filters", {}).get("clip") or {}).get("mode") != "top_fraction":
        from data_tools.clip_filter import filter_clip

        log.info("%s: sharding was complete; finishing the CLIP top-fraction pass", folder)
        filter_clip(folder, top_fraction=clip.top_fraction, progress=progress)
        m = load_manifest(folder)
    c = m.get("counts", {})
    log.info("%s: already complete; nothing to resume", folder)
    return Summary("pairs", folder, c.get("seen", 0), m["n_samples"], c.get("dropped", {}), len(m["shards"]))


def _clip_chunk(scorer: Any, chunk: list[Prepared], clip: ClipOptions | None) -> None:
    """Score the chunk's surviving records in one batch; apply a fixed threshold at once.
    Runs before dedup, so a duplicate of a low-scoring pair is judged the same way. A batch
    that fails is scored record by record, and a record that cannot be scored is dropped
    (``worker_error``) rather than failing the run."""
    live = [r for r in chunk if r.reason is None]
    if not live:
        return
    try:
        scores: list[float | None] = list(scorer.score([(r.data, r.captions) for r in live]))
    except Exception:
        scores = []
        for r in live:
            try:
                scores.append(scorer.score([(r.data, r.captions)])[0])
            except Exception as exc:
                r.reason, r.detail = "worker_error", f"CLIP scoring failed ({type(exc).__name__}: {exc})"
                scores.append(None)
    for rec, score in zip(live, scores, strict=True):
        if score is None:
            continue
        rec.clip_score = score
        if clip is not None and clip.threshold is not None and score < clip.threshold:
            rec.reason = "clip_score_low"


def _payload(rec: Prepared) -> dict[str, bytes] | None:
    """The sample's members as bytes (everything but the key, which the writer assigns), or
    None when its text cannot be written as UTF-8: a lone surrogate from a JSON ``\\udcff``
    escape or an undecodable input byte, in a caption, an extra column or a file name."""
    meta = {**rec.meta, "source": rec.source, "captions": rec.captions, "width": rec.width,
            "height": rec.height, "sha256": rec.sha256}
    if rec.phash is not None:
        meta["phash"] = phash_hex(rec.phash)
    if rec.clip_score is not None:
        meta["clip_score"] = rec.clip_score
    try:
        return {rec.ext: rec.data, "txt": rec.captions[0].encode("utf-8"),
                "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}
    except UnicodeEncodeError:
        return None


# --- shard-text ---------------------------------------------------------------------------------


def text_key_prefixes(inputs: list[str | Path]) -> list[str]:
    """One distinct key prefix per input: the cleaned file stem, made unique with ``-N``
    when two inputs share it (two ``dev_caps.txt`` from different folders). Keys are
    ``PREFIX_LINE``, so distinct prefixes give distinct keys across the whole dataset."""
    used: set[str] = set()
    out: list[str] = []
    for p in inputs:
        name = Path(p).name
        for suffix in (".gz", ".txt"):
            name = name[: -len(suffix)] if name.endswith(suffix) else name
        stem = clean_key(name)
        prefix, n = stem, 1
        while prefix in used:
            n += 1
            prefix = f"{stem}-{n}"
        used.add(prefix)
        out.append(prefix)
    return out


def shard_text(
    inputs: list[str | Path],
    out_dir: str | Path,
    *,
    min_chars: int = 1,
    dedup: bool = False,
    max_count: int = 10_000,
    max_bytes: int = 1 << 30,
    overwrite: bool = False,
    strict: bool = False,
    progress: bool = True,
) -> Summary:
    """One sentence per line -> text shards (``KEY.txt``). A line whose bytes are not UTF-8
    is dropped as ``text_unencodable``, a file that cannot be read on (cut .gz) ends that
    input as ``input_unreadable``; both name file:line, and stop the run under ``strict``."""
    out = Path(out_dir)
    if not inputs:
        raise InputError("no inputs given")
    for p in inputs:
        if not Path(p).is_file():
            raise InputError(f"{p}: file not found")
    check_no_overlap(inputs, out)
    _prepare_out(out, overwrite)
    prefixes = text_key_prefixes(inputs)
    drops = DropCounter()
    examples = Examples()
    seen_text = SeenSet()
    writer = ShardWriter(out, max_count=max_count, max_bytes=max_bytes)
    seen = written = 0
    bar = tqdm(read_sentences(inputs), desc="shard-text", unit=" lines", disable=not progress)
    try:
        for index, where, raw in bar:
            seen += 1
            reason = None
            if raw is None:
                reason = "input_unreadable"
            else:
                sentence = normalize_caption(raw)
                try:
                    data = sentence.encode("utf-8")
                except UnicodeEncodeError:
                    reason = "text_unencodable"
                if reason is None and len(sentence) < max(1, min_chars):
                    reason = "empty" if not sentence else "too_short"
                if reason is None and dedup and seen_text.check_and_add(sentence.lower()):
                    reason = "duplicate"
            if reason is not None:
                if strict and reason in STRICT_REASONS:
                    raise InputError(f"{where}: {reason} (--strict; drop the flag to skip and count such lines)")
                drops.drop(reason)
                examples.add(reason, (seen, 0), where)
                continue
            line = int(where.rpartition(":")[2])
            writer.write({"__key__": f"{prefixes[index]}_{line:09d}", "txt": data})
            written += 1
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    if written == 0:
        raise InputError(f"{', '.join(map(str, inputs))}: no usable sentences ({dict(drops)})")
    write_manifest(out, {
        "kind": "text",
        "tool": TOOL,
        "inputs": [str(p) for p in inputs],
        "filters": {"min_chars": min_chars, "dedup": dedup},
        "counts": {"seen": seen, "written": written, "dropped": dict(drops)},
        "drop_examples": examples.to_manifest(),
        "shards": shard_dicts(shards),
    })
    return Summary("text", out, seen, written, dict(drops), len(shards))


def _batches(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# --- embed --------------------------------------------------------------------------------------


def _decode_batch(batch: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any], list[dict[str, Any]], int]:
    from PIL import Image

    images, keep, bad = [], [], 0
    for sample in batch:
        ext = next((e for e in ("jpg", "png", "webp", "gif", "bmp") if e in sample), None)
        try:
            images.append(Image.open(io.BytesIO(sample[ext])).convert("RGB"))
            keep.append(sample)
        except Exception:
            bad += 1
    return batch, images, keep, bad


def _decoded(batches: Iterable[list[dict[str, Any]]]) -> Iterator[tuple[list[dict[str, Any]], list[Any],
                                                                         list[dict[str, Any]], int]]:
    """Decode batch k+1 in a thread while the caller runs the encoder on batch k (PIL's
    decoder releases the GIL): on a GPU the forward pass is cheap and serial decoding was
    the bottleneck of ``embed``."""
    with ThreadPoolExecutor(1, thread_name_prefix="decode") as pool:
        it = iter(batches)
        first = next(it, None)
        fut = pool.submit(_decode_batch, first) if first is not None else None
        while fut is not None:
            nxt = next(it, None)
            result = fut.result()
            fut = pool.submit(_decode_batch, nxt) if nxt is not None else None
            yield result


def _npy_bytes(vec: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, vec.astype(np.float16), allow_pickle=False)
    return buf.getvalue()


def generation_name(position: int, generation: int) -> str:
    """Shard names of a rewritten dataset: new files next to the old ones, never over them."""
    return f"{position:06d}-g{generation}.tar"


def finish_rewrite(folder: Path, manifest: dict[str, Any], state_path: Path, replaced: list[str]) -> None:
    """The commit of a rewrite (``embed``, ``filter-clip``): the new manifest (sizes.json,
    then manifest.json, atomically each), then the old shard files, then the state. A crash
    anywhere leaves a dataset whose manifest lists complete files."""
    for k in ("format", "version", "created", "n_samples"):
        manifest.pop(k, None)
    write_manifest(folder, manifest)
    listed = {s["name"] for s in manifest["shards"]}
    for name in replaced:
        if name not in listed:
            (folder / name).unlink(missing_ok=True)
    state_path.unlink(missing_ok=True)


def embed(
    dataset: str | Path,
    encoder: str = "efficientnet_lite0",
    *,
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
) -> Summary:
    """Add ``KEY.emb.npy`` (float16 pooled image features) to every sample of a pairs dataset.

    The dataset stays valid at every instant: each shard is written as a *new* file
    (``NNNNNN-gG.tar``, G = the dataset's generation + 1, temp + rename), the manifest that
    lists the new files replaces the old one last, and only then are the old files deleted.
    ``.embed_state.json`` records the finished shards, so a killed run resumes where it
    stopped; ``verify`` reports such a pending run and still passes.
    """
    from data_tools.encoders import load_image_encoder

    folder = Path(dataset)
    manifest = load_manifest(folder)
    if manifest["kind"] != "pairs":
        raise DatasetError(f"{folder / MANIFEST}: kind is {manifest['kind']!r}; embed needs a pairs dataset")
    state_path = folder / EMBED_STATE
    state: dict[str, Any] = {}
    if state_path.is_file():
        state = json.loads(state_path.read_text(encoding="utf-8"))
    listed = [s["name"] for s in manifest["shards"]]
    if state and state.get("new_names") == listed:
        # Killed after the manifest swap: only the old files are left to delete.
        finish_rewrite(folder, manifest, state_path, state.get("replaces", []))
        manifest = load_manifest(folder)
        if state.get("encoder") == encoder:
            return Summary("embed", folder, manifest["n_samples"], manifest["n_samples"], {}, len(listed))
        state = {}
    generation = int(manifest.get("generation", 0)) + 1
    if state.get("encoder") != encoder or state.get("generation") != generation:
        for entry in (state.get("done") or {}).values():  # another run's unfinished files
            if entry["shard"]["name"] not in listed:
                (folder / entry["shard"]["name"]).unlink(missing_ok=True)
        state = {}
    done: dict[str, dict[str, Any]] = state.get("done", {})
    enc = load_image_encoder(encoder)
    enc.model.to(device)
    drops = DropCounter()
    total = sum(s["n_samples"] for s in manifest["shards"])
    bar = tqdm(total=total, desc=f"embed {encoder}", unit=" img", disable=not progress)
    new_shards = []
    for position, shard in enumerate(manifest["shards"]):
        name = shard["name"]
        prev = done.get(name)
        # Trust a shard as done only if it is byte-for-byte the one this run wrote from
        # this very input shard (a rebuilt dataset must be embedded again).
        if prev and prev["input_sha256"] == shard["sha256"] and (folder / prev["shard"]["name"]).is_file() \
                and file_sha256(folder / prev["shard"]["name"]) == prev["shard"]["sha256"]:
            new_shards.append(prev["shard"])
            drops.update(prev["dropped"])
            bar.update(shard["n_samples"])
            continue
        writer = ShardWriter(folder, max_count=math.inf, start_index=position,
                             name=partial(lambda g, i: generation_name(i, g), generation))
        shard_drops = DropCounter()
        try:
            for batch, images, keep, n_bad in _decoded(_batches(read_shard(folder / name), batch_size)):
                if n_bad:
                    shard_drops["embed_undecodable"] += n_bad
                if images:
                    feats = enc.encode(images, device).cpu().numpy()
                    for sample, vec in zip(keep, feats, strict=True):
                        sample.pop("__url__", None)
                        sample["emb.npy"] = _npy_bytes(vec)
                        writer.write(sample)
                bar.update(len(batch))
            written_shards = writer.close()
            info = written_shards[0] if written_shards else None
        except BaseException:
            writer.abort()
            raise
        if info is None:
            raise DatasetError(f"{folder / name}: every image failed to decode; the shard is unusable")
        entry = shard_dicts([info])[0]
        new_shards.append(entry)
        drops.update(shard_drops)
        done[name] = {"input_sha256": shard["sha256"], "shard": entry, "dropped": dict(shard_drops)}
        atomic_write_json(state_path, {"encoder": encoder, "generation": generation, "done": done,
                                       "replaces": listed, "total": len(listed)})
    bar.close()
    counts = manifest.get("counts", {})
    dropped = {**counts.get("dropped", {})}
    for k, v in drops.items():
        dropped[k] = dropped.get(k, 0) + v
    written = sum(s["n_samples"] for s in new_shards)
    new_names = [s["name"] for s in new_shards]
    atomic_write_json(state_path, {"encoder": encoder, "generation": generation, "done": done,
                                   "replaces": listed, "total": len(listed), "new_names": new_names})
    manifest.update({
        "shards": new_shards,
        "generation": generation,
        "image_encoder": enc.describe(),
        "counts": {**counts, "written": written, "dropped": dropped},
    })
    finish_rewrite(folder, manifest, state_path, listed)
    return Summary("embed", folder, total, written, dict(drops), len(new_shards))
