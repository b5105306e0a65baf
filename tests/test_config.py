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
    cfg = load_config(p, ["optim.lr=3e-6", "data.batch_size=16"])
    assert cfg.optim.lr == pytest.approx(3e-6)  # CLI beats YAML
    assert cfg.train.seed == 7  # YAML beats default
    assert cfg.data.batch_size == 16  # CLI beats default
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
        ("data.batch_size=many", "data.batch_size: expected an integer"),
        ("data.batch_size=0", "data.batch_size: must be > 0"),
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
    assert cfg.optim.lr == pytest.approx(3e-5)
    assert cfg.data.batch_size == 64
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
