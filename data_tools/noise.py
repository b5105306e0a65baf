"""`webmcse-data corrupt`: the noise lab — a seeded copy of a pairs dataset in which a known
fraction of the image–caption pairs is wrong, with the ground truth stored in every sample.

Web pairs are noisy in a few recurring ways, and each kind gets its own corruption so that
detectors and robust losses can be scored per kind:

- ``swap``: the caption belongs to another image (a mismatched pair; at p = 1 every caption
  is moved to another image, which is MCSE's shuffled-image ablation);
- ``generic``: the caption is replaced by a web string that describes no image (file names,
  alt-text placeholders, shop boilerplate);
- ``near``: the caption of a visually similar image (nearest neighbour by the stored image
  features), partly right — the hardest kind.

``p`` counts captions, not images: of all captions in the dataset, round(p x total) are
corrupted, chosen by the seed, so a COCO-style sample can hold clean and corrupted captions
side by side. The output sample's json keeps ``captions`` (what training reads), adds
``noise`` (one label per caption: none|swap|generic|near) and ``noise_from`` (the key whose
caption was borrowed, or null), and ``clean_captions`` (the originals); the manifest counts
each kind. Nothing is decoded: image and feature members are copied as they are.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_tools.derive import captions_of, derived_manifest, open_pairs, prepare_output, samples
from data_tools.shards import DatasetError, ShardWriter, shard_dicts, write_manifest

KINDS = ("swap", "generic", "near")

_FILE_STEMS = ("IMG", "DSC", "DSCN", "P", "PXL", "image", "photo", "untitled", "Screenshot", "scan")
_FILE_EXTS = ("jpg", "JPG", "jpeg", "png", "webp")
_BOILERPLATE = (
    "Click to enlarge", "Image not available", "No image", "Thumbnail", "placeholder image", "Loading...",
    "Free stock photo", "All rights reserved", "View larger image", "Photo courtesy of the author",
    "Shop now - free shipping on orders over $50", "Add to cart", "Sold out", "Download high resolution",
    "Image may contain: one or more people", "Image result", "Copyright 2019", "Subscribe for more",
    "Featured image", "banner", "logo", "icon", "Read more", "See details", "Best price guaranteed",
    "New arrivals this week", "Share this:", "Pin it", "untitled design", "stock image",
)


def generic_caption(rng: random.Random) -> str:
    """A web string that describes no image: a camera or export file name, or boilerplate."""
    roll = rng.random()
    if roll < 0.45:
        stem = rng.choice(_FILE_STEMS)
        sep = rng.choice(("_", "-", " ", ""))
        return f"{stem}{sep}{rng.randrange(10**4):04d}.{rng.choice(_FILE_EXTS)}"
    if roll < 0.55:
        return (f"photo_{rng.randrange(2008, 2025)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d} "
                f"{rng.randrange(24):02d}.{rng.randrange(60):02d}.{rng.randrange(60):02d}")
    return rng.choice(_BOILERPLATE)


@dataclass
class NoiseSummary:
    out: Path
    samples: int
    captions: int
    counts: dict[str, int] = field(default_factory=dict)

    def render(self) -> str:
        parts = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        return f"corrupt: {self.samples} samples, {self.captions} captions ({parts}) -> {self.out}"


def _nearest(features: np.ndarray) -> np.ndarray:
    """Index of each row's nearest other row by cosine similarity."""
    f = features.astype(np.float64)
    f /= np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    sims = f @ f.T
    np.fill_diagonal(sims, -np.inf)
    return sims.argmax(1)


def _derange(slots: list[tuple[int, int]], rng: random.Random) -> list[int | None]:
    """A permutation of the slots such that no slot receives a caption of its own image; None
    where that is impossible (a single slot, or one image owning most slots) — the caller then
    borrows a caption from a random other image."""
    n = len(slots)
    perm: list[int | None] = list(range(n))
    rng.shuffle(perm)
    owner = [s[0] for s in slots]
    for i in range(n):
        if perm[i] is None or owner[perm[i]] != owner[i]:
            continue
        candidates = [j for j in range(n) if perm[j] is not None and owner[perm[j]] != owner[i]
                      and owner[perm[i]] != owner[j]]
        if candidates:
            j = rng.choice(candidates)
            perm[i], perm[j] = perm[j], perm[i]
        else:
            perm[i] = None
    return perm


def corrupt(dataset: str | Path, out: str | Path, *, p: float, kinds: tuple[str, ...] = KINDS,
            weights: tuple[float, ...] | None = None, seed: int = 0, shard_size: int = 1000,
            overwrite: bool = False, progress: bool = True) -> NoiseSummary:
    """Write a copy of ``dataset`` with round(p x captions) captions corrupted (see module doc)."""
    src, dst = Path(dataset), Path(out)
    if not 0 <= p <= 1:
        raise DatasetError(f"--p {p}: the fraction of corrupted captions must be in [0, 1]")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise DatasetError(f"--kinds {','.join(kinds)}: choose from {', '.join(KINDS)}")
    weights = weights or tuple(1.0 for _ in kinds)
    if len(weights) != len(kinds) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise DatasetError(f"--mix {weights}: one non-negative weight per kind ({', '.join(kinds)})")
    manifest, shards = open_pairs(src, "corrupt")
    prepare_output(src, dst, overwrite)
    # Pass 1: keys, captions and (for `near`) features of every sample: small, no images.
    keys: list[str] = []
    caps: list[list[str]] = []
    feats: list[np.ndarray] = []
    for sample in samples(shards):
        keys.append(sample["__key__"])
        caps.append(captions_of(sample)[1])
        if "near" in kinds:
            if "emb.npy" not in sample:
                raise DatasetError(f"{src}: sample {sample['__key__']} has no emb.npy; `near` finds visually "
                                   f"similar images by their features: run `webmcse-data embed {src}` first")
            feats.append(np.load(io.BytesIO(sample["emb.npy"]), allow_pickle=False).reshape(-1))
    slots = [(i, j) for i, cs in enumerate(caps) for j in range(len(cs))]
    if len(keys) < 2:
        raise DatasetError(f"{src}: {len(keys)} sample(s); corrupting pairs needs at least two images")
    rng = random.Random(seed)
    chosen = rng.sample(range(len(slots)), round(p * len(slots)))
    # Kinds in proportion to the weights, exactly (largest remainder), then shuffled over slots.
    total_w = sum(weights)
    quota = [len(chosen) * w / total_w for w in weights]
    counts = [int(q) for q in quota]
    for i in sorted(range(len(kinds)), key=lambda i: quota[i] - counts[i], reverse=True)[:len(chosen) - sum(counts)]:
        counts[i] += 1
    labels = [k for k, c in zip(kinds, counts, strict=True) for _ in range(c)]
    rng.shuffle(labels)
    assignment = dict(zip((slots[c] for c in chosen), labels, strict=True))

    new_caps = [list(cs) for cs in caps]
    noise = [["none"] * len(cs) for cs in caps]
    source: list[list[str | None]] = [[None] * len(cs) for cs in caps]
    swap_slots = sorted(s for s, k in assignment.items() if k == "swap")
    if swap_slots:
        perm = _derange(swap_slots, rng)
        for (i, j), take in zip(swap_slots, perm, strict=True):
            if take is None:
                oi = rng.choice([k for k in range(len(keys)) if k != i and caps[k]])
                cap = rng.choice(caps[oi])
            else:
                oi, oj = swap_slots[take]
                cap = caps[oi][oj]
            new_caps[i][j], noise[i][j], source[i][j] = cap, "swap", keys[oi]
    near_slots = sorted(s for s, k in assignment.items() if k == "near")
    if near_slots:
        nearest = _nearest(np.stack(feats))
        for i, j in near_slots:
            n = int(nearest[i])
            new_caps[i][j], noise[i][j], source[i][j] = rng.choice(caps[n]), "near", keys[n]
    for i, j in sorted(s for s, k in assignment.items() if k == "generic"):
        new_caps[i][j], noise[i][j] = generic_caption(rng), "generic"

    # Pass 2: copy every sample with its new captions and ground truth.
    writer = ShardWriter(dst, max_count=shard_size)
    index = 0
    bar = tqdm(total=len(keys), desc="corrupt", unit=" sample", disable=not progress)
    try:
        for sample in samples(shards):
            meta, _ = captions_of(sample)
            meta.update(captions=new_caps[index], noise=noise[index], noise_from=source[index],
                        clean_captions=caps[index])
            sample["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
            sample["txt"] = new_caps[index][0].encode("utf-8")
            writer.write(sample)
            index += 1
            bar.update(1)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    tally = {"none": len(slots) - len(chosen), **{k: labels.count(k) for k in kinds}}
    info = derived_manifest(manifest, src, "noise", {"p": p, "seed": seed, "kinds": list(kinds),
                                                     "weights": list(weights), "captions": len(slots), "counts": tally})
    info["shards"] = shard_dicts(writer.close())
    write_manifest(dst, info)
    return NoiseSummary(dst, len(keys), len(slots), tally)


def add_parser(sub: Any) -> None:
    sp = sub.add_parser("corrupt", help="noise lab: corrupt a seeded fraction of a pairs dataset's captions",
                        description="Writes a copy of a pairs dataset in which a fraction p of all captions is "
                                    "swapped with another image's (swap), replaced by a generic web string "
                                    "(generic) or by a visually similar image's caption (near; needs embedded "
                                    "features). Each sample's json records the ground truth.")
    sp.add_argument("dataset")
    sp.add_argument("--out", required=True)
    sp.add_argument("--p", type=float, required=True, help="fraction of captions to corrupt, in [0, 1]")
    sp.add_argument("--kinds", default=",".join(KINDS), help=f"comma list of {', '.join(KINDS)}")
    sp.add_argument("--mix", help="comma list of relative weights, one per kind (default: equal)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--shard-size", type=int, default=1000)
    sp.add_argument("--overwrite", action="store_true")


def run(args: Any) -> NoiseSummary:
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    try:
        weights = tuple(float(w) for w in args.mix.split(",")) if args.mix else None
    except ValueError:
        raise DatasetError(f"--mix {args.mix}: expected comma-separated numbers") from None
    return corrupt(args.dataset, args.out, p=args.p, kinds=kinds, weights=weights, seed=args.seed,
                   shard_size=args.shard_size, overwrite=args.overwrite)
