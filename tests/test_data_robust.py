"""No record can kill a data_tools run, and nothing a run does can hurt its inputs.

One test per failure class: lone surrogates in captions/columns/file names, a worker that
raises, a worker process that dies, SIGKILL of the parent (its workers must go too), output
folders that overlap an input, a shard-text corpus with two files of the same name, an
interrupted embed (the dataset must stay valid at every instant), row-per-caption tables,
paths outside a table's folder, the evaluation-overlap filter, stats over every caption, and
a CLI flag for every option.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from data_tools import commands, filters, pipeline
from data_tools.__main__ import main as cli
from data_tools.check import stats, verify
from data_tools.commands import embed, shard_pairs, shard_text
from data_tools.dedup import NearDupIndex
from data_tools.shards import ShardWriter, load_manifest, read_shard, shard_dicts, write_manifest
from data_tools.sources import InputError

from .conftest import ROOT, SHARED_DATA
from .test_data_crashers import die_on_seven, prepare_or_die
from .test_data_parts import content, smooth

STS = SHARED_DATA / "sts"


def table(path: Path, rows: list[dict[str, Any]] | list[str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def images(folder: Path, n: int, base: int = 0) -> None:
    for i in range(n):
        (folder / f"{i}.jpg").write_bytes(smooth(base + i))


# --- encoding ------------------------------------------------------------------------------------


def test_lone_surrogates_are_counted_with_their_line_and_strict_names_it(tmp_path: Path) -> None:
    images(tmp_path, 6, 800)
    p = table(tmp_path / "t.jsonl", [
        {"file": "0.jpg", "caption": "a good caption here"},
        '{"file": "1.jpg", "caption": "a caption \\udcff with a lone surrogate"}',
        '{"file": "2.jpg", "caption": "a good caption too", "credit": "\\udcff"}',
        '{"file": "3.jpg", "caption": ["fine one here", "bad \\ud800 one"]}',
        {"file": "4.jpg", "caption": "another good caption"},
    ])
    s = shard_pairs([p], tmp_path / "ds", progress=False)
    assert (s.seen, s.written, s.dropped) == (5, 2, {"text_unencodable": 3})
    assert load_manifest(tmp_path / "ds")["drop_examples"]["text_unencodable"] == [f"{p}:2", f"{p}:3", f"{p}:4"]
    assert verify(tmp_path / "ds", decode=True).ok
    with pytest.raises(InputError, match=rf"{p.name}:2: .*not valid Unicode.*--strict"):
        shard_pairs([p], tmp_path / "strict", strict=True, progress=False)
    # A COCO caption and a file name (bytes that are not UTF-8) are records like any other.
    coco = tmp_path / "coco"
    coco.mkdir()
    (coco / "a.jpg").write_bytes(smooth(810))
    (coco / "captions.json").write_text('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": ['
                                        '{"image_id": 1, "caption": "bad \\udcff caption"},'
                                        '{"image_id": 1, "caption": "a good caption here"}]}')
    s = shard_pairs([coco / "captions.json"], tmp_path / "coco_ds", progress=False)
    assert (s.written, s.dropped) == (1, {"text_unencodable": 1})
    odd = tmp_path / "odd"
    odd.mkdir()
    name = os.fsdecode(b"caf\xe9.jpg")  # a Latin-1 file name on a UTF-8 system
    (odd / name).write_bytes(smooth(811))
    (odd / name).with_suffix(".txt").write_text("a photo with an odd file name\n")
    (odd / "b.jpg").write_bytes(smooth(812))
    (odd / "b.txt").write_text("a photo with a plain file name\n")
    s = shard_pairs([odd], tmp_path / "odd_ds", progress=False)
    assert (s.written, s.dropped) == (1, {"text_unencodable": 1})
    # shard-text: the undecodable line is dropped and named; the others are kept.
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(b"first sentence\ncaf\xe9 latin-1 bytes\nthird sentence\n")
    s = shard_text([corpus], tmp_path / "text", progress=False)
    assert (s.written, s.dropped) == (2, {"text_unencodable": 1})
    assert load_manifest(tmp_path / "text")["drop_examples"] == {"text_unencodable": [f"{corpus}:2"]}


# --- workers ---------------------------------------------------------------------------------------


def test_an_exception_on_one_record_drops_that_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images(tmp_path, 5, 820)
    p = table(tmp_path / "t.jsonl", [{"file": f"{i}.jpg", "caption": f"a caption number {i}"} for i in range(5)])
    real = pipeline._prepare_image

    def flaky(rec: Any, pair: Any, data: bytes, cfg: Any) -> None:
        if pair.image_path.endswith("2.jpg"):
            raise ZeroDivisionError("a decoder bug")
        real(rec, pair, data, cfg)

    monkeypatch.setattr(pipeline, "_prepare_image", flaky)
    s = shard_pairs([p], tmp_path / "ds", progress=False)
    assert (s.written, s.dropped) == (4, {"worker_error": 1})
    assert load_manifest(tmp_path / "ds")["drop_examples"] == {"worker_error": [f"{p}:3"]}
    with pytest.raises(InputError, match=r"t\.jsonl:3: worker_error: ZeroDivisionError: a decoder bug"):
        shard_pairs([p], tmp_path / "strict", strict=True, progress=False)


def test_a_worker_process_that_dies_costs_only_its_record(tmp_path: Path) -> None:
    out = list(pipeline.ordered_map(die_on_seven, range(12), workers=2,
                                    on_crash=lambda item, exc: -1 if item == 7 else -2))
    assert out == [0, 10, 20, 30, 40, 50, 60, -1, 80, 90, 100, 110]  # the pool restarted; order kept
    with pytest.raises(Exception, match="terminated abruptly"):
        list(pipeline.ordered_map(die_on_seven, range(12), workers=2))
    # The real rescue: the chunk is redone record by record, each alone in a fresh process.
    from data_tools.sources import read_pairs

    images(tmp_path, 6, 830)
    p = table(tmp_path / "t.jsonl", [{"key": "die" if i == 3 else f"k{i}", "file": f"{i}.jpg",
                                      "caption": f"a caption number {i}"} for i in range(6)])
    cfg = pipeline.PrepareConfig()
    fn = partial(prepare_or_die, cfg)
    chunks = [list(read_pairs([p]))[i:i + 3] for i in (0, 3)]
    got = [r for c in pipeline.ordered_map(fn, chunks, workers=2, on_crash=partial(pipeline.rescue_chunk, fn))
           for r in c]
    assert [(r.key, r.reason) for r in got] == [("k0", None), ("k1", None), ("k2", None), ("die", "worker_crashed"),
                                                ("k4", None), ("k5", None)]
    assert got[3].source == f"{p}:4" and got[4].sha256 and got[5].phash is not None


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_of_the_parent_ends_its_workers(tmp_path: Path) -> None:
    # Each chunk is ~16 decodes of a 2000x2000 photo: seconds of work a worker would finish
    # (and more queued) after its parent is gone, unless it dies with the parent.
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (2000, 2000, 3), dtype=np.uint8)).save(tmp_path / "big.jpg", quality=90)
    p = table(tmp_path / "t.jsonl", [{"file": "big.jpg", "caption": f"a large noisy photo {i}"} for i in range(400)])
    proc = subprocess.Popen([sys.executable, "-m", "data_tools", "shard-pairs", str(p), "--out", str(tmp_path / "o"),
                             "--workers", "2", "--chunk-size", "16", "--no-group-by-image", "--no-progress"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    workers: list[int] = []
    while len(workers) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        workers = [c for c in _children(proc.pid)
                   if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
        time.sleep(0.1)
    time.sleep(3)  # both workers are inside a chunk now
    everything = _children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    t0 = time.monotonic()
    while any(_alive(c) for c in everything) and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    left = [c for c in everything if _alive(c)]
    for c in left:  # do not leak them into the rest of the suite
        os.kill(c, signal.SIGKILL)
    assert not left and time.monotonic() - t0 < 2.0, f"workers outlived their parent by {time.monotonic() - t0:.1f} s"


# --- inputs vs output ------------------------------------------------------------------------------


def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_output_may_not_overlap_an_input_and_nothing_is_deleted(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    from .test_data_scale import _write_i2d_shard

    i2d = tmp_path / "i2d"
    i2d.mkdir()
    _write_i2d_shard(i2d, 0, [(smooth(840 + i), f"a caption number {i}", {}) for i in range(3)], stats=True)
    before = {p.name: p.read_bytes() for p in i2d.iterdir()}
    for flag in ([], ["--overwrite"], ["--resume"]):
        err = _one_line_error(["shard-pairs", str(i2d), "--out", str(i2d), *flag], capsys)
        assert "overlaps the input" in err
        err = _one_line_error(["shard-pairs", str(i2d), "--out", str(i2d / "sub"), *flag], capsys)
        assert "overlaps the input" in err
    assert {p.name: p.read_bytes() for p in i2d.iterdir()} == before
    # The input inside the output folder.
    data = tmp_path / "data"
    data.mkdir()
    images(data, 2, 850)
    t = table(data / "t.jsonl", [{"file": f"{i}.jpg", "caption": f"a caption number {i}"} for i in range(2)])
    assert "overlaps the input" in _one_line_error(["shard-pairs", str(t), "--out", str(data), "--overwrite"], capsys)
    assert t.is_file() and (data / "0.jpg").is_file()
    # A folder of another tool's tars that is not an input: never emptied by --resume/--overwrite.
    for flag in ([], ["--overwrite"], ["--resume"]):
        err = _one_line_error(["shard-pairs", str(t), "--out", str(i2d.parent / "i2d_copy"), *flag], capsys) \
            if (i2d.parent / "i2d_copy").exists() else None
        if err is None:
            import shutil

            shutil.copytree(i2d, i2d.parent / "i2d_copy")
            err = _one_line_error(["shard-pairs", str(t), "--out", str(i2d.parent / "i2d_copy"), *flag], capsys)
        assert "tar file(s)" in err or "holds tar files" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "i2d_copy").iterdir()} == before
    assert "overlaps the input" in _one_line_error(["shard-text", str(t), "--out", str(data)], capsys)


# --- shard-text ------------------------------------------------------------------------------------


def test_shard_text_keys_are_unique_for_inputs_with_the_same_name(tmp_path: Path) -> None:
    for d in ("flickr", "coco"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "dev_caps.txt").write_text(f"first {d} sentence\nsecond {d} sentence\n")
    ds = tmp_path / "t"
    shard_text([tmp_path / "flickr" / "dev_caps.txt", tmp_path / "coco" / "dev_caps.txt"], ds, progress=False)
    keys = [s["__key__"] for e in load_manifest(ds)["shards"] for s in read_shard(ds / e["name"])]
    assert keys == ["dev_caps_000000001", "dev_caps_000000002", "dev_caps-2_000000001", "dev_caps-2_000000002"]
    assert verify(ds).ok


def test_verify_finds_a_key_used_in_two_shards(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, max_count=2)
    for key in ("a", "b", "c", "a"):
        w.write({"__key__": key, "txt": f"sentence {key}"})
    write_manifest(tmp_path, {"kind": "text", "shards": shard_dicts(w.close())})
    assert verify(tmp_path).problems == ["000001.tar: key 'a' also used in 000000.tar (keys must be unique)"]


# --- embed ----------------------------------------------------------------------------------------


SPEC = "timm:test_efficientnet.r160_in1k:random"


def test_an_interrupted_embed_leaves_a_valid_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from data_tools import encoders

    images(tmp_path, 9, 860)
    p = table(tmp_path / "t.jsonl", [{"file": f"{i}.jpg", "caption": f"a caption number {i}"} for i in range(9)])
    ds = tmp_path / "ds"
    shard_pairs([p], ds, max_count=3, progress=False)
    before = content(ds)
    real_encode = encoders.ImageEncoder.encode
    calls: list[int] = []

    def crashing(self: Any, imgs: list[Any], device: str = "cpu") -> Any:
        calls.append(len(imgs))
        if sum(calls) > 3:
            raise RuntimeError("killed")
        return real_encode(self, imgs, device)

    monkeypatch.setattr(encoders.ImageEncoder, "encode", crashing)
    with pytest.raises(RuntimeError, match="killed"):
        embed(ds, SPEC, batch_size=3, progress=False)
    rep = verify(ds, decode=True)
    assert rep.ok and any("pending: embed has written 1 of 3" in n for n in rep.notes), rep.render()
    assert content(ds) == before  # readers still see the untouched dataset

    # Killed after the manifest swap, before the old files are deleted: still valid.
    monkeypatch.setattr(encoders.ImageEncoder, "encode", real_encode)
    real_unlink = Path.unlink

    def no_delete(self: Path, missing_ok: bool = False) -> None:
        if self.name.endswith(".tar"):
            raise KeyboardInterrupt
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", no_delete)
    with pytest.raises(KeyboardInterrupt):
        embed(ds, SPEC, batch_size=3, progress=False)
    monkeypatch.setattr(Path, "unlink", real_unlink)
    rep = verify(ds, decode=True)
    assert rep.ok and any("committed its manifest" in n for n in rep.notes), rep.render()
    embedded = content(ds)
    assert set(embedded) == set(before) and all("emb.npy" in s for s in embedded.values())
    calls.clear()
    monkeypatch.setattr(encoders.ImageEncoder, "encode",
                        lambda self, imgs, device="cpu": calls.append(len(imgs)) or real_encode(self, imgs, device))
    embed(ds, SPEC, batch_size=3, progress=False)  # only the cleanup is left
    assert calls == [] and sorted(p.name for p in ds.glob("*.tar")) == ["000000-g1.tar", "000001-g1.tar",
                                                                       "000002-g1.tar"]
    rep = verify(ds, decode=True)
    assert rep.ok and not rep.notes, rep.render()


# --- tables ---------------------------------------------------------------------------------------


def test_row_per_caption_tables_keep_every_caption_and_stats_counts_them(tmp_path: Path) -> None:
    import csv

    images(tmp_path, 4, 870)
    rows = [(f"{i}.jpg", f"caption {j} of photo number {i}") for j in range(5) for i in range(4)]  # interleaved
    with open(tmp_path / "captions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "caption"])
        w.writerows(rows)
    s = shard_pairs([tmp_path / "captions.csv"], tmp_path / "ds", progress=False)
    assert (s.seen, s.written, s.dropped) == (4, 4, {})
    got = {json.loads(x["json"])["captions"][0]: json.loads(x["json"])["captions"] for x in content(tmp_path / "ds").values()}
    assert got == {f"caption 0 of photo number {i}": [f"caption {j} of photo number {i}" for j in range(5)]
                   for i in range(4)}
    st = stats(tmp_path / "ds")
    assert len(st.caption_words) == 20 and st.captions_per_sample == {5: 4}
    assert "scanned 4 samples, 20 captions" in st.render()
    s = shard_pairs([tmp_path / "captions.csv"], tmp_path / "rows", group_by_image=False, progress=False)
    assert (s.written, s.dropped) == (4, {"duplicate": 16})  # one record per row: the other rows are repeats


def test_paths_outside_the_table_folder_need_a_flag(tmp_path: Path) -> None:
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "secret.jpg").write_bytes(smooth(880))
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "ok.jpg").write_bytes(smooth(881))
    p = table(tmp_path / "tables" / "t.jsonl", [
        {"file": "ok.jpg", "caption": "a photo next to the table"},
        {"file": "../private/secret.jpg", "caption": "a photo outside the table folder"},
        {"file": str(tmp_path / "private" / "secret.jpg"), "caption": "an absolute path outside"},
        {"file": "sub/../ok.jpg", "caption": "a path that stays inside"},
    ])
    s = shard_pairs([p], tmp_path / "a", progress=False, group_by_image=False)
    assert (s.written, s.dropped) == (1, {"path_outside_root": 2, "duplicate": 1})
    assert load_manifest(tmp_path / "a")["drop_examples"]["path_outside_root"] == [f"{p}:2", f"{p}:3"]
    with pytest.raises(InputError, match=r"t\.jsonl:2: .*secret\.jpg is outside the table's folder.*--allow-outside"):
        shard_pairs([p], tmp_path / "b", strict=True, progress=False)
    s = shard_pairs([p], tmp_path / "c", allow_outside_paths=True, group_by_image=False, progress=False)
    assert (s.written, s.dropped) == (2, {"duplicate": 2})


# --- evaluation hygiene ---------------------------------------------------------------------------


@pytest.mark.skipif(not STS.is_dir(), reason="shared STS data not present")
def test_eval_overlap_drops_sts_sentences_and_eval_photos(tmp_path: Path) -> None:
    held = tmp_path / "heldout"
    held.mkdir()
    for i in range(3):
        (held / f"h{i}.jpg").write_bytes(smooth(890 + i))
    train = tmp_path / "train"
    train.mkdir()
    images(train, 4, 900)
    Image.open(held / "h1.jpg").resize((52, 52)).save(train / "leak.jpg", quality=75)  # an eval photo, re-encoded
    p = table(train / "t.jsonl", [
        {"file": "0.jpg", "caption": "A girl is styling her hair."},  # STS-B test, raw form of "a girl is styling her hair ."
        {"file": "1.jpg", "caption": ["One woman is measuring another woman's ankle.", "a photo of two women"]},
        {"file": "2.jpg", "caption": "a caption found in no evaluation set"},
        {"file": "3.jpg", "caption": "another caption of our own"},
        {"file": "leak.jpg", "caption": "a photo of the held-out set"},
    ])
    plain = shard_pairs([p], tmp_path / "plain", progress=False)
    assert plain.written == 5
    s = shard_pairs([p], tmp_path / "clean", eval_sts=STS, eval_images=held, progress=False)
    assert (s.written, s.dropped) == (3, {"eval_overlap": 2})
    m = load_manifest(tmp_path / "clean")
    assert m["drop_examples"]["eval_overlap"] == [f"{p}:1", f"{p}:5"]
    assert m["notes"]["eval_captions_removed"] == 2
    assert m["filters"]["eval"]["sts"]["sentences"] > 10_000 and m["filters"]["eval"]["images"]["photos"] == 3
    kept = {json.loads(x["json"])["source"]: json.loads(x["json"])["captions"] for x in content(tmp_path / "clean").values()}
    assert kept[f"{p}:2"] == ["a photo of two women"]
    # The held-out set given as a pairs dataset: its phashes come from the sample json.
    hd = tmp_path / "held_ds"
    table(held / "h.jsonl", [{"file": f"h{i}.jpg", "caption": f"held-out photo number {i}"} for i in range(3)])
    shard_pairs([held / "h.jsonl"], hd, progress=False)
    s = shard_pairs([p], tmp_path / "clean2", eval_images=hd, progress=False)
    assert (s.written, s.dropped) == (4, {"eval_overlap": 1})


# --- the CLI ----------------------------------------------------------------------------------------


def test_every_option_has_a_flag_that_reaches_the_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    got: dict[str, Any] = {}
    params = set(inspect.signature(commands.shard_pairs).parameters) - {"inputs", "out_dir"}
    monkeypatch.setattr(commands, "shard_pairs", lambda *a, **k: got.update(k, args=a) or commands.Summary(
        "pairs", tmp_path, 0, 0, {}, 0))
    argv = ["shard-pairs", "in.jsonl", "--out", "o", "--image-col", "I", "--caption-col", "C", "--key-col", "K",
            "--input-format", "table", "--image-root", "R", "--no-group-by-image", "--allow-outside-paths",
            "--strict", "--dedup", "pair", "--near-dup-distance", "3", "--min-side", "7", "--max-aspect", "2.5",
            "--max-pixels", "99", "--min-caption-chars", "3", "--min-caption-words", "4", "--max-caption-chars",
            "77", "--no-verify-decode", "--resize-mode", "border", "--image-size", "300", "--upscale", "--jpeg-quality",
            "80", "--reencode", "--resize-filter", "area", "--timeout", "3",
            "--retries", "5", "--retry-backoff", "0.25", "--max-image-bytes", "1234", "--max-redirects", "2",
            "--download-threads", "9", "--user-agent", "UA/1", "--clip-model", "M", "--clip-pretrained", "P",
            "--clip-threshold", "0.2", "--clip-device", "cuda", "--clip-batch-size", "16", "--eval-sts", "S",
            "--eval-images", "E", "--eval-near-dup-distance", "6", "--workers", "3", "--chunk-size", "8",
            "--shard-size", "100", "--shard-bytes", "5000", "--part", "1", "--parts", "4", "--resume",
            "--no-progress"]
    assert cli(argv) == 0
    f, i, d, c = got["filters"], got["images"], got["download"], got["clip"]
    assert (f.min_side, f.max_aspect, f.max_pixels, f.min_caption_chars, f.min_caption_words, f.max_caption_chars,
            f.verify_decode) == (7, 2.5, 99, 3, 4, 77, False)
    assert (i.resize_mode, i.image_size, i.upscale, i.jpeg_quality, i.reencode, i.resize_filter) == \
        ("border", 300, True, 80, True, "area")
    assert (d.timeout, d.retries, d.backoff, d.max_bytes, d.max_redirects, d.threads, d.user_agent) == \
        (3.0, 5, 0.25, 1234, 2, 9, "UA/1")
    assert (c.model, c.pretrained, c.threshold, c.top_fraction, c.device, c.batch_size) == \
        ("M", "P", 0.2, None, "cuda", 16)
    for name, value in {"image_col": "I", "caption_col": "C", "key_col": "K", "input_format": "table",
                        "image_root": "R", "group_by_image": False, "allow_outside_paths": True, "strict": True,
                        "dedup": "pair", "near_dup_distance": 3, "eval_sts": "S", "eval_images": "E",
                        "eval_near_dup_distance": 6, "workers": 3, "chunk_size": 8, "max_count": 100,
                        "max_bytes": 5000, "part": 1, "parts": 4, "resume": True, "overwrite": False,
                        "progress": False}.items():
        assert got[name] == value, name
    # Nothing settable in code lacks a flag: every keyword and every option field was set above.
    assert params <= set(got) - {"args"}
    for cls, obj in ((filters.FilterOptions, f), (filters.ImageOptions, i)):
        assert all(getattr(obj, fl.name) != fl.default for fl in dataclasses.fields(cls)), cls
    from data_tools.clip_filter import ClipOptions
    from data_tools.download import DownloadOptions

    assert {fl.name for fl in dataclasses.fields(DownloadOptions)
            if getattr(d, fl.name) == fl.default} == set()
    assert {fl.name for fl in dataclasses.fields(ClipOptions) if getattr(c, fl.name) == fl.default} == {"top_fraction"}
    # The dead code is gone.
    assert not hasattr(filters, "check_image") and not hasattr(NearDupIndex, "check_and_add")
