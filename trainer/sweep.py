"""Seed sweeps: the same experiment over several seeds (and arms), as mean ± std.

    python -m trainer.sweep --config configs/coco_mini.yaml --seeds 0,1,2 \\
        --arm mcse --arm simcse:loss.lambda_mm=0 [key=value ...]

One training run per (arm, seed), each through the normal entry point (``accelerate launch
trainer/run.py``), so a sweep measures exactly what users run. An MLflow parent run holds one
child run per (arm, seed) (the UI nests them) and, at the end, the mean and standard deviation
of every final metric per arm plus the table as its description and artifact. A sweep whose
runs already finished (results.json present) skips them, so a killed sweep continues where it
stopped. A single seed proves little on small data: the table reports the spread so a
difference can be judged against it.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LAUNCHER = "accelerate launch"


@dataclass
class Arm:
    name: str
    overrides: list[str]


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets: `a=1,b=[x,y]` -> ['a=1', 'b=[x,y]']."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p for p in [*parts, cur] if p]


def parse_arm(text: str) -> Arm:
    """`name` or `name:key=value,key=value` (a list value keeps its commas: `k=[a,b]`)."""
    name, _, rest = text.partition(":")
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"--arm {text!r}: expected NAME or NAME:key=value,... (NAME: letters, digits, - and _)")
    return Arm(name, _split_top_level(rest))


def collect(results: dict[str, Any]) -> dict[str, float]:
    """The final figures of one run, flat: STS tasks, held-out retrieval, alignment/uniformity,
    and the selection metric at the best checkpoint."""
    out: dict[str, float] = {}
    for task, r in (results.get("final") or {}).items():
        out[task] = float(r["spearman"])
    for k, v in (results.get("retrieval") or {}).items():
        if "@" in k:
            out[k] = float(v)
    au = results.get("alignment_uniformity") or {}
    for k in ("alignment", "uniformity"):
        if k in au:
            out[k] = float(au[k])
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def summarise(per_run: dict[str, dict[int, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """arm -> metric -> {mean, std, n} over the seeds that report the metric."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for arm, seeds in per_run.items():
        metrics = dict.fromkeys(m for figures in seeds.values() for m in figures)
        out[arm] = {}
        for metric in metrics:
            values = [figures[metric] for figures in seeds.values() if metric in figures]
            m, s = mean_std(values)
            out[arm][metric] = {"mean": m, "std": s, "n": len(values)}
    return out


def table(summary: dict[str, dict[str, dict[str, float]]], seeds: list[int], note: str = "") -> str:
    arms = list(summary)
    metrics = list(dict.fromkeys(m for arm in arms for m in summary[arm]))
    lines = [f"Mean ± std over seeds {', '.join(map(str, seeds))}." + (f" {note}" if note else ""), "",
             "| metric | " + " | ".join(arms) + " |", "| --- |" + " ---: |" * len(arms),
             "| seeds run | " + " | ".join(str(max((s["n"] for s in summary[a].values()), default=0))
                                         for a in arms) + " |"]
    for metric in metrics:
        cells = []
        for arm in arms:
            s = summary[arm].get(metric)
            cells.append(f"{s['mean']:.2f} ± {s['std']:.2f}" if s else "")
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _parent_run(cfg: Any, name: str, folder: Path) -> tuple[Any, str | None]:
    """An MLflow parent run for the sweep (reused when the sweep continues); None without MLflow."""
    if cfg.tracking.backend != "mlflow":
        return None, None
    import mlflow

    if cfg.tracking.uri:
        mlflow.set_tracking_uri(cfg.tracking.uri)
    id_file = folder / "parent_run_id"
    client = mlflow.MlflowClient()
    if id_file.is_file():
        return client, id_file.read_text().strip()
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment)
    run = client.create_run(exp_id, run_name=name, tags={"webmcse.sweep": name})
    id_file.write_text(run.info.run_id + "\n")
    return client, run.info.run_id


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--seeds", default="0,1,2", help="comma list of train.seed values")
    p.add_argument("--arm", action="append", default=[],
                   help="NAME[:key=value,...]: one arm of the comparison (repeatable; default one arm 'run')")
    p.add_argument("--name", default="", help="sweep name (default: the config's file name)")
    p.add_argument("--launcher", default=DEFAULT_LAUNCHER,
                   help=f"command that starts trainer/run.py (default: {DEFAULT_LAUNCHER!r})")
    p.add_argument("--note", default="", help="a sentence printed under the table (settings, data)")
    p.add_argument("--report-only", action="store_true",
                   help="launch nothing: the table from the runs that have finished (the rest are listed)")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = p.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        arms = [parse_arm(a) for a in args.arm] or [Arm("run", [])]
        if len({a.name for a in arms}) != len(arms):
            raise ConfigError("--arm: two arms share a name")
        for arm in arms:  # every arm's config must load before anything runs
            cfg = load_config(args.config, [*args.overrides, *arm.overrides])
    except (ConfigError, ValueError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    name = args.name or Path(args.config).stem
    folder = Path(cfg.train.output_dir) / "sweeps" / name
    folder.mkdir(parents=True, exist_ok=True)
    client, parent = _parent_run(cfg, name, folder) if not args.report_only else (None, None)

    per_run: dict[str, dict[int, dict[str, float]]] = {a.name: {} for a in arms}
    t0 = time.perf_counter()
    for arm in arms:
        for seed in seeds:
            run_name = f"{name}-{arm.name}-s{seed}"
            run_dir = Path(cfg.train.output_dir) / run_name
            results = run_dir / "results.json"
            if args.report_only and not results.is_file():
                print(f"sweep {name}: {arm.name} seed {seed} has not finished ({run_dir}); left out", flush=True)
                continue
            if not results.is_file():
                cmd = [*shlex.split(args.launcher), str(ROOT / "trainer" / "run.py"), "--config", args.config,
                       *args.overrides, *arm.overrides, f"train.seed={seed}", f"train.run_name={run_name}"]
                if parent:
                    cmd.append(f"tracking.parent_run_id={parent}")
                print(f"sweep {name}: {arm.name} seed {seed} ({time.perf_counter() - t0:.0f} s) -> {run_dir}",
                      flush=True)
                with open(folder / f"{run_name}.log", "w", encoding="utf-8") as log:
                    code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
                if code != 0 or not results.is_file():
                    print(f"error: run {run_name} failed (exit {code}); its log: {folder / (run_name + '.log')}",
                          file=sys.stderr)
                    return 1
            per_run[arm.name][seed] = collect(json.loads(results.read_text(encoding="utf-8")))
    per_run = {arm: runs for arm, runs in per_run.items() if runs}
    if not per_run:
        print(f"error: sweep {name} has no finished run", file=sys.stderr)
        return 1
    summary = summarise(per_run)
    text = table(summary, seeds, args.note)
    (folder / "sweep.json").write_text(json.dumps({"seeds": seeds, "arms": {a.name: a.overrides for a in arms},
                                                   "overrides": args.overrides, "runs": per_run,
                                                   "summary": summary}, indent=1) + "\n", encoding="utf-8")
    (folder / "sweep.md").write_text(text, encoding="utf-8")
    if client is not None and parent:
        for arm, metrics in summary.items():
            for metric, s in metrics.items():
                key = f"{arm}/{metric}".replace("@", "_at_")
                client.log_metric(parent, f"{key}_mean", s["mean"])
                client.log_metric(parent, f"{key}_std", s["std"])
        client.set_tag(parent, "mlflow.note.content", text)
        client.log_artifact(parent, str(folder / "sweep.md"))
        client.set_terminated(parent, "FINISHED")
    print(text)
    done = sum(len(runs) for runs in per_run.values())
    print(f"sweep {name}: {done} of {len(arms) * len(seeds)} runs finished, table in {folder / 'sweep.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
