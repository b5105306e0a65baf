"""The downloader and the image stage at scale: img2dataset's resize modes worked out by hand,
no enlarging unless asked, one decode (reduced in the DCT domain when the output allows),
kept-alive connections counted at a local server, cached host lookups, requests in flight =
workers x threads, the warning when downloads starve the pipeline, a phash that equals
imagehash's bit for bit, a shard-pairs process that never imports torch, and shard tars that
are the standard library's bytes."""

from __future__ import annotations

import io
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from data_tools.__main__ import main as cli
from data_tools.commands import shard_pairs
from data_tools.dedup import image_phash
from data_tools.download import Downloader, DownloadOptions
from data_tools.filters import FilterOptions, ImageOptions, geometry, inspect_image
from data_tools.pipeline import PrefetchStats
from data_tools.shards import load_manifest, read_shard

from .conftest import ROOT, SHARED_DATA


def photo(size: tuple[int, int], seed: int = 0, fmt: str = "JPEG") -> bytes:
    """A smooth picture (noise upscaled) of ``size``."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def samples(folder: Path) -> list[dict[str, Any]]:
    m = load_manifest(folder)
    return [s for e in m["shards"] for s in read_shard(folder / e["name"])]


# --- resize modes -------------------------------------------------------------------------------


def opts(mode: str, size: int, upscale: bool = False) -> ImageOptions:
    return ImageOptions(resize_mode=mode, image_size=size, upscale=upscale)


@pytest.mark.parametrize(("mode", "size", "upscale", "src", "scaled", "final"), [
    # keep_ratio: shorter side -> size; 64x48 at 16: x 1/3 -> round(21.33) = 21.
    ("keep_ratio", 16, False, (64, 48), (21, 16), (21, 16)),
    ("keep_ratio", 16, False, (48, 64), (16, 21), (16, 21)),
    ("keep_ratio", 16, False, (12, 10), None, (12, 10)),  # smaller: kept, not enlarged
    ("keep_ratio", 20, True, (12, 10), (24, 20), (24, 20)),  # enlarged when asked: x 2
    ("keep_ratio", 48, False, (64, 48), None, (64, 48)),  # already there
    # keep_ratio_largest: longer side -> size; 64x48 at 16: x 1/4 -> 16x12.
    ("keep_ratio_largest", 16, False, (64, 48), (16, 12), (16, 12)),
    ("keep_ratio_largest", 16, False, (30, 100), (5, 16), (5, 16)),  # 30 x 0.16 = 4.8 -> 5
    # center_crop: keep_ratio, then the centred square ((21 - 16) // 2 = 2 from the left).
    ("center_crop", 16, False, (64, 48), (21, 16), (16, 16)),
    ("center_crop", 16, False, (12, 10), None, (12, 10)),  # too small to crop without enlarging
    # border: keep_ratio_largest, then white padding to the square.
    ("border", 16, False, (64, 48), (16, 12), (16, 16)),
    ("border", 16, False, (12, 10), None, (16, 16)),  # padded, not enlarged
    ("no", 0, False, (64, 48), None, (64, 48)),
])
def test_resize_geometry_by_hand(mode: str, size: int, upscale: bool, src: tuple[int, int],
                                 scaled: tuple[int, int] | None, final: tuple[int, int]) -> None:
    g = geometry(*src, opts(mode, size, upscale))
    assert g.scaled == scaled
    w, h = g.scaled or src
    if g.crop is not None:
        left, top, right, bottom = g.crop
        assert (left, top) == ((w - size) // 2, (h - size) // 2)
        w, h = right - left, bottom - top
    if g.canvas:
        assert g.offset == ((size - w) // 2, (size - h) // 2)
        w = h = g.canvas
    assert (w, h) == final


def test_resize_modes_end_to_end(tmp_path: Path) -> None:
    names = {"wide": (64, 48), "tall": (48, 64), "small": (12, 10), "png": (40, 40)}
    rows = []
    for i, (name, size) in enumerate(names.items()):
        fmt = "PNG" if name == "png" else "JPEG"
        (tmp_path / f"{name}.img").write_bytes(photo(size, i, fmt))
        rows.append({"file": f"{name}.img", "caption": f"a picture called {name}"})
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    want = {  # stored pixel size per mode, worked out as in the table above
        "keep_ratio": {"wide": (21, 16), "tall": (16, 21), "small": (12, 10), "png": (16, 16)},
        "keep_ratio_largest": {"wide": (16, 12), "tall": (12, 16), "small": (12, 10), "png": (16, 16)},
        "center_crop": {"wide": (16, 16), "tall": (16, 16), "small": (12, 10), "png": (16, 16)},
        "border": {"wide": (16, 16), "tall": (16, 16), "small": (16, 16), "png": (16, 16)},
        "no": {"wide": (64, 48), "tall": (48, 64), "small": (12, 10), "png": (40, 40)},
    }
    filters = FilterOptions(min_side=8)
    for mode, sizes in want.items():
        out = tmp_path / mode
        shard_pairs([tmp_path / "t.jsonl"], out, images=opts(mode, 0 if mode == "no" else 16), filters=filters,
                    near_dup_distance=None, progress=False)
        got = {}
        for s in samples(out):
            meta = json.loads(s["json"])
            ext = next(e for e in ("jpg", "png") if e in s)
            img = Image.open(io.BytesIO(s[ext]))
            name = meta["captions"][0].split()[-1]
            got[name] = img.size
            assert (meta["width"], meta["height"]) == img.size
            if name == "small" and mode != "border":  # not enlarged, not re-encoded: the original bytes
                assert s[ext] == (tmp_path / "small.img").read_bytes()
            if mode == "border" and name == "wide":  # 16x12 centred: rows 0-1 and 14-15 are white padding
                rgb = img.convert("RGB")
                assert min(rgb.getpixel((8, 0)) + rgb.getpixel((8, 15))) >= 240  # white, up to JPEG noise
                assert rgb.getpixel((8, 8)) != rgb.getpixel((8, 0))
            if mode == "no":
                assert "original_width" not in meta
        assert got == sizes, mode
    out = tmp_path / "up"
    shard_pairs([tmp_path / "t.jsonl"], out, images=opts("keep_ratio", 20, upscale=True), filters=filters,
                near_dup_distance=None, progress=False)
    small = next(s for s in samples(out) if json.loads(s["json"])["captions"][0].endswith("small"))
    meta = json.loads(small["json"])
    assert (meta["width"], meta["height"], meta["original_width"], meta["original_height"]) == (24, 20, 12, 10)


def test_large_jpeg_is_decoded_once_at_reduced_scale_and_still_checked() -> None:
    big = photo((800, 600), 3)
    f = FilterOptions()
    info, reason, img = inspect_image(big, f, opts("keep_ratio", 64))
    assert reason is None and info is not None and (info.width, info.height) == (800, 600)
    assert isinstance(img, np.ndarray) and img.shape == (75, 100, 4)  # 1/8 scale: 600/8 = 75 >= 64
    _, _, img = inspect_image(big, f, opts("keep_ratio", 150))
    assert isinstance(img, np.ndarray) and img.shape == (150, 200, 4)  # 1/4
    _, _, img = inspect_image(big, f, opts("keep_ratio", 400))
    assert isinstance(img, np.ndarray) and img.shape == (600, 800, 4)  # 1/2 would give 300 < 400: full size
    _, reason, _ = inspect_image(big[: len(big) // 2], f, opts("keep_ratio", 64))
    assert reason == "image_truncated"  # the reduced decode still reads every coefficient


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) exact area-average weights: output pixel i covers input [i, i+1) * n_in / n_out,
    edge pixels weighted by the fraction covered."""
    edges = np.linspace(0, n_in, n_out + 1)
    lo, hi = np.arange(n_in), np.arange(n_in) + 1
    w = np.clip(np.minimum(hi[None], edges[1:, None]) - np.maximum(lo[None], edges[:-1, None]), 0, None)
    return w / w.sum(1, keepdims=True)


def test_reduced_decode_and_resize_land_on_the_output_size_close_to_an_area_average() -> None:
    """The n/8 DCT-domain decode plus the residual resize must give exactly the geometry's
    size and pixels close to an exact area average of the full decode (built here in float
    from Pillow's full-size pixels), on real photos, in every residual regime: none left
    (an exact n/8), under 2x (bilinear) and over 2x (area: photos over 8x the output)."""
    import imagehash

    from data_tools.filters import encode_image, resize_image

    photo_file = sorted((SHARED_DATA / "pairs" / "coco_mini" / "images").glob("*.jpg"))[0]
    src = Image.open(photo_file).convert("RGB").resize((640, 480), Image.Resampling.LANCZOS)
    cases = (((640, 480), 60, (80, 60)), ((640, 480), 256, (341, 256)), ((640, 480), 300, (400, 300)),
             ((2560, 1920), 100, (133, 100)))
    for size, side, expect in cases:
        buf = io.BytesIO()
        src.resize(size, Image.Resampling.LANCZOS).save(buf, "JPEG", quality=95)
        data = buf.getvalue()
        info, _, img = inspect_image(data, FilterOptions(), opts("keep_ratio", side))
        assert isinstance(img, np.ndarray) and info is not None
        out, _ = resize_image(img, info, opts("keep_ratio", side))
        assert out.size == expect and out.mode == "RGBX"  # RGB in Pillow's 4-byte layout: no copy
        full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)
        ry, rx = _area_weights(full.shape[0], expect[1]), _area_weights(full.shape[1], expect[0])
        rows = (ry @ full.reshape(full.shape[0], -1)).reshape(expect[1], full.shape[1], 3)
        ref = np.einsum("owc,pw->opc", rows, rx, optimize=True)
        psnr = 10 * np.log10(255**2 / np.mean((np.asarray(out.convert("RGB"), dtype=np.float64) - ref) ** 2))
        assert psnr > 30.0, (size, side, psnr)  # nearest-neighbour sampling scores ~25, a 1-px shift ~26
        assert image_phash(out) == int(str(imagehash.phash(out.convert("RGB"))), 16)  # RGBX hashes as its RGB
        stored, stored_info = encode_image(out, info, geometry(*size, opts("keep_ratio", side)), opts("keep_ratio", side))
        back = np.asarray(Image.open(io.BytesIO(stored)), dtype=np.float64)
        assert back.shape == (*expect[::-1], 3) and (stored_info.width, stored_info.height) == expect
        want = np.asarray(out.convert("RGB"), dtype=np.float64)
        err, swapped = np.abs(back - want).mean(), np.abs(back - want[:, :, ::-1]).mean()
        assert err < 8.0 and swapped > 2 * err, (err, swapped)  # JPEG's own error; channels in order
    # --resize-filter area: an exact area average after the reduced decode (JPEG) or of Pillow's
    # pixels (PNG); closer to the hand-built average than the fast filter's bilinear step.
    buf = io.BytesIO()
    src.save(buf, "JPEG", quality=95)
    png = io.BytesIO()
    src.save(png, "PNG")
    for data, floor in ((buf.getvalue(), 38.5), (png.getvalue(), 50.0)):  # fast filter: 35.8 and 37.6 dB
        o = ImageOptions(resize_mode="keep_ratio", image_size=256, jpeg_quality=95, resize_filter="area")
        info, _, img = inspect_image(data, FilterOptions(), o)
        assert info is not None and img is not None
        out, _ = resize_image(img, info, o)
        full = np.asarray(src, dtype=np.float64)
        ry, rx = _area_weights(480, 256), _area_weights(640, 341)
        ref = np.einsum("owc,pw->opc", (ry @ full.reshape(480, -1)).reshape(256, 640, 3), rx, optimize=True)
        got = np.asarray(out.convert("RGB"), dtype=np.float64)
        assert out.size == (341, 256) and 10 * np.log10(255**2 / np.mean((got - ref) ** 2)) > floor
    with pytest.raises(ValueError, match="--resize-filter 'box': choose one of fast, area"):
        ImageOptions(resize_mode="keep_ratio", image_size=256, resize_filter="box")
    grey = Image.open(photo_file).convert("L")
    buf = io.BytesIO()
    grey.save(buf, "JPEG", quality=90)
    w, h = grey.size
    info, _, img = inspect_image(buf.getvalue(), FilterOptions(), opts("keep_ratio", min(w, h) // 8))
    assert isinstance(img, np.ndarray) and img.ndim == 2  # greyscale stays one channel
    out, _ = resize_image(img, info, opts("keep_ratio", min(w, h) // 8))  # type: ignore[arg-type]
    assert out.mode == "L" and min(out.size) == min(w, h) // 8


def test_resize_flags_and_their_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from data_tools import commands

    (tmp_path / "t.jsonl").write_text("")
    base = ["shard-pairs", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "o")]
    assert cli([*base, "--resize-mode", "keep_ratio"]) == 2
    assert capsys.readouterr().err.strip() == \
        "error: --resize-mode keep_ratio needs --image-size N (pixels, at least 1)"
    assert cli([*base, "--max-side", "64", "--resize-mode", "border", "--image-size", "64"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --max-side N is the older spelling of --resize-mode "
                                                      "keep_ratio_largest --image-size N")
    assert not (tmp_path / "o").exists()
    got: dict[str, Any] = {}
    monkeypatch.setattr(commands, "shard_pairs", lambda *a, **k: got.update(k) or commands.Summary(
        "pairs", tmp_path, 0, 0, {}, 0))
    assert cli([*base, "--max-side", "64"]) == 0
    assert (got["images"].resize_mode, got["images"].image_size, got["images"].upscale) == ("keep_ratio_largest", 64,
                                                                                            False)
    assert cli([*base, "--resize-mode", "center_crop", "--image-size", "224", "--upscale"]) == 0
    assert (got["images"].resize_mode, got["images"].image_size, got["images"].upscale) == ("center_crop", 224, True)


def test_phash_is_imagehash_bit_for_bit() -> None:
    import imagehash

    photos = sorted((SHARED_DATA / "pairs" / "coco_mini" / "images").glob("*.jpg"))[:12]
    rng = np.random.default_rng(0)
    images = [Image.open(p) for p in photos]
    images += [Image.fromarray(rng.integers(0, 256, (int(rng.integers(8, 70)), int(rng.integers(8, 70)), 3),
                                            dtype=np.uint8)) for _ in range(40)]
    images += [Image.new("RGB", (40, 30), (c, c, c)) for c in (0, 128, 255)] + [images[0].convert("L")]
    # the sizes shard-pairs hashes (photos scaled to 256 on the short side, or kept), odd ones, 32x32
    images += [images[i % 12].resize(size) for i, size in enumerate(
        [(341, 256), (256, 384), (384, 256), (256, 256), (1000, 257), (33, 700), (32, 32), (31, 33)])]
    images += [images[i % 12].resize((int(w), int(h))) for i, (w, h) in enumerate(rng.integers(5, 400, (40, 2)))]
    for img in images:
        assert image_phash(img) == int(str(imagehash.phash(img)), 16), img.size


def test_phash_falls_back_to_pillow_when_the_matrix_resize_disagrees(monkeypatch: pytest.MonkeyPatch) -> None:
    """The matrix form of Pillow's resize is checked per input size against Pillow itself;
    a disagreement (here: a planted off-by-one) must route that size through Pillow, so the
    hash stays imagehash's."""
    import imagehash

    from data_tools import dedup

    real = dedup._lanczos_passes
    monkeypatch.setattr(dedup, "_lanczos_passes", lambda px, side, rows_first: real(px, side, rows_first) + 1)
    dedup._pass_order.cache_clear()
    img = Image.open(sorted((SHARED_DATA / "pairs" / "coco_mini" / "images").glob("*.jpg"))[0]).resize((341, 256))
    try:
        assert image_phash(img) == int(str(imagehash.phash(img)), 16)
        assert dedup._pass_order(341, 256, 32) is None
    finally:
        dedup._pass_order.cache_clear()


# --- the connection layer ----------------------------------------------------------------------


class CountingServer:
    """Counts TCP connections and the most requests it served at once; ``delay`` per answer;
    ``close_every`` > 0 drops the connection after that many answers while still announcing
    keep-alive (as servers with a short idle timeout do)."""

    def __init__(self, body: bytes, delay: float = 0.0, close_every: int = 0) -> None:
        self.connections = self.active = self.peak = self.requests = 0
        self.lock = threading.Lock()
        state = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # no 40-ms wait between the header and the body

            def log_message(self, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                self.served = 0
                with state.lock:
                    state.connections += 1

            def do_GET(self) -> None:
                with state.lock:
                    state.active += 1
                    state.requests += 1
                    state.peak = max(state.peak, state.active)
                try:
                    time.sleep(delay)
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    self.served += 1
                    if close_every and self.served % close_every == 0:
                        self.close_connection = True  # silently: no "Connection: close" header
                finally:
                    with state.lock:
                        state.active -= 1

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 128

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def counting() -> Iterator[Any]:
    servers: list[CountingServer] = []

    def make(**kw: Any) -> CountingServer:
        servers.append(CountingServer(photo((64, 48), 9), **kw))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def test_connections_are_kept_alive_and_reused(counting: Any) -> None:
    srv = counting()
    dl = Downloader(DownloadOptions(timeout=2, retries=0, threads=4))
    results = [dl.fetch(f"{srv.base}/{i}.jpg") for i in range(30)]  # one thread, one after another
    assert all(r.reason is None for r in results)
    assert (srv.requests, srv.connections) == (30, 1)
    assert (dl.stats.requests, dl.stats.connections, dl.stats.reused) == (30, 1, 29)
    results = dl.fetch_many(f"{srv.base}/{i}.jpg" for i in range(40))  # 4 threads share the pool
    assert all(r.reason is None for r in results) and srv.connections <= 4
    dl.close()


def test_a_connection_the_server_dropped_is_replaced_without_a_failure(counting: Any) -> None:
    srv = counting(close_every=3)
    dl = Downloader(DownloadOptions(timeout=2, retries=0, threads=1))
    results = [dl.fetch(f"{srv.base}/{i}.jpg") for i in range(12)]
    assert [r.reason for r in results] == [None] * 12 and all(r.attempts == 1 for r in results)
    assert srv.requests == 12 and srv.connections == 4  # a new one after every third answer
    assert dl.stats.stale == 3  # found closed on reuse and replaced, not counted as a failure
    dl.close()


def test_host_lookups_are_cached_failures_too(counting: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    srv = counting()
    port = srv.base.rsplit(":", 1)[1]
    calls: list[str] = []
    real = socket.getaddrinfo

    def fake(host: str, *a: Any, **k: Any) -> Any:
        calls.append(host)
        if host == "dead.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real("127.0.0.1", *a, **k)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    dl = Downloader(DownloadOptions(timeout=2, retries=0, threads=8))
    results = dl.fetch_many([f"http://images.test:{port}/{i}.jpg" for i in range(16)] +
                            [f"http://dead.invalid/{i}.jpg" for i in range(5)])
    assert [r.reason for r in results] == [None] * 16 + ["dns_error"] * 5
    assert sorted(calls) == ["dead.invalid", "images.test"]  # once per host, however many threads
    # Every other new connection and every later fetch of the dead host used the cache.
    assert (dl.stats.dns_lookups, dl.stats.dns_cached) == (2, dl.stats.connections - 1 + 4)
    dl.close()


def _url_table(tmp_path: Path, base: str, n: int) -> Path:
    rows = [{"url": f"{base}/{i}.jpg", "caption": f"a picture with the number {i}"} for i in range(n)]
    path = tmp_path / "urls.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_requests_in_flight_are_workers_times_threads(counting: Any, tmp_path: Path) -> None:
    srv = counting(delay=0.25)
    table = _url_table(tmp_path, srv.base, 24)
    s = shard_pairs([table], tmp_path / "ds", workers=2, download=DownloadOptions(timeout=5, threads=3),
                    dedup="none", near_dup_distance=None, chunk_size=4, progress=False)
    assert s.written == 24
    assert srv.peak == 6  # 3 threads per worker process x 2 workers, as img2dataset counts them


def test_starving_settings_are_warned_about(counting: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    srv = counting(delay=0.15)
    table = _url_table(tmp_path, srv.base, 12)
    with caplog.at_level(logging.INFO, logger="webmcse.data"):
        s = shard_pairs([table], tmp_path / "ds", download=DownloadOptions(timeout=5, threads=1),
                        dedup="none", near_dup_distance=None, progress=False)
    assert s.written == 12
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and warned[0].startswith("downloads starved the pipeline: it waited")
    assert "raise --download-threads" in warned[0]
    info = [r.getMessage() for r in caplog.records if r.getMessage().startswith("downloads:")]
    assert info == ["downloads: 12 requests in 1 connections (11 on kept-alive ones), 1 host lookups "
                    "(0 cached), 1 requests in flight"]
    # The rule itself: a quarter of the run and at least a second spent waiting.
    st = PrefetchStats(in_flight=64, window=1024, started=0.0)
    st.waited = 0.9
    assert st.starved(now=2.0) is None  # under a second
    st.waited = 2.0
    assert st.starved(now=10.0) is None and st.starved(now=7.9) is not None


# --- imports ------------------------------------------------------------------------------------


def test_shard_pairs_never_imports_torch_or_the_trainer(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(photo((64, 48), 1))
    (tmp_path / "t.jsonl").write_text(json.dumps({"file": "a.jpg", "caption": "a picture of something"}) + "\n")
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "data_tools", "shard-pairs",
                           str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "ds"), "--workers", "2",
                           "--resize-mode", "keep_ratio", "--image-size", "32", "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    modules = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "data_tools.commands" in modules and "PIL.Image" in modules  # the check sees real imports
    assert not {m for m in modules if m.split(".")[0] in ("torch", "trainer", "webdataset", "scipy")}
    assert json.loads(samples(tmp_path / "ds")[0]["json"])["width"] == 43  # 64 x 32/48


def test_shard_tars_are_the_standard_librarys_bytes_and_read_back(tmp_path: Path) -> None:
    import tarfile

    from data_tools import shards

    samples = [{"__key__": f"k{i:05d}" + ("é" if i == 3 else "") + ("x" * 120 if i == 4 else ""),
                "jpg": bytes([i]) * (1000 + 37 * i), "txt": f"caption {i}".encode(), "json": b"{}"}
               for i in range(20)]
    want = io.BytesIO()
    with tarfile.open(fileobj=want, mode="w|") as tf:  # what the standard library writes for these members
        for s in samples:
            for ext in ("jpg", "json", "txt"):
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(s[ext]), 0, 0o444, "bigdata", "bigdata"
                tf.addfile(info, io.BytesIO(s[ext]))
    got = io.BytesIO()
    writer = shards._TarWriter(got, mtime=0.0)
    for s in samples:
        writer.write(s)
    writer.close()
    assert got.getvalue() == want.getvalue()
    w = shards.ShardWriter(tmp_path, max_count=8)
    for s in samples:
        w.write(dict(s))
    names = [i.name for i in w.close()]
    back = [x for n in names for x in read_shard(tmp_path / n)]
    assert [x["__key__"] for x in back] == [s["__key__"] for s in samples]
    assert all(x["jpg"] == s["jpg"] and x["txt"] == s["txt"] for x, s in zip(back, samples, strict=True))
