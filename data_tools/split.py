"""`webmcse-data split`: hold out images of a pairs dataset, by image, for honest evaluation.

Retrieval measured on photos the model trained on says little; MCSE's grounding claim needs
images it never saw. The split works on a finished (optionally embedded) dataset, so features
are computed once and both halves carry them. Which samples are held out depends only on the
seed and each sample's key (the smallest sha256(seed:key) values), never on shard order or
size, so the same dataset always splits the same way and a re-sharded copy splits alike.
Samples are copied member by member: nothing is decoded or re-encoded.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_tools.derive import derived_manifest, open_pairs, prepare_output, samples
from data_tools.shards import DatasetError, ShardWriter, read_shard, shard_dicts, write_manifest


@dataclass
class SplitSummary:
    train: int
    heldout: int
    train_out: Path
    heldout_out: Path

    def render(self) -> str:
        return (f"split: {self.train} samples for training -> {self.train_out}, {self.heldout} held out "
                f"-> {self.heldout_out}")


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def split_pairs(dataset: str | Path, train_out: str | Path, heldout_out: str | Path, *, holdout: float,
                seed: int = 0, shard_size: int = 1000, overwrite: bool = False,
                progress: bool = True) -> SplitSummary:
    """Write the held-out images (``holdout`` samples, or that fraction when < 1) and the rest
    as two datasets with the source's manifest fields (image encoder, filters) and a record of
    the split."""
    src = Path(dataset)
    manifest, shards = open_pairs(src, "split")
    total = int(manifest.get("n_samples", sum(s["n_samples"] for s in manifest["shards"])))
    n_hold = round(holdout * total) if 0 < holdout < 1 else int(holdout)
    if not 0 < n_hold < total:
        raise DatasetError(f"--holdout {holdout:g}: {n_hold} of {total} samples; hold out at least one and "
                           f"leave at least one for training (a count, or a fraction in (0, 1))")
    train_dir, hold_dir = Path(train_out), Path(heldout_out)
    if train_dir.resolve() == hold_dir.resolve():
        raise DatasetError(f"{train_dir}: the training and held-out outputs must be different folders")
    for out in (train_dir, hold_dir):
        prepare_output(src, out, overwrite)

    # Pass 1: keys only (tar headers and small members), to choose the held-out set globally.
    keys = [sample["__key__"] for path in shards for sample in read_shard(path)]
    held = set(sorted(keys, key=lambda k: _rank(seed, k))[:n_hold])

    writers = {"train": ShardWriter(train_dir, max_count=shard_size),
               "heldout": ShardWriter(hold_dir, max_count=shard_size)}
    counts = {"train": 0, "heldout": 0}
    bar = tqdm(total=total, desc="split", unit=" sample", disable=not progress)
    try:
        for sample in samples(shards):
            role = "heldout" if sample["__key__"] in held else "train"
            writers[role].write(sample)
            counts[role] += 1
            bar.update(1)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()
    for role, out in (("train", train_dir), ("heldout", hold_dir)):
        info = derived_manifest(manifest, src, "split", {
            "role": role, "seed": seed, "holdout": n_hold, "train": counts["train"], "heldout": counts["heldout"],
            "rule": "held out: the smallest sha256(seed:key)"})
        info["shards"] = shard_dicts(writers[role].close())
        write_manifest(out, info)
    return SplitSummary(counts["train"], counts["heldout"], train_dir, hold_dir)


def add_parser(sub: Any) -> None:
    sp = sub.add_parser("split", help="hold out images of a pairs dataset (by image) for evaluation",
                        description="Writes two datasets: the held-out images and the rest. The choice "
                                    "depends only on --seed and each sample's key.")
    sp.add_argument("dataset", help="pairs dataset folder (embedded or not)")
    sp.add_argument("--holdout", type=float, required=True,
                    help="images to hold out: a count (e.g. 100) or a fraction in (0, 1)")
    sp.add_argument("--train-out", required=True, help="output folder for the training images")
    sp.add_argument("--heldout-out", required=True, help="output folder for the held-out images")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    sp.add_argument("--overwrite", action="store_true", help="replace existing output datasets")


def run(args: Any) -> SplitSummary:
    return split_pairs(args.dataset, args.train_out, args.heldout_out, holdout=args.holdout, seed=args.seed,
                       shard_size=args.shard_size, overwrite=args.overwrite)
