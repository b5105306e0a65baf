"""`webmcse-data score-pairs`: score every caption against its image with a trained webmcse
model's own grounding heads, and keep the best-agreeing captions.

Offline filters of web pairs (LAION's CLIP threshold, DataComp's top 30%) need a pretrained
CLIP. A short MCSE run on the noisy data itself learns a shared space too — networks fit clean
pairs before noisy ones — so its grounding heads can rank the pairs they were trained on:
cosine(g_text(caption), g_image(feature)). Scoring is per caption, not per image, because a
COCO-style image can hold good and bad captions side by side. The output is a new dataset with
the kept captions (an image keeps its sample while one caption survives), every caption's score
in the sample json, and the counts in the manifest. When the input carries the noise lab's
ground truth, detection precision and recall (dropped = flagged as noise) are reported per kind.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_tools.derive import captions_of, derived_manifest, keep_captions, open_pairs, prepare_output, samples
from data_tools.shards import DatasetError, ShardWriter, shard_dicts, write_manifest


@dataclass
class ScoreSummary:
    out: Path
    captions: int
    kept: int
    samples_dropped: int
    threshold: float
    detection: dict[str, dict[str, float]] = field(default_factory=dict)

    def render(self) -> str:
        lines = [f"score-pairs: kept {self.kept} of {self.captions} captions (score >= {self.threshold:.4f}); "
                 f"{self.samples_dropped} images lost every caption -> {self.out}"]
        for kind, d in self.detection.items():
            lines.append(f"  detection of {kind}: precision {d['precision']:.3f}, recall {d['recall']:.3f} "
                         f"({d['noisy']} noisy, {d['flagged']} flagged)")
        return "\n".join(lines)


def detection_report(flagged: list[bool], labels: list[str]) -> dict[str, dict[str, float]]:
    """Precision/recall of ``flagged`` against the noise labels, for all noise and per kind.
    Per kind, precision counts the flagged captions of that kind among all flagged captions
    that are either of that kind or clean (the other kinds are set aside)."""
    out: dict[str, dict[str, float]] = {}
    kinds = sorted({lab for lab in labels if lab != "none"})
    for kind in ["all", *kinds]:
        def is_pos(lab: str, kind: str = kind) -> bool:
            return lab != "none" if kind == "all" else lab == kind

        pool = [(f, lab) for f, lab in zip(flagged, labels, strict=True) if kind == "all" or lab in (kind, "none")]
        tp = sum(1 for f, lab in pool if f and is_pos(lab))
        fl = sum(1 for f, _ in pool if f)
        pos = sum(1 for _, lab in pool if is_pos(lab))
        out[kind] = {"precision": tp / fl if fl else float("nan"), "recall": tp / pos if pos else float("nan"),
                     "noisy": pos, "flagged": fl}
    return out


class GroundingScorer:
    """cosine(g_text(caption), g_image(feature)) under a webmcse model's grounding heads."""

    def __init__(self, model_dir: str | Path, device: str = "cpu", batch_size: int = 128) -> None:
        from transformers import AutoTokenizer

        from trainer.model import MCSEModel

        self.model = MCSEModel.load(model_dir).to(device).eval()
        if self.model.image_head is None:
            raise DatasetError(f"{model_dir}: the model has no grounding heads (trained without caption batches)")
        self.tok = AutoTokenizer.from_pretrained(str(model_dir))
        self.device = device
        self.batch_size = batch_size
        self.name = f"webmcse:{model_dir}"

    def images(self, feats: np.ndarray) -> Any:
        import torch

        with torch.inference_mode():
            return self.model.grounding_image(torch.from_numpy(feats.astype(np.float32)).to(self.device))

    def score(self, items: list[tuple[np.ndarray, list[str]]], against: Any = None,
              owners_in_against: list[int] | None = None) -> list[list[float]]:
        """Each caption's cosine to its own image; with ``against`` (reference image vectors),
        minus its best cosine to any reference image other than its own (the margin)."""
        import torch

        caps = [c for _, cs in items for c in cs]
        img = self.images(np.stack([f for f, _ in items]))
        with torch.inference_mode():
            texts = []
            for i in range(0, len(caps), self.batch_size):
                toks = self.tok(caps[i:i + self.batch_size], padding=True, truncation=True, max_length=77,
                                return_tensors="pt")
                texts.append(self.model.grounding_text({k: v.to(self.device) for k, v in toks.items()}))
            txt = torch.cat(texts)
            owner = torch.tensor([i for i, (_, cs) in enumerate(items) for _ in cs], device=self.device)
            sims = (txt * img[owner]).sum(-1)
            if against is not None:
                others = txt @ against.T  # captions x reference images
                if owners_in_against is not None:  # an image is never its own competitor
                    col = torch.tensor([owners_in_against[i] for i in owner.tolist()], device=self.device)
                    has = col >= 0
                    others[has.nonzero().squeeze(1), col[has]] = -float("inf")
                sims = sims - others.max(1).values
        flat = sims.float().cpu().tolist()
        out, k = [], 0
        for _, cs in items:
            out.append(flat[k:k + len(cs)])
            k += len(cs)
        return out


def _reference(shards: list[Path], against: int) -> tuple[list[str], np.ndarray]:
    """The ``against`` images with the smallest sha256(key): a sample of the dataset that does
    not depend on its order."""
    import hashlib
    import heapq

    heap: list[tuple[str, str, bytes]] = []
    for sample in samples(shards):
        if "emb.npy" not in sample:
            continue
        item = (hashlib.sha256(sample["__key__"].encode()).hexdigest(), sample["__key__"], sample["emb.npy"])
        if len(heap) < against:
            heapq.heappush(heap, (_neg(item[0]), item[1], item[2]))
        elif _neg(item[0]) > heap[0][0]:
            heapq.heapreplace(heap, (_neg(item[0]), item[1], item[2]))
    chosen = sorted(heap, key=lambda x: x[1])
    feats = [np.load(io.BytesIO(raw), allow_pickle=False).reshape(-1) for _, _, raw in chosen]
    return [key for _, key, _ in chosen], np.stack(feats)


def _neg(hexdigest: str) -> str:
    """A string that sorts in the reverse order of a hex digest (for a max-heap of the smallest)."""
    return hexdigest.translate(str.maketrans("0123456789abcdef", "fedcba9876543210"))


def score_pairs(dataset: str | Path, out: str | Path, model_dir: str | Path, *, top_fraction: float | None = None,
                threshold: float | None = None, score: str = "margin", against: int = 4096, device: str = "cpu",
                batch_size: int = 128, shard_size: int = 1000, overwrite: bool = False,
                progress: bool = True) -> ScoreSummary:
    """Score every caption with ``model_dir``'s grounding heads and write ``out`` with the
    captions at or above the threshold (or the best ``top_fraction`` of all captions).

    ``score="cosine"``: cosine(caption, its image). ``score="margin"`` (default): that cosine
    minus the caption's best cosine to any of ``against`` reference images of the dataset (its
    own excluded). A caption that fits another photo better (a swap, a similar photo's caption)
    or fits no photo in particular (generic text) gets a low margin whatever its raw cosine, and
    the raw cosine's spread between captions (short, long, common words) cancels out."""
    if score not in ("cosine", "margin"):
        raise DatasetError(f"--score {score}: choose cosine or margin")
    if (top_fraction is None) == (threshold is None):
        raise DatasetError("score-pairs: give exactly one of --top-fraction or --threshold")
    if top_fraction is not None and not 0 < top_fraction <= 1:
        raise DatasetError(f"--top-fraction {top_fraction}: must be in (0, 1]")
    src, dst = Path(dataset), Path(out)
    manifest, shards = open_pairs(src, "score-pairs")
    prepare_output(src, dst, overwrite)
    scorer = GroundingScorer(model_dir, device=device, batch_size=batch_size)
    ref_vecs, ref_index = None, {}
    if score == "margin":
        ref_keys, ref_feats = _reference(shards, against)
        if ref_feats.shape[1] != scorer.model.image_dim:
            raise DatasetError(f"{src}: features of {ref_feats.shape[1]} dims, the model's image head takes "
                               f"{scorer.model.image_dim}; embed with the encoder the model was trained on")
        ref_vecs = scorer.images(ref_feats)
        ref_index = {k: i for i, k in enumerate(ref_keys)}

    # Pass 1: a score for every caption (features and captions only; images are never decoded).
    scores: list[list[float]] = []
    labels: list[str] = []
    pending: list[tuple[np.ndarray, list[str]]] = []
    pending_keys: list[str] = []

    def flush() -> None:
        owners = [ref_index.get(k, -1) for k in pending_keys] if ref_vecs is not None else None
        scores.extend(scorer.score(pending, ref_vecs, owners))
        bar.update(len(pending))
        pending.clear()
        pending_keys.clear()

    bar = tqdm(total=int(manifest.get("n_samples", 0)), desc="score-pairs", unit=" image", disable=not progress)
    for sample in samples(shards):
        meta, caps = captions_of(sample)
        if "emb.npy" not in sample:
            raise DatasetError(f"{src}: sample {sample['__key__']} has no emb.npy; run `webmcse-data embed "
                               f"{src}` with the model's image encoder first")
        feat = np.load(io.BytesIO(sample["emb.npy"]), allow_pickle=False).reshape(-1)
        if feat.shape[0] != scorer.model.image_dim:
            raise DatasetError(f"{src}: features of {feat.shape[0]} dims, the model's image head takes "
                               f"{scorer.model.image_dim}; embed with the encoder the model was trained on")
        noise = meta.get("noise")
        labels += noise if isinstance(noise, list) and len(noise) == len(caps) else ["unknown"] * len(caps)
        pending.append((feat, caps))
        pending_keys.append(sample["__key__"])
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    bar.close()
    flat = np.asarray([x for row in scores for x in row], dtype=np.float64)
    if flat.size == 0:
        raise DatasetError(f"{src}: no captions to score")
    if threshold is None:
        keep_n = max(1, round(top_fraction * flat.size))
        threshold = float(np.sort(flat)[::-1][keep_n - 1])
    keep_flags = [x >= threshold for x in flat.tolist()]

    # Pass 2: the kept captions (and their ground truth, if any) with every caption's score.
    writer = ShardWriter(dst, max_count=shard_size)
    index = k = dropped_samples = 0
    try:
        for sample in samples(shards):
            meta, caps = captions_of(sample)
            row = scores[index]
            keep = keep_flags[k:k + len(caps)]
            k += len(caps)
            index += 1
            if not any(keep):
                dropped_samples += 1
                continue
            meta["caption_scores"] = [round(x, 5) for x in row]
            meta["scored_by"] = scorer.name
            keep_captions(sample, meta, caps, keep)
            writer.write(sample)
    except BaseException:
        writer.abort()
        raise
    flagged = [not kp for kp in keep_flags]
    detection = detection_report(flagged, labels) if "unknown" not in labels else {}
    info = derived_manifest(manifest, src, "score_filter", {
        "scorer": scorer.name, "score": score, "against": against if score == "margin" else None,
        "threshold": threshold, "top_fraction": top_fraction, "captions": int(flat.size),
        "kept": int(sum(keep_flags)), "images_dropped": dropped_samples, "detection": detection})
    info["shards"] = shard_dicts(writer.close())
    write_manifest(dst, info)
    return ScoreSummary(dst, int(flat.size), int(sum(keep_flags)), dropped_samples, threshold, detection)


def add_parser(sub: Any) -> None:
    sp = sub.add_parser("score-pairs", help="score captions with a webmcse model's grounding heads; keep the best",
                        description="Writes a copy of a pairs dataset with the captions whose grounding-space "
                                    "cosine to their image is highest (bootstrap filtering without CLIP weights).")
    sp.add_argument("dataset", help="embedded pairs dataset (the features the model was trained on)")
    sp.add_argument("--model", required=True, help="an exported webmcse model folder (runs/<run>/final or best)")
    sp.add_argument("--out", required=True)
    g = sp.add_mutually_exclusive_group(required=True)
    g.add_argument("--top-fraction", type=float, help="keep this fraction of all captions, best first")
    g.add_argument("--threshold", type=float, help="keep captions scoring at least this cosine")
    sp.add_argument("--score", choices=["margin", "cosine"], default="margin",
                    help="margin: cosine to its image minus the best cosine to another image (default); cosine")
    sp.add_argument("--against", type=int, default=4096, help="reference images for the margin")
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--batch-size", type=int, default=128)
    sp.add_argument("--shard-size", type=int, default=1000)
    sp.add_argument("--overwrite", action="store_true")


def run(args: Any) -> ScoreSummary:
    return score_pairs(args.dataset, args.out, args.model, top_fraction=args.top_fraction, threshold=args.threshold,
                       score=args.score, against=args.against, device=args.device, batch_size=args.batch_size,
                       shard_size=args.shard_size, overwrite=args.overwrite)
