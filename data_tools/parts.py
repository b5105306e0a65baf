"""``shard-pairs`` on many machines: ``--part i --parts N`` on each, then ``merge``.

**Partition.** Every process reads the whole input (cheap: tables and file lists) and keeps
the records whose image reference — URL, path, or ``tar:key`` of an img2dataset sample —
hashes to its part (:func:`data_tools.sources.part_of`, blake2b, the same everywhere). All
rows of one image therefore land in one part, where they are grouped into one record. The
image work (download, read, decode, checks, phash, re-encode, CLIP score) is done once, by
the owning part. Each record keeps its global input position, counted over *all* input
rows, so positions agree across parts.

**A part** (``OUT/parts/part-IIII-of-NNNN/``) writes, per completed shard, ``NNNNNN.tar``
(every record that passed the per-record filters, under a part-local unique key) and
``NNNNNN.index.parquet``: for each sample its position, key, original key, exact-dedup
identity (16-byte digest of the sha256 of the image bytes [+ captions in ``--dedup pair``]),
64-bit phash, CLIP score and source. It drops and counts per-record failures itself, but
decides no duplicate and no final key: those depend on records in other parts. A part
resumes on its own (``--resume``), like a single-machine run, and ends with ``part.json``.

**Merge** replays the identity indexes of all parts in global position order (a k-way merge
of sorted streams) through exactly the dedup state a single machine keeps while writing —
exact identities, the near-duplicate index, the keys in use — so it drops the same records
for the same reasons and gives the same keys. It never decodes or hashes an image again.
Part shards with nothing dropped and no key changed become dataset shards by a hard link
(a copy where links are refused); only affected shards are rewritten, member bytes as they
are. Then one manifest and sizes.json. The result equals a single-machine run on the same
input (same kept keys, same bytes per sample, same drop counts and examples); only the shard
layout differs. Cost: O(R log N) for R candidate rows over N parts, memory that of the dedup
state (the same as one machine's writer), I/O the index files plus the affected shards.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from data_tools.commands import Examples, Summary, _DedupState
from data_tools.dedup import DedupMode, SeenSet, identity_digest
from data_tools.filters import DropCounter
from data_tools.pipeline import Prepared
from data_tools.shards import (
    MANIFEST,
    PARTS_DIR,
    SHARD_STATE,
    DatasetError,
    ShardWriter,
    atomic_write_json,
    load_manifest,
    place_file,
    read_shard,
    shard_dicts,
    shard_name,
    write_manifest,
)
from data_tools.sources import InputError

log = logging.getLogger("webmcse.data")
PART_MANIFEST = "part.json"
_PART_DIR = re.compile(r"^part-(\d+)-of-(\d+)$")
INDEX_SCHEMA = pa.schema([
    ("row", pa.int64()), ("sub", pa.int64()), ("key", pa.string()), ("raw_key", pa.string()),
    ("ident", pa.binary(16)), ("phash", pa.uint64()), ("clip_score", pa.float64()), ("source", pa.string()),
])


def part_dir(out: Path, part: int, parts: int) -> Path:
    return out / PARTS_DIR / f"part-{part:04d}-of-{parts:04d}"


def _existing_parts(out: Path) -> dict[int, set[int]]:
    """parts count -> part numbers with a folder under OUT/parts."""
    found: dict[int, set[int]] = {}
    root = out / PARTS_DIR
    if root.is_dir():
        for p in root.iterdir():
            m = _PART_DIR.match(p.name)
            if m and p.is_dir():
                found.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    return found


def prepare_part(out: Path, part: int, parts: int, fingerprint: str, overwrite: bool) -> Path | None:
    """The folder of one part (created), or None when OUT already holds the merged dataset
    of this very run. Refuses a run whose other parts were started with another N."""
    if (out / MANIFEST).is_file():
        m = load_manifest(out)
        if m.get("fingerprint") == fingerprint and not overwrite:
            return None
        if not overwrite:
            raise InputError(f"{out}: already holds a dataset built from other inputs or options; pass --overwrite "
                             f"(the merge then replaces it) or choose another --out")
    elif out.is_dir() and any(out.glob("*.tar")) and not (out / PARTS_DIR).is_dir():
        raise InputError(f"{out}: holds tar files but no webmcse manifest (another tool's output?); choose an "
                         f"empty or new --out folder (nothing was deleted)")
    other = sorted(n for n in _existing_parts(out) if n != parts)
    if other:
        raise InputError(f"{out / PARTS_DIR}: holds parts of a run split into {other[0]} parts, not {parts}; "
                         f"pass --parts {other[0]} (rerunning one part keeps the split), or --out elsewhere")
    folder = part_dir(out, part, parts)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class IndexWriter:
    """Collects the identity rows of the samples written to the current shard and writes
    them as ``NNNNNN.index.parquet`` (temp + rename) when the shard completes."""

    def __init__(self, folder: Path, dedup: DedupMode) -> None:
        self.folder = folder
        self.dedup = dedup
        self.rows: dict[str, list[Any]] = {name: [] for name in INDEX_SCHEMA.names}
        self.done: set[str] = set()

    @staticmethod
    def name_for(shard: str) -> str:
        return shard.removesuffix(".tar") + ".index.parquet"

    def add(self, rec: Prepared, key: str) -> None:
        r = self.rows
        r["row"].append(rec.pos[0])
        r["sub"].append(rec.pos[1])
        r["key"].append(key)
        r["raw_key"].append(rec.key)
        r["ident"].append(identity_digest(self.dedup, rec.sha256, rec.captions))
        r["phash"].append(rec.phash)
        r["clip_score"].append(rec.clip_score)
        r["source"].append(rec.source)

    def flush(self, shard: str) -> None:
        path = self.folder / self.name_for(shard)
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(pa.table(self.rows, schema=INDEX_SCHEMA), tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        self.rows = {name: [] for name in INDEX_SCHEMA.names}
        self.done.add(shard)

    def flushed(self, shard: str) -> bool:
        return shard in self.done

    def replay_keys(self, keys: SeenSet, index_names: list[str]) -> None:
        for name in index_names:
            for key in pq.read_table(self.folder / name, columns=["key"]).column("key").to_pylist():
                keys.add(key)


def write_part_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    atomic_write_json(folder / PART_MANIFEST, {"kind": "pairs-part", **manifest})


def load_part_manifest(folder: Path) -> dict[str, Any]:
    path = folder / PART_MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: unreadable part manifest ({exc}); rerun that part with --overwrite") from None


# --- merge --------------------------------------------------------------------------------------


def _find_parts(out: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every part of the run in OUT, complete and consistent, or one error naming what is
    missing and the command that finishes it."""
    found = _existing_parts(out)
    if not found:
        raise DatasetError(f"{out / PARTS_DIR}: no parts to merge (run `webmcse-data shard-pairs ... --out {out} "
                           f"--part I --parts N` for every I first)")
    if len(found) > 1:
        raise DatasetError(f"{out / PARTS_DIR}: parts of runs split {sorted(found)} ways; keep one split")
    parts = next(iter(found))
    incomplete: list[str] = []
    result = []
    for i in range(parts):
        folder = part_dir(out, i, parts)
        if not (folder / PART_MANIFEST).is_file():
            state = " (interrupted: rerun it with --resume)" if (folder / SHARD_STATE).is_file() else \
                " (never ran)" if not folder.is_dir() else ""
            incomplete.append(f"{i}{state}")
            continue
        result.append((folder, load_part_manifest(folder)))
    if incomplete:
        raise DatasetError(f"{out}: part(s) {', '.join(incomplete)} of {parts} not complete; run `webmcse-data "
                           f"shard-pairs ... --out {out} --part I --parts {parts} --resume` for each, then merge")
    prints = {m["fingerprint"] for _, m in result}
    if len(prints) != 1:
        raise DatasetError(f"{out / PARTS_DIR}: the parts were built from different inputs or options; rerun "
                           f"them with one command line (--overwrite)")
    return result


def _index_rows(part: int, folder: Path, manifest: dict[str, Any]) -> Iterator[tuple[Any, ...]]:
    """(row, sub, part, shard number, row in shard, key, raw key, ident, phash, clip, source)
    in position order (a part writes in input order)."""
    for s_i, entry in enumerate(manifest["shards"]):
        cols = pq.read_table(folder / entry["index"]).to_pydict()
        if len(cols["row"]) != entry["n_samples"]:
            raise DatasetError(f"{folder / entry['index']}: {len(cols['row'])} rows for {entry['n_samples']} samples "
                               f"of {entry['name']}; rerun part {part} with --overwrite")
        for r_i, row in enumerate(zip(cols["row"], cols["sub"], cols["key"], cols["raw_key"], cols["ident"],
                                      cols["phash"], cols["clip_score"], cols["source"], strict=True)):
            yield (row[0], row[1], part, s_i, r_i, *row[2:])


class MergePlan:
    """What the replay decided: per part shard, the rows to drop and the keys to change."""

    def __init__(self) -> None:
        self.drop: dict[tuple[int, int], set[int]] = {}
        self.rename: dict[tuple[int, int], dict[int, str]] = {}
        self.drops = DropCounter()
        self.examples = Examples()
        self.seen = 0
        self.written = 0
        self.candidates = 0
        self.cut: float | None = None


def plan_merge(parts: list[tuple[Path, dict[str, Any]]], progress: bool = False) -> MergePlan:
    """Replay every part's identity index in global input order through a single machine's
    dedup state (see the module docstring). Reads only the index files."""
    base = parts[0][1]
    filters = base["dataset"]["filters"]
    dd = _DedupState(filters["dedup"], filters["near_dup_distance"])
    plan = MergePlan()
    for _, m in parts:
        plan.drops.update(m["counts"]["dropped"])
        plan.examples.merge(Examples(m["examples"]))
        plan.seen += m["counts"]["seen"]
    top_fraction = base.get("clip_top_fraction")
    kept_scores: list[tuple[float, int, int, int]] = []  # (score, part, shard, row) in position order
    streams = [_index_rows(i, folder, m) for i, (folder, m) in enumerate(parts)]
    bar = tqdm(total=sum(m["counts"]["written"] for _, m in parts), desc="merge: replay", unit=" rows",
               disable=not progress)
    for row, sub, part, s_i, r_i, key, raw_key, ident, phash, clip_score, source in heapq.merge(*streams):
        plan.candidates += 1
        bar.update(1)
        reason = dd.problem(ident, phash)
        if reason is not None:
            plan.drop.setdefault((part, s_i), set()).add(r_i)
            plan.drops.drop(reason)
            plan.examples.add(reason, (row, sub), source)
            continue
        dd.commit(ident, phash)
        final = dd.unique_key(raw_key)
        if final != key:
            plan.rename.setdefault((part, s_i), {})[r_i] = final
        if top_fraction is not None:
            kept_scores.append((clip_score, part, s_i, r_i))
    bar.close()
    plan.written = plan.candidates - sum(len(v) for v in plan.drop.values())
    if top_fraction is not None and kept_scores:
        # filter-clip's rule on one machine: keep ceil(F*N), ties at the cut in dataset
        # order, which is input order there — the order of kept_scores here.
        from data_tools.clip_filter import DROP_REASON, _cut

        cut, ties = _cut([s for s, *_ in kept_scores], top_fraction)
        for score, part, s_i, r_i in kept_scores:
            keep = score > cut or (score == cut and ties != 0)
            if keep and score == cut and ties > 0:
                ties -= 1
            if not keep:
                plan.drop.setdefault((part, s_i), set()).add(r_i)
                plan.drops.drop(DROP_REASON)
                plan.written -= 1
        plan.cut = cut
    return plan


@contextlib.contextmanager
def _merge_lock(out: Path) -> Iterator[None]:
    """One merge at a time per folder (a requeued array task may submit a second one)."""
    (out / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    with open(out / PARTS_DIR / ".merge.lock", "w") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: no lock, one merge is the caller's business
            pass
        yield


def merge(out_dir: str | Path, *, overwrite: bool = False, keep_parts: bool = False,
          progress: bool = True) -> Summary:
    """Build the dataset in ``out_dir`` from its complete parts (``OUT/parts/``)."""
    out = Path(out_dir)
    if (out / MANIFEST).is_file() and not (out / PARTS_DIR).is_dir():
        m = load_manifest(out)
        c = m.get("counts", {})
        log.info("%s: merged already; nothing to do", out)
        return Summary("pairs", out, c.get("seen", 0), m["n_samples"], c.get("dropped", {}), len(m["shards"]))
    with _merge_lock(out):
        parts = _find_parts(out)
        base = parts[0][1]
        if (out / MANIFEST).is_file():
            m = load_manifest(out)
            if m.get("fingerprint") == base["fingerprint"] and m.get("merged_from_parts"):
                if not keep_parts:
                    shutil.rmtree(out / PARTS_DIR, ignore_errors=True)
                c = m["counts"]
                return Summary("pairs", out, c["seen"], m["n_samples"], c["dropped"], len(m["shards"]))
            if not overwrite:
                raise InputError(f"{out}: already holds a dataset built from other inputs or options; pass "
                                 f"--overwrite to replace it with the merged parts")
        # From here the folder holds no trusted dataset: no manifest until the end.
        (out / MANIFEST).unlink(missing_ok=True)
        for p in list(out.glob("*.tar")) + list(out.glob(".*.tmp")):
            p.unlink()
        plan = plan_merge(parts, progress)
        if plan.written == 0:
            raise InputError(f"{out}: no usable pairs in any part ({dict(plan.drops)})")
        shards = _write_shards(out, parts, plan, progress)
        dataset = dict(base["dataset"])
        if plan.cut is not None:
            dataset["filters"] = {**dataset["filters"], "clip": {**(dataset["filters"].get("clip") or {}),
                                                                 "threshold": plan.cut,
                                                                 "top_fraction": base["clip_top_fraction"],
                                                                 "mode": "top_fraction"}}
        notes = dict(base["notes"])
        notes["eval_captions_removed"] = sum(m["notes"].get("eval_captions_removed", 0) for _, m in parts)
        write_manifest(out, {**dataset, "counts": {"seen": plan.seen, "written": plan.written,
                                                   "dropped": dict(plan.drops)},
                             "drop_examples": plan.examples.to_manifest(), "notes": notes, "shards": shards,
                             "merged_from_parts": len(parts)})
    if not keep_parts:
        shutil.rmtree(out / PARTS_DIR, ignore_errors=True)
    n_rewritten = sum(1 for k in set(plan.drop) | set(plan.rename))
    log.info("%s: merged %d part(s): %d candidate rows, %d part shard(s) rewritten, the rest linked",
             out, len(parts), plan.candidates, n_rewritten)
    return Summary("pairs", out, plan.seen, plan.written, dict(plan.drops), len(shards))


def _write_shards(out: Path, parts: list[tuple[Path, dict[str, Any]]], plan: MergePlan,
                  progress: bool) -> list[dict[str, Any]]:
    """Part shards in part order -> dataset shards 000000.tar, ...: linked when untouched,
    rewritten (dropped rows left out, keys changed) otherwise; empty ones left out."""
    shards: list[dict[str, Any]] = []
    total = sum(len(m["shards"]) for _, m in parts)
    bar = tqdm(total=total, desc="merge: shards", unit=" shards", disable=not progress)
    for p_i, (folder, m) in enumerate(parts):
        for s_i, entry in enumerate(m["shards"]):
            bar.update(1)
            drop = plan.drop.get((p_i, s_i), set())
            rename = plan.rename.get((p_i, s_i), {})
            if len(drop) == entry["n_samples"]:
                continue
            target = shard_name(len(shards))
            if not drop and not rename:
                place_file(folder / entry["name"], out / target)
                shards.append({**{k: entry[k] for k in ("n_samples", "bytes", "sha256")}, "name": target})
                continue
            writer = ShardWriter(out, max_count=math.inf, start_index=len(shards))
            try:
                for r_i, sample in enumerate(read_shard(folder / entry["name"])):
                    if r_i in drop:
                        continue
                    members = {k: v for k, v in sample.items() if not k.startswith("__")}
                    writer.write({"__key__": rename.get(r_i, sample["__key__"]), **members})
                written = writer.close()
            except BaseException:
                writer.abort()
                raise
            shards.append({"name": target, **{k: v for k, v in shard_dicts(written)[0].items() if k != "name"}})
    bar.close()
    return shards
