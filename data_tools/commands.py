"""The data_tools verbs: shard-pairs, shard-text, embed (filter-clip lives in clip_filter.py,
verify and stats in check.py, fetch-eval-data in evaldata.py).

Each verb streams its input once, shows a progress bar, counts every dropped record by
reason, and ends with a summary. Output goes through :mod:`data_tools.shards`, so shards are
atomic and the manifest is written last.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from data_tools.dedup import NEAR_DUP_DEFAULT, DedupMode, NearDupIndex, SeenSet, pair_identity, phash_hex, sha256_hex
from data_tools.download import DownloadOptions
from data_tools.filters import DropCounter, FilterOptions, ImageOptions, normalize_caption
from data_tools.pipeline import PrepareConfig, Prepared, ordered_map, prefetch, prepare_chunk
from data_tools.shards import (
    MANIFEST,
    DatasetError,
    ShardWriter,
    atomic_write_json,
    file_sha256,
    load_manifest,
    read_shard,
    shard_dicts,
    write_manifest,
)
from data_tools.sources import InputError, ReadNotes, read_pairs, read_sentences

if TYPE_CHECKING:
    from data_tools.clip_filter import ClipOptions

log = logging.getLogger("webmcse.data")
TOOL = "webmcse-data"
_WARN_LIMIT = 5  # per-record warnings shown before only counting
EMBED_STATE = ".embed_state.json"


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


def _check_inputs(inputs: list[str | Path]) -> None:
    if not inputs:
        raise InputError("no inputs given")
    for p in inputs:
        if not Path(p).exists():
            raise InputError(f"{p}: no such file or folder")


def _prepare_out(out_dir: Path, overwrite: bool) -> None:
    if (out_dir / MANIFEST).exists() or any(out_dir.glob("*.tar")):
        if not overwrite:
            raise InputError(f"{out_dir}: already holds a dataset; pass --overwrite to replace it "
                             f"or choose another --out folder")
        for p in list(out_dir.glob("*.tar")) + list(out_dir.glob(".*.tmp")):
            p.unlink()
        for name in (MANIFEST, "sizes.json", EMBED_STATE, SHARD_STATE, ".clip_state.json"):
            (out_dir / name).unlink(missing_ok=True)
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


SHARD_STATE = ".shard_state.json"
_EXAMPLES = 3  # drop examples (record locations) kept per reason in the manifest


class _DedupState:
    """Everything the ordered writer remembers across the dataset: exact identities, the
    near-duplicate index and the keys in use. Identities are recorded only when a sample is
    *written*, so the state after shard k can be rebuilt from shards 0..k alone (resume)."""

    def __init__(self, mode: DedupMode, near_distance: int | None) -> None:
        self.mode = mode
        self.ids = SeenSet()
        self.keys = SeenSet()
        self.near = NearDupIndex(near_distance) if near_distance is not None else None

    def problem(self, rec: Prepared) -> str | None:
        ident = pair_identity(self.mode, rec.sha256, rec.captions)
        if ident is not None and ident in self.ids:
            return "duplicate"
        if self.near is not None and rec.phash is not None and self.near.find(rec.phash) is not None:
            return "near_duplicate"
        return None

    def commit(self, sha256: str, captions: list[str], phash: int | None) -> None:
        ident = pair_identity(self.mode, sha256, captions)
        if ident is not None:
            self.ids.add(ident)
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
                self.commit(meta["sha256"], meta["captions"], int(phash, 16) if phash else None)
                self.keys.add(sample["__key__"])


def _fingerprint(inputs: list[str | Path], options: dict[str, Any]) -> str:
    """What must not change between a killed run and its --resume (workers may)."""
    blob = json.dumps({"inputs": [str(Path(p).resolve()) for p in inputs], **options}, sort_keys=True, default=str)
    return sha256_hex(blob.encode("utf-8"))


def _start_or_resume(out: Path, overwrite: bool, resume: bool, fingerprint: str) -> dict[str, Any] | None:
    """Prepare ``out``. Returns the saved state of an interrupted run to continue, or None.

    Completed shards listed in the state (and still byte-identical) are kept; anything else
    — the temp file of the shard in progress, a shard renamed just before the kill but not
    yet recorded — is deleted and redone, which reproduces it exactly.
    """
    if not resume:
        _prepare_out(out, overwrite)
        return None
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / SHARD_STATE
    for tmp in out.glob(".*.tmp"):
        tmp.unlink()
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
    elif (out / MANIFEST).is_file():
        return {"complete": True}
    else:
        keep = set()
    for tar in out.glob("*.tar"):
        if tar.name not in keep:
            tar.unlink()
    return state


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
) -> Summary:
    """Images + captions (tables of paths or URLs, folders, img2dataset output, COCO json)
    -> clean, globally deduplicated pair shards.

    Records flow in input order through :func:`data_tools.pipeline.prepare_chunk` (in
    ``workers`` processes) and then through one ordered writer that does the global exact
    and near-duplicate checks, so the shards are byte-identical for any ``workers``.
    With ``resume`` a killed run continues after its last completed shard.
    """
    out = Path(out_dir)
    opts = filters or FilterOptions()
    img_opts = images or ImageOptions()
    dl_opts = download or DownloadOptions()
    near = near_dup_distance if (near_dup_distance is not None and near_dup_distance >= 0
                                 and dedup == "image") else None
    if workers < 1 or chunk_size < 1:
        raise InputError(f"--workers ({workers}) and --chunk-size ({chunk_size}) must be at least 1")
    _check_inputs(inputs)
    options = {"image_col": image_col, "caption_col": caption_col, "key_col": key_col,
               "input_format": input_format, "image_root": str(image_root) if image_root else None,
               "filters": {**opts.to_dict(), "dedup": dedup, "near_dup_distance": near},
               "images": img_opts.to_dict(), "clip": clip.to_dict() if clip else None,
               "chunk_size": chunk_size, "max_count": max_count, "max_bytes": max_bytes}
    fingerprint = _fingerprint(inputs, options)
    state = _start_or_resume(out, overwrite, resume, fingerprint)
    if state is not None and state.get("complete"):
        m = load_manifest(out)
        if m.get("fingerprint") not in (None, fingerprint):
            raise InputError(f"{out}: complete, but built from other inputs or options; use --overwrite "
                             f"to rebuild it or choose another --out")
        if clip is not None and clip.top_fraction is not None \
                and (m.get("filters", {}).get("clip") or {}).get("mode") != "top_fraction":
            from data_tools.clip_filter import filter_clip

            log.info("%s: sharding was complete; finishing the CLIP top-fraction pass", out)
            filter_clip(out, top_fraction=clip.top_fraction, progress=progress)
            m = load_manifest(out)
        c = m.get("counts", {})
        log.info("%s: already complete; nothing to resume", out)
        return Summary("pairs", out, c.get("seen", 0), m["n_samples"], c.get("dropped", {}), len(m["shards"]))
    state = state or {}
    done_shards: list[dict[str, Any]] = state.get("shards", [])
    start = int(state.get("consumed", 0))
    drops = DropCounter(state.get("dropped", {}))
    examples: dict[str, list[str]] = state.get("examples", {})
    dd = _DedupState(dedup, near)
    if done_shards:
        log.info("%s: resuming after %d completed shard(s), input record %d", out, len(done_shards), start)
        dd.replay(out, [s["name"] for s in done_shards])
    written = sum(s["n_samples"] for s in done_shards)
    seen = start
    scorer = None
    if clip is not None:
        from data_tools.clip_filter import ClipScorer

        scorer = ClipScorer(clip)
    notes = ReadNotes()
    warn = _Warner()
    writer = ShardWriter(out, max_count=max_count, max_bytes=max_bytes, start_index=len(done_shards))
    cfg = PrepareConfig(filters=opts, images=img_opts, download=dl_opts, phash=True)
    records = read_pairs(inputs, image_col, caption_col, key_col, input_format=input_format,
                         image_root=image_root, strict=strict, notes=notes)
    todo = prefetch(((i, p) for i, p in enumerate(records) if i >= start), cfg)
    bar = tqdm(desc="shard-pairs", unit=" pairs", initial=start, disable=not progress)

    def save_state(consumed: int) -> None:
        atomic_write_json(out / SHARD_STATE, {
            "fingerprint": fingerprint, "consumed": consumed, "dropped": dict(drops), "examples": examples,
            "shards": done_shards + shard_dicts(writer.shards)})

    try:
        for chunk in ordered_map(partial(prepare_chunk, cfg), _batches(todo, chunk_size), workers):
            if scorer is not None:
                _clip_chunk(scorer, chunk, clip)
            for rec in chunk:
                seen += 1
                reason = rec.reason or dd.problem(rec)
                if reason is not None:
                    drops.drop(reason)
                    if len(examples.setdefault(reason, [])) < _EXAMPLES:
                        examples[reason].append(rec.source)
                    warn(rec.source, reason, rec.detail)
                    continue
                dd.commit(rec.sha256, rec.captions, rec.phash)
                key = dd.unique_key(rec.key)
                n_done = len(writer.shards)
                writer.write(_sample(key, rec))
                written += 1
                if len(writer.shards) > n_done:
                    save_state(rec.index + 1)
            bar.update(len(chunk))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    shards = done_shards + shard_dicts(writer.shards)
    if written == 0:
        (out / SHARD_STATE).unlink(missing_ok=True)
        raise InputError(f"{', '.join(map(str, inputs))}: no usable pairs "
                         f"({sum(drops.values())} dropped: {dict(drops)})")
    write_manifest(out, {
        "kind": "pairs",
        "tool": TOOL,
        "inputs": [str(p) for p in inputs],
        "input_format": input_format,
        "filters": {**opts.to_dict(), "dedup": dedup, "near_dup_distance": near,
                    "clip": ({"model": clip.model, "pretrained": clip.pretrained, "threshold": clip.threshold,
                              "top_fraction": clip.top_fraction} if clip else None)},
        "images": img_opts.to_dict(),
        "download": dl_opts.to_dict(),
        "counts": {"seen": seen, "written": written, "dropped": dict(drops)},
        "drop_examples": examples,
        "notes": notes.to_dict(),
        "shards": shards,
        "image_encoder": None,
        "fingerprint": fingerprint,
    })
    (out / SHARD_STATE).unlink(missing_ok=True)
    summary = Summary("pairs", out, seen, written, dict(drops), len(shards))
    if clip is not None and clip.top_fraction is not None:
        from data_tools.clip_filter import filter_clip

        fs = filter_clip(out, top_fraction=clip.top_fraction, progress=progress)
        for k, v in fs.dropped.items():
            summary.dropped[k] = summary.dropped.get(k, 0) + v
        summary.written, summary.n_shards = fs.written, fs.n_shards
    return summary


def _clip_chunk(scorer: Any, chunk: list[Prepared], clip: ClipOptions | None) -> None:
    """Score the chunk's surviving records in one batch; apply a fixed threshold at once.
    Runs before dedup, so a duplicate of a low-scoring pair is judged the same way."""
    live = [r for r in chunk if r.reason is None]
    if not live:
        return
    for rec, score in zip(live, scorer.score([(r.data, r.captions) for r in live]), strict=True):
        rec.clip_score = score
        if clip is not None and clip.threshold is not None and score < clip.threshold:
            rec.reason = "clip_score_low"


def _sample(key: str, rec: Prepared) -> dict[str, Any]:
    meta = {**rec.meta, "source": rec.source, "captions": rec.captions, "width": rec.width,
            "height": rec.height, "sha256": rec.sha256}
    if rec.phash is not None:
        meta["phash"] = phash_hex(rec.phash)
    if rec.clip_score is not None:
        meta["clip_score"] = rec.clip_score
    return {"__key__": key, rec.ext: rec.data, "txt": rec.captions[0],
            "json": json.dumps(meta, ensure_ascii=False)}


def shard_text(
    inputs: list[str | Path],
    out_dir: str | Path,
    *,
    min_chars: int = 1,
    dedup: bool = False,
    max_count: int = 10_000,
    overwrite: bool = False,
    progress: bool = True,
) -> Summary:
    """One sentence per line -> text shards (``KEY.txt``)."""
    out = Path(out_dir)
    _check_inputs(inputs)
    _prepare_out(out, overwrite)
    drops = DropCounter()
    seen_text = SeenSet()
    writer = ShardWriter(out, max_count=max_count)
    seen = written = 0
    bar = tqdm(read_sentences(inputs), desc="shard-text", unit=" lines", disable=not progress)
    try:
        for where, raw in bar:
            seen += 1
            sentence = normalize_caption(raw)
            if len(sentence) < max(1, min_chars):
                drops.drop("empty" if not sentence else "too_short")
                continue
            if dedup and seen_text.check_and_add(sentence.lower()):
                drops.drop("duplicate")
                continue
            path, _, line = where.rpartition(":")
            writer.write({"__key__": f"{Path(path).stem.replace('.', '_')}_{int(line):09d}", "txt": sentence})
            written += 1
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    if written == 0:
        raise InputError(f"{', '.join(map(str, inputs))}: no usable sentences")
    write_manifest(out, {
        "kind": "text",
        "tool": TOOL,
        "inputs": [str(p) for p in inputs],
        "filters": {"min_chars": min_chars, "dedup": dedup},
        "counts": {"seen": seen, "written": written, "dropped": dict(drops)},
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


def embed(
    dataset: str | Path,
    encoder: str = "efficientnet_lite0",
    *,
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
) -> Summary:
    """Add ``KEY.emb.npy`` (float16 pooled image features) to every sample of a pairs dataset.

    Shards are rewritten one at a time (temp + rename); ``.embed_state.json`` remembers which
    are done, so a killed run resumes where it stopped. The manifest is rewritten last.
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
        if state.get("encoder") != encoder:
            state = {}
    done: dict[str, dict[str, Any]] = state.get("done", {})
    enc = load_image_encoder(encoder)
    enc.model.to(device)
    drops = DropCounter()
    total = sum(s["n_samples"] for s in manifest["shards"])
    bar = tqdm(total=total, desc=f"embed {encoder}", unit=" img", disable=not progress)
    new_shards = []
    for shard in manifest["shards"]:
        name = shard["name"]
        prev = done.get(name)
        # Trust a shard as done only if it is byte-for-byte the one this run wrote from
        # this very input shard (a rebuilt dataset must be embedded again).
        if prev and prev["input_sha256"] == shard["sha256"] \
                and file_sha256(folder / name) == prev["shard"]["sha256"]:
            new_shards.append(prev["shard"])
            drops.update(prev["dropped"])
            bar.update(shard["n_samples"])
            continue
        writer = ShardWriter(folder, max_count=math.inf, start_index=int(name.split(".")[0]))
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
        atomic_write_json(state_path, {"encoder": encoder, "done": done})
    bar.close()
    counts = manifest.get("counts", {})
    dropped = {**counts.get("dropped", {})}
    for k, v in drops.items():
        dropped[k] = dropped.get(k, 0) + v
    written = sum(s["n_samples"] for s in new_shards)
    manifest.update({
        "shards": new_shards,
        "image_encoder": enc.describe(),
        "counts": {**counts, "written": written, "dropped": dropped},
    })
    for k in ("format", "version", "created", "n_samples"):
        manifest.pop(k, None)
    write_manifest(folder, manifest)
    state_path.unlink(missing_ok=True)
    return Summary("embed", folder, total, written, dict(drops), len(new_shards))
