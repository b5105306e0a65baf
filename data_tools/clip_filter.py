"""CLIP-score filtering (DataComp's best simple filter: keep the pairs whose image and caption
agree under a CLIP model).

Two modes, because they need different passes over the data:

- ``--clip-threshold T`` is local: ``shard-pairs`` scores each chunk as it goes (in the main
  process, on ``--clip-device``) and drops pairs below T before dedup. One pass.
- ``--clip-top-fraction F`` is global: the cut-off is a quantile of *all* scores. So
  ``shard-pairs`` scores everything and stores ``clip_score`` in each sample json; when the
  dataset is complete, :func:`filter_clip` (also the ``filter-clip`` verb) computes the cut
  from the stored scores and rewrites the shards, keeping exactly ceil(F*N) samples (ties at
  the cut broken by dataset order). No image is downloaded or scored twice.

The score is the cosine similarity of the L2-normalised image and text embeddings, averaged
over the sample's captions (COCO has five), stored rounded to 5 decimals.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_tools.commands import Summary, finish_rewrite, generation_name
from data_tools.filters import DropCounter
from data_tools.shards import (
    CLIP_STATE,
    MANIFEST,
    DatasetError,
    ShardWriter,
    atomic_write_json,
    file_sha256,
    load_manifest,
    read_shard,
    shard_dicts,
)

DROP_REASON = "clip_score_low"


@dataclass
class ClipOptions:
    model: str = "ViT-B-32"
    """open_clip model name, or a path to an open_clip model-config JSON."""
    pretrained: str | None = None
    """open_clip pretrained tag (e.g. laion2b_s34b_b79k); None = random init (tests only)."""
    threshold: float | None = None
    top_fraction: float | None = None
    device: str = "cpu"
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.threshold is not None and self.top_fraction is not None:
            raise ValueError("give --clip-threshold or --clip-top-fraction, not both")
        if self.top_fraction is not None and not 0 < self.top_fraction <= 1:
            raise ValueError(f"--clip-top-fraction {self.top_fraction} must be in (0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ClipScorer:
    """Image-caption agreement under one open_clip model, batched."""

    def __init__(self, opts: ClipOptions) -> None:
        import torch

        from data_tools.encoders import load_open_clip

        self.opts = opts
        self.torch = torch
        self.model, self.preprocess, self.tokenizer = load_open_clip(opts.model, opts.pretrained)
        self.model.to(opts.device)

    def score(self, items: list[tuple[bytes, list[str]]]) -> list[float]:
        """Mean cosine(image, caption) over each item's captions."""
        out: list[float] = []
        bs = max(1, self.opts.batch_size)
        for start in range(0, len(items), bs):
            out.extend(self._score_batch(items[start:start + bs]))
        return out

    def _score_batch(self, items: list[tuple[bytes, list[str]]]) -> list[float]:
        from PIL import Image

        torch = self.torch
        dev = self.opts.device
        pixels = torch.stack([self.preprocess(Image.open(io.BytesIO(data)).convert("RGB")) for data, _ in items])
        texts = [c for _, caps in items for c in caps]
        owners = torch.tensor([i for i, (_, caps) in enumerate(items) for _ in caps])
        with torch.inference_mode():
            img = torch.nn.functional.normalize(self.model.encode_image(pixels.to(dev)).float(), dim=-1)
            txt = torch.nn.functional.normalize(self.model.encode_text(self.tokenizer(texts).to(dev)).float(), dim=-1)
            cos = (img[owners.to(dev)] * txt).sum(-1).cpu()
        sums = torch.zeros(len(items)).index_add_(0, owners, cos)
        counts = torch.bincount(owners, minlength=len(items)).clamp(min=1)
        return [round(float(v), 5) for v in (sums / counts)]


def _image_member(sample: dict[str, Any]) -> bytes | None:
    return next((sample[e] for e in ("jpg", "png", "webp") if e in sample), None)


def _cut(scores: list[float], top_fraction: float) -> tuple[float, int]:
    """(threshold t, ties to keep): keep every score > t, plus the first ``ties`` scores == t
    in dataset order, which is exactly ceil(F*N) samples."""
    keep = max(1, math.ceil(top_fraction * len(scores)))
    ordered = sorted(scores, reverse=True)
    t = ordered[keep - 1]
    above = sum(1 for s in scores if s > t)
    return t, keep - above


def filter_clip(
    dataset: str | Path,
    *,
    top_fraction: float | None = None,
    threshold: float | None = None,
    clip: ClipOptions | None = None,
    progress: bool = True,
) -> Summary:
    """Keep the best-scoring pairs of a pairs dataset, rewriting its shards.

    Scores come from each sample's ``clip_score``; samples without one are scored with
    ``clip`` (an error if none is given). Like ``embed``, shards are rewritten one by one
    into *new* files (``NNNNNN-gG.tar``), the manifest that lists them replaces the old one
    last, and the old files are deleted after it, so the dataset is valid at every instant;
    ``.clip_state.json`` holds the cut and the shards done, so a killed run resumes with the
    same cut.
    """
    if (top_fraction is None) == (threshold is None):
        raise ValueError("filter-clip needs exactly one of --top-fraction / --threshold")
    if top_fraction is not None and not 0 < top_fraction <= 1:
        raise ValueError(f"--top-fraction {top_fraction} must be in (0, 1]")
    folder = Path(dataset)
    manifest = load_manifest(folder)
    if manifest["kind"] != "pairs":
        raise DatasetError(f"{folder / MANIFEST}: kind is {manifest['kind']!r}; filter-clip needs a pairs dataset")
    params = {"top_fraction": top_fraction, "threshold": threshold,
              "shards": [s["sha256"] for s in manifest["shards"]]}
    state_path = folder / CLIP_STATE
    state: dict[str, Any] = {}
    listed = [s["name"] for s in manifest["shards"]]
    if state_path.is_file():
        state = json.loads(state_path.read_text(encoding="utf-8"))
        if state.get("new_names") == listed:  # killed after the manifest swap: only cleanup is left
            finish_rewrite(folder, manifest, state_path, state.get("replaces", []))
            n = sum(s["n_samples"] for s in manifest["shards"])
            return Summary("filter-clip", folder, n, n, {}, len(listed))
        if state.get("params") != params:
            for entry in (state.get("done") or {}).values():
                if entry.get("shard") and entry["shard"]["name"] not in listed:
                    (folder / entry["shard"]["name"]).unlink(missing_ok=True)
            state = {}
    generation = int(manifest.get("generation", 0)) + 1
    scorer = ClipScorer(clip) if clip is not None else None
    new_scores: dict[str, dict[str, float]] = {}
    if not state:
        scores: list[float] = []
        bar = tqdm(total=manifest.get("n_samples"), desc="filter-clip: scores", unit=" pairs", disable=not progress)
        for shard in manifest["shards"]:
            missing: list[tuple[str, bytes, list[str]]] = []
            for sample in read_shard(folder / shard["name"]):
                meta = json.loads(sample.get("json", b"{}"))
                if isinstance(meta.get("clip_score"), (int, float)):
                    scores.append(float(meta["clip_score"]))
                else:
                    data = _image_member(sample)
                    caps = [c for c in meta.get("captions", []) if isinstance(c, str)] or \
                        [sample.get("txt", b"").decode("utf-8", "replace")]
                    if data is None:
                        raise DatasetError(f"{folder / shard['name']}: sample {sample['__key__']} has no image")
                    missing.append((sample["__key__"], data, caps))
                bar.update(1)
            if missing:
                if scorer is None:
                    raise DatasetError(f"{folder / shard['name']}: samples without clip_score; build with "
                                       f"shard-pairs --clip-model or give filter-clip --clip-model")
                got = scorer.score([(d, c) for _, d, c in missing])
                new_scores[shard["name"]] = {k: s for (k, _, _), s in zip(missing, got, strict=True)}
                scores.extend(got)
        bar.close()
        if not scores:
            raise DatasetError(f"{folder}: no samples to filter")
        if threshold is not None:
            cut, ties = threshold, -1  # -1: keep every score >= threshold
        else:
            assert top_fraction is not None
            cut, ties = _cut(scores, top_fraction)
        state = {"params": params, "cut": cut, "ties_left": ties, "done": {}, "generation": generation,
                 "replaces": listed, "model": clip.to_dict() if clip else None, "new_scores": new_scores}
        atomic_write_json(state_path, state)
    cut, ties = float(state["cut"]), int(state["ties_left"])
    added = state.get("new_scores", {})
    done: dict[str, Any] = state["done"]
    drops = DropCounter()
    new_shards = []
    for shard in manifest["shards"]:
        name = shard["name"]
        prev = done.get(name)
        if prev is not None:
            if prev["shard"] is not None and file_sha256(folder / prev["shard"]["name"]) != prev["shard"]["sha256"]:
                raise DatasetError(f"{folder / prev['shard']['name']}: changed since filter-clip wrote it; "
                                   f"delete {state_path.name} and run filter-clip again")
            if prev["shard"] is not None:
                new_shards.append(prev["shard"])
            drops.update(prev["dropped"])
            continue
        writer = ShardWriter(folder, max_count=math.inf, start_index=len(done),
                             name=lambda i: generation_name(i, int(state["generation"])))
        shard_drops = DropCounter()
        try:
            for sample in read_shard(folder / name):
                sample.pop("__url__", None)
                meta = json.loads(sample["json"])
                score = meta.get("clip_score")
                if not isinstance(score, (int, float)):
                    score = added.get(name, {}).get(sample["__key__"])
                    meta["clip_score"] = score
                    sample["json"] = json.dumps(meta, ensure_ascii=False)
                # ties == -1 (threshold mode) keeps every score equal to the cut.
                keep = score is not None and (score > cut or (score == cut and ties != 0))
                if keep and score == cut and ties > 0:
                    ties -= 1
                if keep:
                    writer.write(sample)
                else:
                    shard_drops.drop(DROP_REASON)
            written = writer.close()
        except BaseException:
            writer.abort()
            raise
        entry = shard_dicts(written)[0] if written else None  # every sample dropped: no empty shard
        if entry is not None:
            new_shards.append(entry)
        drops.update(shard_drops)
        done[name] = {"shard": entry, "dropped": dict(shard_drops)}
        state["ties_left"] = ties
        atomic_write_json(state_path, state)
    if not new_shards:
        raise DatasetError(f"{folder}: the CLIP filter dropped every sample; lower the threshold")
    counts = manifest.get("counts", {})
    dropped = dict(counts.get("dropped", {}))
    for k, v in drops.items():
        dropped[k] = dropped.get(k, 0) + v
    written_n = sum(s["n_samples"] for s in new_shards)
    filters = dict(manifest.get("filters", {}))
    filters["clip"] = {**(filters.get("clip") or {}), "threshold": cut, "top_fraction": top_fraction,
                       "mode": "threshold" if threshold is not None else "top_fraction",
                       **({"model": clip.model, "pretrained": clip.pretrained} if clip else {})}
    manifest.update({"shards": new_shards, "filters": filters, "generation": int(state["generation"]),
                     "counts": {**counts, "written": written_n, "dropped": dropped}})
    state["new_names"] = [s["name"] for s in new_shards]
    atomic_write_json(state_path, state)
    finish_rewrite(folder, manifest, state_path, state["replaces"])
    before = written_n + sum(drops.values())
    return Summary("filter-clip", folder, before, written_n, dict(drops), len(new_shards))
