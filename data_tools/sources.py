"""Readers that turn each supported input into a stream of :class:`Pair` records.

Every reader streams (a 100M-row table never sits in memory) and reports problems in two
ways: a structural problem with an input as a whole (missing file, no caption column) raises
:class:`InputError` naming the file — :func:`check_inputs` finds those before anything is
written — while everything that goes wrong *inside* an input (a bad row, bytes that are not
UTF-8, a .gz cut half-way, a damaged tar) becomes a Pair with ``error`` set, which the
caller counts under that reason and goes on; ``--strict`` turns those into an InputError
naming file and line instead.

Every record carries its global input position ``pos`` = (row, sub): ``row`` counts the
input rows read so far over all inputs, so the same record has the same position in every
process that reads the same inputs — whether it reads all records or, with ``select``, only
those of one partition (``--part i --parts N``). The merge of a partitioned run orders
records by it.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
IMAGE_COLUMNS = ("image", "image_path", "file", "filepath", "path", "url")
CAPTION_COLUMNS = ("captions", "caption", "text", "txt", "sentence")
TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")

#: Reader-side failures that ``--strict`` turns into an error naming file and line.
STRICT_READ_REASONS = ("bad_row", "input_tar_damaged", "input_unreadable", "path_outside_root", "bad_sidecar",
                       "text_unencodable")

Select = Callable[[str], bool]
"""Which records to read, by :attr:`Pair.ref` (a partition of the input); None reads all."""


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
    pos: tuple[int, int] = (0, 0)
    """Global input position (row, sub); see the module docstring."""

    @property
    def ref(self) -> str:
        """The image reference that partitions the input: URL, image path, or where the
        record lives (img2dataset samples, bad rows)."""
        return self.url or self.image_path or self.source


def part_of(ref: str, parts: int) -> int:
    """The partition (0..parts-1) of an image reference: a stable hash, the same on every
    machine and Python version (not ``hash()``, which is salted per process)."""
    digest = hashlib.blake2b(ref.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % parts


def partition(part: int, parts: int) -> Select:
    return lambda ref: part_of(ref, parts) == part


class _Rows:
    """Input rows consumed so far by one reader (the ``row`` of a record's position)."""

    def __init__(self) -> None:
        self.n = 0

    def take(self) -> int:
        self.n += 1
        return self.n - 1


_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]+")


def clean_key(raw: str) -> str:
    """Keys become tar member prefixes: WebDataset splits at the first dot, so no dots."""
    key = _KEY_BAD.sub("_", raw).strip("_")
    return key or "sample"


class _Unreadable(Exception):
    """An input cannot be read on from ``where`` (cut .gz, corrupt parquet page...)."""

    def __init__(self, where: str, detail: str) -> None:
        super().__init__(f"{where}: {detail}")
        self.where, self.detail = where, detail


def _lines(path: Path, counter: list[int]) -> Iterator[str]:
    """Decoded lines of a (possibly gzipped) file; ``counter[0]`` is the current line.

    Bytes that are not UTF-8 are kept as lone surrogates (``surrogateescape``) instead of
    failing the file: the record holding them is then dropped on its own as
    ``text_unencodable`` with its line. Reading line by line (not in 8 KB blocks) lets a cut
    .gz be reported at the exact line.
    """
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # noqa: SIM115
    with raw:
        while True:
            try:
                line = raw.readline()
            except (EOFError, OSError) as exc:
                raise _Unreadable(f"{path}:{counter[0] + 1}", f"cannot read on after line {counter[0]} "
                                  f"({type(exc).__name__}: {exc}); the file is cut or corrupt") from None
            if not line:
                return
            counter[0] += 1
            yield line.decode("utf-8", "surrogateescape")


def _open_text(path: Path) -> TextIO:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _table_kind(path: Path) -> str:
    """jsonl / csv / tsv / parquet from the file name (``.json`` is read as JSON lines)."""
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


_SKIP: dict[str, Any] = {}
"""A row another partition owns (parquet only: it is never converted to Python)."""


def _rows(path: Path, kind: str, owned: Callable[[int, Any], bool] | None = None, image_col: str | None = None
          ) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """(line number, row or None, error) for every data row, streaming.

    A bad row is yielded with its error (the caller counts it, or stops in --strict mode);
    a file that cannot be read on at all (a cut .gz, a corrupt parquet page) raises
    :class:`_Unreadable` naming the line/row where reading stopped. For parquet,
    ``owned(row number, image cell)`` decides from the image column alone which rows are
    converted to Python at all; the others come back as :data:`_SKIP` (a part of a
    partitioned run skips most rows: this keeps skipping cheap).
    """
    counter = [0]
    rowno = 0
    try:
        if kind == "jsonl":
            for line in _lines(path, counter):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield counter[0], None, f"invalid JSON ({exc.msg} at column {exc.colno})"
                    continue
                if not isinstance(row, dict):
                    yield counter[0], None, "JSON line is not an object"
                    continue
                yield counter[0], row, None
        elif kind in ("csv", "tsv"):
            reader = csv.DictReader(_lines(path, counter), delimiter="\t" if kind == "tsv" else ",")
            if reader.fieldnames is None:
                return
            for row in reader:
                # DictReader puts surplus cells under None and pads short rows with None.
                if None in row or any(v is None for v in row.values()):
                    yield counter[0], None, f"wrong number of cells (the header has {len(reader.fieldnames)})"
                    continue
                yield counter[0], row, None
        elif kind == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            for batch in pf.iter_batches(batch_size=4096):
                if owned is None or image_col is None:
                    for row in batch.to_pylist():
                        rowno += 1
                        yield rowno, row, None
                    continue
                cells = batch.column(image_col).to_pylist()
                keep = [i for i, cell in enumerate(cells) if owned(rowno + i + 1, cell)]
                taken = iter(batch.take(keep).to_pylist()) if keep else iter(())
                wanted = set(keep)
                for i in range(len(cells)):
                    rowno += 1
                    yield rowno, (next(taken) if i in wanted else _SKIP), None
    except _Unreadable:
        raise
    except (csv.Error, OSError, ValueError, EOFError) as exc:
        where, unit = (rowno, "row") if kind == "parquet" else (counter[0], "line")
        raise _Unreadable(f"{path}:{where + 1}", f"cannot read on after {unit} {where} "
                          f"({type(exc).__name__}: {exc})") from None


def table_columns(path: Path, kind: str) -> list[str]:
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            return list(pq.ParquetFile(path).schema_arrow.names)
        if kind in ("csv", "tsv"):
            lines = _lines(path, [0])
            try:
                header = next(csv.reader(lines, delimiter="\t" if kind == "tsv" else ","), None)
            except csv.Error as exc:
                raise InputError(f"{path}:1: unreadable header ({exc})") from None
            finally:
                lines.close()
            if not header:
                raise InputError(f"{path}: empty file (a header row with column names is expected)")
            return header
        # jsonl: columns are the union over the first rows (rows may omit optional fields).
        cols: dict[str, None] = {}
        try:
            for i, (_, row, _) in enumerate(_rows(path, kind)):
                if row is not None:
                    cols.update(dict.fromkeys(row))
                if i >= 100:
                    break
        except _Unreadable:
            if not cols:
                raise
            # The rows before the cut are read, the cut itself counted (input_unreadable).
    except _Unreadable as exc:
        raise InputError(f"{exc.where}: {exc.detail}; fix or drop the file") from None
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise InputError(f"{path}: cannot read ({type(exc).__name__}: {exc}); fix or drop the file") from None
    if not cols:
        raise InputError(f"{path}: no JSON object rows found")
    return list(cols)


@dataclass(frozen=True)
class TableSpec:
    """How to read one table: its kind and the columns to use (checked up front)."""

    path: Path
    kind: str
    image: str
    caption: str
    key: str | None


def table_spec(path: str | Path, image_col: str | None = None, caption_col: str | None = None,
               key_col: str | None = None) -> TableSpec:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    kind = _table_kind(path)
    columns = table_columns(path, kind)
    icol = _pick(columns, image_col, IMAGE_COLUMNS, path, "image")
    ccol = _pick(columns, caption_col, CAPTION_COLUMNS, path, "caption")
    if key_col and key_col not in columns:
        raise InputError(f"{path}: no column {key_col!r} (columns: {', '.join(columns)}); pass the right --key-col")
    kcol = key_col if key_col else ("key" if "key" in columns else None)
    return TableSpec(path, kind, icol, ccol, kcol)


_URL = re.compile(r"^[a-z][a-z0-9+.-]*://")


def _image_target(ref: Any, base: Path, allow_outside: bool) -> tuple[str | None, str | None, str | None]:
    """(url, image path, error) of a table cell. Paths are joined to the table's folder and
    normalised lexically (never resolving symlinks, which legitimately point into shared
    image stores; never made absolute, so the path — the record's partition key — does not
    depend on the working directory) and must stay inside that folder unless
    ``allow_outside``: a downloaded table must not make the tool read ``../../home/...`` or
    ``/etc/...`` into a dataset."""
    if not isinstance(ref, str) or not ref:
        return None, None, "missing_image_ref"
    if _URL.match(ref):
        return ref, None, None
    target = os.path.normpath(os.path.join(str(base), ref))
    if not allow_outside:
        rel = os.path.relpath(os.path.abspath(target), os.path.abspath(base))
        if rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
            return None, target, "path_outside_root"
    return None, target, None


def _ref_hash(ref: str) -> int:
    return int.from_bytes(hashlib.blake2b(ref.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def _repeated_refs(spec: TableSpec, allow_outside: bool, select: Select | None) -> dict[int, int]:
    """Pass 1 of grouping: hash -> row count of every image reference used by more than one
    row (of this partition). 8 bytes per row while counting (numpy), then only the repeats.

    A file that cannot be read on is counted up to that point, exactly where pass 2 will
    stop too. Rows that pass 2 turns into errors (bad text, bad reference) are not counted.
    """
    import numpy as np

    base = spec.path.parent
    hashes: list[int] = []
    try:
        for _, row, _ in _rows(spec.path, spec.kind, _owner(spec, allow_outside, select), spec.image):
            if row is None or row is _SKIP or bad_text(row):
                continue
            url, path, err = _image_target(row.get(spec.image), base, allow_outside)
            if err is None:
                ref = url or path or ""
                if select is None or select(ref):
                    hashes.append(_ref_hash(ref))
    except _Unreadable:
        pass
    if not hashes:
        return {}
    values, counts = np.unique(np.array(hashes, dtype=np.uint64), return_counts=True)
    rep = counts > 1
    return {int(v): int(c) for v, c in zip(values[rep], counts[rep], strict=True)}


def _owner(spec: TableSpec, allow_outside: bool, select: Select | None) -> Callable[[int, Any], bool] | None:
    """``select`` applied to a row from its image cell alone (see :func:`_rows`): the same
    reference :attr:`Pair.ref` gives, the row's location when the cell is unusable."""
    if select is None:
        return None
    base = spec.path.parent

    def owned(lineno: int, cell: Any) -> bool:
        url, image_path, problem = _image_target(cell, base, allow_outside)
        return select(url or (image_path if problem is None else None) or f"{spec.path}:{lineno}")

    return owned


def read_table(
    path: str | Path,
    image_col: str | None = None,
    caption_col: str | None = None,
    key_col: str | None = None,
    *,
    group: bool = True,
    allow_outside: bool = False,
    select: Select | None = None,
    rows: _Rows | None = None,
) -> Iterator[Pair]:
    """Rows of url-or-path + caption(s); other columns are kept in ``meta``.

    With ``group`` (default), rows that name the same image — the usual Flickr30k/COCO CSV
    has one row per image-caption — become one record holding every caption in row order
    (key, extra columns and source from its first row), emitted when its last row is read,
    so nothing waits longer than its own group. Rows are matched by the image reference
    (paths joined to the table's folder and normalised). A row with undecodable text is
    its own ``text_unencodable`` record, so its group keeps the good rows.
    """
    spec = table_spec(path, image_col, caption_col, key_col)
    path, base = spec.path, spec.path.parent
    counter = rows or _Rows()
    repeats = _repeated_refs(spec, allow_outside, select) if group else {}
    open_groups: dict[str, list[Any]] = {}  # ref -> [pair, rows seen, expected rows, first local row]
    try:
        for lineno, row, err in _rows(path, spec.kind, _owner(spec, allow_outside, select), spec.image):
            local = counter.take()
            if row is _SKIP:
                continue
            where = f"{path}:{lineno}"
            if row is None:
                if select is None or select(where):
                    yield Pair(key="", captions=[], source=where, error="bad_row", meta={"detail": err or ""},
                               pos=(local, 0))
                continue
            url, image_path, problem = _image_target(row.get(spec.image), base, allow_outside)
            pair = Pair(key="", captions=_as_captions(row.get(spec.caption)), source=where, url=url,
                        image_path=None if problem else image_path, error=problem, pos=(local, 0))
            if select is not None and not select(pair.ref):
                continue
            raw_key = (str(row[spec.key]) if spec.key and row.get(spec.key) not in (None, "")
                       else f"{path.stem}_{lineno:09d}")
            pair.key = clean_key(raw_key)
            pair.meta = {k: v for k, v in row.items() if k not in (spec.image, spec.caption) and _jsonable(v)}
            if problem == "path_outside_root":
                pair.meta = {"detail": f"{image_path} is outside the table's folder {base}; "
                                       f"pass --allow-outside-paths to read it"}
            elif bad_text(row):
                problem = pair.error = "text_unencodable"
                pair.meta = {"detail": "a cell holds text that is not valid Unicode (lone surrogate)"}
            expected = repeats.get(_ref_hash(pair.ref), 0) if problem is None else 0
            if expected < 2:
                yield pair
                continue
            grp = open_groups.get(pair.ref)
            if grp is None:
                grp = open_groups[pair.ref] = [pair, 0, expected, local]
            else:
                grp[0].captions.extend(pair.captions)
            grp[1] += 1
            if grp[1] == grp[2]:
                del open_groups[pair.ref]
                grp[0].pos = (local, 0)
                yield grp[0]
    except _Unreadable as exc:
        local = counter.take()
        if select is None or select(exc.where):
            yield Pair(key="", captions=[], source=exc.where, error="input_unreadable",
                       meta={"detail": exc.detail}, pos=(local, 0))
    # Groups still open: rows lost to an unreadable tail, or two references sharing a hash.
    last = max(counter.n - 1, 0)
    for pair, _, _, first in open_groups.values():
        pair.pos = (last, 1 + first)
        yield pair


def bad_text(value: Any) -> bool:
    """True if a cell holds text that cannot be written as UTF-8: a lone surrogate, from a
    JSON ``"\\udcff"`` escape or from input bytes that are not UTF-8."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(bad_text(k) or bad_text(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(bad_text(v) for v in value)
    return False


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def read_folder(path: str | Path, *, select: Select | None = None, rows: _Rows | None = None) -> Iterator[Pair]:
    """Images with sidecar captions: ``x.jpg`` + ``x.txt`` (one caption per line) or
    ``x.json`` (with a caption/captions field). Sorted for a deterministic order."""
    path = Path(path)
    counter = rows or _Rows()
    if not path.is_dir():
        raise InputError(f"{path}: folder not found")
    images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not images:
        raise InputError(f"{path}: no images ({', '.join(IMAGE_EXTS)}) found")
    for img in images:
        local = counter.take()
        if select is not None and not select(str(img)):
            continue
        rel = img.relative_to(path).with_suffix("")
        pair = Pair(key=clean_key(str(rel)), captions=[], image_path=str(img), source=str(img), pos=(local, 0))
        txt, js = img.with_suffix(".txt"), img.with_suffix(".json")
        try:
            if txt.is_file():
                text = txt.read_text(encoding="utf-8", errors="replace")
                pair.captions = [ln for ln in text.splitlines() if ln.strip()]
            elif js.is_file():
                meta = json.loads(js.read_text(encoding="utf-8"))
                if isinstance(meta, dict):
                    for col in CAPTION_COLUMNS:
                        if col in meta:
                            pair.captions = _as_captions(meta.pop(col))
                            break
                    pair.meta = {k: v for k, v in meta.items() if _jsonable(v)}
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            pair.error, pair.meta = "bad_sidecar", {"detail": f"{type(exc).__name__}: {exc}"}
            yield pair
            continue
        if not pair.captions:
            pair.error = "missing_caption"
        yield pair


# --- img2dataset output folders --------------------------------------------------------------

I2D_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Fields of img2dataset's per-sample json that describe the download, not the sample.
_I2D_DROP_FIELDS = ("caption", "key", "status", "error_message", "exif")
MAX_MEMBER_BYTES = 256 * 1024 * 1024


@dataclass
class ReadNotes:
    """What readers learnt besides the records, for the manifest: skipped input files,
    upstream statistics (img2dataset's own download counts) and rows grouped by image."""

    skipped_inputs: list[str] = field(default_factory=list)
    upstream: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"skipped_inputs": self.skipped_inputs, "upstream": self.upstream}


def is_img2dataset_folder(path: Path) -> bool:
    return path.is_dir() and (any(path.glob("*_stats.json")) or
                              (any(path.glob("*.tar")) and any(path.glob("*.parquet"))))


def img2dataset_shards(path: Path, notes: ReadNotes | None = None) -> list[Path]:
    """The complete shards of an img2dataset folder, in order.

    img2dataset writes ``NNNNN_stats.json`` after a shard's tar and parquet are closed, and
    its own incremental mode trusts only shards with that file; we do the same, so a folder
    still being downloaded (or killed mid-way) is read safely.
    """
    tars = sorted(path.glob("*.tar"))
    complete = [t for t in tars if (t.parent / f"{t.stem}_stats.json").is_file()]
    skipped = [t for t in tars if t not in complete]
    if notes is not None:
        notes.skipped_inputs.extend(f"{t}: no {t.stem}_stats.json (incomplete img2dataset shard)" for t in skipped)
        for t in complete:
            try:
                stats = json.loads((t.parent / f"{t.stem}_stats.json").read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                continue
            up = notes.upstream
            for k in ("count", "successes", "failed_to_download", "failed_to_resize"):
                if isinstance(stats.get(k), int):
                    up[k] = up.get(k, 0) + stats[k]
            for msg, n in (stats.get("status_dict") or {}).items():
                if isinstance(n, int):
                    up.setdefault("status", {})[msg] = up.get("status", {}).get(msg, 0) + n
    if not complete:
        raise InputError(f"{path}: img2dataset folder without any complete shard (no NNNNN_stats.json "
                         f"next to the {len(tars)} tar(s)); let img2dataset finish or rerun it")
    return complete


def _tar_samples(tar_path: Path, want: Callable[[str], bool] | None = None
                 ) -> Iterator[tuple[str, dict[str, bytes] | None] | tuple[None, str]]:
    """(key, {ext: bytes}) groups of adjacent members; (key, None) for a sample ``want``
    rejects (its bytes are never read); (None, problem) on a damaged tar.

    Uses tarfile in streaming mode and reads regular files only: links, devices, absolute
    or ``..`` names and nested paths are never followed or extracted.
    """
    import tarfile

    group: dict[str, bytes] | None = {}
    current: str | None = None
    try:
        with tarfile.open(tar_path, mode="r|") as tf:
            for member in tf:
                name = member.name
                if not member.isfile() or "/" in name or "\\" in name or name.startswith("."):
                    continue
                if member.size > MAX_MEMBER_BYTES:
                    continue
                key, dot, ext = name.partition(".")
                if not dot:
                    continue
                if key != current:
                    if current is not None:
                        yield current, group
                    current = key
                    group = {} if want is None or want(key) else None
                if group is None:
                    continue
                fh = tf.extractfile(member)
                if fh is not None:
                    group[ext.lower()] = fh.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        if current is not None:
            yield current, group
        yield None, f"damaged tar ({type(exc).__name__}: {exc})"
        return
    if current is not None:
        yield current, group


def read_img2dataset(path: str | Path, notes: ReadNotes | None = None, *, select: Select | None = None,
                     rows: _Rows | None = None) -> Iterator[Pair]:
    """Samples of an img2dataset output folder (``output_format="webdataset"``): the image,
    the caption from ``KEY.txt`` and the extra columns from ``KEY.json``. Samples outside
    ``select`` are counted but their bytes are not read."""
    path = Path(path)
    counter = rows or _Rows()
    for tar in img2dataset_shards(path, notes):
        want = None if select is None else (lambda key, tar=tar: select(f"{tar}:{key}"))
        for key, members in _tar_samples(tar, want):
            local = counter.take()
            if key is None:
                if select is None or select(str(tar)):
                    yield Pair(key="", captions=[], source=str(tar), error="input_tar_damaged",
                               meta={"detail": str(members)}, pos=(local, 0))
                continue
            if not isinstance(members, dict):
                continue  # another partition's sample
            where = f"{tar}:{key}"
            pair = Pair(key=clean_key(key), captions=[], source=where, pos=(local, 0))
            ext = next((e for e in I2D_IMAGE_EXTS if e in members), None)
            if "txt" in members:
                pair.captions = [members["txt"].decode("utf-8", errors="replace")]
            meta: dict[str, Any] = {}
            if "json" in members:
                try:
                    raw = json.loads(members["json"])
                    meta = raw if isinstance(raw, dict) else {}
                except (json.JSONDecodeError, UnicodeDecodeError):
                    meta = {}
            if not pair.captions and isinstance(meta.get("caption"), str):
                pair.captions = [meta["caption"]]
            pair.meta = {k: v for k, v in meta.items() if k not in _I2D_DROP_FIELDS and _jsonable(v)}
            if ext is None:
                pair.error = "image_missing"
            elif not pair.captions:
                pair.error = "missing_caption"
            else:
                pair.image_bytes = members[ext]
            yield pair


# --- COCO-style caption files -------------------------------------------------------------------


def is_coco_json(path: Path) -> bool:
    """A ``.json`` file holding one object with ``images`` and ``annotations`` lists.

    Peeks at the first 64 KB: a JSON-lines file has a complete object on its first line, a
    COCO file (one object, usually on one huge line or pretty-printed) does not.
    """
    name = path.name.lower()
    if not (name.endswith(".json") or name.endswith(".json.gz")) or not path.is_file():
        return False
    try:
        with _open_text(path) as fh:
            head = fh.read(65536)
    except (OSError, UnicodeDecodeError, EOFError):
        return False
    first = head.lstrip()
    if not first.startswith("{"):
        return False
    line = first.split("\n", 1)[0]
    try:
        obj = json.loads(line)
        return isinstance(obj, dict) and "images" in obj and "annotations" in obj
    except json.JSONDecodeError:
        return '"images"' in head or '"annotations"' in head


def read_coco(path: str | Path, image_root: str | Path | None = None, *, allow_outside: bool = False,
              select: Select | None = None, rows: _Rows | None = None) -> Iterator[Pair]:
    """COCO caption json: ``images`` (id, file_name, ...) + ``annotations`` (image_id, caption).

    All captions of an image go into one sample (``captions`` in the sample json, the first
    as ``KEY.txt``), in annotation order — the layout the trainer's ``caption_choice``
    reads. Image files are looked up under ``image_root`` (default: the json's folder) and
    must stay inside it unless ``allow_outside``. The json itself is parsed whole: COCO's
    600k train captions take ~0.3 GB as Python objects, while the images, the big part, are
    still streamed one by one. A file that does not parse is one ``input_unreadable`` record.
    """
    path = Path(path)
    counter = rows or _Rows()
    root = Path(image_root) if image_root else path.parent
    try:
        with _open_text(path) as fh:
            obj = json.load(fh)
    except json.JSONDecodeError as exc:
        where = f"{path}:{exc.lineno}"
        local = counter.take()
        if select is None or select(where):
            yield Pair(key="", captions=[], source=where, error="input_unreadable", pos=(local, 0),
                       meta={"detail": f"invalid JSON ({exc.msg} at column {exc.colno})"})
        return
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        local = counter.take()
        if select is None or select(str(path)):
            yield Pair(key="", captions=[], source=str(path), error="input_unreadable", pos=(local, 0),
                       meta={"detail": f"cannot read ({type(exc).__name__}: {exc})"})
        return
    if not isinstance(obj, dict) or not isinstance(obj.get("images"), list) \
            or not isinstance(obj.get("annotations"), list):
        raise InputError(f"{path}: not a COCO caption file (needs 'images' and 'annotations' lists)")
    captions: dict[Any, list[str]] = {}
    ids = {img.get("id") for img in obj["images"] if isinstance(img, dict)}
    for i, ann in enumerate(obj["annotations"]):
        where = f"{path}:annotations[{i}]"
        bad = None
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str) or "image_id" not in ann:
            bad = "annotation without image_id and a string caption"
        elif ann["image_id"] not in ids:
            bad = f"image_id {ann['image_id']!r} is not in 'images'"
        elif bad_text(ann["caption"]):
            local = counter.take()
            if select is None or select(where):
                yield Pair(key="", captions=[], source=where, error="text_unencodable", pos=(local, 0),
                           meta={"detail": "the caption is not valid Unicode (lone surrogate)"})
            continue
        else:
            captions.setdefault(ann["image_id"], []).append(ann["caption"])
            continue
        local = counter.take()
        if select is None or select(where):
            yield Pair(key="", captions=[], source=where, error="bad_row", meta={"detail": bad}, pos=(local, 0))
    for i, img in enumerate(obj["images"]):
        local = counter.take()
        where = f"{path}:images[{i}]"
        if not isinstance(img, dict) or not isinstance(img.get("file_name"), str) or "id" not in img:
            if select is None or select(where):
                yield Pair(key="", captions=[], source=where, error="bad_row", pos=(local, 0),
                           meta={"detail": "image entry without id and file_name"})
            continue
        file_name = img["file_name"]
        _, image_path, problem = _image_target(file_name, root, allow_outside)
        pair = Pair(key=clean_key(Path(file_name).stem), captions=captions.get(img["id"], []),
                    image_path=None if problem else image_path, source=where, pos=(local, 0))
        if select is not None and not select(pair.ref):
            continue
        pair.meta = {("coco_id" if k == "id" else k): v for k, v in img.items()
                     if k not in ("file_name", "width", "height") and _jsonable(v)}
        if problem:
            pair.error = problem
            pair.meta = {"detail": f"file_name {file_name!r} leaves the image root {root}; "
                                   f"pass --allow-outside-paths to read it"}
        elif not pair.captions:
            pair.error = "missing_caption"
        yield pair


# --- dispatch ---------------------------------------------------------------------------------

INPUT_FORMATS = ("auto", "table", "folder", "img2dataset", "coco")


def detect_format(path: Path) -> str:
    """Which reader an input needs (``--input-format auto``)."""
    if path.is_dir():
        if (path / "manifest.json").is_file():
            raise InputError(f"{path}: is a webmcse dataset already (it has a manifest.json); "
                             f"train on it directly, or give the raw inputs it was built from")
        if is_img2dataset_folder(path):
            return "img2dataset"
        tables = [q for q in path.iterdir() if q.is_file() and _is_table(q)]
        # A folder holding one captions table (like the bundled sample) is read as that
        # table; any other folder is images + sidecars.
        if len(tables) == 1 and not any(q.suffix.lower() in IMAGE_EXTS for q in path.iterdir()):
            return "coco" if is_coco_json(tables[0]) else "table"
        return "folder"
    if path.is_file():
        return "coco" if is_coco_json(path) else "table"
    raise InputError(f"{path}: no such file or folder")


def _resolve_input(p: Path, input_format: str) -> tuple[str, Path]:
    """(reader kind, the file or folder it reads) of one input; InputError if unusable."""
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    fmt = detect_format(p) if input_format == "auto" else input_format
    if fmt == "coco" and p.is_dir():
        found = [q for q in sorted(p.iterdir()) if is_coco_json(q)]
        if len(found) != 1:
            raise InputError(f"{p}: expected exactly one COCO caption json in the folder, found {len(found)}")
        return fmt, found[0]
    if fmt == "table" and p.is_dir():
        tables = sorted(q for q in p.iterdir() if q.is_file() and _is_table(q))
        if len(tables) != 1:
            raise InputError(f"{p}: expected exactly one table in the folder, found {len(tables)}")
        return fmt, tables[0]
    return fmt, p


def check_inputs(inputs: list[str | Path], image_col: str | None = None, caption_col: str | None = None,
                 key_col: str | None = None, *, input_format: str = "auto") -> None:
    """Every structural problem of the inputs (missing file, unknown type, no caption column,
    an img2dataset folder with no complete shard), before anything is read or written."""
    if not inputs:
        raise InputError("no inputs given")
    if input_format not in INPUT_FORMATS:
        raise InputError(f"unknown input format {input_format!r} (choose from {', '.join(INPUT_FORMATS)})")
    for item in inputs:
        fmt, target = _resolve_input(Path(item), input_format)
        if fmt == "table":
            table_spec(target, image_col, caption_col, key_col)
        elif fmt == "img2dataset":
            img2dataset_shards(target)
        elif fmt == "folder" and not target.is_dir():
            raise InputError(f"{target}: folder not found")


def read_pairs(
    inputs: list[str | Path],
    image_col: str | None = None,
    caption_col: str | None = None,
    key_col: str | None = None,
    *,
    input_format: str = "auto",
    image_root: str | Path | None = None,
    strict: bool = False,
    notes: ReadNotes | None = None,
    group: bool = True,
    allow_outside: bool = False,
    select: Select | None = None,
) -> Iterator[Pair]:
    """Dispatch each input to its reader, in the order given; positions are global.

    ``strict`` turns a reader-side failure (:data:`STRICT_READ_REASONS`: unparsable line,
    wrong cell count, broken annotation, cut file, path outside the table's folder) into an
    InputError naming file and line, instead of a counted drop. ``select`` keeps only the
    records of one partition (by :attr:`Pair.ref`); the others are counted, not built.
    """
    if input_format not in INPUT_FORMATS:
        raise InputError(f"unknown input format {input_format!r} (choose from {', '.join(INPUT_FORMATS)})")
    offset = 0
    for item in inputs:
        fmt, target = _resolve_input(Path(item), input_format)
        rows = _Rows()
        records: Iterator[Pair]
        if fmt == "img2dataset":
            records = read_img2dataset(target, notes, select=select, rows=rows)
        elif fmt == "coco":
            records = read_coco(target, image_root, allow_outside=allow_outside, select=select, rows=rows)
        elif fmt == "folder":
            records = read_folder(target, select=select, rows=rows)
        else:
            records = read_table(target, image_col, caption_col, key_col, group=group,
                                 allow_outside=allow_outside, select=select, rows=rows)
        for pair in records:
            pair.pos = (offset + pair.pos[0], pair.pos[1])
            if strict and pair.error in STRICT_READ_REASONS:
                raise InputError(f"{pair.source}: {pair.meta.get('detail') or pair.error} "
                                 f"(--strict; drop the flag to skip and count such records)")
            yield pair
        offset += rows.n


def _is_table(p: Path) -> bool:
    try:
        _table_kind(p)
        return True
    except InputError:
        return False


def read_sentences(inputs: list[str | Path]) -> Iterator[tuple[int, str, str | None]]:
    """(input index, source `file:line`, sentence or None) for one-sentence-per-line corpora
    (.gz too). Bytes that are not UTF-8 arrive as lone surrogates (the caller drops that
    line as ``text_unencodable``); a file that cannot be read on yields one
    ``(index, file:line, None)`` and the next input follows."""
    for index, item in enumerate(inputs):
        p = Path(item)
        if not p.is_file():
            raise InputError(f"{p}: file not found")
        counter = [0]
        try:
            for line in _lines(p, counter):
                yield index, f"{p}:{counter[0]}", line.rstrip("\r\n")
        except _Unreadable as exc:
            yield index, exc.where, None
