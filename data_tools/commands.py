"""The data_tools verbs: shard-pairs, shard-text, embed.

Each verb streams its input once, shows a progress bar, counts every dropped record by
reason, and ends with a summary. Output goes through :mod:`data_tools.shards`, so shards are
atomic and the manifest is written last.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_tools.dedup import DedupMode, SeenSet, pair_identity, sha256_hex
from data_tools.filters import DropCounter, FilterOptions, caption_problem, check_image, normalize_caption
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
from data_tools.sources import InputError, Pair, read_pairs, read_sentences

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
        for name in (MANIFEST, "sizes.json", EMBED_STATE):
            (out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


class _Warner:
    """Warn about the first few bad records with their location, then only count."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, where: str, reason: str) -> None:
        self.n += 1
        if self.n <= _WARN_LIMIT:
            log.warning("%s: skipped (%s)", where, reason)
        elif self.n == _WARN_LIMIT + 1:
            log.warning("further skipped records are only counted (see the summary)")


def _unique_key(key: str, keys: SeenSet) -> str:
    candidate, n = key, 1
    while keys.check_and_add(candidate):
        candidate = f"{key}_{n}"
        n += 1
    return candidate


def shard_pairs(
    inputs: list[str | Path],
    out_dir: str | Path,
    *,
    image_col: str | None = None,
    caption_col: str | None = None,
    key_col: str | None = None,
    filters: FilterOptions | None = None,
    dedup: DedupMode = "image",
    max_count: int = 10_000,
    max_bytes: int = 1 << 30,
    overwrite: bool = False,
    progress: bool = True,
) -> Summary:
    """Local images + captions -> clean, deduplicated pair shards."""
    out = Path(out_dir)
    opts = filters or FilterOptions()
    _check_inputs(inputs)
    _prepare_out(out, overwrite)
    drops = DropCounter()
    seen_images, seen_keys = SeenSet(), SeenSet()
    warn = _Warner()
    writer = ShardWriter(out, max_count=max_count, max_bytes=max_bytes)
    seen = written = 0
    bar = tqdm(read_pairs(inputs, image_col, caption_col, key_col), desc="shard-pairs",
               unit=" pairs", disable=not progress)
    try:
        for pair in bar:
            seen += 1
            reason = _pair_problem(pair, opts)
            if reason is None:
                sample, reason = _pair_sample(pair, opts, dedup, seen_images)
            if reason is not None:
                drops.drop(reason)
                warn(pair.source, reason)
                continue
            sample["__key__"] = _unique_key(pair.key, seen_keys)
            writer.write(sample)
            written += 1
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    if written == 0:
        raise InputError(f"{', '.join(map(str, inputs))}: no usable pairs "
                         f"({sum(drops.values())} dropped: {dict(drops)})")
    write_manifest(out, {
        "kind": "pairs",
        "tool": TOOL,
        "inputs": [str(p) for p in inputs],
        "filters": {**opts.to_dict(), "dedup": dedup},
        "counts": {"seen": seen, "written": written, "dropped": dict(drops)},
        "shards": shard_dicts(shards),
        "image_encoder": None,
    })
    return Summary("pairs", out, seen, written, dict(drops), len(shards))


def _pair_problem(pair: Pair, opts: FilterOptions) -> str | None:
    if pair.error:
        return pair.error
    if pair.url is not None:
        raise InputError(f"{pair.source}: image reference {pair.url!r} is a URL; shard-pairs "
                         f"reads local image files (give paths relative to the table)")
    cleaned = [normalize_caption(c) for c in pair.captions]
    good = [c for c in cleaned if caption_problem(c, opts) is None]
    if not good:
        return caption_problem(cleaned[0], opts) if cleaned else "caption_missing"
    pair.captions = good
    return None


def _pair_sample(pair: Pair, opts: FilterOptions, dedup: DedupMode,
                 seen_images: SeenSet) -> tuple[dict[str, Any], str | None]:
    try:
        data = Path(pair.image_path or "").read_bytes()
    except OSError:
        return {}, "image_missing"
    info, reason = check_image(data, opts)
    if reason is not None or info is None:
        return {}, reason
    digest = sha256_hex(data)
    ident = pair_identity(dedup, digest, pair.captions)
    if ident is not None and seen_images.check_and_add(ident):
        return {}, "duplicate"
    meta = {**pair.meta, "source": pair.source, "captions": pair.captions, "width": info.width,
            "height": info.height, "sha256": digest}
    return {info.format: data, "txt": pair.captions[0], "json": json.dumps(meta, ensure_ascii=False)}, None


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
    from PIL import Image

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
            for batch in _batches(read_shard(folder / name), batch_size):
                images, keep = [], []
                for sample in batch:
                    ext = next((e for e in ("jpg", "png", "webp", "gif", "bmp") if e in sample), None)
                    try:
                        images.append(Image.open(io.BytesIO(sample[ext])).convert("RGB"))
                        keep.append(sample)
                    except Exception:
                        shard_drops.drop("embed_undecodable")
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
