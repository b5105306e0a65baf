from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from trainer.config import Config, ConfigError, flatten, load_config, save_config, to_dict

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

BASE = {"data": {"sources": [{"kind": "text", "path": "data/x"}]}}


def write(tmp_path: Path, tree: dict) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


def test_precedence_defaults_then_yaml_then_cli(tmp_path: Path) -> None:
    p = write(tmp_path, {**BASE, "optim": {"lr": 1e-4}, "train": {"seed": 7}})
    cfg = load_config(p, ["optim.lr=3e-6", "data.global_batch_size=16"])
    assert cfg.optim.lr == pytest.approx(3e-6)  # CLI beats YAML
    assert cfg.train.seed == 7  # YAML beats default
    assert cfg.data.global_batch_size == 16  # CLI beats default
    assert cfg.loss.temperature == pytest.approx(0.05)  # default kept
    assert cfg.optim.weight_decay == 0.0


def test_yaml_scientific_notation_without_dot_is_a_number(tmp_path: Path) -> None:
    # PyYAML reads 3e-5 as a string; the config must still see a float.
    p = tmp_path / "c.yaml"
    p.write_text("data: {sources: [{kind: text, path: x}]}\noptim: {lr: 3e-5}\n")
    assert load_config(p).optim.lr == pytest.approx(3e-5)


def test_list_overrides_address_and_extend_sources(tmp_path: Path) -> None:
    p = write(tmp_path, BASE)
    cfg = load_config(p, ["data.sources.0.path=/new", "data.sources.1.kind=pairs",
                          "data.sources.1.path=/pairs", "eval.final_tasks=[stsb_dev]"])
    assert [s.path for s in cfg.data.sources] == ["/new", "/pairs"]
    assert cfg.data.sources[1].kind == "pairs"
    assert cfg.eval.final_tasks == ["stsb_dev"]


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("optim.lrr=1", "optim.lrr: unknown key (did you mean optim.lr?)"),
        ("nosuch.key=1", "nosuch: unknown key"),
        ("data.global_batch_size=many", "data.global_batch_size: expected an integer"),
        ("data.global_batch_size=0", "data.global_batch_size: must be > 0"),
        ("data.batch_size=64", "data.batch_size: replaced by data.global_batch_size"),
        ("train.grad_cache_chunk=16", "train.grad_cache_chunk: replaced by data.max_device_batch"),
        ("eval.dev_task=stsb", "eval.dev_task: unknown task 'stsb'"),
        ("eval.retrieval_every=true", "eval.retrieval_every: needs eval.retrieval_path"),
        ("optim.lr=-1", "optim.lr: must be a positive number"),
        ("train.precision=fp8", "train.precision: 'fp8' is not one of"),
        ("model.mlp_head=maybe", "model.mlp_head: expected true or false"),
        ("data.sources.0.weight=0", "data.sources.0.weight: must be > 0"),
        ("data.sources.5.path=x", "data.sources.5: index out of range"),
        ("distributed.zero_stage=4", "distributed.zero_stage: must be 0, 1, 2 or 3"),
        ("eval.dev_task=sts99", "eval.dev_task: unknown task 'sts99'"),
        ("data.schedule=ratio", "data.caption_ratio: must be in (0, 1]"),
        ("optim.betas=[0.9]", "optim.betas: must be two numbers"),
        ("batch_size", "overrides take the form key=value"),
    ],
)
def test_bad_values_fail_with_one_line_naming_the_key(tmp_path: Path, override: str, fragment: str) -> None:
    p = write(tmp_path, BASE)
    with pytest.raises(ConfigError) as err:
        load_config(p, [override])
    msg = str(err.value)
    assert fragment in msg
    assert "\n" not in msg


def test_unknown_key_in_yaml_names_file_and_key(tmp_path: Path) -> None:
    p = write(tmp_path, {**BASE, "train": {"max_step": 5}})
    with pytest.raises(ConfigError, match=r"c\.yaml: train\.max_step: unknown key \(did you mean train\.max_steps\?\)"):
        load_config(p)


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("data:\n  sources: [\n  batch_size: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml line \d+: invalid YAML"):
        load_config(p)


def test_missing_sources_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.sources: at least one source"):
        load_config(write(tmp_path, {}))


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE), ["optim.lr=2e-5", "loss.symmetric=true"])
    out = tmp_path / "resolved.yaml"
    save_config(cfg, out)
    again = load_config(out)
    assert to_dict(again) == to_dict(cfg)
    flat = flatten(cfg)
    assert flat["optim.lr"] == "2e-05"
    assert flat["data.sources.0.kind"] == "text"
    assert flat["loss.symmetric"] == "True"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_validates(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_paper_config_has_mcse_hyper_parameters() -> None:
    cfg = load_config(ROOT / "configs" / "mcse_bert_base_flickr.yaml")
    assert cfg.optim.lr == pytest.approx(3e-5) and cfg.optim.lr_scaling == "none"
    assert cfg.data.global_batch_size == 64
    assert cfg.data.caption_choice == "once" and cfg.model.mlp_head
    assert cfg.data.max_len == 32
    assert cfg.loss.temperature == cfg.loss.temperature_vl == pytest.approx(0.05)
    assert cfg.loss.lambda_mm == pytest.approx(0.01)
    assert cfg.model.proj_dim == 256
    assert cfg.model.pooler == "cls" and cfg.eval.pooler == "cls_before_pooler"
    assert cfg.eval.every_steps == 125
    assert cfg.optim.weight_decay == 0 and cfg.optim.warmup_steps == 0
    assert cfg.optim.grad_clip == pytest.approx(1.0)
    assert cfg.data.schedule == "mcse"


def test_accelerate_and_deepspeed_configs_parse() -> None:
    for p in (ROOT / "configs" / "accelerate").glob("*.yaml"):
        tree = yaml.safe_load(p.read_text())
        assert "distributed_type" in tree, p
    for p in (ROOT / "configs" / "deepspeed").glob("*.json"):
        tree = json.loads(p.read_text())
        assert "zero_optimization" in tree, p


@pytest.mark.parametrize("world", [1, 2, 4, 8, 64])
def test_paper_config_is_global_batch_64_at_any_world_size(world: int) -> None:
    """The same file means the same training on 1 or 64 GPUs: 64 sentences per step, split
    evenly, with the same steps per epoch and the same learning rate."""
    from trainer.config import batch_layout, effective_lr
    from trainer.data import Schedule, Source

    cfg = load_config(ROOT / "configs" / "mcse_bert_base_flickr.yaml")
    layout = batch_layout(cfg, world)
    assert (layout.global_batch, layout.device_batch, layout.chunks) == (64, 64 // world, 1)
    assert layout.device_batch * world == 64
    # Wiki1M (1,000,000 sentences) + Flickr30k (29,783 images): MCSE's schedule from the sizes.
    sources = [Source("wiki1m", "text", "w", 1.0, ["a.tar"], 1_000_000),
               Source("flickr30k", "pairs", "f", 1.0, ["b.tar"], 29_783)]
    sched = Schedule.build(sources, cfg.data, layout.global_batch, cfg.train.seed)
    assert sched.steps_per_epoch == 1_000_000 // 64 + 29_783 // 64 == 16_090
    assert sched.caption_every == (1_000_000 // 64) // (29_783 // 64) == 33
    assert effective_lr(cfg) == pytest.approx(3e-5)


@pytest.mark.parametrize(("global_batch", "limit", "world", "expected"), [
    (64, 0, 1, (64, 1, 64)),      # no limit: one pass
    (64, 16, 1, (64, 4, 16)),     # 4 chunks of 16
    (64, 16, 2, (32, 2, 16)),     # each rank: 32 = 2 x 16
    (64, 16, 4, (16, 1, 16)),     # fits: no caching
    (96, 40, 1, (96, 3, 32)),     # 96 / 40 -> 3 equal chunks of 32 (never uneven chunks)
    (1024, 48, 8, (128, 4, 32)),  # 128 per rank, at most 48 at once -> 4 x 32
])
def test_max_device_batch_sets_equal_gradient_caching_chunks(tmp_path: Path, global_batch: int, limit: int,
                                                             world: int, expected: tuple[int, int, int]) -> None:
    from trainer.config import batch_layout

    cfg = load_config(write(tmp_path, BASE), [f"data.global_batch_size={global_batch}",
                                              f"data.max_device_batch={limit}"])
    layout = batch_layout(cfg, world)
    assert (layout.device_batch, layout.chunks, layout.chunk_size) == expected
    assert layout.chunks * layout.chunk_size == layout.device_batch and layout.chunk_size <= (limit or global_batch)


def test_global_batch_not_divisible_by_world_size_is_refused(tmp_path: Path) -> None:
    from trainer.config import batch_layout

    cfg = load_config(write(tmp_path, BASE), ["data.global_batch_size=64"])
    with pytest.raises(ConfigError, match=r"^data.global_batch_size=64 cannot be split evenly over 3 processes .*use 63 or 66"):
        batch_layout(cfg, 3)


@pytest.mark.parametrize(("rule", "factor"), [("none", 1.0), ("linear", 4.0), ("sqrt", 2.0)])
def test_lr_scaling_rules(tmp_path: Path, rule: str, factor: float) -> None:
    from trainer.config import effective_lr

    cfg = load_config(write(tmp_path, BASE), ["optim.lr=1e-5", "data.global_batch_size=256",
                                              "optim.lr_base_batch=64", f"optim.lr_scaling={rule}"])
    assert effective_lr(cfg) == pytest.approx(1e-5 * factor)


def test_config_module_imports_nothing_of_the_trainer() -> None:
    """The config tree is the ground floor: importing it must not pull in other trainer modules
    (an import circle through evaluate.py once did)."""
    import subprocess
    import sys

    code = ("import sys; import trainer.config; "
            "print(sorted(m for m in sys.modules if m.startswith('trainer.') and m != 'trainer.config'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
