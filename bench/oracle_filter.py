"""The oracle of caption filtering: a copy of a noise-lab dataset that keeps exactly the captions
its ground truth calls clean (``noise == "none"``).

No real filter knows the ground truth; this one bounds what any filter (score-pairs, CLIP
scores, the online robust loss) could recover. Training on it at the same steps separates the
two ways noise costs a run: the noisy captions' own gradients (which a perfect filter removes)
and the clean captions that are simply not there (which no filter brings back).

    python bench/oracle_filter.py data/coco_mini/noisy_p04 --out data/coco_mini/oracle_p04
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_tools.derive import (  # noqa: E402
    captions_of,
    derived_manifest,
    keep_captions,
    open_pairs,
    prepare_output,
    samples,
)
from data_tools.shards import DatasetError, ShardWriter, shard_dicts, write_manifest  # noqa: E402


def oracle_filter(src: Path, dst: Path, shard_size: int = 1000, overwrite: bool = False) -> dict[str, int]:
    manifest, shards = open_pairs(src, "oracle_filter")
    if "noise" not in manifest:
        raise DatasetError(f"{src}: no noise-lab ground truth (manifest has no 'noise'); make one with "
                           f"`webmcse-data corrupt`")
    prepare_output(src, dst, overwrite)
    kept = dropped = images_dropped = 0
    writer = ShardWriter(dst, max_count=shard_size)
    try:
        for sample in samples(shards):
            meta, caps = captions_of(sample)
            keep = [label == "none" for label in meta["noise"]]
            kept += sum(keep)
            dropped += len(keep) - sum(keep)
            if not any(keep):
                images_dropped += 1
                continue
            keep_captions(sample, meta, caps, keep)
            writer.write(sample)
    except BaseException:
        writer.abort()
        raise
    counts = {"kept": kept, "dropped": dropped, "images_dropped": images_dropped}
    info = derived_manifest(manifest, src, "oracle_filter", counts)
    info["shards"] = shard_dicts(writer.close())
    write_manifest(dst, info)
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset")
    ap.add_argument("--out", required=True)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args()
    try:
        counts = oracle_filter(Path(args.dataset), Path(args.out), args.shard_size, args.overwrite)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"oracle filter: kept {counts['kept']} clean captions, dropped {counts['dropped']} corrupted ones "
          f"({counts['images_dropped']} images left without a caption) -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
