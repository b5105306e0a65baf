"""Stream throughput per DataLoader worker vs the trainer's consumption rate (CPU).

Two pipelines over shards built from the bundled sample (76 real COCO photos x 5 captions,
replicated under new keys to make a few thousand samples):

(a) precomputed image features + caption tokenisation (the default training input);
(b) JPEG decode + resize/crop/normalise (EfficientNet-Lite0 preprocessing) + tokenisation
    (training with an image tower).

Consumption: the trainer's step rate for all-MiniLM-L6-v2 at batch 32 on this machine (the
median of `bench/bench_step.py`, measured here again for a few steps).

    python bench/bench_stream.py [--samples 4096] [--batches 40]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import write_section  # noqa: E402


def build(out: Path, n: int, with_images: bool) -> Path:
    """A pairs dataset of n samples (shards of 512) from the bundled sample."""
    import json

    from data_tools.commands import embed, shard_pairs
    from data_tools.shards import ShardWriter, read_shard, shard_dicts, write_manifest

    base = out / "base"
    shard_pairs([ROOT / "sample" / "coco_cc"], base, progress=False)
    embed(base, "efficientnet_lite0", batch_size=32, progress=False)
    samples = [s for sh in sorted(base.glob("*.tar")) for s in read_shard(sh)]
    ds = out / ("images" if with_images else "features")
    w = ShardWriter(ds, max_count=512)
    for i in range(n):
        src = dict(samples[i % len(samples)])
        src.pop("__url__", None)
        src["__key__"] = f"s{i:07d}"
        if not with_images:
            src.pop("jpg", None)
        w.write(src)
    manifest = json.loads((base / "manifest.json").read_text())
    write_manifest(ds, {"kind": "pairs", "shards": shard_dicts(w.close()), "image_encoder": manifest["image_encoder"]})
    return ds


def stream_rate(ds: Path, workers: int, batches: int, tower) -> float:
    from transformers import AutoTokenizer

    from trainer.config import DataConfig, SourceConfig
    from trainer.data import BatchStreams, open_source
    from trainer.model import resolve_name

    tok = AutoTokenizer.from_pretrained(resolve_name("gt:all-MiniLM-L6-v2"))
    source = open_source(SourceConfig(path=str(ds), kind="pairs", name="s"), 0)
    cfg = DataConfig(global_batch_size=64, num_workers=workers, max_len=32, shuffle_shards=2)
    streams = BatchStreams([source], tok, cfg, seed=0, rank=0, world=1, image_dim=1280,
                           image_transform=tower.preprocess if tower is not None else None)
    for _ in range(max(2, workers)):  # start-up: workers fork, first windows load
        streams.next("s")
    t0 = time.perf_counter()
    for _ in range(batches):
        streams.next("s")
    return batches * 64 / (time.perf_counter() - t0)


def consumption_rate(steps: int) -> float:
    import subprocess

    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_step.py"), "--steps", str(steps),
                          "--block", str(steps), "--no-write"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.startswith("| webmcse `train_step`"):
            return float(line.split("|")[3])
    raise RuntimeError(out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--batches", type=int, default=160)
    p.add_argument("--consumption-steps", type=int, default=6)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    import os

    from data_tools.encoders import load_image_encoder

    cores = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="bench_stream_"))
    try:
        feats = build(tmp, args.samples, with_images=False)
        images = build(tmp / "img", args.samples, with_images=True)
        tower = load_image_encoder("efficientnet_lite0")
        rows = []
        for workers in (1, 2):
            a = stream_rate(feats, workers, args.batches, None)
            b = stream_rate(images, workers, max(4, args.batches // 10), tower)
            rows.append((workers, a, b))
        consume = consumption_rate(args.consumption_steps)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    one = rows[0]
    table = ("| DataLoader workers | (a) features + tokenise, samples/s | per worker | (b) JPEG decode + resize + "
             "tokenise, samples/s | per worker |\n| ---: | ---: | ---: | ---: | ---: |\n")
    table += "".join(f"| {w} | {a:,.0f} | {a / w:,.0f} | {b:,.0f} | {b / w:,.0f} |\n" for w, a, b in rows)
    body = (f"Batches of 64, max_len 32, all-MiniLM-L6-v2 tokenizer, shards of 512 samples ({args.samples} samples "
            f"built from the bundled photos), shuffle window 2 shards; {cores} CPU cores shared by the workers and "
            f"the main process.\n\n{table}\n"
            f"Trainer consumption on this machine (all-MiniLM-L6-v2, batch 32, one process): **{consume:.1f} "
            f"samples/s**. One worker of (a) streams **{one[1] / consume:,.0f}x** that (goal >= 10x); (b) "
            f"streams {one[2] / consume:.1f}x per worker, so image-tower training needs several workers per GPU "
            f"on a GPU machine, which is why precomputed features are the default.")
    print(body)
    if not args.no_write:
        write_section("stream", "Stream throughput vs consumption (CPU)", body,
                      "python bench/bench_stream.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
