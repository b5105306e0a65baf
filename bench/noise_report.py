"""Tables and a plot from the coco_mini sweep (bench/coco_mini_experiments.sh sweep): MCSE vs
SimCSE-only vs the shuffled-image control, and held-out retrieval / STS-B dev against the
fraction of corrupted captions, without and with each defence, plus the offline scorer's
detection precision and recall against the noise lab's ground truth.

    .venv/bin/python bench/noise_report.py [--sweep runs/sweeps/coco_mini] [--data data/coco_mini]

Prints markdown (pasted into docs/RESULTS.md) and writes docs/noise_curve.png, which is also
logged to the sweep's MLflow parent run.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SEEDS = 3  # seeds per arm in the sweep; a cell over fewer says so
NOISE_ARMS = {0.0: "mcse", 0.2: "noise20", 0.4: "noise40", 0.6: "noise60"}
DEFENCES = {"robust": {0.0: "robust0", 0.4: "robust40"}, "scored": {0.0: "scored0", 0.4: "scored40"},
            # not a defence: the ground-truth filter (bench/oracle_filter.py), what any filter could reach
            "oracle filter (bound)": {0.4: "oracle40"}}


def cell(summary: dict[str, Any], arm: str, metric: str) -> str:
    s = summary.get(arm, {}).get(metric)
    if not s:
        return "—"
    return f"{s['mean']:.2f} ± {s['std']:.2f}" + ("" if s.get("n", SEEDS) == SEEDS else f" (n={s['n']})")


def stat(summary: dict[str, Any], arm: str, metric: str) -> tuple[float, float]:
    s = summary.get(arm, {}).get(metric)
    return (s["mean"], s["std"]) if s else (math.nan, math.nan)


def comparison_table(summary: dict[str, Any], images: int) -> str:
    metrics = ["stsb_dev", "stsb_test", "sickr_test", "sts12", "sts13", "sts14", "sts15", "sts16",
               "t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10"]
    lines = ["| metric | MCSE | SimCSE only (λ = 0) | MCSE, images shuffled (control) | chance |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for m in metrics:
        chance = f"{100 * int(m.split('@')[1]) / images:.1f}" if "@" in m else ""
        lines.append(f"| {m} | {cell(summary, 'mcse', m)} | {cell(summary, 'simcse', m)} | "
                     f"{cell(summary, 'shuffled', m)} | {chance} |")
    sts7 = ["sts12", "sts13", "sts14", "sts15", "sts16", "stsb_test", "sickr_test"]
    for arm_label, arm in (("MCSE", "mcse"), ("SimCSE only", "simcse"), ("shuffled", "shuffled")):
        vals = [summary.get(arm, {}).get(t, {}).get("mean") for t in sts7]
        if all(v is not None for v in vals):
            lines.append(f"| STS avg (7), {arm_label} | {sum(vals) / 7:.2f} | | | |")
    return "\n".join(lines) + "\n"


def noise_table(summary: dict[str, Any]) -> str:
    metrics = ["t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@10", "stsb_dev"]
    lines = ["| p (captions corrupted) | defence | " + " | ".join(metrics) + " |",
             "| ---: | --- |" + " ---: |" * len(metrics)]
    rows = [(p, "none", arm) for p, arm in NOISE_ARMS.items()]
    rows += [(p, name, arm) for name, arms in DEFENCES.items() for p, arm in arms.items()]
    for p, defence, arm in sorted(rows, key=lambda r: (r[0], r[1] != "none", r[1])):
        if arm not in summary:
            continue
        lines.append(f"| {p:.1f} | {defence} | " + " | ".join(cell(summary, arm, m) for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def recovery(summary: dict[str, Any]) -> str:
    clean, _ = stat(summary, "mcse", "t2i_R@10")
    noisy, _ = stat(summary, "noise40", "t2i_R@10")
    stds = [stat(summary, a, "t2i_R@10")[1] for a in ("mcse", "noise40")]
    lost = clean - noisy
    out = [f"Undefended t2i R@10 lost between p = 0 and p = 0.4: {lost:.2f} points; largest seed std of the "
           f"two: {max(stds):.2f} (gap / std = {lost / max(max(stds), 1e-9):.1f})."]
    for name, arms in DEFENCES.items():
        d40, _ = stat(summary, arms[0.4], "t2i_R@10")
        d0, _ = stat(summary, arms.get(0.0, ""), "t2i_R@10")
        s0, _ = stat(summary, arms.get(0.0, ""), "stsb_dev")
        c0, _ = stat(summary, "mcse", "stsb_dev")
        if not math.isnan(d40):
            at0 = "" if math.isnan(d0) else (f"; at p = 0 it changes R@10 by {d0 - clean:+.2f} and STS-B dev "
                                             f"by {s0 - c0:+.2f}")
            out.append(f"- {name}: recovers {100 * (d40 - noisy) / lost:.0f}% of the lost R@10 at p = 0.4{at0}.")
    return "\n".join(out) + "\n"


def detection_table(data: Path) -> str:
    """Detection of the noise lab's corrupted captions by the offline scorer, against the ground
    truth. A cross-fitted scoring (two halves, each scored by the run on the other) is reported
    as one: its halves' counts are added. Per kind, precision is that kind's flagged captions
    over themselves plus every clean caption flagged (the other kinds left out)."""
    lines = ["| scored dataset | noise kind | captions of that kind | flagged | precision | recall |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    candidates = []
    for name in ("scored_noisy_p04", "scored_train"):
        single = data / name / "manifest.json"
        if single.is_file():
            scorer = json.loads(single.read_text())["score_filter"]
            candidates.append((f"{name} (one run on all photos, scoring its own training captions, "
                               f"{scorer.get('score', 'cosine')})", [single]))
        halves = [data / f"{name}_f{f}" / "manifest.json" for f in (0, 1)]
        if all(h.is_file() for h in halves):
            scorer = json.loads(halves[0].read_text())["score_filter"]
            candidates.append((f"{name}_f0 + _f1 (cross-fitted halves, {scorer.get('score', 'cosine')})", halves))
    for label, paths in candidates:
        totals: dict[str, list[float]] = {}
        for path in paths:
            for kind, d in json.loads(path.read_text())["score_filter"]["detection"].items():
                t = totals.setdefault(kind, [0.0, 0.0, 0.0])  # true positives, noisy, flagged
                t[0] += d["recall"] * d["noisy"]
                t[1] += d["noisy"]
                t[2] += d["flagged"]
        for kind, (tp, noisy, flagged) in totals.items():
            lines.append(f"| {label} | {kind} | {noisy:.0f} | {flagged:.0f} | {tp / max(flagged, 1):.3f} | "
                         f"{tp / max(noisy, 1):.3f} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric, label in ((axes[0], "t2i_R@10", "held-out text→image R@10 (%)"),
                              (axes[1], "stsb_dev", "STS-B dev, raw [CLS] (Spearman x100)")):
        ps = [p for p, a in NOISE_ARMS.items() if a in summary]
        ms = [stat(summary, NOISE_ARMS[p], metric) for p in ps]
        ax.errorbar(ps, [m for m, _ in ms], yerr=[s for _, s in ms], marker="o", capsize=3, label="no defence")
        for (name, arms), mk in zip(DEFENCES.items(), ("s", "^", "*"), strict=True):
            pts = [(p, *stat(summary, a, metric)) for p, a in arms.items() if a in summary]
            if pts:
                ax.errorbar([p + 0.01 for p, _, _ in pts], [m for _, m, _ in pts], yerr=[s for _, _, s in pts],
                            marker=mk, linestyle="none", capsize=3, label=name)
        ax.set_xlabel("fraction of training captions corrupted (p)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", default=str(ROOT / "runs" / "sweeps" / "coco_mini"))
    ap.add_argument("--data", default=str(ROOT / "data" / "coco_mini"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "noise_curve.png"))
    ap.add_argument("--images", type=int, default=100, help="held-out photos (for chance levels)")
    args = ap.parse_args()
    folder = Path(args.sweep)
    summary = json.loads((folder / "sweep.json").read_text())["summary"]
    print("## MCSE vs SimCSE vs the shuffled-image control\n")
    print(comparison_table(summary, args.images))
    print("## Noise\n")
    print(noise_table(summary))
    print(recovery(summary))
    print("## Detection (offline scorer)\n")
    print(detection_table(Path(args.data)))
    plot(summary, Path(args.plot))
    parent = folder / "parent_run_id"
    if parent.is_file():
        import mlflow

        mlflow.MlflowClient().log_artifact(parent.read_text().strip(), args.plot, "plots")
    print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
