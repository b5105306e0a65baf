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


def _lines(path: Path, counter: list[int]) -> Iterator[str]:
    """Decoded lines of a (possibly gzipped) UTF-8 file; ``counter[0]`` is the current line.

    Decoding line by line (not in 8 KB blocks like TextIOWrapper) lets a bad byte or a cut
    .gz be reported at the exact line.
    """
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # noqa: SIM115
    with raw:
        while True:
            try:
                line = raw.readline()
            except (EOFError, OSError) as exc:
                raise InputError(f"{path}:{counter[0] + 1}: cannot read on after line {counter[0]} "
                                 f"({type(exc).__name__}: {exc}); the file is cut or corrupt") from None
            if not line:
                return
            counter[0] += 1
            try:
                yield line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"{path}:{counter[0]}: not valid UTF-8 (byte {exc.start + 1} of the line: "
                                 f"UnicodeDecodeError); re-encode the file as UTF-8") from None


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


def _rows(path: Path, kind: str) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """(line number, row or None, error) for every data row, streaming.

    A bad row is yielded with its error (the caller counts it, or stops in --strict mode);
    a file that cannot be read on at all (invalid UTF-8, a cut .gz, a corrupt parquet
    page) raises InputError naming the file and the line/row where reading stopped.
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
                for row in batch.to_pylist():
                    rowno += 1
                    yield rowno, row, None
    except InputError:
        raise
    except (csv.Error, OSError, ValueError) as exc:
        where, unit = (rowno, "row") if kind == "parquet" else (counter[0], "line")
        raise InputError(f"{path}:{where + 1}: cannot read on after {unit} {where} "
                         f"({type(exc).__name__}: {exc}); fix or drop the file") from None


def table_columns(path: Path, kind: str) -> list[str]:
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
            yield Pair(key="", captions=[], source=where, error="bad_row", meta={"detail": err or ""})
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


# --- img2dataset output folders --------------------------------------------------------------

I2D_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Fields of img2dataset's per-sample json that describe the download, not the sample.
_I2D_DROP_FIELDS = ("caption", "key", "status", "error_message", "exif")
MAX_MEMBER_BYTES = 256 * 1024 * 1024


@dataclass
class ReadNotes:
    """What readers learnt besides the records, for the manifest: skipped input files and
    upstream statistics (img2dataset's own download counts)."""

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


def _tar_samples(tar_path: Path) -> Iterator[tuple[str, dict[str, bytes]] | tuple[None, str]]:
    """(key, {ext: bytes}) groups of adjacent members; (None, problem) on a damaged tar.

    Uses tarfile in streaming mode and reads regular files only: links, devices, absolute
    or ``..`` names and nested paths are never followed or extracted.
    """
    import tarfile

    group: dict[str, bytes] = {}
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
                if key != current and current is not None:
                    yield current, group
                    group = {}
                current = key
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


def read_img2dataset(path: str | Path, notes: ReadNotes | None = None) -> Iterator[Pair]:
    """Samples of an img2dataset output folder (``output_format="webdataset"``): the image,
    the caption from ``KEY.txt`` and the extra columns from ``KEY.json``."""
    path = Path(path)
    for tar in img2dataset_shards(path, notes):
        for key, members in _tar_samples(tar):
            if key is None:
                yield Pair(key="", captions=[], source=str(tar), error="input_tar_damaged",
                           meta={"detail": str(members)})
                continue
            assert isinstance(members, dict)
            where = f"{tar}:{key}"
            pair = Pair(key=clean_key(key), captions=[], source=where)
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


def read_coco(path: str | Path, image_root: str | Path | None = None) -> Iterator[Pair]:
    """COCO caption json: ``images`` (id, file_name, ...) + ``annotations`` (image_id, caption).

    All captions of an image go into one sample (``captions`` in the sample json, the first
    as ``KEY.txt``), in annotation order — the layout the trainer's ``caption_choice``
    reads. Image files are looked up under ``image_root`` (default: the json's folder).
    The json itself is parsed whole: COCO's 600k train captions take ~0.3 GB as Python
    objects, while the images, the big part, are still streamed one by one.
    """
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    try:
        with _open_text(path) as fh:
            obj = json.load(fh)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise InputError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("images"), list) \
            or not isinstance(obj.get("annotations"), list):
        raise InputError(f"{path}: not a COCO caption file (needs 'images' and 'annotations' lists)")
    captions: dict[Any, list[str]] = {}
    ids = {img.get("id") for img in obj["images"] if isinstance(img, dict)}
    for i, ann in enumerate(obj["annotations"]):
        where = f"{path}:annotations[{i}]"
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str) or "image_id" not in ann:
            yield Pair(key="", captions=[], source=where, error="bad_row",
                       meta={"detail": "annotation without image_id and a string caption"})
        elif ann["image_id"] not in ids:
            yield Pair(key="", captions=[], source=where, error="bad_row",
                       meta={"detail": f"image_id {ann['image_id']!r} is not in 'images'"})
        else:
            captions.setdefault(ann["image_id"], []).append(ann["caption"])
    for i, img in enumerate(obj["images"]):
        where = f"{path}:images[{i}]"
        if not isinstance(img, dict) or not isinstance(img.get("file_name"), str) or "id" not in img:
            yield Pair(key="", captions=[], source=where, error="bad_row",
                       meta={"detail": "image entry without id and file_name"})
            continue
        file_name = img["file_name"]
        meta = {("coco_id" if k == "id" else k): v for k, v in img.items()
                if k not in ("file_name", "width", "height") and _jsonable(v)}
        pair = Pair(key=clean_key(Path(file_name).stem), captions=captions.get(img["id"], []),
                    image_path=str(root / file_name), source=where, meta=meta)
        if Path(file_name).is_absolute() or ".." in Path(file_name).parts:
            pair.error = "bad_row"
            pair.meta = {"detail": f"file_name {file_name!r} leaves the image root"}
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
) -> Iterator[Pair]:
    """Dispatch each input to its reader, in the order given.

    ``strict`` turns a bad row (unparsable line, wrong cell count, broken annotation) into
    an InputError naming file and line, instead of a counted ``bad_row`` drop.
    """
    if input_format not in INPUT_FORMATS:
        raise InputError(f"unknown input format {input_format!r} (choose from {', '.join(INPUT_FORMATS)})")
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise InputError(f"{p}: no such file or folder")
        fmt = detect_format(p) if input_format == "auto" else input_format
        if fmt == "img2dataset":
            records = read_img2dataset(p, notes)
        elif fmt == "coco":
            target = p
            if p.is_dir():
                found = [q for q in sorted(p.iterdir()) if is_coco_json(q)]
                if len(found) != 1:
                    raise InputError(f"{p}: expected exactly one COCO caption json in the folder, "
                                     f"found {len(found)}")
                target = found[0]
            records = read_coco(target, image_root)
        elif fmt == "folder":
            records = read_folder(p)
        elif p.is_dir():
            tables = sorted(q for q in p.iterdir() if q.is_file() and _is_table(q))
            if len(tables) != 1:
                raise InputError(f"{p}: expected exactly one table in the folder, found {len(tables)}")
            records = read_table(tables[0], image_col, caption_col, key_col)
        else:
            records = read_table(p, image_col, caption_col, key_col)
        for pair in records:
            if strict and pair.error in ("bad_row", "input_tar_damaged"):
                raise InputError(f"{pair.source}: {pair.meta.get('detail') or pair.error} "
                                 f"(--strict; drop the flag to skip and count such rows)")
            yield pair


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
