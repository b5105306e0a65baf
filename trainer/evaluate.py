"""SentEval-compatible STS evaluation (cosine similarity, Spearman x 100).

Read from SentEval's own file layout and processed as SentEval does (whitespace-tokenised
and re-joined sentences, pairs without a gold score dropped, STS12-16 reported in the "all"
setting: every subset pooled into one Spearman, plus "wmean" and per subset), so our figures
are comparable with the SimCSE/MCSE papers. Standalone use:

    python -m trainer.evaluate --model PATH_OR_NAME [--pooler mean] [--tasks stsb_dev,stsb_test]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr
from tqdm import tqdm

from trainer.config import STS_TASKS

STS_SUBSETS = {
    "sts12": ("STS12-en-test", ["MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"]),
    "sts13": ("STS13-en-test", ["FNWN", "headlines", "OnWN"]),
    "sts14": ("STS14-en-test", ["deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"]),
    "sts15": ("STS15-en-test", ["answers-forums", "answers-students", "belief", "headlines", "images"]),
    "sts16": ("STS16-en-test",
              ["answer-answer", "headlines", "plagiarism", "postediting", "question-question"]),
}
TASKS = list(STS_TASKS)
FETCH_HINT = ("get SentEval's STS data with `webmcse-data fetch-eval-data data/senteval` (needs internet) and "
              "point eval.sts_dir at that folder (it holds STSBenchmark/, SICK/ and STS1x-en-test/)")

Encoder = Callable[[list[str]], np.ndarray]


class EvalDataError(FileNotFoundError):
    """Evaluation data missing or malformed; the message says which file and how to get it."""


@dataclass
class Subset:
    name: str
    s1: list[str]
    s2: list[str]
    gold: np.ndarray


def _senteval_tok(s: str) -> str:
    # SentEval stores sentences as token lists (str.split) and the SimCSE batcher joins them
    # with single spaces: the text the encoder sees has its whitespace normalised.
    return " ".join(s.split())


def _need(path: Path) -> Path:
    if not path.is_file():
        raise EvalDataError(f"{path}: not found; {FETCH_HINT}")
    return path


def _read_lines(path: Path) -> list[str]:
    return _need(path).read_text(encoding="utf-8").splitlines()


def _load_sts_year(root: Path, task: str) -> list[Subset]:
    folder, names = STS_SUBSETS[task]
    subsets = []
    for name in names:
        pairs = _read_lines(root / folder / f"STS.input.{name}.txt")
        raw = _read_lines(root / folder / f"STS.gs.{name}.txt")
        if len(pairs) != len(raw):
            raise EvalDataError(f"{root / folder}: STS.input.{name}.txt has {len(pairs)} lines but "
                                f"STS.gs.{name}.txt has {len(raw)}; the copy is damaged")
        s1, s2, gold = [], [], []
        for lineno, (line, score) in enumerate(zip(pairs, raw, strict=True), 1):
            if score.strip() == "":
                continue  # SentEval drops pairs without a gold score
            cols = line.split("\t")
            if len(cols) < 2:
                raise EvalDataError(f"{root / folder}/STS.input.{name}.txt:{lineno}: expected two "
                                    f"tab-separated sentences")
            s1.append(_senteval_tok(cols[0]))
            s2.append(_senteval_tok(cols[1]))
            gold.append(float(score))
        subsets.append(Subset(name, s1, s2, np.asarray(gold)))
    return subsets


def _load_tsv(path: Path, c1: int, c2: int, cs: int, skip_header: bool, name: str) -> list[Subset]:
    s1, s2, gold = [], [], []
    for lineno, line in enumerate(_read_lines(path), 1):
        if skip_header and lineno == 1:
            continue
        cols = line.strip().split("\t")
        if len(cols) <= max(c1, c2, cs):
            raise EvalDataError(f"{path}:{lineno}: expected at least {max(c1, c2, cs) + 1} "
                                f"tab-separated columns")
        s1.append(_senteval_tok(cols[c1]))
        s2.append(_senteval_tok(cols[c2]))
        gold.append(float(cols[cs]))
    return [Subset(name, s1, s2, np.asarray(gold))]


def load_task(sts_dir: str | Path, task: str) -> list[Subset]:
    root = Path(sts_dir)
    if not root.is_dir():
        raise EvalDataError(f"{root}: STS data folder not found; {FETCH_HINT}")
    if task in STS_SUBSETS:
        return _load_sts_year(root, task)
    if task in ("stsb_dev", "stsb_test"):
        split = task.split("_")[1]
        return _load_tsv(root / "STSBenchmark" / f"sts-{split}.csv", 5, 6, 4, False, task)
    if task == "sickr_test":
        return _load_tsv(root / "SICK" / "SICK_test_annotated.txt", 1, 2, 3, True, task)
    raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")


def _cosine(a_ND: np.ndarray, b_ND: np.ndarray) -> np.ndarray:
    a = a_ND.astype(np.float64)
    b = b_ND.astype(np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.nan_to_num(num / np.where(den == 0, 1.0, den))


def _spearman(pred: np.ndarray, gold: np.ndarray) -> float:
    return float(spearmanr(pred, gold).statistic) * 100.0


def evaluate_tasks(encode: Encoder, sts_dir: str | Path,
                   tasks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Spearman x100 per task: {"task": {"spearman": all, "wmean": ..., "subsets": {...}}}."""
    loaded = {t: load_task(sts_dir, t) for t in tasks}
    # Encode every distinct sentence once across all tasks (STS shares many sentences).
    unique = sorted({s for subs in loaded.values() for sub in subs for s in (*sub.s1, *sub.s2)})
    vecs = encode(unique)
    index = {s: i for i, s in enumerate(unique)}
    results: dict[str, dict[str, Any]] = {}
    for task, subsets in loaded.items():
        preds, golds, per = [], [], {}
        for sub in subsets:
            pred = _cosine(vecs[[index[s] for s in sub.s1]], vecs[[index[s] for s in sub.s2]])
            per[sub.name] = {"spearman": _spearman(pred, sub.gold), "n": len(sub.gold)}
            preds.append(pred)
            golds.append(sub.gold)
        entry: dict[str, Any] = {"spearman": _spearman(np.concatenate(preds), np.concatenate(golds)),
                                 "n": int(sum(len(g) for g in golds))}
        if len(subsets) > 1:
            entry["wmean"] = sum(v["spearman"] * v["n"] for v in per.values()) / entry["n"]
            entry["subsets"] = per
        results[task] = entry
    return results


def alignment_uniformity(encode: Encoder, sts_dir: str | Path, task: str = "stsb_dev",
                         threshold: float = 4.0) -> dict[str, float]:
    """Wang & Isola's alignment (mean squared distance of positive pairs: STS pairs with gold
    >= threshold) and uniformity (log mean Gaussian potential over all sentence pairs), on
    L2-normalised embeddings; lower is better for both."""
    (sub,) = load_task(sts_dir, task)
    unique = sorted(set(sub.s1) | set(sub.s2))
    index = {s: i for i, s in enumerate(unique)}
    vecs = encode(unique).astype(np.float64)
    vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    pos = sub.gold >= threshold
    a = vecs[[index[s] for s, p in zip(sub.s1, pos, strict=True) if p]]
    b = vecs[[index[s] for s, p in zip(sub.s2, pos, strict=True) if p]]
    alignment = float(((a - b) ** 2).sum(1).mean())
    sq = np.clip(2.0 - 2.0 * (vecs @ vecs.T), 0.0, None)  # squared distances of unit vectors
    iu = np.triu_indices(len(vecs), k=1)
    uniformity = float(np.log(np.mean(np.exp(-2.0 * sq[iu]))))
    return {"alignment": alignment, "uniformity": uniformity, "positive_pairs": int(pos.sum()),
            "sentences": len(unique)}


def retrieval(model: Any, tokenizer: Any, source_path: str, *, batch_size: int = 128, device: Any = "cpu",
              max_images: int = 5000, max_len: int = 77, image_transform: Any = None) -> dict[str, float]:
    """Image <-> text retrieval through the grounding heads on a held-out pairs dataset:
    R@1/5/10 for text -> image (each caption finds its image) and image -> text (any of the
    image's captions counts). Images come from `KEY.emb.npy` or, with an image tower, pixels."""
    import torch

    from trainer.config import SourceConfig
    from trainer.data import SkipCounter, open_source, read_tar, safe_image

    source = open_source(SourceConfig(path=source_path, kind="pairs", name="retrieval"), 0)
    members = ("txt", "json", "jpg", "jpeg", "png", "webp") if image_transform else ("txt", "json", "emb.npy")
    captions: list[str] = []
    owner: list[int] = []
    images: list[Any] = []
    skipped = SkipCounter("retrieval")
    for url in source.shards:
        for raw in read_tar(url, members, skipped):
            if len(images) >= max_images:
                break
            try:
                meta = json.loads(raw["json"]) if "json" in raw else {}
                caps = [c for c in meta.get("captions", []) if isinstance(c, str) and c] or \
                    ([raw["txt"].decode("utf-8")] if "txt" in raw else [])
                if image_transform is not None:
                    ext = next(e for e in ("jpg", "jpeg", "png", "webp") if e in raw)
                    item = image_transform(safe_image(raw[ext]))
                else:
                    item = torch.from_numpy(np.load(io.BytesIO(raw["emb.npy"]), allow_pickle=False).astype(np.float32))
            except Exception as exn:
                skipped(exn)
                continue
            if not caps:
                skipped(ValueError(f"{raw['__key__']}: no caption"))
                continue
            images.append(item)
            captions += caps
            owner += [len(images) - 1] * len(caps)
    if not images:
        raise EvalDataError(f"{source_path}: no usable image-caption pairs for retrieval")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            text_vecs = []
            for i in range(0, len(captions), batch_size):
                toks = tokenizer(captions[i:i + batch_size], padding=True, truncation=True, max_length=max_len,
                                 return_tensors="pt")
                text_vecs.append(model.grounding_text({k: v.to(device) for k, v in toks.items()}).float().cpu())
            image_vecs = []
            for i in range(0, len(images), batch_size):
                chunk = torch.stack(images[i:i + batch_size]).to(device)
                out = model.grounding_image(pixels=chunk) if image_transform else model.grounding_image(chunk)
                image_vecs.append(out.float().cpu())
    finally:
        model.train(was_training)
    sims = (torch.cat(text_vecs) @ torch.cat(image_vecs).T).numpy()  # captions x images
    return {"images": len(images), "captions": len(captions), "skipped": skipped.count,
            **recall_at_k(sims, np.asarray(owner))}


def recall_at_k(sims_TI: np.ndarray, owner_T: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """R@k (x100) both ways from caption x image similarities; ``owner_T[t]`` is caption t's image.
    Text -> image ranks the true image among all images (ties count against it); image -> text
    takes the best-ranked of the image's own captions."""
    true = sims_TI[np.arange(len(owner_T)), owner_T]
    t2i_rank = (sims_TI > true[:, None]).sum(1)
    i2t_rank = np.empty(sims_TI.shape[1], dtype=np.int64)
    for j in range(sims_TI.shape[1]):
        col = sims_TI[:, j]
        best_own = col[owner_T == j].max()
        i2t_rank[j] = int((col > best_own).sum())
    out = {}
    for k in ks:
        out[f"t2i_R@{k}"] = float((t2i_rank < k).mean() * 100)
        out[f"i2t_R@{k}"] = float((i2t_rank < k).mean() * 100)
    return out


def make_encoder(model: Any, tokenizer: Any, pooler: str, *, batch_size: int = 128,
                 max_len: int = 0, device: Any = "cpu", progress: bool = True,
                 desc: str = "encode", on_batch: Callable[[], None] | None = None) -> Encoder:
    """Batched sentence encoder over an :class:`~trainer.model.MCSEModel`.

    Sentences are sorted by length so each batch pads little (results do not depend on the
    order: attention masks hide the padding). ``max_len=0`` truncates only at the model's
    position limit, as SentEval's batcher does.
    """
    import torch

    limit = max_len or int(getattr(model.encoder.config, "max_position_embeddings", 512))

    def encode(sentences: list[str]) -> np.ndarray:
        order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
        out = np.zeros((len(sentences), 0), dtype=np.float32)
        chunks: list[np.ndarray] = []
        was_training = model.training
        model.eval()
        try:
            for start in tqdm(range(0, len(order), batch_size), desc=desc, unit=" batch",
                              disable=not progress, leave=False):
                idx = order[start:start + batch_size]
                toks = tokenizer([sentences[i] for i in idx], padding=True, truncation=True,
                                 max_length=limit, return_tensors="pt")
                toks = {k: v.to(device) for k, v in toks.items()}
                with torch.inference_mode():
                    emb = model.sentence_embedding(toks, pooler)
                chunks.append(emb.float().cpu().numpy())
                if on_batch is not None:
                    on_batch()
        finally:
            model.train(was_training)
        if chunks:
            out = np.concatenate(chunks)
        result = np.empty_like(out)
        result[order] = out
        return result

    return encode


def results_markdown(results: dict[str, dict[str, Any]], title: str = "") -> str:
    """One table: task, Spearman x100 (all), wmean where defined, n pairs."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| task | Spearman x100 | wmean | pairs |", "| --- | ---: | ---: | ---: |"]
    for task, r in results.items():
        wmean = f"{r['wmean']:.2f}" if "wmean" in r else ""
        lines.append(f"| {task} | {r['spearman']:.2f} | {wmean} | {r['n']} |")
    return "\n".join(lines) + "\n"


def _load_for_eval(name_or_path: str) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    from trainer.model import META_FILE, MCSEModel, resolve_name

    path = resolve_name(name_or_path)
    if (Path(path) / META_FILE).is_file():
        model = MCSEModel.load(path)
    else:
        model = MCSEModel.from_pretrained_encoder(path, image_dim=0)
    return model, AutoTokenizer.from_pretrained(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder, HF id or gt:all-MiniLM-L6-v2")
    p.add_argument("--pooler", default="cls_before_pooler",
                   choices=["cls_before_pooler", "cls", "mean", "avg_first_last"])
    p.add_argument("--tasks", default="stsb_dev,stsb_test", help=f"comma list of {', '.join(TASKS)}")
    p.add_argument("--sts-dir", default="data/senteval")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--align-uniform", action="store_true", help="also alignment/uniformity on STS-B dev")
    p.add_argument("--retrieval", metavar="PAIRS_DIR", help="also image<->text retrieval on a pairs dataset")
    p.add_argument("--out", help="write results json (and .md beside it) here")
    args = p.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        print(f"error: --tasks: unknown {', '.join(unknown)} (known: {', '.join(TASKS)})", file=sys.stderr)
        return 2
    try:
        for t in tasks:
            load_task(args.sts_dir, t)  # fail before loading the model
    except EvalDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model, tok = _load_for_eval(args.model)
    model.to(args.device)
    enc = make_encoder(model, tok, args.pooler, batch_size=args.batch_size, device=args.device)
    results: dict[str, Any] = evaluate_tasks(enc, args.sts_dir, tasks)
    table = results_markdown(results, f"{args.model} ({args.pooler})")
    extra: dict[str, float] = {}
    if args.align_uniform:
        au = alignment_uniformity(enc, args.sts_dir)
        results["alignment_uniformity"] = au
        extra.update(alignment=au["alignment"], uniformity=au["uniformity"])
    if args.retrieval:
        rt = retrieval(model, tok, args.retrieval, batch_size=args.batch_size, device=args.device)
        results["retrieval"] = rt
        extra.update({k: v for k, v in rt.items() if "@" in k})
    if extra:
        table += "\n| metric | value |\n| --- | ---: |\n" + "".join(f"| {k} | {v:.3f} |\n" for k, v in extra.items())
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        out.with_suffix(".md").write_text(table, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
