"""Data pipeline throughput: sharding, downloading (ours vs img2dataset), embedding.

(a) ``shard-pairs`` on local real photos (the 239 COCO photos of shared/data/pairs/coco_mini,
    listed repeatedly up to --images rows by absolute path — ``--allow-outside-paths``, one
    record per row — with exact/near dedup off so repeats are kept): samples/s
    with 1 worker and with every core, per core, and with ``--max-side 384`` re-encoding.
(b) The same URL list fetched by our downloader (``shard-pairs`` on a url table) and by
    img2dataset (its Python API, webdataset output, same processes/threads/timeout, no
    retries, no resize), from a local http.server on 127.0.0.1 that adds --latency-ms to every
    answer and injects faults: 10% 404, 5% slower than the timeout, 5% HTML served as .jpg,
    5% truncated bodies (Content-Length promises twice what is sent). img2dataset's output is
    then read back by ``shard-pairs`` (input kind: img2dataset folder).
(c) ``embed`` (read shard, decode, preprocess, forward, write) vs the encoder's forward pass
    alone on random tensors, same batch size and device.

    python bench/bench_data.py [--images 960] [--urls 800] [--workers N] [--threads 32]
                               [--embed-images 256] [--device cpu] [--no-write]

img2dataset pins webdataset<0.3, so it is installed beside our webdataset 1.0.2 with
``pip install -e '.[bench]' && pip install --no-deps 'img2dataset>=1.45'``; without it, (b)
reports our downloader only.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import write_section  # noqa: E402

PHOTOS = ROOT.parent / "shared" / "data" / "pairs" / "coco_mini"


def _photos() -> list[tuple[Path, str]]:
    rows = [json.loads(line) for line in (PHOTOS / "captions.jsonl").read_text().splitlines()]
    return [(PHOTOS / r["file"], r["captions"][0]) for r in rows]


# --- (a) local sharding ------------------------------------------------------------------------


def bench_shard(tmp: Path, n_images: int, workers: int) -> list[dict[str, Any]]:
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
    for w, max_side in ((1, 0), (workers, 0), (workers, 384)):
        out = tmp / f"local_w{w}_{max_side}"
        t0 = time.perf_counter()
        s = shard_pairs([table], out, dedup="none", near_dup_distance=None, workers=w, chunk_size=32,
                        images=ImageOptions(max_side=max_side), max_count=500, allow_outside_paths=True,
                        group_by_image=False, progress=False)
        dt = time.perf_counter() - t0
        results.append({"workers": w, "max_side": max_side, "samples": s.written, "seconds": dt,
                        "rate": s.written / dt, "per_core": s.written / dt / w, "mb_s": mb / dt})
        shutil.rmtree(out)
    return results


# --- (b) downloads with faults -----------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the listen() backlog: the default 5 drops SYNs under 64 clients


class FaultyServer:
    """Serves the photos at /img/<i>.jpg with the fault of row i (see module docstring)."""

    def __init__(self, n: int, latency: float, slow: float) -> None:
        photos = [p.read_bytes() for p, _ in _photos()]
        self.kinds: dict[str, str] = {}
        self.bodies: dict[str, bytes] = {}
        for i in range(n):
            r = i % 20
            kind = "404" if r in (0, 10) else "slow" if r == 3 else "html" if r == 7 else "cut" if r == 13 else "ok"
            self.kinds[f"/img/{i}.jpg"] = kind
            self.bodies[f"/img/{i}.jpg"] = photos[i % len(photos)]
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                time.sleep(latency)
                kind = srv.kinds.get(self.path, "404")
                try:
                    if kind == "404":
                        self.send_response(404)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    if kind == "slow":
                        time.sleep(slow)
                    body = srv.bodies[self.path]
                    if kind == "html":
                        body = b"<!DOCTYPE html><html><body>Image not available</body></html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html" if kind == "html" else "image/jpeg")
                    self.send_header("Content-Length", str(len(body) * (2 if kind == "cut" else 1)))
                    if kind == "cut":
                        self.send_header("Connection", "close")
                        self.close_connection = True
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def bench_download(tmp: Path, n_urls: int, workers: int, threads: int, latency: float,
                   timeout: float) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_tools.commands import shard_pairs
    from data_tools.download import DownloadOptions

    server = FaultyServer(n_urls, latency, slow=timeout + 1.0)
    photos = _photos()
    rows = [{"url": f"{server.base}/img/{i}.jpg", "caption": photos[i % len(photos)][1]} for i in range(n_urls)]
    table = tmp / "urls.parquet"
    pq.write_table(pa.Table.from_pylist(rows), table)
    expected = sum(1 for k in server.kinds.values() if k == "ok")
    out: dict[str, Any] = {"urls": n_urls, "expected_ok": expected,
                           "faults": dict(sorted({k: list(server.kinds.values()).count(k)
                                                  for k in set(server.kinds.values())}.items()))}
    try:
        t0 = time.perf_counter()
        s = shard_pairs([table], tmp / "ours", dedup="none", near_dup_distance=None, workers=workers,
                        download=DownloadOptions(timeout=timeout, retries=0, threads=threads * workers),
                        chunk_size=32, max_count=1000, progress=False)
        dt = time.perf_counter() - t0
        out["ours"] = {"seconds": dt, "ok": s.written, "rate": n_urls / dt, "dropped": s.dropped}
        try:
            import img2dataset  # noqa: F401
        except ImportError:
            out["img2dataset"] = None
            return out
        out["img2dataset"] = _run_img2dataset(table, tmp / "i2d", workers, threads, timeout, n_urls)
        t0 = time.perf_counter()
        back = shard_pairs([tmp / "i2d"], tmp / "i2d_read", dedup="none", near_dup_distance=None,
                           progress=False)
        out["i2d_read"] = {"seconds": time.perf_counter() - t0, "written": back.written, "dropped": back.dropped}
    finally:
        server.close()
    return out


def _run_img2dataset(table: Path, folder: Path, workers: int, threads: int, timeout: float,
                     n_urls: int) -> dict[str, Any]:
    from img2dataset import download

    os.environ.setdefault("WANDB_MODE", "disabled")
    per_shard = max(1, math.ceil(n_urls / (4 * workers)))  # several shards per process
    t0 = time.perf_counter()
    download(url_list=str(table), input_format="parquet", url_col="url", caption_col="caption",
             output_folder=str(folder), output_format="webdataset", processes_count=workers,
             thread_count=threads, timeout=math.ceil(timeout), retries=0, resize_mode="no",
             number_sample_per_shard=per_shard, enable_wandb=False, disallowed_header_directives=[],
             distributor="multiprocessing")
    dt = time.perf_counter() - t0
    stats = [json.loads(p.read_text()) for p in sorted(folder.glob("*_stats.json"))]
    ok = sum(s.get("successes", 0) for s in stats)
    status: dict[str, int] = {}
    for s in stats:
        for k, v in (s.get("status_dict") or {}).items():
            k = k.split("(", 1)[0].strip()  # "IncompleteRead(116377 bytes read, ...)" -> one bucket
            status[k] = status.get(k, 0) + v
    return {"seconds": dt, "ok": ok, "rate": n_urls / dt, "status": status}


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


def render(a: list[dict[str, Any]], b: dict[str, Any] | None, c: dict[str, Any] | None,
           args: argparse.Namespace) -> str:
    parts = []
    if a:
        parts.append(f"**(a) shard-pairs, local COCO photos** ({a[0]['samples']} rows of 640-px JPEGs, decode + "
                     f"checks + phash + tar write; dedup off so repeats count)\n")
        parts.append("| workers | re-encode | samples/s | per core | input MB/s |\n|---|---|---|---|---|")
        for r in a:
            parts.append(f"| {r['workers']} | {'max side ' + str(r['max_side']) if r['max_side'] else 'no'} "
                         f"| {r['rate']:.0f} | {r['per_core']:.0f} | {r['mb_s']:.1f} |")
    if b:
        parts.append(f"\n**(b) downloads** of {b['urls']} URLs from a local server ({args.latency_ms} ms latency "
                     f"per answer; faults: {', '.join(f'{k} {v}' for k, v in b['faults'].items())}; "
                     f"{b['expected_ok']} can succeed), {args.workers} process(es) x {args.threads} threads, "
                     f"timeout {args.timeout} s, no retries\n")
        parts.append("| tool | seconds | URLs/s | images kept | failures by reason |\n|---|---|---|---|---|")
        o = b["ours"]
        parts.append(f"| webmcse-data shard-pairs | {o['seconds']:.1f} | {o['rate']:.0f} | {o['ok']} | "
                     f"{', '.join(f'{k} {v}' for k, v in sorted(o['dropped'].items()))} |")
        i = b.get("img2dataset")
        if i:
            parts.append(f"| img2dataset (webdataset, resize no) | {i['seconds']:.1f} | {i['rate']:.0f} | {i['ok']} | "
                         f"{', '.join(f'{k[:40]} {v}' for k, v in sorted(i['status'].items()) if k != 'success')} |")
            r = b["i2d_read"]
            parts.append(f"\nimg2dataset's output read back by `shard-pairs` (input kind img2dataset): "
                         f"{r['written']} samples in {r['seconds']:.1f} s, dropped {r['dropped'] or 'none'}.")
        else:
            parts.append("\nimg2dataset not installed: only our downloader measured.")
    if c:
        parts.append(f"\n**(c) embed vs forward only** (EfficientNet-Lite0, {c['images']} images, batch {c['batch']}, "
                     f"{c['device']}, {c['threads']} torch threads)\n")
        parts.append("| stage | images/s |\n|---|---|")
        parts.append(f"| encoder forward only (random tensors) | {c['forward_rate']:.1f} |")
        parts.append(f"| `embed` (read, decode, preprocess, forward, write) | {c['embed_rate']:.1f} |")
        parts.append(f"\n`embed` runs at {100 * c['embed_rate'] / c['forward_rate']:.0f}% of the forward pass.")
    return "\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=960)
    p.add_argument("--urls", type=int, default=800)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--threads", type=int, default=32, help="download threads per process")
    p.add_argument("--latency-ms", type=int, default=50)
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--embed-images", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip", default="", help="comma list of parts to skip: a,b,c")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    skip = set(args.skip.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        a = bench_shard(tmp, args.images, args.workers) if "a" not in skip else []
        print(render(a, None, None, args), flush=True)
        b = bench_download(tmp, args.urls, args.workers, args.threads, args.latency_ms / 1000, args.timeout) \
            if "b" not in skip else None
        c = bench_embed(tmp, args.embed_images, args.device, args.batch) if "c" not in skip else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    body = render(a, b, c, args)
    print(body)
    if not args.no_write:
        cmd = "python bench/bench_data.py " + " ".join(sys.argv[1:])
        write_section("data", "Data pipeline: sharding, downloads (vs img2dataset), embedding", body, cmd.strip())
        print("\nwrote the 'data' section of docs/BENCHMARKS.md")


if __name__ == "__main__":
    main()
