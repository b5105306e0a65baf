"""The one place that writes shards: atomic tars, sizes.json, manifest.json (written last).

A shard is written under a hidden temp name and renamed only once it is complete and
fsynced, so a crash never leaves a half-written ``NNNNNN.tar`` that a reader could trust.
The manifest is the dataset's commit record: readers use only the shards it lists.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# webdataset is imported only where a tar is read: importing it imports torch (~2 s of CPU,
# ~300 MB), which `webmcse-data shard-pairs` and its worker processes never need.

MANIFEST = "manifest.json"
SIZES = "sizes.json"
SHARD_STATE = ".shard_state.json"
EMBED_STATE = ".embed_state.json"
CLIP_STATE = ".clip_state.json"
PARTS_DIR = "parts"
FORMAT_VERSION = 1
# A fixed member mtime makes the same input produce byte-identical shards (and sha256s).
_MTIME = 0.0


class DatasetError(ValueError):
    """A dataset folder that cannot be used; the message names the file and the fix."""


@dataclass
class ShardInfo:
    name: str
    n_samples: int
    bytes: int
    sha256: str


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    try:
        data = (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate somewhere: JSON's \u escapes still carry it
        data = (json.dumps(obj, indent=1) + "\n").encode("ascii")
    atomic_write_bytes(path, data)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shard_name(index: int) -> str:
    return f"{index:06d}.tar"


class _HashingFile:
    """File wrapper that hashes and counts bytes as the tar stream writes them."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


class _TarWriter:
    """Tar members written straight to the file, one write per sample: the bytes
    ``tarfile.open(mode="w|")`` writes for the same members (tests compare the two), without
    its 10-KB block copies. One member per extension in sorted order, mode 0444, owner and
    group "bigdata", a fixed whole-second mtime (a float one makes tarfile add a PAX header
    to every member).

    Building a header through ``TarInfo.tobuf`` costs ~0.1 ms (field checks for a PAX
    record, two checksums over the block); three members per sample made it a third of
    the writer process's time. A plain member header differs from member to member only
    in its name, size and checksum, so those are put into a block tarfile itself built
    once; names a plain header cannot hold (non-ASCII, over 100 bytes) and sizes past 8 GiB
    still go through tarfile, which adds its PAX record."""

    def __init__(self, fileobj: Any, mtime: float) -> None:
        self.fileobj = fileobj
        self.mtime = int(mtime)
        self.offset = 0
        template = bytearray(self._tarinfo("x", 0).tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape"))
        template[0:100], template[124:136] = bytes(100), bytes(12)
        template[148:156] = b"        "  # the checksum counts its own field as spaces
        self._template, self._template_sum = bytes(template), sum(template)

    def _tarinfo(self, name: str, size: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, self.mtime, 0o444
        info.uname = info.gname = "bigdata"
        return info

    def _header(self, name: str, size: int) -> bytes:
        raw = name.encode("utf-8", "surrogateescape")
        if len(raw) > 100 or not raw.isascii() or "\0" in name or size >= 8**11:
            return self._tarinfo(name, size).tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
        size_field = b"%011o\0" % size
        block = bytearray(self._template)
        block[0:len(raw)] = raw
        block[124:136] = size_field
        block[148:155] = b"%06o\0" % (self._template_sum + sum(raw) + sum(size_field))
        return bytes(block)

    def write(self, sample: dict[str, Any]) -> None:
        key = sample["__key__"]
        parts: list[bytes | bytearray | memoryview] = []
        for ext in sorted(k for k in sample if not k.startswith("_")):
            data = sample[ext]
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise ValueError(f"{key}.{ext}: member is {type(data).__name__}, not bytes")
            size = len(data) if not isinstance(data, memoryview) else data.nbytes
            parts.append(self._header(f"{key}.{ext}", size))
            parts.append(data)
            pad = -size % tarfile.BLOCKSIZE
            if pad:
                parts.append(tarfile.NUL * pad)
        blob = b"".join(parts)
        self.fileobj.write(blob)
        self.offset += len(blob)

    def close(self) -> None:
        end = tarfile.NUL * (2 * tarfile.BLOCKSIZE)  # end-of-archive, then pad to a whole record
        self.fileobj.write(end + tarfile.NUL * (-(self.offset + len(end)) % tarfile.RECORDSIZE))


class ShardWriter:
    """Rolls samples into shards of at most ``max_count`` samples or ``max_bytes`` bytes.

    Samples are dicts of ``__key__`` plus extension -> bytes/str (``jpg``, ``txt``, ``json``,
    ``emb.npy``). :class:`_TarWriter` encodes the tar; this class adds the temp
    name, fsync, rename and the per-shard accounting the manifest needs.
    """

    def __init__(self, out_dir: str | Path, max_count: float = 10_000, max_bytes: int = 1 << 30,
                 start_index: int = 0, name: Callable[[int], str] = shard_name) -> None:
        self.out_dir = Path(out_dir)
        self.name = name
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.index = start_index
        self.shards: list[ShardInfo] = []
        self._tar: _TarWriter | None = None
        self._file: _HashingFile | None = None
        self._raw: Any = None
        self._count = 0
        self._tmp: Path | None = None

    def _open(self) -> None:
        self._tmp = self.out_dir / f".{self.name(self.index)}.tmp"
        self._raw = open(self._tmp, "wb")  # noqa: SIM115 - held across write() calls
        self._file = _HashingFile(self._raw)
        self._tar = _TarWriter(self._file, mtime=_MTIME)
        self._count = 0

    def write(self, sample: dict[str, Any]) -> None:
        if self._tar is None:
            self._open()
        assert self._tar is not None and self._file is not None
        encoded = {k: (v.encode("utf-8") if isinstance(v, str) and k != "__key__" else v)
                   for k, v in sample.items()}
        self._tar.write(encoded)
        self._count += 1
        if self._count >= self.max_count or self._file.size >= self.max_bytes:
            self.finish_shard()

    def finish_shard(self) -> ShardInfo | None:
        if self._tar is None:
            return None
        assert self._file is not None and self._tmp is not None
        self._tar.close()  # writes the end-of-archive blocks through _HashingFile
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        final = self.out_dir / self.name(self.index)
        os.replace(self._tmp, final)
        _fsync_dir(self.out_dir)
        info = ShardInfo(final.name, self._count, self._file.size, self._file.sha.hexdigest())
        self.shards.append(info)
        self.index += 1
        self._tar = self._file = self._raw = self._tmp = None
        return info

    def close(self) -> list[ShardInfo]:
        self.finish_shard()
        return self.shards

    def abort(self) -> None:
        """Drop the shard in progress (its temp file); completed shards stay."""
        if self._tar is not None:
            with contextlib.suppress(Exception):  # end blocks into the temp file deleted below
                self._tar.close()
        if self._raw is not None:
            self._raw.close()
        if self._tmp is not None and self._tmp.exists():
            self._tmp.unlink()
        self._tar = self._file = self._raw = self._tmp = None


def place_file(src: Path, dst: Path) -> None:
    """Put ``src``'s bytes at ``dst`` atomically without copying when possible: a hard link
    under a temp name, renamed into place (a copy where the filesystem refuses links)."""
    import shutil

    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)


def write_manifest(out_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """sizes.json first, manifest.json last: the manifest's presence commits the dataset."""
    out_dir = Path(out_dir)
    shards = manifest["shards"]
    atomic_write_json(out_dir / SIZES, {s["name"]: s["n_samples"] for s in shards})
    manifest = {
        "format": "webmcse-shards",
        "version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **manifest,
        "n_samples": sum(s["n_samples"] for s in shards),
    }
    path = out_dir / MANIFEST
    atomic_write_json(path, manifest)
    return path


def shard_dicts(shards: list[ShardInfo]) -> list[dict[str, Any]]:
    return [asdict(s) for s in shards]


def load_manifest(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        if (folder / SHARD_STATE).is_file():
            raise DatasetError(f"{path}: no manifest yet: a shard-pairs run into this folder is running or was "
                               f"interrupted; finish it with the same command plus --resume")
        if (folder / PARTS_DIR).is_dir():
            raise DatasetError(f"{path}: no manifest yet: the folder holds the parts of a partitioned run; "
                               f"when every part is done, `webmcse-data merge {folder}` builds the dataset")
        raise DatasetError(f"{path}: no manifest. Build the folder with `webmcse-data shard-pairs` "
                           f"or `webmcse-data shard-text` (a folder without a manifest is "
                           f"incomplete or not a webmcse dataset)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: unreadable manifest ({exc}); rebuild the dataset") from None
    for field in ("kind", "shards"):
        if field not in manifest:
            raise DatasetError(f"{path}: manifest lacks {field!r}; rebuild the dataset")
    if manifest.get("version", 0) > FORMAT_VERSION:
        raise DatasetError(f"{path}: format version {manifest['version']} is newer than this "
                           f"webmcse understands ({FORMAT_VERSION}); upgrade webmcse")
    return manifest


def read_shard(path: str | Path) -> Iterator[dict[str, Any]]:
    """Samples of one local tar as ``{"__key__", ext: bytes}``, members grouped by key."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    with open(path, "rb") as fh:
        members = ({**m, "__url__": str(path)} for m in tar_file_iterator(fh))
        yield from group_by_keys(members)
