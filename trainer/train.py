"""The training loop: data schedule -> MCSE loss -> optimizer step -> eval/export -> tracking.

Kept as one readable loop. Everything a step needs is built once in :func:`train`; the loop
body only moves a batch, computes the loss with gathered negatives, steps, and on cadence
logs, evaluates and exports.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from trainer import dist
from trainer.checkpoint import export_model
from trainer.config import Config, flatten, save_config
from trainer.data import BatchStreams, DataError, Schedule, open_source
from trainer.engine import (
    build_model,
    build_optimizer,
    build_scheduler,
    eval_copy,
    unsharded_construction,
    zero_stage,
)
from trainer.evaluate import evaluate_tasks, load_task, make_encoder, results_markdown
from trainer.model import MCSEModel, resolve_name
from trainer.step import train_step
from trainer.tracking import make_tracker, run_tags

log = logging.getLogger("webmcse.train")


@dataclass
class TrainState:
    """Everything about progress that is not a tensor."""

    step: int = 0
    samples_seen: int = 0
    caption_steps: int = 0
    best_metric: float = -math.inf
    best_step: int = -1
    before_metric: float | None = None
    after_metric: float | None = None


def setup_logging(is_main: bool) -> None:
    """Rank 0 logs INFO; other ranks only warnings, prefixed with their rank."""
    rank = dist.rank()
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if is_main else \
        f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format=fmt,
                        datefmt="%H:%M:%S", force=True)
    import transformers

    if is_main:
        transformers.logging.set_verbosity_warning()
    else:
        transformers.logging.set_verbosity_error()


def default_run_name(cfg: Config, world: int) -> str:
    model = Path(cfg.model.name_or_path.rstrip("/")).name.replace(":", "-") or "model"
    kinds = "+".join(sorted({s.kind for s in cfg.data.sources}))
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{model}-{kinds}-b{cfg.data.batch_size * world}-lr{cfg.optim.lr:g}-{stamp}"


class _Averager:
    """Means of step metrics between two log points."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1

    def pop(self) -> dict[str, float]:
        out = {k: self.sums[k] / self.counts[k] for k in self.sums}
        self.sums, self.counts = {}, {}
        return out


def train(cfg: Config, accelerator: Any) -> dict[str, Any]:
    """Run one training job; returns the results summary (also written to the run folder)."""
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer

    is_main = accelerator.is_main_process
    setup_logging(is_main)
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(cfg.train.seed)

    # ---- data: manifests are read and checked before any model is loaded
    sources = [open_source(s, i) for i, s in enumerate(cfg.data.sources)]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise DataError(f"data.sources: two sources share the name {max(names, key=names.count)!r}; "
                        f"give each a distinct data.sources.N.name")
    dims = {s.image_dim for s in sources if s.kind == "pairs"}
    if len(dims) > 1:
        raise DataError(f"data.sources: pairs sources have different image feature sizes "
                        f"{sorted(dims)}; embed them with the same encoder")
    image_dim = cfg.model.image_dim or (dims.pop() if dims else 0)
    if dims and cfg.model.image_dim and cfg.model.image_dim not in dims:
        raise DataError(f"model.image_dim={cfg.model.image_dim} but the pairs manifests say "
                        f"{sorted(dims)}")
    global_batch = cfg.data.batch_size * world
    schedule = Schedule.build(sources, cfg.data, global_batch, cfg.train.seed)
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * schedule.steps_per_epoch))
    for task in {cfg.eval.dev_task, *cfg.eval.final_tasks}:
        load_task(cfg.eval.sts_dir, task)  # missing eval data fails now, not after hours

    # ---- run folder and tracking (rank 0 decides the name; every rank uses it)
    run_name = cfg.train.run_name or default_run_name(cfg, world)
    run_name = dist.broadcast_object(run_name)
    run_dir = Path(cfg.train.output_dir) / run_name
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    tracker = make_tracker(cfg.tracking, run_name, is_main)
    tracker.log_params(flatten(cfg))
    tracker.set_tags(run_tags(world, {s.name: s.manifest_sha256 for s in sources}))
    tracker.log_artifact(run_dir / "config.yaml")

    # ---- model and optimizer
    tokenizer = AutoTokenizer.from_pretrained(resolve_name(cfg.model.name_or_path))
    model = build_model(cfg, image_dim)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    dist.setup_long_waits(cfg.distributed.eval_wait_timeout_s)
    streams = BatchStreams(sources, tokenizer, cfg.data, seed=cfg.train.seed, rank=rank, world=world,
                           image_dim=image_dim)

    every = (f"one every {schedule.caption_every} steps" if cfg.data.schedule == "mcse"
             else f"{cfg.data.caption_ratio:.0%} of steps")
    log.info("run %s: %d steps (%d per epoch), global batch %d on %d process(es), caption batches: "
             "%s; sources: %s", run_name, total_steps, schedule.steps_per_epoch,
             global_batch, world, every, ", ".join(f"{s.name} ({s.kind}, {s.n_samples})" for s in sources))

    state = TrainState()
    evaluator = _Evaluator(cfg, accelerator, tokenizer, tracker, run_dir, image_dim)
    if cfg.eval.at_start:
        state.before_metric = evaluator.dev(model, state, 0, consider_best=False)

    avg = _Averager()
    bar = tqdm(total=total_steps, desc="train", unit=" step", disable=not is_main, dynamic_ncols=True)
    t_log = time.perf_counter()
    wait_acc = 0.0
    model.train()
    for step in range(total_steps):
        t0 = time.perf_counter()
        source = schedule.source_at(step)
        batch = streams.next(source.name)
        keys = batch.pop("keys")
        batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
        wait_acc += time.perf_counter() - t0

        result = train_step(model, optimizer, scheduler, batch, cfg, accelerator)

        state.step = step + 1
        state.samples_seen += len(keys) * world
        state.caption_steps += int(source.kind == "pairs")
        step_metrics = dict(result.losses)
        if result.grad_norm is not None:
            step_metrics["grad_norm"] = result.grad_norm
        avg.add(step_metrics)
        bar.update(1)

        if state.step % cfg.train.log_every == 0 or state.step == total_steps:
            elapsed = time.perf_counter() - t_log
            metrics = avg.pop()
            n_steps = state.step % cfg.train.log_every or cfg.train.log_every
            metrics.update({
                "lr": scheduler.get_last_lr()[0],
                **_temperature_metrics(accelerator, model),
                "samples_per_s": n_steps * global_batch / max(elapsed, 1e-9),
                "data_wait_frac": wait_acc / max(elapsed, 1e-9),
                "skipped_samples": streams.skipped,
                "caption_steps": state.caption_steps,
                "epoch": state.step / schedule.steps_per_epoch,
            })
            tracker.log_metrics({f"train/{k}": v for k, v in metrics.items()}, state.step)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
            t_log, wait_acc = time.perf_counter(), 0.0

        if cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0 and state.step < total_steps:
            evaluator.dev(model, state, state.step)
    bar.close()

    state.after_metric = evaluator.dev(model, state, state.step)
    if cfg.train.save_final:
        evaluator.export(model, run_dir / "final", state, state.after_metric)
    summary = evaluator.final(state, total_steps)
    dist.wait_for_main("the final evaluation")
    tracker.finish("FINISHED")
    if is_main:
        print("\n" + summary["table"])
        print(tracker.describe())
    return summary


def _temperature_metrics(accelerator: Any, model: Any) -> dict[str, float]:
    unwrapped = accelerator.unwrap_model(model)
    if unwrapped.log_inv_tau is None or zero_stage(accelerator) == 3:
        return {}
    with torch.no_grad():
        tau = unwrapped.temperatures()
    return {"temperature": float(tau[0]), "temperature_vl": float(tau[1])}


class _Evaluator:
    """Dev evaluation on rank 0, best-model export, and the end-of-run report.

    Every rank calls :meth:`dev` and :meth:`export` (under ZeRO-3 the weights must be gathered
    collectively first); rank 0 then works alone while the others wait on the long-wait group,
    which cannot trip the collective timeout however long the evaluation takes.
    """

    def __init__(self, cfg: Config, accelerator: Any, tokenizer: Any, tracker: Any, run_dir: Path,
                 image_dim: int) -> None:
        self.cfg = cfg
        self.acc = accelerator
        self.tok = tokenizer
        self.tracker = tracker
        self.run_dir = run_dir
        self.image_dim = image_dim
        self.history: list[dict[str, Any]] = []

    def _encoder(self, model: Any, desc: str) -> Any:
        e = self.cfg.eval
        return make_encoder(model, self.tok, e.pooler, batch_size=e.batch_size, max_len=e.max_len,
                            device=self.acc.device, progress=True, desc=desc)

    def dev(self, model: Any, state: TrainState, step: int, consider_best: bool = True) -> float | None:
        """Evaluate the dev task on rank 0 (and export it if it is the best so far)."""
        score = None
        solo = eval_copy(self.acc, model, self.cfg, self.image_dim)
        if solo is not None:
            task = self.cfg.eval.dev_task
            t0 = time.perf_counter()
            encoder = self._encoder(solo, f"eval {task} @ {step}")
            res = evaluate_tasks(encoder, self.cfg.eval.sts_dir, [task])
            score = res[task]["spearman"]
            self.history.append({"step": step, task: score})
            self.tracker.log_metrics({f"eval/{task}": score, "eval/seconds": time.perf_counter() - t0}, step)
            log.info("step %d: %s Spearman x100 = %.2f", step, task, score)
            if consider_best and score > state.best_metric:
                state.best_metric, state.best_step = score, step
                if self.cfg.train.save_best:
                    self._export(solo, self.run_dir / "best", state, score)
        dist.wait_for_main("the evaluation")
        return score

    def export(self, model: Any, folder: Path, state: TrainState, score: float | None) -> None:
        solo = eval_copy(self.acc, model, self.cfg, self.image_dim)
        if solo is not None:
            self._export(solo, folder, state, score)
        dist.wait_for_main(f"the export to {folder}")

    def _export(self, solo: Any, folder: Path, state: TrainState, score: float | None) -> None:
        info = {"step": state.step, "dev_task": self.cfg.eval.dev_task, "dev_spearman": score,
                "eval_pooler": self.cfg.eval.pooler}
        export_model(solo, self.tok, folder, info)
    def final(self, state: TrainState, total_steps: int) -> dict[str, Any]:
        """Evaluate the best model on the final tasks; write and log results."""
        summary: dict[str, Any] = {"state": asdict(state), "history": self.history, "table": ""}
        if not self.acc.is_main_process:
            return summary
        task = self.cfg.eval.dev_task
        lines = [f"| {task} (Spearman x100) | step | value |", "| --- | ---: | ---: |"]
        if state.before_metric is not None:
            lines.append(f"| before training | 0 | {state.before_metric:.2f} |")
        if state.after_metric is not None:
            lines.append(f"| after training | {total_steps} | {state.after_metric:.2f} |")
        if state.best_step >= 0:
            lines.append(f"| best checkpoint | {state.best_step} | {state.best_metric:.2f} |")
        table = "\n".join(lines) + "\n"
        best_dir = self.run_dir / "best"
        if self.cfg.eval.final_tasks and best_dir.is_dir():
            with unsharded_construction(self.acc):
                best = MCSEModel.load(best_dir).to(self.acc.device)
            res = evaluate_tasks(self._encoder(best, "final eval"), self.cfg.eval.sts_dir,
                                 self.cfg.eval.final_tasks)
            summary["final"] = res
            table += "\n" + results_markdown(res, f"best checkpoint (step {state.best_step}), "
                                                  f"pooler {self.cfg.eval.pooler}")
            self.tracker.log_metrics({f"final/{t}": r["spearman"] for t, r in res.items()}, total_steps)
        summary["table"] = table
        record = {k: v for k, v in summary.items() if k != "table"}
        (self.run_dir / "results.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        (self.run_dir / "results.md").write_text(table, encoding="utf-8")
        self.tracker.log_artifact(self.run_dir / "results.json")
        self.tracker.log_artifact(self.run_dir / "results.md")
        return summary
