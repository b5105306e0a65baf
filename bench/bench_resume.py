"""What a failure costs: steps lost, checkpoint save and load time, restart overhead.

Runs the real trainer through tests/harness.py (one process per rank): an uninterrupted run,
then the same run killed with SIGKILL at a step between two checkpoints and resumed.

    python bench/bench_resume.py [--model gt:all-MiniLM-L6-v2] [--world 1] [--steps 40] [--every 10] [--kill 27]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import write_section  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="gt:all-MiniLM-L6-v2")
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--kill", type=int, default=27)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    import yaml

    from data_tools.commands import embed, shard_pairs, shard_text

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        shard_pairs([ROOT / "sample/coco_cc"], tmp / "pairs", max_count=16, progress=False)
        embed(tmp / "pairs", "efficientnet_lite0", progress=False)
        shard_text([ROOT / "sample/wiki1m/wiki1m_first5000.txt"], tmp / "text", max_count=500, progress=False)
        cfg = {
            "data": {"sources": [{"name": "wiki", "kind": "text", "path": str(tmp / "text")},
                                 {"name": "coco", "kind": "pairs", "path": str(tmp / "pairs")}],
                     "caption_every": 4, "global_batch_size": 16, "num_workers": 1},
            "model": {"name_or_path": args.model, "pooler": "mean"},
            "train": {"max_steps": args.steps, "checkpoint_every": args.every, "log_every": 10,
                      "output_dir": str(tmp / "runs"), "save_best": False, "save_final": False},
            "eval": {"sts_dir": str(ROOT / "sample/senteval"), "every_steps": 0, "at_start": False,
                     "final_tasks": []},
            "tracking": {"backend": "none"},
        }
        (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        base = ["--config", str(tmp / "cfg.yaml")]
        jobs = [{"name": "whole", "args": [*base, "train.run_name=whole"], "world": args.world},
                {"name": "killed", "args": [*base, "train.run_name=cut"], "world": args.world,
                 "faults": [{"kind": "kill_after_step", "rank": args.world - 1, "step": args.kill}]},
                {"name": "resumed", "args": [*base, "train.run_name=cut"], "world": args.world}]
        (tmp / "spec.json").write_text(json.dumps({"jobs": jobs, "logs": str(tmp / "logs")}))
        subprocess.run([sys.executable, str(ROOT / "tests/harness.py"), str(tmp / "spec.json"), str(tmp / "out.json")],
                       check=True)
        res = {r["name"]: r for r in json.loads((tmp / "out.json").read_text())}
        log_whole = (tmp / "logs" / "whole.rank0.log").read_text()
        log_resumed = (tmp / "logs" / "resumed.rank0.log").read_text()
        saves = [float(x) for x in re.findall(r"committed in ([0-9.]+) s", log_whole)]
        found = re.search(r"resumed from .*verified in ([0-9.]+) s, loaded in ([0-9.]+) s", log_resumed)
        verify, load = float(found.group(1)), float(found.group(2))
        ckpts = sorted((tmp / "runs" / "whole" / "checkpoints").iterdir())
        size = sum(f.stat().st_size for f in ckpts[-1].rglob("*") if f.is_file())
        assert res["whole"]["ok"] and res["resumed"]["ok"] and not res["killed"]["ok"]
    lost = args.kill - (args.kill // args.every) * args.every
    body = (f"Model `{args.model}`, world size {args.world} on CPU, {args.steps} steps, checkpoint every "
            f"{args.every} steps, SIGKILL after step {args.kill}.\n\n"
            f"| figure | value |\n| --- | ---: |\n"
            f"| steps lost (kill step - last committed checkpoint; at most checkpoint_every - 1) | {lost} |\n"
            f"| checkpoint size (model + optimizer + schedule + RNG + data position) | {size / 2**20:.0f} MiB |\n"
            f"| checkpoint save, median (write + sha256 + commit) | {sorted(saves)[len(saves) // 2]:.2f} s |\n"
            f"| resume: verify every file's sha256 | {verify:.2f} s |\n"
            f"| resume: load model, optimizer, schedule, RNG, data position | {load:.2f} s |\n"
            f"| uninterrupted job, wall time | {res['whole']['seconds']:.1f} s |\n"
            f"| killed job until the kill | {res['killed']['seconds']:.1f} s |\n"
            f"| resumed job, wall time (start-up + {args.steps - (args.kill // args.every) * args.every} steps) | "
            f"{res['resumed']['seconds']:.1f} s |\n\n"
            f"The resumed run ends with weights bit-identical to the uninterrupted one "
            f"(tests/test_reliability.py).")
    print(body)
    if not args.no_write:
        write_section(f"resume-w{args.world}", f"Failure cost: steps lost and resume time (world size {args.world})",
                      body, "python bench/bench_resume.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
