"""The training loop: schedule -> batch -> step -> log / evaluate / checkpoint -> report.

Everything a step needs is built once in :func:`train`; the loop body moves a batch, runs
:func:`trainer.step.train_step`, and on cadence logs metrics, evaluates the dev task on rank 0,
writes a checkpoint, and checks (together with every other rank) whether it was asked to stop.
A run resumes from its newest valid checkpoint: model, optimizer, schedule, RNG, data position,
progress and MLflow run all continue where they were.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from trainer import dist
from trainer.checkpoint import (
    CheckpointError,
    committed_checkpoints,
    export_model,
    load_checkpoint,
    load_data_states,
    save_checkpoint,
    set_rng_state,
    verify,
)
from trainer.config import Config, SourceConfig, batch_layout, effective_lr, flatten, save_config, to_dict
from trainer.control import PREEMPTED_FILE, STOP_FILE, StopRequest, Watchdog
from trainer.data import BatchStreams, DataError, Schedule, check_layouts, open_source
from trainer.engine import (
    build_model,
    build_optimizer,
    build_scheduler,
    check_tower_chunking,
    eval_copy,
    load_image_tower,
    unsharded_construction,
    zero_stage,
)
from trainer.evaluate import (
    alignment_uniformity,
    evaluate_tasks,
    load_task,
    make_encoder,
    results_markdown,
    retrieval,
)
from trainer.model import MCSEModel, ModelLoadError, resolve_name
from trainer.step import train_step
from trainer.tracking import make_tracker, run_tags, write_plots

log = logging.getLogger("webmcse.train")


@dataclass
class TrainState:
    """Everything about progress that is not a tensor (saved in every checkpoint)."""

    step: int = 0
    samples_seen: int = 0
    caption_steps: int = 0
    skipped_steps: int = 0
    best_metric: float = -math.inf
    best_step: int = -1
    before_metric: float | None = None
    after_metric: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    loss_curve: list[list[float]] = field(default_factory=list)
    mlflow_run_id: str | None = None
    resumed_from: list[int] = field(default_factory=list)


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


def default_run_name(cfg: Config) -> str:
    model = Path(cfg.model.name_or_path.rstrip("/")).name.replace(":", "-") or "model"
    kinds = "+".join(sorted({s.kind for s in cfg.data.sources}))
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{model}-{kinds}-b{cfg.data.global_batch_size}-lr{effective_lr(cfg):g}-{stamp}"


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch on the training device without waiting for it: a copy from pageable host
    memory first drains the device's queue (the previous step's kernels); from page-locked
    memory a non_blocking copy is queued behind them instead."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: (v if v.is_pinned() else v.pin_memory()).to(device, non_blocking=True) for k, v in batch.items()}


def dropout_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one rank's dropout masks at one step (64-bit, well mixed)."""
    digest = hashlib.blake2b(f"dropout:{seed}:{rank}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class _Averager:
    """Means of step metrics between two log points. Device scalars are summed where they are
    (an asynchronous add) and read back once, at the log point: reading one per step would
    stall the host on the device every step."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1

    def pop(self) -> dict[str, float]:
        out = {k: float(self.sums[k]) / self.counts[k] for k in self.sums}
        self.sums, self.counts = {}, {}
        return out


def _choose_checkpoint(cfg: Config, run_dir: Path) -> Path | None:
    """The checkpoint to resume from (rank 0 decides; damaged ones are skipped, loudly)."""
    mode = cfg.train.resume
    if mode not in ("auto", "never"):
        path = Path(mode)
        verify(path)  # an explicitly named checkpoint must be valid
        return path
    found = committed_checkpoints(run_dir)
    if mode == "never":
        if found:
            raise CheckpointError(f"{run_dir}: holds checkpoints ({found[0].name} ...) and "
                                  f"train.resume=never; pass train.resume=auto to continue the run or "
                                  f"choose another train.run_name")
        return None
    for ckpt in found:
        try:
            verify(ckpt)
            return ckpt
        except CheckpointError as exc:
            log.error("cannot resume from %s: %s; trying the previous checkpoint", ckpt.name, exc)
    if found:
        raise CheckpointError(f"{run_dir / 'checkpoints'}: every checkpoint is damaged "
                              f"({', '.join(p.name for p in found)}); see the errors above")
    return None


def train(cfg: Config, accelerator: Any) -> dict[str, Any]:
    """Run (or resume) one training job; returns the results summary."""
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer

    is_main = accelerator.is_main_process
    setup_logging(is_main)
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    # ---- data: manifests are read and checked before any model is loaded
    sources = [open_source(s, i) for i, s in enumerate(cfg.data.sources)]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise DataError(f"data.sources: two sources share the name {max(names, key=names.count)!r}; "
                        f"give each a distinct data.sources.N.name")
    layout = batch_layout(cfg, world)
    tower = load_image_tower(cfg)
    check_tower_chunking(cfg, tower, layout)
    image_dim = _image_dim(cfg, sources, tower)
    global_batch = layout.global_batch
    schedule = Schedule.build(sources, cfg.data, global_batch, cfg.train.seed)
    check_layouts(sources, cfg.data, world, cfg.train.seed)
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * schedule.steps_per_epoch))
    for task in {cfg.eval.dev_task, *cfg.eval.final_tasks} - {""}:
        load_task(cfg.eval.sts_dir, task)  # missing eval data fails now, not after hours
    if cfg.eval.retrieval_path:
        open_source(SourceConfig(path=cfg.eval.retrieval_path, kind="pairs", name="retrieval"), 0)

    # ---- run folder; rank 0 decides the name and the checkpoint, every rank uses them
    run_name = dist.broadcast_object(cfg.train.run_name or default_run_name(cfg))
    run_dir = Path(cfg.train.output_dir) / run_name
    ckpt_choice: Any = None
    t_verify = time.perf_counter()
    if is_main:
        try:
            ckpt_choice = _choose_checkpoint(cfg, run_dir)
        except CheckpointError as exc:
            ckpt_choice = exc
    ckpt_choice = dist.broadcast_object(str(ckpt_choice) if isinstance(ckpt_choice, Path) else
                                        (f"!{ckpt_choice}" if ckpt_choice is not None else None))
    if isinstance(ckpt_choice, str) and ckpt_choice.startswith("!"):
        raise CheckpointError(ckpt_choice[1:])
    ckpt = Path(ckpt_choice) if ckpt_choice else None
    t_verify = time.perf_counter() - t_verify
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_config(cfg, run_dir, resumed=ckpt is not None)
        for marker in (STOP_FILE, PREEMPTED_FILE):
            (run_dir / marker).unlink(missing_ok=True)

    # ---- model, optimizer, schedule
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_name(cfg.model.name_or_path))
    except OSError as exc:  # a hub name that is not cached offline, a folder without a tokenizer
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"model.name_or_path={cfg.model.name_or_path}: cannot load its tokenizer "
                             f"({first})") from None
    model = build_model(cfg, image_dim, tower=tower)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    dist.setup_long_waits(cfg.distributed.eval_wait_timeout_s)

    state, data_state, rng_state = TrainState(), {}, None
    if ckpt is not None:
        t0 = time.perf_counter()
        saved, data_state, rng_state = load_checkpoint(ckpt, accelerator, model, optimizer, scheduler)
        state = TrainState(**{k: v for k, v in saved.items() if k in TrainState.__dataclass_fields__})
        state.resumed_from.append(state.step)
        log.info("resumed from %s (step %d): verified in %.2f s, loaded in %.2f s", ckpt, state.step, t_verify,
                 time.perf_counter() - t0)

    tracker = make_tracker(cfg.tracking, run_name, is_main, run_dir=run_dir, run_id=state.mlflow_run_id)
    state.mlflow_run_id = tracker.run_id
    derived = {**layout.params(), "layout.steps_per_epoch": str(schedule.steps_per_epoch),
               "layout.total_steps": str(total_steps), "optim.effective_lr": f"{effective_lr(cfg):g}"}
    if ckpt is None:
        tracker.log_params({**flatten(cfg), **derived})
        tracker.set_tags(run_tags(world, {s.name: s.manifest_sha256 for s in sources}))
        if cfg.tracking.parent_run_id:
            tracker.set_tags({"mlflow.parentRunId": cfg.tracking.parent_run_id})
        tracker.log_artifact(run_dir / "config.yaml")
    else:
        tracker.set_tags({"webmcse.resumed_at_step": str(state.step)})

    streams = BatchStreams(sources, tokenizer, cfg.data, seed=cfg.train.seed, rank=rank, world=world,
                           image_dim=image_dim, image_transform=tower.preprocess if tower else None,
                           state=data_state, all_states=load_data_states(ckpt) if ckpt is not None else None)
    if rng_state is not None:
        # Restored after the DataLoaders started: creating them draws from the global RNG.
        set_rng_state(rng_state)

    log.info("run %s: steps %d..%d (%d per epoch), %s, lr %g (scaling %s); %s; sources: %s", run_name,
             state.step, total_steps, schedule.steps_per_epoch, layout.describe(), effective_lr(cfg),
             cfg.optim.lr_scaling, schedule.describe(), ", ".join(f"{s.name} ({s.kind}, {s.n_samples})"
                                                               for s in sources))

    watchdog = Watchdog(run_dir, rank, world, cfg.distributed.heartbeat_timeout_s)
    watchdog.start()
    stop = StopRequest(run_dir, cfg.train.stop_check_every)
    evaluator = _Evaluator(cfg, accelerator, tokenizer, tracker, run_dir, image_dim, watchdog)
    if cfg.eval.at_start and ckpt is None:
        state.before_metric = evaluator.dev(model, state, 0, consider_best=False)

    def checkpoint() -> None:
        if keys_log is not None:
            keys_log.flush()
        watchdog.waiting(True)
        save_checkpoint(run_dir, state.step, accelerator, model, optimizer, scheduler, asdict(state),
                        streams.state(), cfg.train.keep_checkpoints,
                        barrier=lambda: dist.wait_for_main("the checkpoint"))
        watchdog.waiting(False)

    keys_log = _KeyLog(run_dir, rank) if cfg.train.record_keys else None
    console = _MetricsLog(run_dir) if is_main else None
    avg = _Averager()
    bar = tqdm(total=total_steps, initial=state.step, desc="train", unit=" step", disable=not is_main,
               dynamic_ncols=True)
    # A logging window's samples/s and data-wait fraction cover training only: evaluation and
    # checkpoints between its steps are paused out of it (they are timed on their own).
    # Unwrapped once, here: the first unwrap imports DeepSpeed (~4 s on 2 cores), which inside
    # the loop would land in the first logging window's time.
    unwrapped = accelerator.unwrap_model(model)
    t_log = time.perf_counter()
    wait_acc, pause_acc, steps_since_log = 0.0, 0.0, 0
    model.train()
    preempted = False
    try:
        while state.step < total_steps:
            t0 = time.perf_counter()
            source = schedule.source_at(state.step)
            batch = streams.next(source.name)
            keys = batch.pop("keys")
            batch = _to_device(batch, accelerator.device)
            wait_acc += time.perf_counter() - t0

            # Dropout masks come from a stream of their own per (seed, rank, step): ranks never
            # share masks, and a resumed run — at any world size — draws exactly what the
            # uninterrupted run drew at that step, with no RNG state to carry.
            torch.manual_seed(dropout_seed(cfg.train.seed, rank, state.step))
            result = train_step(model, optimizer, scheduler, batch, cfg, accelerator, state.step)

            state.step += 1
            watchdog.beat(state.step)  # before any logging collective, so a stall is attributable
            if keys_log is not None:
                keys_log.add(state.step, source.name, keys, streams.last_epoch[source.name])
            state.samples_seen += len(keys) * world
            state.caption_steps += int(source.kind == "pairs")
            state.skipped_steps += int(result.skipped)
            steps_since_log += 1
            step_metrics = dict(result.terms)
            if result.grad_norm_t is not None:
                step_metrics["grad_norm"] = result.grad_norm_t
            avg.add(step_metrics)
            bar.update(1)

            if state.step % cfg.train.log_every == 0 or state.step == total_steps:
                elapsed = time.perf_counter() - t_log - pause_acc
                metrics = avg.pop()
                metrics.update({
                    "lr": scheduler.get_last_lr()[0],
                    **_temperature_metrics(accelerator, unwrapped),
                    "samples_per_s": steps_since_log * global_batch / max(elapsed, 1e-9),
                    "data_wait_frac": wait_acc / max(elapsed, 1e-9),
                    "skipped_samples": dist.all_reduce_sum(streams.skipped),
                    "skipped_steps": state.skipped_steps,
                    "caption_steps": state.caption_steps,
                    "epoch": state.step / schedule.steps_per_epoch,
                })
                tracker.log_metrics({f"train/{k}": v for k, v in metrics.items()}, state.step)
                if is_main:
                    console.log(state.step, total_steps, metrics)
                state.loss_curve.append([state.step, metrics.get("loss", float("nan")),
                                         metrics.get("loss_mm", float("nan"))])
                bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}", refresh=False)
                t_log, wait_acc, pause_acc, steps_since_log = time.perf_counter(), 0.0, 0.0, 0

            t_pause = time.perf_counter()
            if cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0 and state.step < total_steps:
                evaluator.dev(model, state, state.step)
            # The last step is checkpointed too: the finished run can be exported from it with
            # its optimizer state, or continued with a larger train.max_steps.
            if cfg.train.checkpoint_every and (state.step % cfg.train.checkpoint_every == 0
                                               or state.step == total_steps):
                checkpoint()
            pause_acc += time.perf_counter() - t_pause
            if state.step < total_steps and stop.agreed(state.step, accelerator.device):
                log.warning("stop requested (%s): checkpointing at step %d and exiting", stop.reason, state.step)
                checkpoint()
                preempted = True
                break
    finally:
        bar.close()
        watchdog.close()
        if keys_log is not None:
            keys_log.close()
        if console is not None:
            console.close()

    if preempted:
        if is_main:
            (run_dir / PREEMPTED_FILE).write_text(json.dumps({"step": state.step, "reason": stop.reason}) + "\n")
        tracker.set_tags({"webmcse.preempted_at_step": str(state.step)})
        tracker.flush()
        return {"state": asdict(state), "preempted": True, "table": ""}

    state.after_metric = evaluator.dev(model, state, state.step)
    if cfg.train.save_final or not evaluator.best_dir_exists():
        # Without a best-on-dev export (no selection metric, or save_best off) the final
        # weights are the run's model, so they are exported whatever save_final says.
        evaluator.export(model, run_dir / "final", state, state.after_metric)
    summary = evaluator.final(state, total_steps)
    dist.wait_for_main("the final evaluation")
    tracker.finish("FINISHED")
    if is_main:
        print("\n" + summary["table"])
        print(tracker.describe())
    return summary


class _MetricsLog:
    """One line per log step on the console and in run_dir/metrics.jsonl, whatever the tracking
    backend: the run folder alone tells how training went."""

    ORDER = ("loss", "loss_simcse", "loss_mm", "view_cos", "grad_norm", "lr", "samples_per_s", "data_wait_frac")

    def __init__(self, run_dir: Path) -> None:
        self.fh = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 - kept open

    def log(self, step: int, total: int, metrics: dict[str, float]) -> None:
        self.fh.write(json.dumps({"step": step, **metrics}) + "\n")
        self.fh.flush()
        shown = [f"{k} {metrics[k]:.4g}" for k in self.ORDER if k in metrics]
        log.info("step %d/%d: %s", step, total, ", ".join(shown))

    def close(self) -> None:
        self.fh.close()


class _KeyLog:
    """Per-rank JSON lines {step, source, epoch, keys}: which samples every step consumed, and
    from which data epoch of the source."""

    def __init__(self, run_dir: Path, rank: int) -> None:
        folder = run_dir / "sample_keys"
        folder.mkdir(parents=True, exist_ok=True)
        self.fh = open(folder / f"rank{rank}.jsonl", "a", encoding="utf-8")  # noqa: SIM115 - kept open

    def add(self, step: int, source: str, keys: list[str], epoch: int) -> None:
        self.fh.write(json.dumps({"step": step, "source": source, "epoch": epoch, "keys": keys}) + "\n")

    def flush(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        self.flush()
        self.fh.close()


def _image_dim(cfg: Config, sources: list[Any], tower: Any) -> int:
    pairs = [s for s in sources if s.kind == "pairs"]
    if tower is not None:
        return int(tower.dim)
    missing = [s for s in pairs if not s.image_dim]
    if missing:
        raise DataError(f"source {missing[0].name} ({missing[0].path}): pairs without image features; run "
                        f"`webmcse-data embed {missing[0].path}` or set model.image_tower")
    dims = {s.image_dim for s in pairs}
    if len(dims) > 1:
        raise DataError(f"data.sources: pairs sources have different image feature sizes "
                        f"{sorted(dims)}; embed them with the same encoder")
    if dims and cfg.model.image_dim and cfg.model.image_dim not in dims:
        raise DataError(f"model.image_dim={cfg.model.image_dim} but the pairs manifests say {sorted(dims)}")
    return cfg.model.image_dim or (dims.pop() if dims else 0)


def _write_config(cfg: Config, run_dir: Path, resumed: bool) -> None:
    """The resolved config of the run; a resume with different settings keeps the original
    and writes its own next to it."""
    path = run_dir / "config.yaml"
    if not resumed or not path.is_file():
        save_config(cfg, path)
        return
    import yaml

    original = yaml.safe_load(path.read_text(encoding="utf-8"))
    if original != to_dict(cfg):
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        other = run_dir / f"config.resume-{stamp}.yaml"
        save_config(cfg, other)
        log.warning("resuming with a config that differs from %s; this invocation's is %s", path, other)


def _metric_key(name: str) -> str:
    return name.split(" (")[0].replace(" ", "_").replace("@", "_at_")


def _temperature_metrics(accelerator: Any, unwrapped: Any) -> dict[str, float]:
    if unwrapped.log_inv_tau is None or zero_stage(accelerator) == 3:
        return {}
    with torch.no_grad():
        tau = unwrapped.temperatures()
    return {"temperature": float(tau[0]), "temperature_vl": float(tau[1])}


class _Evaluator:
    """Evaluation during training on rank 0, best-model export, and the end-of-run report.

    What is evaluated is configurable and all of it optional: an STS dev task (raw [CLS] under
    MCSE's protocol), held-out image<->text retrieval through the grounding heads, both, or
    nothing. The selection metric (``eval.select_by``, default the dev task) picks the best
    checkpoint. Every rank calls :meth:`dev` and :meth:`export` (under ZeRO-3 the weights must be
    gathered collectively first); rank 0 then works alone while the others wait on the
    long-wait group, which cannot trip the collective timeout however long evaluation takes.
    """

    def __init__(self, cfg: Config, accelerator: Any, tokenizer: Any, tracker: Any, run_dir: Path,
                 image_dim: int, watchdog: Watchdog) -> None:
        self.cfg = cfg
        self.acc = accelerator
        self.tok = tokenizer
        self.tracker = tracker
        self.run_dir = run_dir
        self.image_dim = image_dim
        self.watchdog = watchdog
        e = cfg.eval
        self.retrieval_every = bool(e.retrieval_every and e.retrieval_path and image_dim)
        self.select = e.select_by or e.dev_task
        self.active = bool(e.dev_task) or self.retrieval_every
        self.tower = load_image_tower(cfg) if e.retrieval_path and cfg.model.image_tower else None

    def best_dir_exists(self) -> bool:
        return bool(dist.broadcast_object((self.run_dir / "best").is_dir() if self.acc.is_main_process else None))

    def _encoder(self, model: Any, desc: str) -> Any:
        e = self.cfg.eval
        return make_encoder(model, self.tok, e.pooler, batch_size=e.batch_size, max_len=e.max_len,
                            device=self.acc.device, progress=True, desc=desc,
                            on_batch=lambda: self.watchdog.beat())

    def _retrieval(self, model: Any) -> dict[str, float]:
        e = self.cfg.eval
        return retrieval(model, self.tok, e.retrieval_path, batch_size=e.batch_size, device=self.acc.device,
                         max_images=e.retrieval_max_images,
                         image_transform=self.tower.preprocess if self.tower else None)

    def _solo(self, model: Any) -> Any:
        """The model rank 0 works on alone; the other ranks are marked as waiting."""
        solo = eval_copy(self.acc, model, self.cfg, self.image_dim)
        if solo is None:
            self.watchdog.waiting(True)
        return solo

    def _done(self, what: str) -> None:
        dist.wait_for_main(what)
        self.watchdog.waiting(False)

    def dev(self, model: Any, state: TrainState, step: int, consider_best: bool = True) -> float | None:
        """Evaluate on rank 0; export the model if its selection metric is the best so far.
        Returns the selection metric (None when nothing is evaluated)."""
        if not self.active:
            return None
        score = None
        solo = self._solo(model)
        if solo is not None:
            t0 = time.perf_counter()
            entry: dict[str, Any] = {"step": step}
            task = self.cfg.eval.dev_task
            if task:
                res = evaluate_tasks(self._encoder(solo, f"eval {task} @ {step}"), self.cfg.eval.sts_dir, [task])
                entry[task] = res[task]["spearman"]
            if self.retrieval_every:
                rt = self._retrieval(solo)
                entry.update({k: v for k, v in rt.items() if "@" in k})
            state.history.append(entry)
            score = entry.get(self.select)
            self.tracker.log_metrics({**{f"eval/{_metric_key(k)}": v for k, v in entry.items() if k != "step"},
                                      "eval/seconds": time.perf_counter() - t0}, step)
            log.info("step %d: %s", step, ", ".join(f"{k} {v:.2f}" for k, v in entry.items() if k != "step"))
            if consider_best and score is not None and score > state.best_metric:
                state.best_metric, state.best_step = score, step
                if self.cfg.train.save_best:
                    self._export(solo, self.run_dir / "best", state, score)
        self._done("the evaluation")
        # Every rank keeps the same progress record (it is part of every rank's checkpoint).
        synced = dist.broadcast_object([state.best_metric, state.best_step, state.history])
        state.best_metric, state.best_step, state.history = synced
        return dist.broadcast_object(score)

    def export(self, model: Any, folder: Path, state: TrainState, score: float | None) -> None:
        solo = self._solo(model)
        if solo is not None:
            self._export(solo, folder, state, score)
        self._done(f"the export to {folder}")

    def _export(self, solo: Any, folder: Path, state: TrainState, score: float | None) -> None:
        info = {"step": state.step, "select_metric": self.select or None, "select_value": score,
                "eval_pooler": self.cfg.eval.pooler}
        export_model(solo, self.tok, folder, info)

    def _progress_table(self, state: TrainState, total_steps: int) -> str:
        """Before / after / best for every metric evaluated during training."""
        by_step = {h["step"]: h for h in state.history}
        cols: list[tuple[str, dict[str, Any]]] = []
        if 0 in by_step and state.before_metric is not None:
            cols.append(("before training (step 0)", by_step[0]))
        if total_steps in by_step:
            cols.append((f"after training (step {total_steps})", by_step[total_steps]))
        if self.cfg.train.save_best and state.best_step >= 0 and state.best_step in by_step:
            cols.append((f"best checkpoint (step {state.best_step})", by_step[state.best_step]))
        names = [k for k in dict.fromkeys(k for h in state.history for k in h) if k != "step"]
        if not cols or not names:
            return ""
        lines = ["| metric | " + " | ".join(c for c, _ in cols) + " |",
                 "| --- |" + " ---: |" * len(cols)]
        for name in names:
            label = _metric_label(name, self.cfg)
            lines.append(f"| {label} | " + " | ".join(f"{h[name]:.2f}" if name in h else "" for _, h in cols) + " |")
        return "\n".join(lines) + "\n"

    def _extra_metrics(self, model: Any, summary: dict[str, Any], step: int) -> str:
        """Alignment/uniformity and held-out retrieval of the exported model, as a markdown table."""
        e = self.cfg.eval
        rows = []
        if e.align_uniform and (Path(e.sts_dir) / "STSBenchmark" / "sts-dev.csv").is_file():
            au = alignment_uniformity(self._encoder(model, "alignment/uniformity"), e.sts_dir)
            summary["alignment_uniformity"] = au
            rows += [("alignment", "alignment (STS-B dev, gold >= 4; lower is better)", au["alignment"]),
                     ("uniformity", "uniformity (STS-B dev; lower is better)", au["uniformity"])]
        if e.retrieval_path and model.image_head is not None:
            rt = self._retrieval(model)
            summary["retrieval"] = rt
            chance = {k: 100.0 * min(1.0, int(k.split("@")[1]) / rt["images"]) for k in rt if "@" in k}
            summary["retrieval_chance"] = chance
            rows += [(f"retrieval_{k}", f"held-out retrieval {k} ({rt['images']} images; chance {chance[k]:.1f})", v)
                     for k, v in rt.items() if "@" in k]
        if not rows:
            return ""
        self.tracker.log_metrics({f"final/{_metric_key(key)}": v for key, _, v in rows}, step)
        return "\n| metric | value |\n| --- | ---: |\n" + "".join(f"| {n} | {v:.3f} |\n" for _, n, v in rows)

    def final(self, state: TrainState, total_steps: int) -> dict[str, Any]:
        """Evaluate the exported model (best checkpoint, else the last step's) on the final
        tasks; write and log the results."""
        summary: dict[str, Any] = {"state": asdict(state), "history": state.history, "table": ""}
        if not self.acc.is_main_process:
            self.watchdog.waiting(True)
            return summary
        best_dir, final_dir = self.run_dir / "best", self.run_dir / "final"
        model_dir = best_dir if best_dir.is_dir() else final_dir if final_dir.is_dir() else None
        if model_dir is best_dir:
            which = f"best checkpoint (step {state.best_step}, by {_metric_label(self.select, self.cfg)})"
        else:
            reason = "no evaluation during training" if not self.active else \
                "train.save_best=false" if not self.cfg.train.save_best else "no best checkpoint"
            which = f"last step ({total_steps}; {reason})"
        summary["exported"] = {"folder": str(model_dir) if model_dir else None, "which": which}
        table = self._progress_table(state, total_steps)
        if model_dir is not None:
            table += f"\nExported model: {model_dir} = {which}.\n"
        e = self.cfg.eval
        if model_dir is not None and (e.final_tasks or e.align_uniform or e.retrieval_path):
            with unsharded_construction(self.acc):
                exported = MCSEModel.load(model_dir).to(self.acc.device)
            if e.final_tasks:
                res = evaluate_tasks(self._encoder(exported, "final eval"), e.sts_dir, e.final_tasks)
                summary["final"] = res
                table += "\n" + results_markdown(res, f"{which}, pooler {e.pooler}")
                self.tracker.log_metrics({f"final/{t}": r["spearman"] for t, r in res.items()}, total_steps)
            table += self._extra_metrics(exported, summary, total_steps)
        summary["table"] = table
        record = {k: v for k, v in summary.items() if k != "table"}
        (self.run_dir / "results.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        (self.run_dir / "results.md").write_text(table, encoding="utf-8")
        self.tracker.log_artifact(self.run_dir / "results.json")
        self.tracker.log_artifact(self.run_dir / "results.md")
        for png in write_plots(self.run_dir, state, summary.get("final")):
            self.tracker.log_artifact(png, "plots")
        if table.strip():
            self.tracker.set_description(table)
        if self.cfg.tracking.log_model and model_dir is not None:
            # The final metrics were logged at total_steps: the logged model carries them.
            self.tracker.log_model(model_dir, e.pooler, step=total_steps, link_metrics=("final/",))
        return summary


def _metric_label(name: str, cfg: Config) -> str:
    if "@" in name:
        return f"held-out {name.replace('_', ' ')}"
    return f"{name} Spearman x100 ({cfg.eval.pooler})"
