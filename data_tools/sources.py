"""Readers that turn each supported input into a stream of :class:`Pair` records.

Every reader streams (a 100M-row table never sits in memory) and reports problems in the same
two ways: a structural problem with the input as a whole (missing file, no caption column)
raises :class:`InputError` naming the file, while a bad row is yielded as a Pair with
``error`` set so the caller counts it under a reason and goes on.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
IMAGE_COLUMNS = ("image", "image_path", "file", "filepath", "path", "url")
CAPTION_COLUMNS = ("captions", "caption", "text", "txt", "sentence")
TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


class InputError(ValueError):
    """The input as a whole cannot be read; the message names the file and what to do."""


@dataclass
class Pair:
    """One image-text record on its way into a shard."""

    key: str
    captions: list[str]
    image_path: str | None = None
    url: str | None = None
    image_bytes: bytes | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    """`file:line` of the record, so a drop can be traced to its origin."""
    error: str | None = None
    """Drop reason when the record itself is unusable (bad row, missing caption...)."""


_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]+")


def clean_key(raw: str) -> str:
    """Keys become tar member prefixes: WebDataset splits at the first dot, so no dots."""
    key = _KEY_BAD.sub("_", raw).strip("_")
    return key or "sample"


def _open_text(path: Path) -> TextIO:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _table_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for suffix in TABLE_SUFFIXES:
        if name.endswith(suffix):
            return "jsonl" if suffix == ".json" else suffix[1:]
    raise InputError(f"{path}: unsupported table type (expected {', '.join(TABLE_SUFFIXES)}, optionally .gz)")


def _pick(columns: list[str], wanted: str | None, defaults: tuple[str, ...], path: Path, what: str) -> str:
    if wanted:
        if wanted not in columns:
            raise InputError(f"{path}: no column {wanted!r} (columns: {', '.join(columns)}); "
                             f"pass the right --{what}-col")
        return wanted
    for name in defaults:
        if name in columns:
            return name
    raise InputError(f"{path}: none of the columns {', '.join(columns)} looks like the {what} "
                     f"column (tried {', '.join(defaults)}); pass --{what}-col")


def _as_captions(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, str)]
    if hasattr(value, "tolist"):
        return _as_captions(value.tolist())
    return []


def _rows(path: Path, kind: str) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """(line number, row or None, error) for every data row, streaming."""
    if kind == "jsonl":
        with _open_text(path) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield lineno, None, f"invalid JSON ({exc.msg})"
                    continue
                if not isinstance(row, dict):
                    yield lineno, None, "JSON line is not an object"
                    continue
                yield lineno, row, None
    elif kind in ("csv", "tsv"):
        with _open_text(path) as fh:
            reader = csv.DictReader(fh, delimiter="\t" if kind == "tsv" else ",")
            if reader.fieldnames is None:
                return
            for row in reader:
                # DictReader puts surplus cells under None and pads short rows with None.
                if None in row or any(v is None for v in row.values()):
                    yield reader.line_num, None, "wrong number of cells"
                    continue
                yield reader.line_num, row, None
    elif kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        rowno = 0
        for batch in pf.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                rowno += 1
                yield rowno, row, None


def table_columns(path: Path, kind: str) -> list[str]:
    if kind == "parquet":
        import pyarrow.parquet as pq

        return list(pq.ParquetFile(path).schema_arrow.names)
    if kind in ("csv", "tsv"):
        with _open_text(path) as fh:
            header = next(csv.reader(fh, delimiter="\t" if kind == "tsv" else ","), None)
        if not header:
            raise InputError(f"{path}: empty file (a header row with column names is expected)")
        return header
    # jsonl: columns are the union over the first rows (rows may omit optional fields).
    cols: dict[str, None] = {}
    for i, (_, row, _) in enumerate(_rows(path, kind)):
        if row is not None:
            cols.update(dict.fromkeys(row))
        if i >= 100:
            break
    if not cols:
        raise InputError(f"{path}: no JSON object rows found")
    return list(cols)


def read_table(
    path: str | Path,
    image_col: str | None = None,
    caption_col: str | None = None,
    key_col: str | None = None,
) -> Iterator[Pair]:
    """Rows of url-or-path + caption(s); other columns are kept in ``meta``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    kind = _table_kind(path)
    columns = table_columns(path, kind)
    icol = _pick(columns, image_col, IMAGE_COLUMNS, path, "image")
    ccol = _pick(columns, caption_col, CAPTION_COLUMNS, path, "caption")
    kcol = key_col if key_col else ("key" if "key" in columns else None)
    if key_col and key_col not in columns:
        raise InputError(f"{path}: no column {key_col!r} (columns: {', '.join(columns)})")
    base = path.parent
    for lineno, row, err in _rows(path, kind):
        where = f"{path}:{lineno}"
        if row is None:
            yield Pair(key="", captions=[], source=where, error="bad_row", meta={"detail": err})
            continue
        ref = row.get(icol)
        captions = _as_captions(row.get(ccol))
        raw_key = str(row[kcol]) if kcol and row.get(kcol) not in (None, "") else f"{path.stem}_{lineno:09d}"
        meta = {k: v for k, v in row.items() if k not in (icol, ccol) and _jsonable(v)}
        pair = Pair(key=clean_key(raw_key), captions=captions, source=where, meta=meta)
        if not isinstance(ref, str) or not ref:
            pair.error = "missing_image_ref"
        elif re.match(r"^[a-z][a-z0-9+.-]*://", ref):
            pair.url = ref
        else:
            pair.image_path = str((base / ref) if not Path(ref).is_absolute() else Path(ref))
        yield pair


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def read_folder(path: str | Path) -> Iterator[Pair]:
    """Images with sidecar captions: ``x.jpg`` + ``x.txt`` (one caption per line) or
    ``x.json`` (with a caption/captions field). Sorted for a deterministic order."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: folder not found")
    images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not images:
        raise InputError(f"{path}: no images ({', '.join(IMAGE_EXTS)}) found")
    for img in images:
        rel = img.relative_to(path).with_suffix("")
        pair = Pair(key=clean_key(str(rel)), captions=[], image_path=str(img), source=str(img))
        txt, js = img.with_suffix(".txt"), img.with_suffix(".json")
        if txt.is_file():
            text = txt.read_text(encoding="utf-8", errors="replace")
            pair.captions = [ln for ln in text.splitlines() if ln.strip()]
        elif js.is_file():
            try:
                meta = json.loads(js.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                pair.error = "bad_sidecar"
                yield pair
                continue
            if isinstance(meta, dict):
                for col in CAPTION_COLUMNS:
                    if col in meta:
                        pair.captions = _as_captions(meta.pop(col))
                        break
                pair.meta = {k: v for k, v in meta.items() if _jsonable(v)}
        if not pair.captions and pair.error is None:
            pair.error = "missing_caption"
        yield pair


def read_pairs(
    inputs: list[str | Path],
    image_col: str | None = None,
    caption_col: str | None = None,
    key_col: str | None = None,
) -> Iterator[Pair]:
    """Dispatch each input to its reader, in the order given."""
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            tables = sorted(q for q in p.iterdir() if q.is_file() and _is_table(q))
            # A folder holding one captions table (like the bundled sample) is read as that
            # table; any other folder is images + sidecars.
            if len(tables) == 1 and not any(q.suffix.lower() in IMAGE_EXTS for q in p.iterdir()):
                yield from read_table(tables[0], image_col, caption_col, key_col)
            else:
                yield from read_folder(p)
        elif p.is_file():
            yield from read_table(p, image_col, caption_col, key_col)
        else:
            raise InputError(f"{p}: no such file or folder")


def _is_table(p: Path) -> bool:
    try:
        _table_kind(p)
        return True
    except InputError:
        return False


def read_sentences(inputs: list[str | Path]) -> Iterator[tuple[str, str]]:
    """(source `file:line`, sentence) for one-sentence-per-line corpora (.gz too)."""
    for item in inputs:
        p = Path(item)
        if not p.is_file():
            raise InputError(f"{p}: file not found")
        with _open_text(p) as fh:
            for lineno, line in enumerate(fh, 1):
                yield f"{p}:{lineno}", line.rstrip("\r\n")
