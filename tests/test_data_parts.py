"""shard-pairs on several "machines" (--part i --parts N) + merge equals one machine.

The input is built to make every cross-part decision matter: exact copies and resized
near-copies of a photo under other file names (so they hash to other parts), repeated and
suffix-shaped keys, rows of one image spread over the table, bad rows, undecodable text, a
missing file, captions from the STS evaluation sets. The expected result is the
single-machine run on the same input; the comparison is per sample (key -> member bytes),
per drop reason and per drop example.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from data_tools.check import verify
from data_tools.commands import shard_pairs
from data_tools.parts import merge
from data_tools.shards import DatasetError, file_sha256, load_manifest, read_shard
from data_tools.sources import InputError, part_of

from .conftest import SHARED_DATA

STS = SHARED_DATA / "sts"


def smooth(seed: int, size: tuple[int, int] = (64, 64), quality: int = 95) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def web_table(folder: Path) -> Path:
    """~60 rows with the cross-part cases named in the module docstring."""
    rows: list[dict[str, Any]] = []
    for i in range(40):
        (folder / f"{i}.jpg").write_bytes(smooth(500 + i))
        rows.append({"key": f"k{i % 25}", "file": f"{i}.jpg", "caption": f"a smooth picture number {i}"})
    for i in range(6):  # exact copies of earlier photos, other names (other parts)
        (folder / f"copy{i}.jpg").write_bytes((folder / f"{i * 5}.jpg").read_bytes())
        rows.insert(6 * i + 4, {"key": "copy", "file": f"copy{i}.jpg", "caption": "the same photo again"})
    for i in (13, 26):  # re-encoded, resized: near duplicates (phash 2 and 0 bits away)
        Image.open(folder / f"{i}.jpg").resize((58, 58)).save(folder / f"near{i}.jpg", quality=70)
        rows.append({"key": f"near{i}", "file": f"near{i}.jpg", "caption": "the picture resized and recompressed"})
    rows.insert(10, {"key": "k3_1", "file": "40.jpg", "caption": "a key shaped like a renamed one"})
    (folder / "40.jpg").write_bytes(smooth(540))
    (folder / "g.jpg").write_bytes(smooth(541))
    for j, at in enumerate((2, 20, 45)):  # one image, three rows far apart
        rows.insert(at, {"key": "group", "file": "g.jpg", "caption": f"caption {j} of the grouped photo"})
    rows.insert(15, {"key": "sts", "file": "41.jpg", "caption": "A girl is styling her hair."})  # STS-B test
    (folder / "41.jpg").write_bytes(smooth(542))
    rows.insert(30, {"key": "gone", "file": "missing.jpg", "caption": "a file that is not there"})
    (folder / "short.jpg").write_bytes(smooth(543))
    rows.insert(33, {"key": "short", "file": "short.jpg", "caption": "hi"})
    path = folder / "web.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
        fh.write('{"key": "bad", "file": "1.jpg", "caption": "lone \\udcff surrogate"}\n')
        fh.write("{not json\n")
    return path


def content(folder: Path) -> dict[str, dict[str, bytes]]:
    m = load_manifest(folder)
    out: dict[str, dict[str, bytes]] = {}
    for entry in m["shards"]:
        for s in read_shard(folder / entry["name"]):
            assert s["__key__"] not in out, f"duplicate key {s['__key__']}"
            out[s["__key__"]] = {k: v for k, v in s.items() if not k.startswith("__")}
    return out


OPTS = {"max_count": 5, "progress": False}


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("web")
    table = web_table(root)
    shard_pairs([table], root / "single", eval_sts=STS, **OPTS)
    return table, root / "single"


@pytest.mark.parametrize("parts", [1, 2, 4])
def test_parts_and_merge_equal_one_machine(web: tuple[Path, Path], tmp_path: Path, parts: int,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    table, single = web
    out = tmp_path / "out"
    for i in range(parts):
        shard_pairs([table], out, eval_sts=STS, part=i, parts=parts, **OPTS)
    # The merge works from the identity indexes: it must never decode or hash an image.
    import PIL.Image

    import data_tools.dedup

    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("the merge decoded or hashed an image")

    monkeypatch.setattr(PIL.Image, "open", boom)
    monkeypatch.setattr(data_tools.dedup, "image_phash", boom)
    summary = merge(out, progress=False, keep_parts=True)
    monkeypatch.undo()

    ms, mm = load_manifest(single), load_manifest(out)
    assert content(out) == content(single)
    assert mm["counts"] == ms["counts"] and summary.written == ms["n_samples"]
    assert mm["drop_examples"] == ms["drop_examples"]
    assert mm["notes"] == ms["notes"] and mm["fingerprint"] == ms["fingerprint"]
    # Every kind of cross-part decision happened, and was made as one machine makes it.
    dropped = ms["counts"]["dropped"]
    assert dropped["duplicate"] == 6 and dropped["near_duplicate"] == 2 and dropped["eval_overlap"] == 1
    assert dropped["text_unencodable"] == 1 and dropped["bad_row"] == 1 and dropped["image_missing"] == 1
    assert dropped["caption_too_short"] == 1
    keys = set(content(single))
    assert {"k3", "k3_1", "k3_2", "group"} <= keys  # k3 twice + a literal k3_1 -> k3_2
    group = json.loads(content(single)["group"]["json"])
    assert group["captions"] == [f"caption {j} of the grouped photo" for j in range(3)]
    assert verify(out, decode=True).ok
    # Only affected part shards were rewritten; the others are the part's file (hard link).
    part_files = {file_sha256(p): p for p in (out / "parts").rglob("0*.tar")}
    linked = [e for e in mm["shards"] if e["sha256"] in part_files]
    assert all(os.path.samefile(out / e["name"], part_files[e["sha256"]]) for e in linked)
    assert 0 < len(linked) < len(mm["shards"])  # some untouched, some rewritten
    merge(out, progress=False)  # merged already: only removes the parts
    assert not (out / "parts").exists() and verify(out).ok


def test_partition_keeps_every_row_of_an_image_together_and_covers_every_record(tmp_path: Path) -> None:
    refs = [f"img/{i}.jpg" for i in range(2000)] + [f"http://x/{i}.jpg" for i in range(2000)]
    counts = np.bincount([part_of(r, 4) for r in refs], minlength=4)
    assert counts.sum() == 4000 and counts.min() > 850  # balanced, nothing lost
    assert all(part_of(r, 4) == part_of(r, 4) for r in refs[:50])
    # The part of a record does not depend on the working directory (relative inputs).
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(smooth(1))
    (tmp_path / "a" / "t.jsonl").write_text(json.dumps({"file": "x.jpg", "caption": "a caption here"}) + "\n")
    from data_tools.sources import read_pairs

    cwd = Path.cwd()
    try:
        os.chdir(tmp_path)
        here = [p.ref for p in read_pairs(["a/t.jsonl"])]
        os.chdir(tmp_path / "a")
        there = [p.ref for p in read_pairs(["../a/t.jsonl"])]
    finally:
        os.chdir(cwd)
    assert here == ["a/x.jpg"] and there == ["../a/x.jpg"] == [os.path.normpath("../a/x.jpg")]


def test_a_killed_part_resumes_and_merge_names_what_is_missing(web: tuple[Path, Path], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    table, single = web
    out = tmp_path / "out"
    shard_pairs([table], out, eval_sts=STS, part=0, parts=3, **OPTS)
    # Part 1 dies after its first completed shard (the writer is told to fail).
    from data_tools import shards as shards_mod

    real = shards_mod.ShardWriter.finish_shard
    calls = {"n": 0}

    def dying(self: Any) -> Any:
        info = real(self)
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("node lost")
        return info

    monkeypatch.setattr(shards_mod.ShardWriter, "finish_shard", dying)
    with pytest.raises(RuntimeError, match="node lost"):
        shard_pairs([table], out, eval_sts=STS, part=1, parts=3, **OPTS)
    monkeypatch.undo()
    with pytest.raises(DatasetError, match=r"part\(s\) 1 \(interrupted: rerun it with --resume\), 2 \(never ran\) of 3"):
        merge(out, progress=False)
    with pytest.raises(InputError, match="split into 3 parts, not 4; pass --parts 3"):
        shard_pairs([table], out, eval_sts=STS, part=1, parts=4, **OPTS)
    with pytest.raises(InputError, match="already holds a dataset; pass --overwrite"):
        shard_pairs([table], out, eval_sts=STS, part=1, parts=3, **OPTS)
    s = shard_pairs([table], out, eval_sts=STS, part=1, parts=3, resume=True, **OPTS)
    assert s.kind == "pairs-part"
    shard_pairs([table], out, eval_sts=STS, part=2, parts=3, resume=True, **OPTS)  # resume of nothing: a start
    merge(out, progress=False)
    assert content(out) == content(single) and load_manifest(out)["counts"] == load_manifest(single)["counts"]
    # Every part again after the merge: nothing to do.
    assert shard_pairs([table], out, eval_sts=STS, part=0, parts=3, resume=True, **OPTS).written == \
        load_manifest(single)["n_samples"]


def test_merge_applies_the_clip_top_fraction_as_one_machine(tmp_path: Path) -> None:
    from data_tools.clip_filter import ClipOptions

    from .test_data_scale import TINY_CLIP

    cfg = tmp_path / "tiny-clip-parts.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    rows = []
    for i in range(24):
        (tmp_path / f"{i}.jpg").write_bytes(smooth(700 + i, (32, 32)))
        rows.append({"file": f"{i}.jpg", "caption": f"a smooth picture number {i}"})
    (tmp_path / "dup.jpg").write_bytes((tmp_path / "3.jpg").read_bytes())
    rows.append({"file": "dup.jpg", "caption": "a copy"})
    table = tmp_path / "t.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    clip = ClipOptions(model=str(cfg), top_fraction=0.4)
    one = shard_pairs([table], tmp_path / "one", clip=clip, max_count=4, progress=False)
    for i in range(2):
        shard_pairs([table], tmp_path / "two", clip=clip, part=i, parts=2, max_count=4, progress=False)
    two = merge(tmp_path / "two", progress=False)
    assert (two.written, two.dropped) == (one.written, one.dropped) == (10, {"duplicate": 1, "clip_score_low": 14})
    assert content(tmp_path / "two") == content(tmp_path / "one")
    assert load_manifest(tmp_path / "two")["filters"]["clip"] == load_manifest(tmp_path / "one")["filters"]["clip"]


def test_parquet_parts_skip_rows_without_converting_them_and_still_equal_one_machine(
        web: tuple[Path, Path], tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table, _ = web
    rows = []
    for line in table.read_text(encoding="utf-8").splitlines():
        try:  # parquet strings are UTF-8: the bad JSON line and the lone surrogate stay out
            row = json.loads(line)
            json.dumps(row, ensure_ascii=False).encode("utf-8")
        except (ValueError, UnicodeEncodeError):
            continue
        rows.append(row)
    rows += [{"key": "noref", "file": None, "caption": "a row without an image"},
             {"key": "out", "file": "../elsewhere.jpg", "caption": "a path leaving the folder"}]
    pq.write_table(pa.Table.from_pylist(rows), table.parent / "web.parquet")
    single = tmp_path / "single"
    shard_pairs([table.parent / "web.parquet"], single, eval_sts=STS, **OPTS)
    for i in range(3):
        shard_pairs([table.parent / "web.parquet"], tmp_path / "three", eval_sts=STS, part=i, parts=3, **OPTS)
    merge(tmp_path / "three", progress=False)
    assert content(tmp_path / "three") == content(single)
    ms, mm = load_manifest(single), load_manifest(tmp_path / "three")
    assert mm["counts"] == ms["counts"] and mm["drop_examples"] == ms["drop_examples"]
    assert {"missing_image_ref", "path_outside_root", "duplicate", "near_duplicate"} <= set(ms["counts"]["dropped"])
