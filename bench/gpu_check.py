"""The GPU check: one command that runs the CUDA path on any CUDA machine and records its figures.

It measures the trainer's own step (`trainer.step.train_step`
on the Accelerator, model and optimizer of `trainer.engine`) for BERT-base built from its
config (transformers' BertConfig defaults, the bert-base-uncased shape, random weights: nothing
is downloaded; token ids are drawn directly, so no tokenizer is needed), max_len 32, bf16:

- global batch 64 / 256 / 1024 on the plain engine: samples/s, model FLOP/s, MFU, peak memory;
- plain vs DeepSpeed ZeRO-2 vs ZeRO-3 at world size 1 (one GPU);
- gradient caching (data.max_device_batch) against the unsplit batch;

then runs the tests marked `gpu` in a subprocess (with WEBMCSE_TEST_TOKENIZER pointing at the
tokenizer files carried in .whl/tokenizer when they are there), and writes the `gpu` section of
docs/BENCHMARKS.md (plus everything as JSON under --out). Nothing new starts once 270 s have
passed since the process started (--budget-s); the tests get what is left, so the whole check
fits in 5 minutes on an H100/H200.

On this workplace's lent GPU machine (the device tool's `run`), after `bash bench/gpu_wheels.sh`
here (it fills the ignored folder .whl/ with the wheels that machine lacks):

    run(command="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
                 --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
                 PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT",
        carry=[".whl"], timeout_s=420)

(the command is one line), then here, from the files that come back:

    .venv/bin/python bench/gpu_check.py --apply <files_at>/gpu_check.json

On any other CUDA machine with the project installed: `python bench/gpu_check.py`.
CI runs the plumbing on CPU (tiny BERT, fp32, two steps, a copy of BENCHMARKS.md):

    python bench/gpu_check.py --dry-run --out /tmp/gpu_check

FLOPs are counted, not estimated from time: see `step_flops` (and docs/BENCHMARKS.md's GPU
section); torch's FlopCounterMode counts one real step as a cross-check.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import functools
import gc
import json
import logging
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Nothing is downloaded: the model is built from a config written locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bench.report import DOC, git_rev, machine, write_section_to  # noqa: E402

log = logging.getLogger("webmcse.gpu_check")

SECTION = "gpu"
RESULTS = "gpu_check.json"
# Dense bf16 tensor-core rates from the vendors' datasheets (TFLOP/s, no sparsity), by a
# substring of torch.cuda.get_device_name(); first match wins.
SPEC_BF16_TFLOPS = (("GH200", 989.4), ("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0),
                    ("H100", 989.4), ("A100", 312.0), ("L40S", 362.1), ("A10G", 70.0), ("L4", 121.0))
# The bf16 matrix rate measured on this workplace's H200 (8192^3 product, random data).
KNOWN_MEASURED_TFLOPS = 790.0
GOAL_MFU = 0.40
GOAL_ZERO2 = 0.95
RUN_COMMAND = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
               "--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; "
               "PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT")
RUN_CARRY = [".whl"]
RUN_TIMEOUT_S = 420
RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_START = time.monotonic()
_LAUNCHER_SET = frozenset(k for k in RENDEZVOUS if k in os.environ)


# ------------------------------------------------------------------------------- FLOP counting


@dataclasses.dataclass(frozen=True)
class Shape:
    """What the FLOP count depends on: the encoder's shape, the heads and the sequence length."""

    layers: int
    hidden: int
    intermediate: int
    seq: int
    proj: int
    image_dim: int
    mlp_head: bool = True


def step_flops(shape: Shape, batch: int, columns: int | None = None) -> dict[str, float]:
    """Model FLOPs of one training step (forward + backward) on `batch` sentences, by term.

    A multiply-add is 2 FLOPs; only matrix products count (embedding lookups, norms, softmax,
    GELU and the optimizer are memory-bound and left out, as in every MFU convention). Every
    sentence is encoded twice (two dropout views), so T = 2 * batch * seq tokens:

    - dense: the four attention projections and the two FFN matrices of each layer,
      2 * T * layers * (4h^2 + 2h*i);
    - attention: QK^T and attention x V, 2 * 2 * seq * h per token per layer;
    - heads: SimCSE's MLP (h x h) and the grounding text head (h x proj) on the 2 * batch
      pooled vectors, the image head (image_dim x proj) on the batch's image features;
    - loss: cosine logits of the local rows against `columns` gathered columns (the global
      batch; = batch at world size 1): z1 z2^T (h) and both views' text-image logits (proj).

    The backward costs two forward passes (gradients of the inputs and of the weights), except
    for the image head, whose input (frozen features) needs no gradient: one.
    """
    b = batch
    g = batch if columns is None else columns
    s, h, i, n_layers, p = shape.seq, shape.hidden, shape.intermediate, shape.layers, shape.proj
    tokens = 2 * b * s
    dense = 2 * tokens * n_layers * (4 * h * h + 2 * h * i)
    attention = 2 * tokens * n_layers * 2 * s * h
    rows = 2 * b
    heads = 2 * rows * h * p + (2 * rows * h * h if shape.mlp_head else 0)
    image = 2 * b * shape.image_dim * p
    loss = 2 * b * g * h + 2 * 2 * b * g * p
    forward = dense + attention + heads + image + loss
    return {"dense": 3.0 * dense, "attention": 3.0 * attention, "heads": 3.0 * heads, "image_head": 2.0 * image,
            "loss": 3.0 * loss, "total": 3.0 * (forward - image) + 2.0 * image, "forward": float(forward)}


def flop_formula(shape: Shape, batch: int) -> str:
    """How the FLOPs are counted, with each term's share for the measured model and batch."""
    f = step_flops(shape, batch)
    share = {k: f[k] / f["total"] for k in ("dense", "attention", "heads", "image_head", "loss")}
    per_token = f["dense"] / (2 * batch * shape.seq) / 6
    return (f"model FLOPs per step = 3 x the forward pass's matrix-product FLOPs (the backward computes "
            f"input and weight gradients: 2 x forward), a multiply-add counting 2. With T = 2 x batch x "
            f"{shape.seq} tokens (two dropout views), L = {shape.layers} layers, h = {shape.hidden}, "
            f"i = {shape.intermediate}: 2·T·L·(4h² + 2h·i) for the attention projections and the FFN "
            f"({share['dense']:.2%} of the total at global batch {batch}; this is 6 x {per_token / 1e6:.1f} M "
            f"encoder weights x T), 2·T·L·2·s·h for QKᵀ and attention·V ({share['attention']:.2%}), "
            f"2·(2·batch)·(h² + 256h) for the SimCSE MLP and the text head ({share['heads']:.3%}), "
            f"2·batch·batch·(h + 2·256) for the cosine logits ({share['loss']:.3%}), and the image head "
            f"({shape.image_dim}→256 on frozen features) at 2 x its forward, having no input gradient "
            f"({share['image_head']:.3%}). Embedding lookups, norms, softmax, GELU and AdamW move memory "
            f"and are not counted. MFU = model FLOPs / step time / peak; gradient caching's extra "
            f"forward pass is overhead and is not counted as model FLOPs.")


def spec_tflops(device_name: str) -> float | None:
    for key, value in SPEC_BF16_TFLOPS:
        if key in device_name:
            return value
    return None


# ------------------------------------------------------------------------------- measurement


@dataclasses.dataclass
class Plan:
    """What one run measures; the dry run shrinks every number but keeps every stage."""

    dry_run: bool
    precision: str
    seq: int
    bert: dict[str, int]
    batches: tuple[int, ...]
    engine_batch: int
    cache_limits: tuple[int, ...]
    cache_batch: int
    warmup: int
    steps: int
    image_dim: int = 1280

    @classmethod
    def make(cls, dry_run: bool, steps: int | None) -> Plan:
        if dry_run:
            return cls(True, "no", 16, {"vocab_size": 1000, "hidden_size": 32, "num_hidden_layers": 2,
                                        "num_attention_heads": 2, "intermediate_size": 64,
                                        "max_position_embeddings": 64},
                       (4, 8), 8, (4,), 8, 1, steps or 2, image_dim=24)
        return cls(False, "bf16", 32, {}, (64, 256, 1024), 1024, (256, 64), 1024, 5, steps or 20)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def single_process_env() -> None:
    """DeepSpeed wants a process group even for one process; without a launcher it needs the
    rendezvous variables (else it looks for MPI)."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def reset_accelerate(partial: bool) -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=partial)
    GradientState._reset_state()


def make_batch(n: int, seq: int, vocab: int, image_dim: int, device: Any, seed: int = 0) -> dict[str, Any]:
    """Token ids drawn uniformly (a [CLS] first, a [SEP] last, no padding: every position is
    real, so every counted attention FLOP is executed) and random image features."""
    import torch

    g = torch.Generator().manual_seed(seed)
    low = min(1000, vocab // 2)
    ids = torch.randint(low, vocab, (n, seq), generator=g)
    ids[:, 0], ids[:, -1] = min(101, vocab - 1), min(102, vocab - 1)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones(n, seq, dtype=torch.long, device=device),
            "image_emb": torch.randn(n, image_dim, generator=g).to(device)}


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_tflops(dry_run: bool) -> float:
    """This card's dense matrix rate, measured: the ceiling MFU is read against. Random data
    (zeros run faster on some chips), the median of timed products after warm-up."""
    import torch

    cuda = torch.cuda.is_available()
    n, dtype, device = (8192, torch.bfloat16, "cuda") if cuda else (256, torch.float32, "cpu")
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    reps = 3 if dry_run else 10
    times = []
    for i in range(reps + 3):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    del a, b
    return 2 * n**3 / statistics.median(times) / 1e12


@contextlib.contextmanager
def bert_folder(plan: Plan) -> Iterator[Path]:
    """A Hugging Face folder holding only BERT's config (no weights): build_model(pretrained=False)
    then initialises the architecture randomly, exactly as the trainer would before loading."""
    from transformers import BertConfig

    with tempfile.TemporaryDirectory(prefix="webmcse-bert-") as tmp:
        BertConfig(**plan.bert).save_pretrained(tmp)
        yield Path(tmp)


def bert_base() -> Shape:
    return shape_of(Plan.make(False, None))


def shape_of(plan: Plan) -> Shape:
    from transformers import BertConfig

    c = BertConfig(**plan.bert)
    return Shape(c.num_hidden_layers, c.hidden_size, c.intermediate_size, plan.seq, 256, plan.image_dim)


def measure(plan: Plan, folder: Path, global_batch: int, *, engine: str = "plain", max_device_batch: int = 0,
            count_flops: bool = False, peak_tflops: float | None = None) -> dict[str, Any]:
    """Median step time of the trainer's own step for one configuration, with its peak memory."""
    import torch

    from trainer.config import batch_layout, load_config
    from trainer.engine import build_accelerator, build_model, build_optimizer, build_scheduler
    from trainer.step import train_step

    overrides = ["data.sources=[{kind: pairs, path: unused}]", f"data.global_batch_size={global_batch}",
                 f"data.max_device_batch={max_device_batch}", f"data.max_len={plan.seq}",
                 f"model.name_or_path={folder}", "model.pooler=cls", f"model.image_dim={plan.image_dim}",
                 f"train.precision='{plan.precision}'", "tracking.backend=none"]
    if engine != "plain":
        overrides.append(f"distributed.zero_stage={engine[-1]}")
    cfg = load_config(None, overrides)
    layout = batch_layout(cfg, 1)
    rec: dict[str, Any] = {"engine": engine, "global_batch": global_batch, "chunks": layout.chunks,
                           "chunk_size": layout.chunk_size, "precision": plan.precision}
    cuda = torch.cuda.is_available()
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        rec["baseline_mem_gib"] = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    acc = build_accelerator(cfg)
    if acc.num_processes != 1 or acc.gradient_accumulation_steps != layout.chunks:
        raise RuntimeError(f"expected one process and {layout.chunks} accumulation steps, got "
                           f"{acc.num_processes} and {acc.gradient_accumulation_steps}")
    torch.manual_seed(0)
    model = build_model(cfg, plan.image_dim, pretrained=False)
    opt = build_optimizer(cfg, model)
    sched = build_scheduler(cfg, opt, 10**6)
    model, opt = acc.prepare(model, opt)
    model.train()
    vocab = int(acc.unwrap_model(model).encoder.config.vocab_size)
    batch = make_batch(global_batch, plan.seq, vocab, plan.image_dim, acc.device)
    step = functools.partial(train_step, model, opt, sched, batch, cfg, acc)
    try:
        for _ in range(plan.warmup):
            step()
        sync()
        times = []
        for _ in range(plan.steps):
            t0 = time.perf_counter()
            result = step()
            sync()
            times.append(time.perf_counter() - t0)
        if result.skipped or not all(map(_finite, result.losses.values())):
            raise RuntimeError(f"non-finite step: losses {result.losses}")
        if count_flops:
            rec["counted_flops"] = _counted_flops(step)
        step_s = statistics.median(times)
        flops = step_flops(shape_of(plan), global_batch)["total"]
        rec.update(step_s=step_s, step_min_s=min(times), step_max_s=max(times), steps=len(times),
                   samples_s=global_batch / step_s, model_flops=flops, tflops=flops / step_s / 1e12,
                   loss=float(result.losses["loss"]))
        if peak_tflops:
            rec["mfu"] = rec["tflops"] / peak_tflops
        if cuda:
            rec["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 - rec["baseline_mem_gib"]
    finally:
        acc.free_memory()
        del step, model, opt, sched, acc, batch
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return rec


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def _counted_flops(step: Any) -> float | None:
    """FLOPs of one real step as torch's dispatcher sees them (matrix products only)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            step()
        sync()
        return float(counter.get_total_flops())
    except Exception as exc:  # a counter gap must not cost the step figures
        log.warning("FlopCounterMode failed: %s", exc)
        return None


# ------------------------------------------------------------------------------- the GPU tests


GPU_MARK = re.compile(r"pytest\.mark\.gpu\b")
TEST_LINE = re.compile(r"^(tests/\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def gpu_test_files(root: Path = ROOT) -> list[str]:
    """Test files that hold gpu-marked tests. Only these are collected: the others import
    packages (mlflow, open_clip, webdataset) that a bare CUDA image may lack."""
    return sorted(str(p.relative_to(root)) for p in (root / "tests").glob("test_*.py")
                  if GPU_MARK.search(p.read_text(encoding="utf-8")))


def run_gpu_tests(out: Path, timeout_s: float) -> dict[str, Any]:
    files = gpu_test_files()
    res: dict[str, Any] = {"files": files, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "bad": [],
                           "timed_out": False}
    if not files:
        res["note"] = "no test file holds a test marked gpu"
        return res
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for key in set(RENDEZVOUS) - _LAUNCHER_SET:
        # Set here for DeepSpeed at world size 1; the tests' Accelerators would otherwise try to
        # join this process's group.
        env.pop(key, None)
    tok = ROOT / ".whl" / "tokenizer"
    if tok.is_dir():  # the tokenizer files the tests' tiny BERT needs, carried with the wheels
        env.setdefault("WEBMCSE_TEST_TOKENIZER", str(tok))
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", *files]
    res["command"] = " ".join(cmd[1:])
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(timeout_s, 1))
        text, res["returncode"] = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        raw = (exc.stdout or b"") + (exc.stderr or b"")
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        res["timed_out"], res["returncode"] = True, None
    res["seconds"] = time.perf_counter() - t0
    (out / "gpu_tests.log").write_text(text, encoding="utf-8")
    for line in text.splitlines():
        m = TEST_LINE.match(line)
        if not m:
            continue
        name, outcome = m.groups()
        key = {"PASSED": "passed", "XFAIL": "passed", "FAILED": "failed", "XPASS": "failed", "ERROR": "errors",
               "SKIPPED": "skipped"}[outcome]
        res[key] += 1
        if key in ("failed", "errors"):
            res["bad"].append(f"{name} {outcome}")
    if res["returncode"] not in (0, 5, None) and not (res["failed"] or res["errors"]):
        # Collection errors and crashes end without per-test lines: keep the last line.
        tail = [ln for ln in text.splitlines() if ln.strip()][-1:] or ["(no output)"]
        res["errors"] += 1
        res["bad"].append(f"pytest exit {res['returncode']}: {tail[0][:200]}")
    return res


# ------------------------------------------------------------------------------- the whole check


class Budget:
    """Wall-clock budget, counted from the start of the process (imports included)."""

    def __init__(self, seconds: float) -> None:
        self.end = _START + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "accelerate", "deepspeed", "webdataset"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def check(plan: Plan, out: Path, budget: Budget, run_tests: bool) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if cuda else "CPU (dry run)"
    res: dict[str, Any] = {
        "version": 1, "dry_run": plan.dry_run, "date": _dt.date.today().isoformat(), "commit": git_rev(),
        "machine": machine(), "device": name, "versions": versions(), "plan": dataclasses.asdict(plan),
        "spec_tflops": spec_tflops(name) if cuda else None, "shape": dataclasses.asdict(shape_of(plan)),
        "steps": [], "engines": [], "caching": [],
        "skipped": [], "errors": []}
    stages: list[tuple[str, dict[str, Any]]] = [("steps", {"global_batch": b}) for b in plan.batches]
    stages += [("caching", {"global_batch": plan.cache_batch, "max_device_batch": m}) for m in plan.cache_limits]
    stages += [("engines", {"global_batch": plan.engine_batch, "engine": e}) for e in ("zero2", "zero3")]
    bar = tqdm(total=len(stages) + 2, desc="gpu check", unit=" stage", file=sys.stdout, disable=None)
    t0 = time.perf_counter()
    res["measured_tflops"] = matmul_tflops(plan.dry_run)
    peak = res["measured_tflops"]
    bar.write(f"{name}: dense {'bf16' if cuda else 'fp32'} matrix product {peak:.3g} TFLOP/s measured"
              + (f", {res['spec_tflops']:.0f} by the datasheet" if res["spec_tflops"] else ""))
    bar.update()
    deepspeed_ok = res["versions"]["deepspeed"] is not None
    with bert_folder(plan) as folder:
        for kind, kw in stages:
            label = f"{kind} {kw}"
            if kind == "engines" and not deepspeed_ok:
                res["skipped"].append(f"{label}: deepspeed is not installed (bash bench/gpu_wheels.sh, carry .whl)")
                bar.update()
                continue
            # A BERT-base configuration costs ~10-20 s on an H100 with its start-up; keep 60 s
            # for the tests.
            if budget.left() < (60 if run_tests else 15):
                res["skipped"].append(f"{label}: time budget spent")
                bar.update()
                continue
            if kind == "engines":
                single_process_env()
            reset_accelerate(partial=kind != "engines" or kw["engine"] == "zero2")
            t_stage = time.perf_counter()
            try:
                count = kind == "caching" or (kind == "steps" and kw["global_batch"] == max(plan.batches))
                rec = measure(plan, folder, peak_tflops=peak, count_flops=count, **kw)
            except Exception as exc:  # one failing configuration must not cost the others
                log.exception("%s failed", label)
                res["errors"].append(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
                bar.update()
                continue
            rec["wall_s"] = time.perf_counter() - t_stage
            res[kind].append(rec)
            bar.write(f"  {kind:8s} {rec['engine']:6s} batch {rec['global_batch']:5d} chunks {rec['chunks']:2d}: "
                      f"{rec['step_s'] * 1e3:8.1f} ms/step, {rec['samples_s']:9.1f} samples/s, "
                      f"{rec['tflops']:7.2f} TFLOP/s" + (f", MFU {rec['mfu']:.1%}" if "mfu" in rec else "")
                      + (f", peak {rec['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in rec else ""))
            bar.update()
    res["bench_s"] = time.perf_counter() - t0
    if run_tests:
        if cuda:
            torch.cuda.empty_cache()
        res["tests"] = run_gpu_tests(out, min(max(budget.left() - 5, 30), 240))
        bar.write(f"  gpu tests: {res['tests']['passed']} passed, {res['tests']['failed']} failed, "
                  f"{res['tests']['errors']} errors, {res['tests']['skipped']} skipped")
    bar.update()
    bar.close()
    res["goals"] = goals(res)
    return res


def _plain_at(res: dict[str, Any], batch: int) -> dict[str, Any] | None:
    return next((r for r in res["steps"] if r["global_batch"] == batch and r["engine"] == "plain"), None)


def goals(res: dict[str, Any]) -> dict[str, Any]:
    """MFU >= 40% at global batch 1024; ZeRO-2 >= 0.95x plain throughput (None: not measured)."""
    plan = res["plan"]
    g: dict[str, Any] = {"mfu": None, "zero2": None, "evaluated": not res["dry_run"]}
    top = _plain_at(res, plan["engine_batch"]) if plan["engine_batch"] in plan["batches"] else None
    big = _plain_at(res, max(plan["batches"]))
    if big and "mfu" in big:
        g["mfu"] = {"batch": big["global_batch"], "mfu": big["mfu"], "met": big["mfu"] >= GOAL_MFU}
        if res.get("spec_tflops"):
            g["mfu"]["mfu_spec"] = big["tflops"] / res["spec_tflops"]
    z2 = next((r for r in res["engines"] if r["engine"] == "zero2"), None)
    if top and z2:
        ratio = z2["samples_s"] / top["samples_s"]
        g["zero2"] = {"batch": top["global_batch"], "ratio": ratio, "met": ratio >= GOAL_ZERO2}
    return g


# ------------------------------------------------------------------------------- the report


def _gib(rec: dict[str, Any]) -> str:
    return f"{rec['peak_mem_gib']:.2f}" if "peak_mem_gib" in rec else "n/a"


def _num(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def _pct(x: float | None) -> str:
    return f"{x:.1%}" if x is not None else "n/a"


def render(res: dict[str, Any]) -> str:
    """The section body, from the results alone (so it can be rendered again elsewhere)."""
    plan, peak, spec = res["plan"], res["measured_tflops"], res.get("spec_tflops")
    dry = res["dry_run"]
    unit = "TFLOP/s"
    lines: list[str] = []
    if dry:
        lines += ["**Dry run on CPU: the plumbing only (tiny BERT, fp32, a couple of steps). These numbers "
                  "are not GPU figures.**", ""]
    model = ("BERT-base from `BertConfig()` (bert-base-uncased shape, random init)" if not plan["bert"]
             else f"tiny BERT {plan['bert']}")
    lines += [f"Device: **{res['device']}**; {model}, max_len {plan['seq']}, every sentence encoded twice "
              f"(dropout views), caption batches with {plan['image_dim']}-d image features (both loss terms), "
              f"precision `{plan['precision']}`, AdamW, clipping; the trainer's `train_step` through "
              f"`trainer.engine`, world size 1; median of {plan['steps']} steps after {plan['warmup']} warm-up "
              f"step(s), each ended by a device synchronisation. Token ids are drawn uniformly without padding.", ""]
    peak_txt = f"{_num(peak)} {unit} measured in this run (dense {'bf16' if not dry else 'fp32'} matrix product)"
    spec_txt = f"{spec:.0f} {unit} datasheet" if spec else "no datasheet figure for this device"
    lines += [f"Peak used for MFU: {peak_txt}; {spec_txt} (this workplace's H200 measured "
              f"{KNOWN_MEASURED_TFLOPS:.0f}).", ""]

    lines += ["| global batch | step (ms) | samples/s | tokens/s | model TFLOP/s | MFU (measured peak) | "
              "MFU (datasheet) | peak memory (GiB) |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in res["steps"]:
        lines.append(f"| {r['global_batch']} | {r['step_s'] * 1e3:.1f} | {r['samples_s']:,.0f} | "
                     f"{r['samples_s'] * 2 * plan['seq']:,.0f} | {_num(r['tflops'])} | {_pct(r.get('mfu'))} | "
                     f"{_pct(r['tflops'] / spec if spec else None)} | {_gib(r)} |")
    counted = [r for r in res["steps"] if r.get("counted_flops")]
    if counted:
        r = counted[-1]
        lines += ["", f"FLOPs per step at global batch {r['global_batch']}: {r['model_flops']:.4g} by the "
                  f"formula below; torch's `FlopCounterMode` counted {r['counted_flops']:.4g} on one real "
                  f"step (formula / counter = {r['model_flops'] / r['counted_flops']:.4f})."]
    base = _plain_at(res, plan["engine_batch"])
    if res["engines"] or base:
        mixed = ("; with bf16, DeepSpeed keeps bf16 weights (fp32 master weights in its optimizer) while the "
                 "plain engine keeps fp32 weights under autocast" if plan["precision"] == "bf16" else "")
        lines += ["", f"**Engines at world size 1**, global batch {plan['engine_batch']} (ZeRO on one GPU "
                  f"partitions nothing: this is DeepSpeed's own overhead{mixed}):", "",
                  "| engine | step (ms) | samples/s | vs plain | peak memory (GiB) |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for r in ([base] if base else []) + res["engines"]:
            ratio = f"{r['samples_s'] / base['samples_s']:.3f}x" if base else "n/a"
            lines.append(f"| {r['engine']} | {r['step_s'] * 1e3:.1f} | {r['samples_s']:,.0f} | {ratio} | {_gib(r)} |")
    cache_base = _plain_at(res, plan["cache_batch"])
    if res["caching"]:
        lines += ["", f"**Gradient caching** at global batch {plan['cache_batch']} (`data.max_device_batch`; "
                  "every chunk is encoded twice: once without a graph, once with):", "",
                  "| chunks x size | step (ms) | samples/s | throughput vs unsplit | executed / model FLOPs | "
                  "peak memory (GiB) |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in ([cache_base] if cache_base else []) + res["caching"]:
            ratio = f"{r['samples_s'] / cache_base['samples_s']:.3f}x" if cache_base else "n/a"
            executed = (f"{r['counted_flops'] / r['model_flops']:.2f}" if r.get("counted_flops") else "n/a")
            lines.append(f"| {r['chunks']} x {r['chunk_size']} | {r['step_s'] * 1e3:.1f} | {r['samples_s']:,.0f} | "
                         f"{ratio} | {executed} | {_gib(r)} |")
    t = res.get("tests")
    lines += [""]
    if t is None:
        lines.append("GPU tests: not run (--no-tests).")
    else:
        state = "timed out; " if t.get("timed_out") else ""
        lines.append(f"GPU tests (`pytest -m gpu` on {', '.join(t['files']) or 'no file'}): {state}**{t['passed']} "
                     f"passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped**"
                     + (f" in {t['seconds']:.0f} s" if "seconds" in t else "") + ".")
        lines += [f"- {b}" for b in t["bad"]]
    g = res["goals"]
    lines += ["", "**Goals**" + (" (not evaluated: dry run)" if dry else "") + ":", ""]
    if g["mfu"]:
        m = g["mfu"]
        verdict = "met" if m["met"] else "not met"
        lines.append(f"- MFU >= {GOAL_MFU:.0%} at global batch {m['batch']}: {m['mfu']:.1%} of the measured peak"
                     + (f" ({m['mfu_spec']:.1%} of the datasheet's)" if "mfu_spec" in m else "")
                     + ("" if dry else f": **{verdict}**"))
    else:
        lines.append(f"- MFU >= {GOAL_MFU:.0%} at global batch 1024: not measured")
    if g["zero2"]:
        z = g["zero2"]
        verdict = "met" if z["met"] else "not met"
        lines.append(f"- ZeRO-2 >= {GOAL_ZERO2}x plain throughput (global batch {z['batch']}): {z['ratio']:.3f}x"
                     + ("" if dry else f": **{verdict}**"))
    else:
        lines.append(f"- ZeRO-2 >= {GOAL_ZERO2}x plain throughput: not measured")
    for note in res["skipped"] + res["errors"]:
        lines.append(f"- not measured: {note}")
    shape = Shape(**res["shape"])
    lines += ["", f"How FLOPs are counted: {flop_formula(shape, max(plan['batches']))}", "", how_to_run(), "",
              embedded(res)]
    return "\n".join(lines)


def how_to_run() -> str:
    return ("How to run it. On this workplace's lent GPU machine: `bash bench/gpu_wheels.sh` here first (it puts "
            "deepspeed, pydantic, hjson, webdataset and the tests' tokenizer files in the ignored folder `.whl/`), "
            "then the device tool's `run` with "
            f"command `{RUN_COMMAND}`, carry `{json.dumps(RUN_CARRY)}`, timeout_s {RUN_TIMEOUT_S} (the check "
            "stops starting work after 270 s, so a rerun still fits in 15 device minutes); then here "
            "`.venv/bin/python bench/gpu_check.py --apply <files_at>/gpu_check.json` writes this section from "
            "the results that came back. On any CUDA machine with the project installed: "
            "`python bench/gpu_check.py`.")


def embedded(res: dict[str, Any]) -> str:
    """The figures bench/scaling_model.py calibrates its step-time model with, inside an HTML
    comment (invisible when rendered)."""
    keep = {"device": res["device"], "dry_run": res["dry_run"], "measured_tflops": res["measured_tflops"],
            "spec_tflops": res.get("spec_tflops"), "seq": res["plan"]["seq"], "bert": res["plan"]["bert"],
            "steps": [{k: r[k] for k in ("global_batch", "step_s", "model_flops", "samples_s")} for r in res["steps"]]}
    return f"<!-- gpu-check-results {json.dumps(keep, sort_keys=True)} -->"


def read_embedded(text: str) -> dict[str, Any] | None:
    m = re.search(r"<!-- gpu-check-results (\{.*?\}) -->", text)
    return json.loads(m.group(1)) if m else None


def title(res: dict[str, Any]) -> str:
    if res["dry_run"]:
        return "GPU check (dry run on CPU: plumbing only, not GPU figures)"
    return f"GPU check: BERT-base step, engines and gradient caching ({res['device']}, one GPU)"


def write_report(res: dict[str, Any], doc: Path, command: str, commit: str | None = None) -> None:
    when = res["date"]
    rev = res["commit"] if res["commit"] not in ("", "unknown") else (commit or "unknown")
    stamp = f"Measured {when} at commit {rev} on {res['machine']}."
    write_section_to(doc, SECTION, title(res), render(res), command, stamp=stamp)


def write_pending(doc: Path) -> None:
    """The section before any GPU has run the check: what it will measure and how to run it."""
    body = ("No GPU figures yet: no CUDA machine has run the check so far. `bench/gpu_check.py` measures, on "
            "one CUDA GPU, the trainer's step for BERT-base (random init from `BertConfig()`) at max_len 32 and "
            "global batch 64 / 256 / 1024 in bf16 (samples/s, MFU against the measured dense bf16 peak and the "
            "datasheet's, peak memory), plain vs ZeRO-2 vs ZeRO-3 at world size 1, gradient caching at global "
            "batch 1024 in chunks of 256 and 64, and runs the tests marked `gpu`. Goals on an H100/H200: MFU "
            f">= {GOAL_MFU:.0%} at global batch 1024; ZeRO-2 >= {GOAL_ZERO2}x plain throughput.\n\n"
            f"How FLOPs are counted: {flop_formula(bert_base(), 1024)}\n\n{how_to_run()}")
    stamp = f"Written {_dt.date.today().isoformat()} at commit {git_rev()}; not measured."
    write_section_to(doc, SECTION, "GPU check (not measured yet)", body, "python bench/gpu_check.py", stamp=stamp)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU plumbing check: tiny BERT, fp32, two steps")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for gpu_check.json, the section, logs (default runs/gpu_check)")
    p.add_argument("--doc", type=Path, default=None,
                   help="BENCHMARKS.md to write (default docs/BENCHMARKS.md; a dry run writes a copy in --out)")
    p.add_argument("--apply", type=Path, default=None, metavar="JSON",
                   help="write the section from a gpu_check.json that came back from a GPU machine")
    p.add_argument("--pending", action="store_true", help="write the not-yet-measured section")
    p.add_argument("--no-tests", action="store_true", help="skip the gpu-marked tests")
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration")
    p.add_argument("--budget-s", type=float, default=270.0,
                   help="seconds from start after which no new work starts (the tests get what is left)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = "python bench/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])

    if args.apply:
        try:
            res = json.loads(args.apply.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            print(f"{args.apply}: cannot read GPU check results ({exc}); pass the gpu_check.json that "
                  f"the GPU run wrote under its --out folder", file=sys.stderr)
            return 2
        res["goals"] = goals(res)
        if res.get("dry_run"):
            print(f"{args.apply}: results of a dry run; only a run on a CUDA device writes the GPU section",
                  file=sys.stderr)
            return 2
        write_report(res, args.doc or DOC, res.get("command", "python bench/gpu_check.py"), commit=git_rev())
        print(f"wrote the {SECTION} section of {args.doc or DOC} from {args.apply}")
        return 0
    if args.pending:
        write_pending(args.doc or DOC)
        return 0

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: the GPU check measures a GPU (use --dry-run to check its plumbing on CPU)",
              file=sys.stderr)
        return 2
    if args.dry_run:
        # Tiny tensors: a second intra-op thread only adds spin-waits, which on a shared 2-core
        # machine made each step 10-40x slower.
        torch.set_num_threads(1)
    out = (args.out or ROOT / "runs" / "gpu_check").resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        doc = args.doc or out / "BENCHMARKS.md"
        if doc.resolve() == DOC.resolve():
            print(f"--dry-run --doc {doc}: a dry run never writes the real BENCHMARKS.md; give a copy",
                  file=sys.stderr)
            return 2
        if args.doc is None and DOC.exists():
            shutil.copyfile(DOC, doc)
    else:
        doc = args.doc or DOC
    budget = Budget(args.budget_s)
    res = check(Plan.make(args.dry_run, args.steps), out, budget, run_tests=not args.no_tests)
    res["command"] = command
    res["total_s"] = time.monotonic() - _START
    tmp = out / (RESULTS + ".tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    tmp.replace(out / RESULTS)
    write_report(res, doc, command)
    (out / "gpu_section.md").write_text(render(res) + "\n", encoding="utf-8")
    if doc.resolve() != (out / "BENCHMARKS.md").resolve():
        shutil.copyfile(doc, out / "BENCHMARKS.md")
    print(summary(res, doc, out))
    failed = bool(res["errors"]) or bool(res.get("tests") and (res["tests"]["failed"] or res["tests"]["errors"]))
    return 1 if failed else 0


def summary(res: dict[str, Any], doc: Path, out: Path) -> str:
    g = res["goals"]
    lines = [f"GPU check {'(dry run) ' if res['dry_run'] else ''}on {res['device']} in {res['total_s']:.0f} s:"]
    for r in res["steps"]:
        lines.append(f"  batch {r['global_batch']:5d}: {r['samples_s']:9.1f} samples/s, {r['tflops']:.2f} TFLOP/s"
                     + (f", MFU {r['mfu']:.1%}" if "mfu" in r else ""))
    if g["mfu"]:
        lines.append(f"  goal MFU >= {GOAL_MFU:.0%} at {g['mfu']['batch']}: {g['mfu']['mfu']:.1%}"
                     + (f" ({'met' if g['mfu']['met'] else 'NOT met'})" if g["evaluated"] else ""))
    if g["zero2"]:
        lines.append(f"  goal ZeRO-2 >= {GOAL_ZERO2}x plain: {g['zero2']['ratio']:.3f}x"
                     + (f" ({'met' if g['zero2']['met'] else 'NOT met'})" if g["evaluated"] else ""))
    t = res.get("tests")
    if t:
        lines.append(f"  gpu tests: {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, "
                     f"{t['skipped']} skipped")
    lines += [f"  not measured: {s}" for s in res["skipped"] + res["errors"]]
    lines.append(f"  section written to {doc}; results in {out / RESULTS}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
