"""data_tools at scale: every input kind, the downloader against a hostile local server, each
filter reason, global exact + near dedup, determinism across --workers, resume after SIGKILL,
verify/stats, the CLIP filter on a tiny random-init model and fetch-eval-data from a local
stand-in archive. Everything is tiny (32-64 px images made here) and offline (127.0.0.1)."""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from data_tools.__main__ import main as cli
from data_tools.check import stats, verify
from data_tools.commands import shard_pairs
from data_tools.dedup import NearDupIndex
from data_tools.download import Downloader, DownloadOptions
from data_tools.filters import FilterOptions, ImageOptions
from data_tools.shards import ShardWriter, load_manifest, read_shard, shard_dicts, write_manifest
from data_tools.sources import InputError

from .conftest import ROOT, SHARED_DATA

# --- helpers -------------------------------------------------------------------------------------


def smooth(seed: int, size: tuple[int, int] = (64, 64), fmt: str = "JPEG", quality: int = 95) -> bytes:
    """A smooth random picture (4x4 noise upscaled): its phash is stable under re-encoding
    and resizing, and far from any other seed's."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8))
    img = small.resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def samples(folder: Path) -> list[dict[str, Any]]:
    m = load_manifest(folder)
    return [s for e in m["shards"] for s in read_shard(folder / e["name"])]


def caption(i: int) -> str:
    return f"a smooth picture number {i}"


class Server:
    """A local HTTP server whose routes misbehave on purpose; counts hits per path."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple] = {}
        self.hits: Counter[str] = Counter()
        self.delay = 0.0
        state = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                state.hits[self.path] += 1
                if state.delay:
                    time.sleep(state.delay)
                spec = state.routes.get(self.path, ("status", 404))
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # client gave up (size cap)
                    state.respond(self, spec)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def respond(self, h: BaseHTTPRequestHandler, spec: tuple) -> None:
        kind = spec[0]
        if kind == "ok":
            body, ctype = spec[1], spec[2] if len(spec) > 2 else "image/jpeg"
            h.send_response(200)
            h.send_header("Content-Type", ctype)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
        elif kind == "status":
            h.send_response(spec[1])
            h.send_header("Content-Length", "0")
            h.end_headers()
        elif kind == "flaky":  # 503 for the first n hits, then the body
            if self.hits[h.path] <= spec[1]:
                self.respond(h, ("status", 503))
            else:
                self.respond(h, ("ok", spec[2]))
        elif kind == "slow":
            time.sleep(spec[1])
            self.respond(h, ("ok", spec[2]))
        elif kind == "truncated":  # promises more than it sends, then hangs up
            body = spec[1]
            h.send_response(200)
            h.send_header("Content-Type", "image/jpeg")
            h.send_header("Content-Length", str(len(body) * 2))
            h.end_headers()
            h.wfile.write(body)
            h.close_connection = True
        elif kind == "redirect":
            h.send_response(302)
            h.send_header("Location", spec[1])
            h.send_header("Content-Length", "0")
            h.end_headers()
        elif kind == "endless":  # no Content-Length: the size cap must stop the read
            h.send_response(200)
            h.send_header("Content-Type", "image/jpeg")
            h.end_headers()
            for _ in range(spec[1]):
                h.wfile.write(b"\xff" * 65536)
        elif kind == "file":
            self.respond(h, ("ok", Path(spec[1]).read_bytes(), "application/octet-stream"))

    def url(self, path: str) -> str:
        return self.base + path


@pytest.fixture()
def server() -> Iterator[Server]:
    srv = Server()
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


FAST = DownloadOptions(timeout=0.5, retries=1, backoff=0.01, max_bytes=200_000, max_redirects=3, threads=8)


# --- downloader ------------------------------------------------------------------------------------


def test_downloader_retries_only_transient_failures_and_caps_everything(server: Server) -> None:
    img = smooth(1)
    server.routes.update({
        "/ok.jpg": ("ok", img),
        "/flaky.jpg": ("flaky", 1, img),
        "/gone.jpg": ("status", 404),
        "/busy.jpg": ("status", 503),
        "/page.jpg": ("ok", b"<html>hi</html>", "text/html; charset=utf-8"),
        "/slow.jpg": ("slow", 2.0, img),
        "/cut.jpg": ("truncated", img),
        "/huge.jpg": ("ok", b"\0" * 300_000),
        "/endless.jpg": ("endless", 100),
        "/loop1": ("redirect", "/loop2"), "/loop2": ("redirect", "/loop1"),
        "/hop": ("redirect", "/ok.jpg"),
        "/tofile": ("redirect", "file:///etc/passwd"),
    })
    dl = Downloader(FAST)
    names = ["ok.jpg", "flaky.jpg", "gone.jpg", "busy.jpg", "page.jpg", "slow.jpg", "cut.jpg", "huge.jpg",
             "endless.jpg", "loop1", "hop", "tofile"]
    t0 = time.monotonic()
    res = {n: r for n, r in zip(names, dl.fetch_many(server.url("/" + n) for n in names), strict=True)}
    res["ftp"] = dl.fetch("ftp://127.0.0.1/x.jpg")
    dl.close()
    assert time.monotonic() - t0 < 4.0  # concurrent: the slow ones overlap
    got = {n: r.reason for n, r in res.items()}
    assert got == {"ok.jpg": None, "flaky.jpg": None, "gone.jpg": "http_404", "busy.jpg": "http_503",
                   "page.jpg": "html_not_image", "slow.jpg": "timeout", "cut.jpg": "truncated",
                   "huge.jpg": "too_large", "endless.jpg": "too_large", "loop1": "too_many_redirects",
                   "hop": None, "tofile": "redirect_bad_scheme", "ftp": "url_bad_scheme"}
    assert res["ok.jpg"].data == img and res["hop"].data == img and res["flaky.jpg"].data == img
    assert server.hits["/flaky.jpg"] == 2 and server.hits["/busy.jpg"] == 2  # retried once
    assert server.hits["/gone.jpg"] == 1 and server.hits["/page.jpg"] == 1  # permanent: no retry


# --- input kinds -------------------------------------------------------------------------------


def test_url_table_parquet_downloads_keeps_extra_columns_and_counts_reasons(server: Server, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i in range(6):
        server.routes[f"/img/{i}.jpg"] = ("ok", smooth(i))
        rows.append({"URL": server.url(f"/img/{i}.jpg"), "TEXT": caption(i), "license": f"cc-{i}"})
    server.routes["/img/html.jpg"] = ("ok", b"<!doctype html><p>not found</p>", "image/jpeg")
    cut = smooth(50, (96, 96))
    server.routes["/img/cut.jpg"] = ("ok", cut[: len(cut) * 2 // 3])
    rows += [{"URL": server.url("/img/missing.jpg"), "TEXT": "a picture that is gone", "license": "x"},
             {"URL": server.url("/img/html.jpg"), "TEXT": "an html page as jpg", "license": "x"},
             {"URL": server.url("/img/cut.jpg"), "TEXT": "a truncated jpeg file", "license": "x"},
             {"URL": "file:///etc/passwd", "TEXT": "a local file url here", "license": "x"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "urls.parquet")
    s = shard_pairs([tmp_path / "urls.parquet"], tmp_path / "ds", image_col="URL", caption_col="TEXT",
                    download=FAST, progress=False)
    assert (s.seen, s.written) == (10, 6)
    assert s.dropped == {"http_404": 1, "image_is_html": 1, "image_truncated": 1, "url_bad_scheme": 1}
    got = samples(tmp_path / "ds")
    meta = json.loads(got[2]["json"])
    assert meta["license"] == "cc-2" and meta["url"].endswith("/img/2.jpg") and meta["captions"] == [caption(2)]
    assert len(meta["phash"]) == 16 and len(meta["sha256"]) == 64
    m = load_manifest(tmp_path / "ds")
    assert m["drop_examples"]["http_404"] == [f"{tmp_path / 'urls.parquet'}:7"]
    assert m["download"]["timeout"] == 0.5


def _write_i2d_shard(folder: Path, shard: int, items: list[tuple[bytes | None, str, dict]], stats: bool) -> None:
    """What img2dataset writes for one shard: NNNNN.tar (key.jpg/.txt/.json), .parquet, _stats.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = f"{shard:05d}"
    rows = []
    with tarfile.open(folder / f"{name}.tar", "w") as tf:
        for i, (img, text, extra) in enumerate(items):
            key = f"{shard:05d}{i:04d}"
            meta = {"url": f"http://example.com/{key}.jpg", "caption": text, "key": key, "status": "success",
                    "error_message": None, "width": 64, "height": 64, "exif": "{}", **extra}
            rows.append(meta)
            members = [("txt", text.encode()), ("json", json.dumps(meta).encode())]
            if img is not None:
                members.insert(0, ("jpg", img))
            for ext, data in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    pq.write_table(pa.Table.from_pylist(rows), folder / f"{name}.parquet")
    if stats:
        (folder / f"{name}_stats.json").write_text(json.dumps({
            "count": len(items) + 2, "successes": len(items), "failed_to_download": 2, "failed_to_resize": 0,
            "status_dict": {"success": len(items), "HTTP Error 404: Not Found": 2}}))


def test_img2dataset_folder_reads_complete_shards_only(tmp_path: Path) -> None:
    i2d = tmp_path / "i2d"
    i2d.mkdir()
    _write_i2d_shard(i2d, 0, [(smooth(i), caption(i), {"source_id": i}) for i in range(4)], stats=True)
    _write_i2d_shard(i2d, 1, [(smooth(10), caption(10), {}), (None, "a sample without image", {})], stats=True)
    _write_i2d_shard(i2d, 2, [(smooth(20), caption(20), {})], stats=False)  # still being written
    s = shard_pairs([i2d], tmp_path / "ds", progress=False)
    assert (s.seen, s.written) == (6, 5) and s.dropped == {"image_missing": 1}
    got = samples(tmp_path / "ds")
    assert [x["__key__"] for x in got] == ["000000000", "000000001", "000000002", "000000003", "000010000"]
    meta = json.loads(got[1]["json"])
    assert meta["source_id"] == 1 and meta["url"] == "http://example.com/000000001.jpg"
    assert "status" not in meta and "exif" not in meta and meta["captions"] == [caption(1)]
    notes = load_manifest(tmp_path / "ds")["notes"]
    assert notes["skipped_inputs"] == [f"{i2d / '00002.tar'}: no 00002_stats.json (incomplete img2dataset shard)"]
    assert notes["upstream"]["failed_to_download"] == 4 and notes["upstream"]["successes"] == 6


def test_coco_caption_json_keeps_every_caption_of_an_image(tmp_path: Path) -> None:
    (tmp_path / "val").mkdir()
    images = []
    for i in range(3):
        (tmp_path / "val" / f"{i:012d}.jpg").write_bytes(smooth(30 + i))
        images.append({"id": 100 + i, "file_name": f"{i:012d}.jpg", "coco_url": f"http://x/{i}.jpg",
                       "width": 64, "height": 64, "license": 4})
    anns = [{"id": 1, "image_id": 100, "caption": "First caption of image zero."},
            {"id": 2, "image_id": 101, "caption": "Only caption of image one."},
            {"id": 3, "image_id": 100, "caption": "Second caption of image zero."},
            {"id": 4, "image_id": 999, "caption": "an annotation of no image"}]
    coco = tmp_path / "ann" / "captions_val.json"
    coco.parent.mkdir()
    coco.write_text(json.dumps({"info": {}, "images": images, "annotations": anns}, indent=1))
    s = shard_pairs([coco], tmp_path / "ds", image_root=tmp_path / "val", progress=False)
    assert (s.seen, s.written) == (4, 2) and s.dropped == {"bad_row": 1, "missing_caption": 1}
    first, second = samples(tmp_path / "ds")
    meta = json.loads(first["json"])
    assert meta["captions"] == ["First caption of image zero.", "Second caption of image zero."]
    assert first["txt"].decode() == "First caption of image zero." and meta["coco_id"] == 100
    assert first["__key__"] == "000000000000" and json.loads(second["json"])["coco_id"] == 101
    with pytest.raises(InputError, match=r"captions_val\.json:.*annotations\[3\].*image_id 999"):
        shard_pairs([coco], tmp_path / "strict", image_root=tmp_path / "val", strict=True, progress=False)


def test_gzipped_jsonl_and_tsv_with_paths(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(smooth(40 + i, fmt="PNG"))
    with gzip.open(tmp_path / "t.jsonl.gz", "wt") as fh:
        for i in range(3):
            fh.write(json.dumps({"path": f"{i}.png", "caption": caption(i)}) + "\n")
    with open(tmp_path / "t.tsv", "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t")
        w.writerow(["image", "sentence", "split"])
        w.writerows([[f"{i}.png", caption(i), "train"] for i in range(3)])
    assert shard_pairs([tmp_path / "t.jsonl.gz"], tmp_path / "a", progress=False).written == 3
    s = shard_pairs([tmp_path / "t.tsv"], tmp_path / "b", progress=False)
    assert s.written == 3 and all("png" in x for x in samples(tmp_path / "b"))
    assert json.loads(samples(tmp_path / "b")[0]["json"])["split"] == "train"


# --- filters -----------------------------------------------------------------------------------------


def test_every_filter_reason_is_counted(tmp_path: Path) -> None:
    d = tmp_path / "im"
    d.mkdir()
    cut = smooth(5)
    files = {"good.jpg": smooth(1), "small.jpg": smooth(2, (20, 40)), "wide.jpg": smooth(3, (150, 32)),
             "big.jpg": smooth(4, (80, 80)), "html.jpg": b"<html><body>oops</body></html>",
             "cut.jpg": cut[: len(cut) * 2 // 3], "noise.jpg": os.urandom(500), "empty.jpg": b""}
    for name, data in files.items():
        (d / name).write_bytes(data)
    rows = [{"file": "im/good.jpg", "caption": "a good &amp; <b>clean</b>   caption"},
            {"file": "im/good.jpg", "caption": "   "},
            {"file": "im/good.jpg", "caption": "hi"},
            {"file": "im/good.jpg", "caption": "x " * 400},
            {"file": "im/small.jpg", "caption": "a picture that is too small"},
            {"file": "im/wide.jpg", "caption": "a picture that is far too wide"},
            {"file": "im/big.jpg", "caption": "a picture with too many pixels"},
            {"file": "im/html.jpg", "caption": "an html page named jpg"},
            {"file": "im/cut.jpg", "caption": "a jpeg cut in the middle"},
            {"file": "im/noise.jpg", "caption": "random bytes named jpg"},
            {"file": "im/empty.jpg", "caption": "a file of zero bytes"},
            {"file": "im/none.jpg", "caption": "a file that does not exist"},
            {"file": "", "caption": "a row without an image"},
            {"file": "im/good.jpg"}]
    p = write_jsonl(tmp_path / "t.jsonl", rows)
    with open(p, "a") as fh:
        fh.write("{broken json\n")
    opts = FilterOptions(min_side=32, max_aspect=4.0, max_pixels=6000, max_caption_chars=300)
    s = shard_pairs([p], tmp_path / "ds", filters=opts, group_by_image=False, progress=False)
    assert s.written == 1
    assert s.dropped == {"caption_empty": 1, "caption_too_short": 1, "caption_too_long": 1, "image_too_small": 1,
                         "image_bad_aspect": 1, "image_too_many_pixels": 1, "image_is_html": 1,
                         "image_truncated": 1, "image_undecodable": 1, "image_empty": 1, "image_missing": 1,
                         "missing_image_ref": 1, "caption_missing": 1, "bad_row": 1}
    assert samples(tmp_path / "ds")[0]["txt"].decode() == "a good & clean caption"
    with pytest.raises(InputError, match=r"t\.jsonl:15: invalid JSON"):
        shard_pairs([p], tmp_path / "strict", filters=opts, strict=True, group_by_image=False, progress=False)


def test_resize_and_reencode(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (36, 36), (255, 0, 0, 128))
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    gif = io.BytesIO()
    Image.open(io.BytesIO(smooth(7))).convert("P").save(gif, "GIF")
    (tmp_path / "wide.jpg").write_bytes(smooth(6, (120, 60)))
    (tmp_path / "alpha.png").write_bytes(buf.getvalue())
    (tmp_path / "anim.gif").write_bytes(gif.getvalue())
    write_jsonl(tmp_path / "t.jsonl", [{"file": n, "caption": caption(i)}
                                       for i, n in enumerate(["wide.jpg", "alpha.png", "anim.gif"])])
    s = shard_pairs([tmp_path / "t.jsonl"], tmp_path / "ds", images=ImageOptions(resize_mode="keep_ratio_largest", image_size=40, jpeg_quality=80),
                    near_dup_distance=None, progress=False)
    assert s.written == 3
    wide, alpha, anim = samples(tmp_path / "ds")
    meta = json.loads(wide["json"])
    assert (meta["width"], meta["height"], meta["original_width"], meta["original_height"]) == (40, 20, 120, 60)
    assert Image.open(io.BytesIO(wide["jpg"])).size == (40, 20)
    assert "png" in alpha and "jpg" in anim  # small PNG kept as is; GIF converted for the trainer
    s = shard_pairs([tmp_path / "t.jsonl"], tmp_path / "re", images=ImageOptions(reencode=True),
                    near_dup_distance=None, progress=False)
    px = Image.open(io.BytesIO(samples(tmp_path / "re")[1]["jpg"])).getpixel((5, 5))
    assert all(abs(a - b) <= 3 for a, b in zip(px, (255, 127, 127), strict=True))  # alpha over white


# --- dedup -------------------------------------------------------------------------------------------


def test_near_dup_index_matches_brute_force() -> None:
    rng = random.Random(0)
    stored = [rng.getrandbits(64) for _ in range(3000)]
    queries = [rng.getrandbits(64) for _ in range(300)]
    for q in queries[:150]:  # plant neighbours at distance 1..9
        flips = rng.sample(range(64), rng.randint(1, 9))
        stored.append(q ^ sum(1 << b for b in flips))
    for d in (0, 3, 6, 9):
        brute = [any((q ^ h).bit_count() <= d for h in stored) for q in queries]
        # Every layout the index may choose: d+1 exact bands, fewer bands probed at a radius.
        for plan in [None] + [(m, d // m) for m in range(2 if d > 2 else 1, d + 2)]:
            idx = NearDupIndex(d, plan=plan)
            for h in stored:
                idx.add(h)
            for q, want in zip(queries, brute, strict=True):
                found = idx.find(q)
                assert (found is not None) == want, (d, plan)
                assert found is None or (found ^ q).bit_count() <= d
    with pytest.raises(ValueError, match="misses matches"):
        NearDupIndex(4, plan=(2, 1))


def test_near_dup_index_replans_as_it_grows_and_stays_exact() -> None:
    rng = np.random.default_rng(1)
    stored = rng.integers(0, 2**63, 70_000, dtype=np.int64).astype(np.uint64) * np.uint64(2) + \
        rng.integers(0, 2, 70_000).astype(np.uint64)
    idx = NearDupIndex(4)
    plans = set()
    for h in stored.tolist():
        idx.add(h)
        plans.add(idx.plan)
    assert plans == {(5, 0), (3, 1)} and len(idx) == 70_000  # re-planned once, past ~48k hashes
    near = zip(rng.integers(0, len(stored), 100).tolist(), [rng.choice(64, 4, replace=False) for _ in range(100)],
               strict=True)
    queries = [int(stored[i]) ^ sum(1 << int(b) for b in bits) for i, bits in near] + \
        rng.integers(0, 2**63, 100, dtype=np.int64).tolist()
    for q in queries:
        dist = np.unpackbits((stored ^ np.uint64(q)).view(np.uint8)).reshape(-1, 64).sum(axis=1)
        assert (idx.find(q) is not None) == bool((dist <= 4).any())


def test_exact_and_near_dedup_are_global_across_shards(tmp_path: Path) -> None:
    rows = []
    for i in range(8):
        (tmp_path / f"{i}.jpg").write_bytes(smooth(100 + i))
        rows.append({"file": f"{i}.jpg", "caption": caption(i)})
    # Shard size 2 puts every copy in another shard than its original.
    (tmp_path / "copy.jpg").write_bytes((tmp_path / "1.jpg").read_bytes())
    Image.open(tmp_path / "2.jpg").resize((58, 58)).save(tmp_path / "resized.jpg", quality=70)
    rows += [{"file": "copy.jpg", "caption": "the same bytes with another caption"},
             {"file": "resized.jpg", "caption": "the second picture resized and recompressed"},
             {"file": "1.jpg", "caption": caption(1)}]
    p = write_jsonl(tmp_path / "t.jsonl", rows)
    # One record per row here (rows of one image are otherwise grouped into one record).
    s = shard_pairs([p], tmp_path / "a", max_count=2, group_by_image=False, progress=False)
    assert (s.written, s.dropped) == (8, {"duplicate": 2, "near_duplicate": 1})
    s = shard_pairs([p], tmp_path / "b", max_count=2, near_dup_distance=None, group_by_image=False, progress=False)
    assert (s.written, s.dropped) == (9, {"duplicate": 2})
    # "pair" mode: same image with a new caption survives, the exact repeat does not.
    s = shard_pairs([p], tmp_path / "c", max_count=2, dedup="pair", group_by_image=False, progress=False)
    assert (s.written, s.dropped) == (10, {"duplicate": 1})
    keys = [x["__key__"] for x in samples(tmp_path / "c")]
    assert len(keys) == len(set(keys))


# --- parallel, resume --------------------------------------------------------------------------------


def _mixed_table(folder: Path, n: int) -> Path:
    rows = []
    for i in range(n):
        (folder / f"{i}.jpg").write_bytes(smooth(200 + i, (48 + i % 5 * 8, 48)))
        rows.append({"file": f"{i}.jpg", "caption": caption(i) if i % 7 else "no"})
    (folder / "bad.jpg").write_bytes(b"<html>")
    (folder / "copy3.jpg").write_bytes((folder / "3.jpg").read_bytes())
    rows.insert(5, {"file": "bad.jpg", "caption": "an html file here"})
    rows.insert(9, {"file": "copy3.jpg", "caption": caption(3)})
    return write_jsonl(folder / "t.jsonl", rows)


def test_output_is_identical_for_any_number_of_workers(tmp_path: Path) -> None:
    p = _mixed_table(tmp_path, 30)
    a = shard_pairs([p], tmp_path / "w1", workers=1, chunk_size=4, max_count=8, progress=False)
    b = shard_pairs([p], tmp_path / "w2", workers=2, chunk_size=4, max_count=8, progress=False)
    assert (a.written, a.dropped) == (b.written, b.dropped)
    ma, mb = load_manifest(tmp_path / "w1"), load_manifest(tmp_path / "w2")
    assert [s["sha256"] for s in ma["shards"]] == [s["sha256"] for s in mb["shards"]]
    assert a.dropped == {"caption_too_short": 5, "image_is_html": 1, "duplicate": 1}


def test_resume_after_sigkill_matches_an_uninterrupted_run(server: Server, tmp_path: Path) -> None:
    rows = []
    for i in range(48):
        server.routes[f"/{i}.jpg"] = ("ok", smooth(300 + i))
        rows.append({"url": server.url(f"/{i}.jpg"), "caption": caption(i)})
    server.routes["/copy3.jpg"] = ("ok", smooth(303))
    rows.insert(20, {"url": server.url("/copy3.jpg"), "caption": caption(3)})  # a duplicate
    rows.insert(30, {"url": server.url("/nope.jpg"), "caption": "a missing picture"})
    table = write_jsonl(tmp_path / "urls.jsonl", rows)
    ref = shard_pairs([table], tmp_path / "ref", max_count=6, chunk_size=2, download=FAST, progress=False)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "data_tools", "shard-pairs", str(table), "--out", str(out), "--shard-size", "6",
           "--chunk-size", "2", "--download-threads", "1", "--timeout", "0.5", "--retries", "1"]
    server.delay = 0.04  # ~2 s of downloads: time to kill it mid-way
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (out / "000001.tar").exists():
        assert proc.poll() is None, "finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    server.delay = 0.0
    assert not (out / "manifest.json").exists()
    for tar in out.glob("*.tar"):  # whatever is visible under a final name is a complete shard
        with tarfile.open(tar) as tf:
            assert len(tf.getnames()) == 18
    assert any(out.glob("*.tar"))

    hits_before = sum(server.hits.values())
    res = subprocess.run([*cmd, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "resuming after" in res.stderr
    assert sum(server.hits.values()) - hits_before < len(rows)  # completed shards not downloaded again
    mk, mr = load_manifest(out), load_manifest(tmp_path / "ref")
    keys = [x["__key__"] for x in samples(out)]
    assert keys == [x["__key__"] for x in samples(tmp_path / "ref")] and len(set(keys)) == len(keys) == ref.written
    assert [s["sha256"] for s in mk["shards"]] == [s["sha256"] for s in mr["shards"]]
    assert mk["counts"] == mr["counts"] == {"seen": 50, "written": ref.written, "dropped": {"duplicate": 1,
                                                                                             "http_404": 1}}
    assert not list(out.glob(".*")) and verify(out, decode=True).ok
    res = subprocess.run([*cmd, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "already complete" in res.stderr


def test_resume_refuses_changed_options(tmp_path: Path) -> None:
    p = _mixed_table(tmp_path, 6)
    out = tmp_path / "ds"
    out.mkdir()
    (out / ".shard_state.json").write_text(json.dumps({"fingerprint": "other", "consumed": 3, "shards": []}))
    with pytest.raises(InputError, match="other inputs or options"):
        shard_pairs([p], out, resume=True, progress=False)
    shard_pairs([p], tmp_path / "done", progress=False)
    assert shard_pairs([p], tmp_path / "done", resume=True, progress=False).written == 5  # complete: no-op
    with pytest.raises(InputError, match="complete, but built from other inputs or options"):
        shard_pairs([p], tmp_path / "done", resume=True, dedup="none", progress=False)


# --- verify, stats -------------------------------------------------------------------------------------


def test_verify_catches_a_flipped_byte_and_bad_members(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    p = _mixed_table(tmp_path, 12)
    ds = tmp_path / "ds"
    shard_pairs([p], ds, max_count=4, progress=False)
    assert verify(ds, decode=True).ok
    assert cli(["verify", str(ds), "--decode"]) == 0
    victim = ds / "000001.tar"
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0x01
    victim.write_bytes(bytes(data))
    rep = verify(ds)
    assert not rep.ok and any(x.startswith("000001.tar: sha256") for x in rep.problems)
    capsys.readouterr()
    assert cli(["verify", str(ds)]) == 1
    assert "000001.tar: sha256" in capsys.readouterr().out

    # A shard whose bytes match the manifest but whose image does not decode: only --decode sees it.
    bad = tmp_path / "bad"
    w = ShardWriter(bad, max_count=10)
    w.write({"__key__": "a", "jpg": smooth(1)[:200], "txt": "a cut image", "json": "{}"})
    w.write({"__key__": "b", "jpg": smooth(2), "txt": "a fine image", "json": "{}", "pyd": b"x"})
    write_manifest(bad, {"kind": "pairs", "shards": shard_dicts(w.close()), "image_encoder": None})
    assert [x for x in verify(bad).problems] == ["000000.tar: b: unexpected member type .pyd"]
    problems = verify(bad, decode=True).problems
    assert any(x.startswith("000000.tar: a: jpg does not decode") for x in problems)


def test_stats_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    p = _mixed_table(tmp_path, 10)
    shard_pairs([p], tmp_path / "ds", progress=False)
    st = stats(tmp_path / "ds")
    text = st.render()
    assert st.scanned == 8 and "caption_too_short" in text and "image min side" in text
    assert cli(["stats", str(tmp_path / "ds"), "--plot", str(tmp_path / "s.png")]) == 0
    assert Image.open(tmp_path / "s.png").size[0] > 400
    assert "caption words: mean 5" in capsys.readouterr().out


# --- malformed inputs -------------------------------------------------------------------------------


def test_malformed_inputs_are_named_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "0.jpg").write_bytes(smooth(0))
    t = tmp_path / "t.csv"
    t.write_text("file,caption\n0.jpg,a fine caption here\n0.jpg,too,many,cells\n")
    with pytest.raises(InputError, match=r"t\.csv:3: wrong number of cells"):
        shard_pairs([t], tmp_path / "a", strict=True, progress=False)
    # Bytes that are not UTF-8 spoil their row only: counted (with its line), or --strict stops there.
    u = tmp_path / "u.csv"
    u.write_bytes(b"file,caption\n0.jpg,fine caption here\n0.jpg,caf\xe9 latin-1 bytes\n")
    s = shard_pairs([u], tmp_path / "b", progress=False)
    assert (s.seen, s.written, s.dropped) == (2, 1, {"text_unencodable": 1})
    assert load_manifest(tmp_path / "b")["drop_examples"] == {"text_unencodable": [f"{u}:3"]}
    with pytest.raises(InputError, match=r"u\.csv:3: .*not valid Unicode.*--strict"):
        shard_pairs([u], tmp_path / "b2", strict=True, progress=False)
    # A .gz cut half-way: the rows before the cut are kept, the rest is one counted drop.
    g = tmp_path / "g.jsonl.gz"
    g.write_bytes(gzip.compress(b'{"file": "0.jpg", "caption": "fine caption here"}\n' * 50)[:-20])
    s = shard_pairs([g], tmp_path / "c", progress=False)
    assert s.written == 1 and s.dropped == {"input_unreadable": 1}
    assert re.fullmatch(rf"{re.escape(str(g))}:\d+", load_manifest(tmp_path / "c")["drop_examples"]["input_unreadable"][0])
    with pytest.raises(InputError, match=r"g\.jsonl\.gz:\d+: cannot read on"):
        shard_pairs([g], tmp_path / "c2", strict=True, progress=False)
    c = tmp_path / "coco.json"
    c.write_text('{"images": [], "annotations": [\n  {"image_id": 1,}\n]}')
    with pytest.raises(InputError, match=r"no usable pairs .*input_unreadable.*coco\.json:2"):
        shard_pairs([c], tmp_path / "d", progress=False)
    assert cli(["shard-pairs", str(c), "--out", str(tmp_path / "e")]) == 2


# --- CLIP filter -------------------------------------------------------------------------------------


TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def test_clip_score_threshold_and_top_fraction(tmp_path: Path) -> None:
    from data_tools.clip_filter import ClipOptions, filter_clip

    cfg = tmp_path / "tiny-clip-test.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    rows = []
    for i in range(20):
        (tmp_path / f"{i}.jpg").write_bytes(smooth(400 + i, (32, 32)))
        rows.append({"file": f"{i}.jpg", "caption": caption(i)})
    p = write_jsonl(tmp_path / "t.jsonl", rows)
    s = shard_pairs([p], tmp_path / "scored", clip=ClipOptions(model=str(cfg)), max_count=6, progress=False)
    scores = [json.loads(x["json"])["clip_score"] for x in samples(tmp_path / "scored")]
    assert s.written == 20 and len(set(scores)) > 10 and all(-1 <= v <= 1 for v in scores)

    cut = sorted(scores)[8]
    s = shard_pairs([p], tmp_path / "thr", clip=ClipOptions(model=str(cfg), threshold=cut), progress=False)
    assert s.written == sum(v >= cut for v in scores) and s.dropped == {"clip_score_low": 20 - s.written}

    s = shard_pairs([p], tmp_path / "top", clip=ClipOptions(model=str(cfg), top_fraction=0.25), max_count=6,
                    progress=False)
    kept = [json.loads(x["json"])["clip_score"] for x in samples(tmp_path / "top")]
    assert s.written == len(kept) == 5 and sorted(kept) == sorted(scores)[-5:]
    m = load_manifest(tmp_path / "top")
    assert m["counts"]["dropped"] == {"clip_score_low": 15} and m["filters"]["clip"]["mode"] == "top_fraction"
    assert verify(tmp_path / "top").ok and not (tmp_path / "top" / ".clip_state.json").exists()

    # filter-clip on a dataset built without scores: scores it, then keeps the top third.
    shard_pairs([p], tmp_path / "plain", max_count=6, progress=False)
    fs = filter_clip(tmp_path / "plain", top_fraction=1 / 3, clip=ClipOptions(model=str(cfg)), progress=False)
    assert fs.written == math.ceil(20 / 3) and verify(tmp_path / "plain", decode=True).ok
    again = sorted(json.loads(x["json"])["clip_score"] for x in samples(tmp_path / "plain"))
    assert again == sorted(scores)[-7:]


# --- fetch-eval-data ---------------------------------------------------------------------------------


def _fake_senteval_archive(src: Path) -> bytes:
    """The STS suite packed like the published archive (SentEval/data/downstream/{STS,SICK}),
    plus another task and hostile members that must not be extracted."""
    buf = io.BytesIO()
    prefix = "SentEval/data/downstream"
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for path in sorted(src.rglob("*")):
            if path.is_file() and path.name != "counts.json":
                rel = path.relative_to(src)
                sub = "" if rel.parts[0] == "SICK" else "STS/"
                tf.add(path, arcname=f"{prefix}/{sub}{rel.as_posix()}")
        for name, data in ((f"{prefix}/MR/rt-polarity.pos", b"other task\n"), ("../../evil.txt", b"x"),
                           ("/abs/STSBenchmark/evil.txt", b"x"), (f"{prefix}/STS/STS12-en-test/../../x", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo(f"{prefix}/SICK/link.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    return buf.getvalue()


def test_fetch_eval_data_lays_out_what_the_evaluator_reads(server: Server, tmp_path: Path) -> None:
    from trainer.evaluate import TASKS, load_task

    src = SHARED_DATA / "sts"
    if not src.is_dir():
        pytest.skip("shared STS data not present")
    archive = tmp_path / "senteval.tar.gz"
    archive.write_bytes(_fake_senteval_archive(src))
    server.routes["/senteval.tar"] = ("file", archive)
    dest = tmp_path / "eval"
    assert cli(["fetch-eval-data", str(dest), "--url", server.url("/senteval.tar")]) == 0
    counts = json.loads((src / "counts.json").read_text())
    want = {"stsb_test": "STSB-test", "stsb_dev": "STSB-dev", "sickr_test": "SICKR-test", "sts12": "STS12",
            "sts13": "STS13", "sts14": "STS14", "sts15": "STS15", "sts16": "STS16"}
    for task in TASKS:
        n = sum(len(sub.gold) for sub in load_task(dest, task))
        assert n == counts[f"senteval/{want[task]}"]["total"], task
    for f in ("STS12-en-test/STS.input.MSRpar.txt", "SICK/SICK_test_annotated.txt", "STSBenchmark/sts-dev.csv"):
        assert (dest / f).read_bytes() == (src / f).read_bytes()
    assert not (dest / "MR").exists() and not (dest / "SICK" / "link.txt").exists()
    assert not list(tmp_path.rglob("evil.txt")) and not (tmp_path / "x").exists()
    assert json.loads((dest / "FETCHED.json").read_text())["source"].endswith("/senteval.tar")
    # A second call sees the data and does nothing; a 404 is one clear error.
    assert cli(["fetch-eval-data", str(dest), "--url", server.url("/senteval.tar")]) == 0
    assert server.hits["/senteval.tar"] == 1
    assert cli(["fetch-eval-data", str(tmp_path / "e2"), "--url", server.url("/missing.tar")]) == 2
