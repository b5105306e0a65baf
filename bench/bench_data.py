"""Data pipeline throughput: sharding local photos, the downloader against img2dataset, embedding.

(a) ``shard-pairs`` on local real photos (the 239 COCO photos of shared/data/pairs/coco_mini,
    listed repeatedly up to --images rows by absolute path, one record per row, dedup off so
    repeats are kept): samples/s with 1 worker and with every core, with and without a
    ``keep_ratio`` 256 resize.
(b) ``webmcse-data shard-pairs`` vs ``img2dataset`` on the same URL list, each as its own
    command in its own process tree, at matched settings: the same requests in flight
    (``--workers W --download-threads T`` = ``--processes_count W --thread_count T``), the same
    resize (``keep_ratio`` to --image-size, downscale only), JPEG quality, timeout and retries.
    The URLs point at a loopback server in a separate process that injects faults by row:
    404s, stalls longer than the timeout, HTML served as image/jpeg, bodies cut short of their
    Content-Length, and redirects. Every URL serves a distinct photo (collages of two COCO
    photos, perceptually far apart), so deduplication keeps every row and both tools save
    the same rows. Runs are interleaved (ours with dedup+hashing, ours without, img2dataset
    with sha256, img2dataset without) and repeated; the table gives medians. CPU-seconds are
    user+sys of the whole process tree (``wait4`` on the command: every worker it waited for).
(c) ``embed`` (read shard, decode, preprocess, forward, write) vs the encoder's forward pass
    alone on random tensors, same batch size and device.
(d) The image work of (b) stage by stage, CPU-ms per photo: our header checks + decode, resize,
    phash, encode, sha256, and img2dataset's Resizer (decode + resize + encode) on the same photos.

    flock /tmp/webmcse-heavy.lock python bench/bench_data.py [--urls 2000,20000] [--repeats 3]
        [--workers 2] [--threads 32] [--image-size 256] [--skip a,c] [--no-write]

img2dataset pins webdataset<0.3, so it lives in its own virtual environment:
``python -m venv /tmp/i2d-venv && /tmp/i2d-venv/bin/pip install 'img2dataset==1.47.*'``
(--i2d names its command; without it, (b) reports our tool only).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import math
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import write_section  # noqa: E402

PHOTOS = ROOT.parent / "shared" / "data" / "pairs" / "coco_mini"
I2D_DEFAULT = "/tmp/i2d-venv/bin/img2dataset"
FAULTS = {0: "404", 10: "404", 3: "stall", 7: "html", 13: "cut", 5: "redirect", 15: "redirect"}
"""Fault of row i by i % 20; the other rows (and redirect targets) serve their photo."""


def _photos() -> list[tuple[Path, str]]:
    rows = [json.loads(line) for line in (PHOTOS / "captions.jsonl").read_text().splitlines()]
    return [(PHOTOS / r["file"], r["captions"][0]) for r in rows]


# --- (a) local sharding ------------------------------------------------------------------------


def bench_shard(tmp: Path, n_images: int, workers: int, size: int) -> list[dict[str, Any]]:
    from data_tools.commands import shard_pairs
    from data_tools.filters import ImageOptions

    photos = _photos()
    table = tmp / "local.jsonl"
    with open(table, "w") as fh:
        for i in range(n_images):
            path, cap = photos[i % len(photos)]
            fh.write(json.dumps({"key": f"r{i:06d}", "file": str(path), "caption": cap}) + "\n")
    mb = sum(photos[i % len(photos)][0].stat().st_size for i in range(n_images)) / 2**20
    results = []
    for w, mode in ((1, "no"), (workers, "no"), (1, "keep_ratio"), (workers, "keep_ratio")):
        out = tmp / f"local_w{w}_{mode}"
        t0 = time.perf_counter()
        s = shard_pairs([table], out, dedup="none", near_dup_distance=None, workers=w, chunk_size=32,
                        images=ImageOptions(resize_mode=mode, image_size=size), max_count=500,
                        allow_outside_paths=True, group_by_image=False, progress=False)
        dt = time.perf_counter() - t0
        results.append({"workers": w, "mode": mode, "size": size, "samples": s.written, "seconds": dt,
                        "rate": s.written / dt, "mb_s": mb / dt, "load1": os.getloadavg()[0]})
        shutil.rmtree(out)
    return results


# --- (b) the URL list, its server, the two tools ------------------------------------------------


def photo_set(n: int, cache: Path) -> Path:
    """``n`` distinct JPEGs ``NNNNNN.jpg`` (photo a's left part + photo b's right part, at a's
    size, a seeded split, every other one mirrored), built once and kept in ``cache``.
    Each is checked against every earlier one with the near-duplicate index at the
    default distance (with a margin), so exact and near dedup keep every row."""
    from PIL import Image

    from data_tools.dedup import NEAR_DUP_DEFAULT, NearDupIndex, image_phash

    folder = cache / "collages-v1"
    if (folder / "done").is_file() and int((folder / "done").read_text()) >= n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    base = [Image.open(p).convert("RGB") for p, _ in _photos()]
    index = NearDupIndex(2 * NEAR_DUP_DEFAULT)  # margin: far apart for any phash variant
    m = len(base)
    made = attempt = 0
    t0 = time.monotonic()
    while made < n:
        a, b = attempt % m, (attempt * 7 + attempt // m + 1) % m
        attempt += 1
        if a == b:
            continue
        left = base[a]
        right = base[b].resize(left.size, Image.Resampling.BILINEAR)
        split = left.width * (35 + (attempt * 13) % 31) // 100
        img = left.copy()
        img.paste(right.crop((split, 0, left.width, left.height)), (split, 0))
        if attempt % 2:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        ph = image_phash(img)
        if index.find(ph) is not None:
            continue
        index.add(ph)
        img.save(folder / f"{made:06d}.jpg", quality=90)
        made += 1
        if made % 2000 == 0:
            print(f"  photo set: {made}/{n} ({time.monotonic() - t0:.0f} s)", flush=True)
    (folder / "done").write_text(str(n))
    return folder


def row_kind(i: int) -> str:
    return FAULTS.get(i % 20, "ok")


def serve(folder: str, n: int, latency: float, stall: float, port_q: Any) -> None:
    """The faulty loopback server (run in its own process: its CPU is not either tool's)."""

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024  # the listen() backlog: the default 5 drops SYNs under load

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # clients that hang up (timeouts, cut bodies) are part of the test

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive for clients that ask for it
        disable_nagle_algorithm = True  # header and body leave at once, as from a real server

        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, code: int, body: bytes, ctype: str = "image/jpeg", length: int | None = None,
                  extra: dict[str, str] | None = None, close: bool = False) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            time.sleep(latency)
            try:
                path = self.path
                target = path.startswith("/to/")
                i = int(path.rsplit("/", 1)[-1].split(".")[0])
                kind = "ok" if target else row_kind(i) if 0 <= i < n else "404"
                if kind == "404":
                    self._send(404, b"", "text/plain")
                elif kind == "redirect":
                    self._send(302, b"", "text/plain", extra={"Location": f"/to/{i}.jpg"})
                elif kind == "html":
                    self._send(200, b"<!DOCTYPE html><html><body>Image not available</body></html>")
                else:
                    if kind == "stall":
                        time.sleep(stall)
                    body = (Path(folder) / f"{i:06d}.jpg").read_bytes()
                    if kind == "cut":
                        self._send(200, body[: len(body) // 2], length=len(body), close=True)
                    else:
                        self._send(200, body)
            except (BrokenPipeError, ConnectionResetError, ValueError):
                self.close_connection = True

    httpd = Server(("127.0.0.1", 0), Handler)
    port_q.put(httpd.server_address[1])
    httpd.serve_forever()


class ServerProcess:
    def __init__(self, folder: Path, n: int, latency: float, stall: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        q = ctx.Queue()
        self.proc = ctx.Process(target=serve, args=(str(folder), n, latency, stall, q), daemon=True)
        self.proc.start()
        self.base = f"http://127.0.0.1:{q.get(timeout=60)}"

    def cpu(self) -> float:
        return _proc_cpu(self.proc.pid)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.join(10)


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy() -> float:
    """CPU-seconds the whole machine has been busy (all cores, /proc/stat)."""
    vals = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = vals[3] + vals[4]
    return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def timed(cmd: list[str], env: dict[str, str], log: Path) -> dict[str, float]:
    """Run ``cmd``; wall seconds and CPU-seconds of its whole (waited-for) process tree."""
    with open(log, "w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}:\n{log.read_text()[-2000:]}")
    return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "maxrss_mb": ru.ru_maxrss / 1024}


def run_ours(table: Path, out: Path, a: argparse.Namespace, dedup: bool, log: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "data_tools", "shard-pairs", str(table), "--out", str(out),
           "--workers", str(a.workers), "--download-threads", str(a.threads),
           "--resize-mode", "keep_ratio", "--image-size", str(a.image_size), "--jpeg-quality", str(a.quality),
           "--timeout", str(a.timeout), "--retries", "0", "--shard-size", "10000", "--no-progress"]
    if not dedup:
        cmd += ["--dedup", "none", "--near-dup-distance", "-1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = timed(cmd, env, log)
    m = json.loads((out / "manifest.json").read_text())
    r["saved"] = m["n_samples"]
    r["dropped"] = m["counts"]["dropped"]
    return r


def run_i2d(i2d: str, table: Path, out: Path, a: argparse.Namespace, n: int, hashing: bool,
            log: Path) -> dict[str, Any]:
    cmd = [i2d, "--url_list", str(table), "--input_format", "parquet", "--url_col", "url",
           "--caption_col", "caption", "--output_folder", str(out), "--output_format", "webdataset",
           "--processes_count", str(a.workers), "--thread_count", str(a.threads),
           "--resize_mode", "keep_ratio", "--image_size", str(a.image_size), "--resize_only_if_bigger", "True",
           "--encode_quality", str(a.quality), "--timeout", str(math.ceil(a.timeout)), "--retries", "0",
           "--number_sample_per_shard", str(max(1, math.ceil(n / (4 * a.workers)))),
           "--enable_wandb", "False", "--disallowed_header_directives", "[]",
           "--compute_hash", "sha256" if hashing else "None"]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    env.pop("PYTHONPATH", None)
    r = timed(cmd, env, log)
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    r["saved"] = sum(s.get("successes", 0) for s in stats)
    status: dict[str, int] = {}
    for s in stats:
        for k, v in (s.get("status_dict") or {}).items():
            k = k.split("(", 1)[0].strip()
            status[k] = status.get(k, 0) + v
    status.pop("success", None)
    r["dropped"] = status
    return r


def _sizes_by_url(folder: Path, ours: bool) -> dict[str, tuple[int, int]]:
    """url -> (width, height) of the stored image, read from the decoded pixels."""
    from PIL import Image

    out: dict[str, tuple[int, int]] = {}
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as tf:
            members: dict[str, dict[str, bytes]] = {}
            for m in tf:
                if not m.isfile():
                    continue
                key, _, ext = m.name.partition(".")
                f = tf.extractfile(m)
                assert f is not None
                members.setdefault(key, {})[ext] = f.read()
        for parts in members.values():
            img = parts.get("jpg")
            if img is None:
                continue
            meta = json.loads(parts["json"])
            url = meta["url"]
            if "/to/" in url:
                url = url.replace("/to/", "/img/")
            out[url] = Image.open(io.BytesIO(img)).size
    return out


def bench_download(tmp: Path, a: argparse.Namespace, n: int, i2d: str | None) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = photo_set(n, Path(a.cache))
    server = ServerProcess(folder, n, a.latency_ms / 1000, a.timeout + 1.0)
    captions = [c for _, c in _photos()]
    rows = [{"url": f"{server.base}/img/{i}.jpg", "caption": captions[i % len(captions)] + f" (view {i})"}
            for i in range(n)]
    table = tmp / f"urls{n}.parquet"
    pq.write_table(pa.Table.from_pylist(rows), table)
    kinds = [row_kind(i) for i in range(n)]
    mean_kb = statistics.mean((folder / f"{i:06d}.jpg").stat().st_size for i in range(n)) / 1000
    res: dict[str, Any] = {"urls": n, "mean_kb": mean_kb, "faults": {k: kinds.count(k) for k in sorted(set(kinds))},
                           "can_succeed": sum(k in ("ok", "redirect") for k in kinds), "runs": {}}
    arms = [("ours", True), ("ours", False)] + ([("i2d", True), ("i2d", False)] if i2d else [])
    try:
        for rep in range(a.repeats):
            order = arms[rep % len(arms):] + arms[: rep % len(arms)]  # rotate who goes first
            for tool, on in order:
                name = f"{tool}-{'on' if on else 'off'}"
                out = tmp / f"{name}-{n}"
                shutil.rmtree(out, ignore_errors=True)
                load0, busy0, srv0 = os.getloadavg()[0], _machine_busy(), server.cpu()
                if tool == "ours":
                    r = run_ours(table, out, a, on, tmp / f"{name}.log")
                else:
                    assert i2d is not None
                    r = run_i2d(i2d, table, out, a, n, on, tmp / f"{name}.log")
                r["server_cpu"] = server.cpu() - srv0
                r["machine_busy"] = _machine_busy() - busy0
                r["load1"] = load0
                r["others_cpu"] = max(0.0, r["machine_busy"] - r["cpu"] - r["server_cpu"])
                print(f"  {n} URLs, run {rep + 1}, {name}: {r['wall']:.1f} s, {r['cpu']:.1f} CPU-s, "
                      f"{r['saved']} saved, others {r['others_cpu']:.1f} CPU-s", flush=True)
                if rep == a.repeats - 1 and on:
                    res.setdefault("sizes", {})[tool] = _sizes_by_url(out, tool == "ours")
                res["runs"].setdefault(name, []).append(r)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        server.close()
    sizes = res.pop("sizes", {})
    if "ours" in sizes and "i2d" in sizes:
        both = set(sizes["ours"]) & set(sizes["i2d"])
        res["saved_by"] = (len(sizes["ours"]), len(sizes["i2d"]))
        res["size_mismatch"] = sum(sizes["ours"][u] != sizes["i2d"][u] for u in both)
        res["compared"] = len(both)
        res["size_example"] = sizes["ours"][min(both)] if both else None
    return res


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


# --- (d) image work per sample, stage by stage ----------------------------------------------------

_I2D_STAGES = """
import glob, hashlib, io, json, os, sys, time
import cv2, numpy as np
from img2dataset.resizer import Resizer
files, size, quality, out_dir = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
datas = [open(f, "rb").read() for f in files]
cv2.setNumThreads(1)
r = Resizer(size, "keep_ratio", True, encode_quality=quality)
def t(fn):
    best = []
    for _ in range(3):
        t0 = time.process_time()
        for d in datas:
            fn(d)
        best.append((time.process_time() - t0) / len(datas) * 1000)
    return sorted(best)[1]
out = {"decode (cv2.imdecode)": t(lambda d: cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_UNCHANGED)),
       "decode + resize + encode (its Resizer)": t(lambda d: r(io.BytesIO(d))),
       "sha256 of the download": t(lambda d: hashlib.sha256(d).hexdigest())}
for i, d in enumerate(datas):
    open(os.path.join(out_dir, f"{i:06d}.jpg"), "wb").write(r(io.BytesIO(d))[0])
print(json.dumps(out))
"""


def _area_psnr(stored: bytes, original: bytes) -> float:
    """PSNR (dB) of a stored JPEG against the exact area average of the original's full
    decode at the stored size (fractional edge pixels weighted by coverage): how close a
    tool's resize + encode comes to the ideal box downscale."""
    import numpy as np
    from PIL import Image

    def weights(n_in: int, n_out: int) -> Any:
        edges = np.linspace(0, n_in, n_out + 1)
        lo, hi = np.arange(n_in), np.arange(n_in) + 1
        w = np.clip(np.minimum(hi[None], edges[1:, None]) - np.maximum(lo[None], edges[:-1, None]), 0, None)
        return w / w.sum(1, keepdims=True)

    out = np.asarray(Image.open(io.BytesIO(stored)).convert("RGB"), dtype=np.float64)
    full = np.asarray(Image.open(io.BytesIO(original)).convert("RGB"), dtype=np.float64)
    (oh, ow), (h, w) = out.shape[:2], full.shape[:2]
    rows = (weights(h, oh) @ full.reshape(h, -1)).reshape(oh, w, 3)
    ref = np.einsum("owc,pw->opc", rows, weights(w, ow), optimize=True)
    return float(10 * np.log10(255**2 / np.mean((out - ref) ** 2)))


def bench_stages(a: argparse.Namespace, n: int, i2d: str | None) -> dict[str, Any]:
    """CPU-ms per photo of each image stage, ours in this process (one BLAS and one OpenCV
    thread, as in a shard-pairs worker) and img2dataset's Resizer in its venv, on the same
    photos of the benchmark's set (median of 3 passes); and the output quality of both."""
    import hashlib

    from threadpoolctl import threadpool_limits

    from data_tools.dedup import image_phash
    from data_tools.filters import FilterOptions, ImageOptions, encode_image, inspect_image, resize_image

    threadpool_limits(1)
    folder = photo_set(n, Path(a.cache))
    files = [str(folder / f"{i:06d}.jpg") for i in range(n)]
    datas = [Path(f).read_bytes() for f in files]
    opts = ImageOptions(resize_mode="keep_ratio", image_size=a.image_size, jpeg_quality=a.quality)
    filt = FilterOptions()

    def t(fn: Any, items: list[Any]) -> float:
        runs = []
        for _ in range(3):
            t0 = time.process_time()
            for x in items:
                fn(x)
            runs.append((time.process_time() - t0) / len(items) * 1000)
        return sorted(runs)[1]

    decoded = [inspect_image(d, filt, opts) for d in datas]
    scaled = [resize_image(img, info, opts) for info, _, img in decoded]  # type: ignore[arg-type]
    ours = {
        "header + decode (libjpeg-turbo at 1, 1/2, 1/4 or 1/8 scale)": t(lambda d: inspect_image(d, filt, opts), datas),
        "resize (OpenCV bilinear / area, into a Pillow image)": t(lambda x: resize_image(x[2], x[0], opts), decoded),
        "phash (of the resized image)": t(lambda x: image_phash(x[0]), scaled),
        "encode (Pillow JPEG)": t(lambda x: encode_image(x[0], decoded[0][0], x[1], opts), scaled),
        "sha256 of the download": t(lambda d: hashlib.sha256(d).hexdigest(), datas),
    }
    stored = [encode_image(img, info, geo, opts) for (info, _, _), (img, geo) in zip(decoded, scaled, strict=True)]
    quality = {"ours": statistics.median(_area_psnr(s[0], d) for s, d in zip(stored, datas, strict=True) if s)}
    area = dataclasses.replace(opts, resize_filter="area")
    area_dec = [inspect_image(d, filt, area) for d in datas]
    area_resize = t(lambda x: resize_image(x[2], x[0], area), area_dec)
    area_scaled = [resize_image(img, info, area) for info, _, img in area_dec]  # type: ignore[arg-type]
    area_out = [encode_image(img, info, geo, area)
                for (info, _, _), (img, geo) in zip(area_dec, area_scaled, strict=True)]
    quality["ours_area"] = statistics.median(_area_psnr(s[0], d) for s, d in zip(area_out, datas, strict=True) if s)
    res: dict[str, Any] = {"photos": n, "ours": ours, "i2d": None, "psnr": quality, "area_resize": area_resize}
    if i2d:
        pyexe = str(Path(i2d).with_name("python"))
        with tempfile.TemporaryDirectory() as out_dir:
            proc = subprocess.run([pyexe, "-c", _I2D_STAGES, json.dumps(files), str(a.image_size), str(a.quality),
                                   out_dir], capture_output=True, text=True,
                                  env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": ""})
            if proc.returncode == 0:
                res["i2d"] = json.loads(proc.stdout.strip().splitlines()[-1])
                quality["img2dataset"] = statistics.median(
                    _area_psnr((Path(out_dir) / f"{i:06d}.jpg").read_bytes(), d) for i, d in enumerate(datas))
    return res


def render_stages(d: dict[str, Any], a: argparse.Namespace) -> str:
    ours, i2d = d["ours"], d["i2d"]
    p = [f"CPU-ms per photo, one process, the first {d['photos']} photos of the URL benchmark's set, resize "
         f"`keep_ratio` {a.image_size}, JPEG quality {a.quality}; median of 3 passes.\n",
         "| stage | webmcse-data | img2dataset |", "|---|---|---|"]
    for k, v in ours.items():
        p.append(f"| {k} | {v:.2f} | |")
    p.append(f"| **image work in all** | **{sum(ours.values()):.2f}** | |")
    if i2d:
        for k, v in i2d.items():
            p.append(f"| {k} | | {v:.2f} |")
        total = i2d["decode + resize + encode (its Resizer)"] + i2d["sha256 of the download"]
        p.append(f"| **image work in all** | | **{total:.2f}** |")
        p.append(f"\nOur image work costs {sum(ours.values()) / total:.2f}x img2dataset's per photo (the phash "
                 f"included, which img2dataset does not compute). The rest of each tool's CPU per saved sample "
                 f"(previous section) is the HTTP client, moving bytes between processes, writing, and start-up.")
    q = d.get("psnr") or {}
    if q:
        both = f", img2dataset's {q['img2dataset']:.1f} dB" if "img2dataset" in q else ""
        fast = ours["resize (OpenCV bilinear / area, into a Pillow image)"]
        p.append(f"\nOutput quality, same photos and settings: median PSNR of the stored JPEG against the exact area "
                 f"average of the full-size photo (fractional edge pixels weighted by coverage): ours "
                 f"{q['ours']:.1f} dB{both}; ours with `--resize-filter area` {q['ours_area']:.1f} dB, its resize "
                 f"costing {d['area_resize']:.2f} CPU-ms instead of {fast:.2f} (image work "
                 f"{sum(ours.values()) - fast + d['area_resize']:.2f}). img2dataset decodes at full size and "
                 f"area-averages (OpenCV "
                 f"INTER_AREA); we decode at the largest 1/2^k scale that still covers the output and finish "
                 f"with a bilinear step under 2x, which is cheaper and stays close to that average (a 1-pixel "
                 f"shift or nearest-neighbour sampling scores ~25 dB). Both then encode at JPEG quality "
                 f"{a.quality}, whose own error is part of both figures.")
    return "\n".join(p)


# --- (c) embedding ----------------------------------------------------------------------------


def bench_embed(tmp: Path, n_images: int, device: str, batch: int) -> dict[str, Any]:
    import torch

    from data_tools.commands import embed, shard_pairs
    from data_tools.encoders import load_image_encoder

    photos = _photos()
    table = tmp / "embed.jsonl"
    with open(table, "w") as fh:
        for i in range(n_images):
            path, cap = photos[i % len(photos)]
            fh.write(json.dumps({"key": f"e{i:06d}", "file": str(path), "caption": cap}) + "\n")
    ds = tmp / "embed_ds"
    shard_pairs([table], ds, dedup="none", near_dup_distance=None, max_count=128, allow_outside_paths=True,
                group_by_image=False, progress=False)
    enc = load_image_encoder("efficientnet_lite0")
    enc.model.to(device)
    x = torch.randn(batch, 3, 224, 224, device=device)
    with torch.inference_mode():
        enc.model(x)  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        reps = max(4, n_images // batch)
        t0 = time.perf_counter()
        for _ in range(reps):
            enc.model(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()  # note: waits for the queued kernels
        fwd = reps * batch / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    s = embed(ds, "efficientnet_lite0", batch_size=batch, device=device, progress=False)
    dt = time.perf_counter() - t0
    return {"images": s.written, "embed_rate": s.written / dt, "forward_rate": fwd, "batch": batch,
            "device": device, "threads": torch.get_num_threads()}


# --- report ------------------------------------------------------------------------------------


def render_local(a_res: list[dict[str, Any]], c: dict[str, Any] | None) -> str:
    parts = []
    if a_res:
        parts.append(f"**(a) shard-pairs, local COCO photos** ({a_res[0]['samples']} rows of 640-px JPEGs read "
                     f"from disk: header checks, one decode, sha256, tar write; dedup off (so no phash) so "
                     f"repeats count)\n")
        parts.append("| workers | resize | samples/s | input MB/s |\n|---|---|---|---|")
        for r in a_res:
            mode = "no (original bytes)" if r["mode"] == "no" else f"{r['mode']} {r['size']}"
            parts.append(f"| {r['workers']} | {mode} | {r['rate']:.0f} | {r['mb_s']:.1f} |")
        lo, hi = min(r["load1"] for r in a_res), max(r["load1"] for r in a_res)
        busy = ("other work shared this 2-core machine, so these are lower bounds" if hi > 2.5
                else "nothing else ran on the machine")
        parts.append(f"\n1-min load average {lo:.1f}-{hi:.1f} after the runs: {busy}. The downloader's "
                     f"comparison with img2dataset is in the next section.")
    if c:
        parts.append(f"\n**(c) embed vs forward only** (EfficientNet-Lite0, {c['images']} images, batch {c['batch']}, "
                     f"{c['device']}, {c['threads']} torch threads)\n")
        parts.append("| stage | images/s |\n|---|---|")
        parts.append(f"| encoder forward only (random tensors) | {c['forward_rate']:.1f} |")
        parts.append(f"| `embed` (read, decode, preprocess, forward, write) | {c['embed_rate']:.1f} |")
        parts.append(f"\n`embed` runs at {100 * c['embed_rate'] / c['forward_rate']:.0f}% of the forward pass.")
    return "\n".join(parts)


def goal_lines(results: list[dict[str, Any]]) -> str:
    """The goals (dedup and hashing on, against img2dataset with sha256): samples/s at least
    1.2x on short lists and 1.5x from 10,000 URLs (start-up no longer dominates), CPU per
    saved sample at most 2/3; each checked on the medians above."""
    parts = []
    for res in results:
        ours, peer = res["runs"].get("ours-on"), res["runs"].get("i2d-on")
        if not ours or not peer:
            continue
        rate = (statistics.median(r["saved"] / r["wall"] for r in ours)
                / statistics.median(r["saved"] / r["wall"] for r in peer))
        cpu = (statistics.median(r["cpu"] / max(1, r["saved"]) for r in ours)
               / statistics.median(r["cpu"] / max(1, r["saved"]) for r in peer))
        want = 1.5 if res["urls"] >= 10_000 else 1.2
        met = rate >= want and cpu <= 2 / 3
        parts.append(f"{res['urls']:,} URLs: {rate:.2f}x the samples/s (goal >= {want}x) at {cpu:.2f}x the CPU "
                     f"per saved sample (goal <= 0.67x): **{'met' if met else 'not met'}**")
    return ("Goals, with dedup and hashing on: " + "; ".join(parts) + ".") if parts else ""


def render_download(results: list[dict[str, Any]], a: argparse.Namespace, i2d_version: str | None) -> str:
    inflight = a.workers * a.threads
    p = [f"Same URL list, same machine, runs interleaved; each figure is the median of {a.repeats} runs. "
         f"Settings shared by both tools: {a.workers} processes x {a.threads} download threads each = "
         f"**{inflight} requests in flight**, resize `keep_ratio` to {a.image_size} px on the shorter side "
         f"(downscale only), JPEG quality {a.quality}, timeout {a.timeout:g} s, no retries, webdataset tars. "
         f"The loopback server runs in its own process ({a.latency_ms} ms per answer; by row: 10% 404, "
         f"5% stall {a.timeout + 1:g} s (past the timeout), 5% HTML served as image/jpeg, 5% body cut "
         f"at half its Content-Length, 10% one redirect); every URL is a distinct photo (a collage of "
         f"two COCO photos at the first one's size, mostly 640 x 480/427, "
         f"{statistics.mean(r['mean_kb'] for r in results):.0f} kB on average), so both tools can save the same "
         f"rows.\n"]
    p.append("| URLs | tool | dedup + hashing | wall s | samples saved | samples/s | CPU-s | "
             "CPU-ms per saved sample | vs img2dataset (same hashing): samples/s, CPU per sample |")
    p.append("|---|---|---|---|---|---|---|---|---|")
    for res in results:
        runs = res["runs"]
        for name in ("ours-on", "ours-off", "i2d-on", "i2d-off"):
            if name not in runs:
                continue
            rr = runs[name]
            wall, cpu, saved = _median(rr, "wall"), _median(rr, "cpu"), _median(rr, "saved")
            rate = statistics.median(r["saved"] / r["wall"] for r in rr)
            per = statistics.median(1000 * r["cpu"] / max(1, r["saved"]) for r in rr)
            tool, on = name.split("-")
            label = "webmcse-data shard-pairs" if tool == "ours" else f"img2dataset {i2d_version or ''}".strip()
            what = ("sha256 + phash, exact + near dedup" if on == "on" else "sha256 only, no dedup") \
                if tool == "ours" else ("sha256 (`--compute_hash sha256`)" if on == "on" else "none")
            ratio = ""
            peer = runs.get(f"i2d-{on}")
            if tool == "ours" and peer:
                prate = statistics.median(r["saved"] / r["wall"] for r in peer)
                pper = statistics.median(1000 * r["cpu"] / max(1, r["saved"]) for r in peer)
                ratio = f"**{rate / prate:.2f}x**, **{per / pper:.2f}x**"
            p.append(f"| {res['urls']:,} | {label} | {what} | {wall:.1f} | {saved:,.0f} | {rate:.0f} | {cpu:.1f} | "
                     f"{per:.2f} | {ratio} |")
    p.append("")
    for res in results:
        runs = res["runs"]
        o = runs["ours-on"][-1]
        line = (f"{res['urls']:,} URLs ({res['can_succeed']:,} can succeed): ours dropped "
                f"{', '.join(f'{k} {v}' for k, v in sorted(o['dropped'].items()))}")
        if "i2d-on" in runs:
            i = runs["i2d-on"][-1]
            line += f"; img2dataset: {', '.join(f'{k[:40]} {v}' for k, v in sorted(i['dropped'].items()))}"
        if "compared" in res:
            line += (f". Stored images of the last runs compared URL by URL: {res['compared']:,} URLs saved by "
                     f"both ({res['saved_by'][0]:,} by us, {res['saved_by'][1]:,} by img2dataset), "
                     f"{res['size_mismatch']} with another pixel size (e.g. {res['size_example'][0]}x"
                     f"{res['size_example'][1]})")
        p.append(line + ".")
        loads = [r["load1"] for rr in runs.values() for r in rr]
        others = [r["others_cpu"] / r["wall"] for rr in runs.values() for r in rr]
        srv = [r["server_cpu"] / r["wall"] for rr in runs.values() for r in rr]
        p.append(f"\nLoad while measuring ({res['urls']:,} URLs): 1-min load average {min(loads):.1f}-{max(loads):.1f} "
                 f"at the start of the runs; other work used {statistics.median(others):.2f} cores "
                 f"(median; {max(others):.2f} at most) of the 2 beside the tool under test and the server "
                 f"({statistics.median(srv):.2f} cores).\n")
    p.append(goal_lines(results))
    p.append("")
    p.append("Our runs use `data_tools/shards.py`'s standard-library tar writer: `shard-pairs` imports neither "
             "webdataset nor torch.\n")
    p.append("Settings that differ, and why: img2dataset also extracts EXIF (its default; cheap on these "
             "photos) and writes a parquet table and stats per shard; we write one manifest and check "
             "each image fully (one decode, truncated files dropped). img2dataset gets "
             f"`--number_sample_per_shard` = URLs / {4 * a.workers} so each of its processes gets several "
             "shards (one shard per process would serialize it); we write one tar per 10,000 samples. "
             "img2dataset's `--resize_only_if_bigger True` matches our no-upscaling default (every photo "
             "here is larger than the target, so it changes nothing). Its `--timeout` takes whole "
             "seconds. CPU-s include each tool's start-up (imports, process spawns): a few seconds that "
             "weigh on the 2,000-URL list and not on the 20,000 one. The resize itself differs: we decode "
             "a JPEG with libjpeg-turbo at the largest 1/2^k scale that still covers the output and finish "
             "with OpenCV's bilinear step (under 2x here); img2dataset decodes at full size and area-averages "
             "(OpenCV INTER_AREA). Pixel sizes are the same (compared above); how close each output comes to "
             "an exact area average is in the stage-by-stage section.")
    return "\n".join(p)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=960)
    p.add_argument("--urls", default="2000,20000", help="comma list of URL-list sizes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=32, help="download threads per process (both tools)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--quality", type=int, default=95, help="JPEG quality (img2dataset's default)")
    p.add_argument("--latency-ms", type=int, default=50)
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--i2d", default=I2D_DEFAULT, help="img2dataset command (its own venv)")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "webmcse-bench-photos"))
    p.add_argument("--embed-images", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--stage-photos", type=int, default=200, help="photos for (d), the per-stage costs")
    p.add_argument("--skip", default="", help="comma list of parts to skip: a,b,c,d")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    a = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    skip = set(a.skip.split(","))
    i2d = a.i2d if a.i2d and shutil.which(a.i2d) else None
    i2d_version = None
    if i2d:
        pyexe = str(Path(i2d).with_name("python"))
        i2d_version = subprocess.run([pyexe, "-c", "import importlib.metadata as m; print(m.version('img2dataset'))"],
                                     capture_output=True, text=True).stdout.strip() or None
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        a_res = bench_shard(tmp, a.images, a.workers, a.image_size) if "a" not in skip else []
        if a_res:
            print(render_local(a_res, None), flush=True)
        b_res = [bench_download(tmp, a, int(n), i2d) for n in a.urls.split(",")] if "b" not in skip else []
        if b_res:
            print(render_download(b_res, a, i2d_version), flush=True)
        c = bench_embed(tmp, a.embed_images, a.device, a.batch) if "c" not in skip else None
        d = bench_stages(a, a.stage_photos, i2d) if "d" not in skip else None
        if d:
            print(render_stages(d, a), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cmd = "flock /tmp/webmcse-heavy.lock python bench/bench_data.py " + " ".join(sys.argv[1:])
    if a_res or c:
        body = render_local(a_res, c)
        print(body)
        if not a.no_write:
            write_section("data", "Data pipeline: sharding local photos, embedding", body, cmd.strip())
    if d and not a.no_write:
        write_section("data-stages", "Image work per sample, stage by stage (ours vs img2dataset)",
                      render_stages(d, a), cmd.strip())
    if b_res:
        body = render_download(b_res, a, i2d_version)
        if not a.no_write:
            write_section("data-download", "Downloading: webmcse-data vs img2dataset at matched settings",
                          body, cmd.strip())
            print("\nwrote docs/BENCHMARKS.md")


if __name__ == "__main__":
    main()
