"""``fetch-eval-data DIR``: the SentEval STS suite (STS12-16, STS-B, SICK-R) in SentEval's layout.

Why this source: the SimCSE/MCSE numbers we compare against were computed on SentEval's
*processed* files (Moses-tokenised and lower-cased STS12-16/STS-B, tokenised SICK with its
header kept), not on the organisers' raw releases. The SimCSE authors publish exactly those
processed files as one archive, so fetching it reproduces the published evaluation input
byte for byte; the raw organiser archives would need SentEval's Moses preprocessing.

The result is what trainer/evaluate.py reads (``eval.sts_dir``)::

    DIR/STS12-en-test/STS.input.MSRpar.txt, STS.gs.MSRpar.txt, ...   (also STS13..STS16)
    DIR/STSBenchmark/sts-{train,dev,test}.csv
    DIR/SICK/SICK_{train,trial,test_annotated}.txt

Only those folders are taken from the archive (it also holds SentEval's classification
tasks); members are extracted by name only — no links, no absolute or ``..`` paths — and
each file is written to a temp name and renamed.
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO
from urllib.parse import urlsplit

from data_tools.shards import atomic_write_bytes, atomic_write_json
from data_tools.sources import InputError

DEFAULT_URL = "https://huggingface.co/datasets/princeton-nlp/datasets-for-simcse/resolve/main/senteval.tar"
MAX_ARCHIVE_BYTES = 2 << 30
MAX_FILE_BYTES = 64 << 20
STS_SUBSETS = {  # mirrors trainer/evaluate.py STS_SUBSETS (what the evaluator opens)
    "STS12-en-test": ["MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"],
    "STS13-en-test": ["FNWN", "headlines", "OnWN"],
    "STS14-en-test": ["deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"],
    "STS15-en-test": ["answers-forums", "answers-students", "belief", "headlines", "images"],
    "STS16-en-test": ["answer-answer", "headlines", "plagiarism", "postediting", "question-question"],
}
TARGET_DIRS = (*STS_SUBSETS, "STSBenchmark", "SICK")
RECORD = "FETCHED.json"


def required_files() -> list[str]:
    files = [f"{d}/STS.{kind}.{name}.txt" for d, names in STS_SUBSETS.items() for name in names
             for kind in ("input", "gs")]
    files += [f"STSBenchmark/sts-{split}.csv" for split in ("train", "dev", "test")]
    files += ["SICK/SICK_test_annotated.txt"]
    return files


@dataclass
class FetchReport:
    folder: Path
    source: str
    n_files: int = 0
    archive_sha256: str = ""
    skipped: list[str] = field(default_factory=list)
    already: bool = False

    def render(self) -> str:
        if self.already:
            return f"{self.folder}: the STS suite is already there (use --force to fetch again)"
        return (f"{self.folder}: {self.n_files} files of STS12-16, STS-B and SICK from {self.source} "
                f"(archive sha256 {self.archive_sha256[:16]}…)")


def _download(url: str, dest: BinaryIO, timeout: float) -> None:
    """Stream ``url`` into ``dest`` with a size cap and a few retries for transient errors."""
    if urlsplit(url).scheme not in ("http", "https"):
        raise InputError(f"{url}: only http(s) URLs or local files can be fetched")
    last: Exception | None = None
    for attempt in range(3):
        dest.seek(0)
        dest.truncate()
        try:
            req = urllib.request.Request(url, headers={"User-Agent": "webmcse-data/0.1"})
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                total = 0
                while block := resp.read(1 << 20):
                    total += len(block)
                    if total > MAX_ARCHIVE_BYTES:
                        raise InputError(f"{url}: larger than {MAX_ARCHIVE_BYTES >> 20} MiB; not the STS archive")
                    dest.write(block)
                declared = resp.headers.get("Content-Length")
                if declared and declared.isdigit() and total < int(declared):
                    raise OSError(f"body cut at {total} of {declared} bytes")
            return
        except urllib.error.HTTPError as exc:
            if exc.code < 500 and exc.code not in (408, 429):
                raise InputError(f"{url}: HTTP {exc.code}; pass --url with a mirror of the archive") from None
            last = exc
        except (OSError, urllib.error.URLError) as exc:
            last = exc
        time.sleep(1.0 * 2**attempt)
    raise InputError(f"{url}: download failed after 3 attempts ({last}); check the network or pass --url")


def _members(archive: Path) -> Iterator[tuple[str, int, BinaryIO | None]]:
    """(posix name, size, file) of every regular file of a tar (any compression) or zip."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    with zf.open(info) as fh:
                        yield info.filename, info.file_size, fh  # type: ignore[misc]
        return
    try:
        with tarfile.open(archive, mode="r:*") as tf:
            for m in tf:
                if m.isfile():
                    yield m.name, m.size, tf.extractfile(m)
    except tarfile.TarError as exc:
        raise InputError(f"{archive}: neither a tar nor a zip archive ({exc})") from None


def _target(name: str) -> PurePosixPath | None:
    """Where an archive member goes under DIR, or None to skip it.

    The archive's own prefix (``SentEval/data/downstream/STS/...``, ``STS/...``) varies, so
    the path is cut at the first component that names one of our folders. Names that climb
    out (``..``) or are absolute are refused whatever follows.
    """
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not parts or parts[0] == "/" or ".." in parts or any(p.startswith("__MACOSX") for p in parts):
        return None
    for i, part in enumerate(parts):
        if part in TARGET_DIRS and len(parts) > i + 1:
            rel = PurePosixPath(*parts[i:])
            file = rel.name
            if rel.parts[0] == "STS16-en-test" and file.startswith("STS2016."):
                rel = rel.with_name("STS." + file[len("STS2016."):])  # organisers' STS16 names
            return rel
    return None


def fetch_eval_data(folder: str | Path, *, url: str | None = None, timeout: float = 60.0,
                    force: bool = False) -> FetchReport:
    out = Path(folder)
    need = required_files()
    source = url or DEFAULT_URL
    if not force and all((out / f).is_file() for f in need):
        return FetchReport(out, source, already=True)
    out.mkdir(parents=True, exist_ok=True)
    report = FetchReport(out, source)
    with tempfile.NamedTemporaryFile(dir=out, prefix=".fetch-", suffix=".tmp", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        local = Path(source)
        if urlsplit(source).scheme in ("http", "https"):
            with open(tmp_path, "w+b") as fh:
                _download(source, fh, timeout)
        elif local.is_file():
            shutil.copyfile(local, tmp_path)
        else:
            raise InputError(f"{source}: neither an http(s) URL nor an existing file")
        h = hashlib.sha256()
        with open(tmp_path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        report.archive_sha256 = h.hexdigest()
        written: list[str] = []
        for name, size, fh in _members(tmp_path):
            rel = _target(name)
            if rel is None or fh is None:
                continue
            if size > MAX_FILE_BYTES:
                report.skipped.append(f"{name} ({size} bytes)")
                continue
            dest = out / Path(*rel.parts)
            dest.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(dest, fh.read())
            written.append(rel.as_posix())
        report.n_files = len(written)
    finally:
        tmp_path.unlink(missing_ok=True)
    missing = [f for f in need if not (out / f).is_file()]
    if missing:
        raise InputError(f"{source}: the archive lacks {len(missing)} file(s) the evaluator needs, e.g. "
                         f"{', '.join(missing[:3])}; is it SentEval's STS data?")
    atomic_write_json(out / RECORD, {"source": source, "sha256": report.archive_sha256,
                                     "files": sorted(written), "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                       time.gmtime())})
    return report
