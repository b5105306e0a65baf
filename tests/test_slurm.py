"""`sbatch launch/slurm.sh` on a real Slurm cluster started by the test (two slurmd "nodes" on
this host): a normal job, and a multi-node preemption drill that checkpoints, requeues itself,
resumes and ends with the same weights and the same consumed samples as the normal job."""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from .conftest import ROOT, SAMPLE, make_tiny_bert
from .slurm_cluster import Cluster, available

pytestmark = [pytest.mark.slow, pytest.mark.skipif(available() is not None, reason=str(available()))]
STEPS = 160


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    c = Cluster(tmp_path_factory.mktemp("slurm"), nodes=2)
    c.start()
    yield c
    c.stop()


def heartbeat_step(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / ".heartbeat" / "rank0.json").read_text())["step"] or 0)
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def keys(run_dir: Path) -> collections.Counter:
    last: dict[tuple[str, int], list[str]] = {}
    for path in (run_dir / "sample_keys").glob("rank*.jsonl"):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            last[(path.stem, rec["step"])] = rec["keys"]
    return collections.Counter(k for ks in last.values() for k in ks)


def test_sbatch_preemption_drill_matches_an_uninterrupted_job(cluster: Cluster, tmp_path: Path,
                                                              sample_datasets: dict[str, Path]) -> None:
    tiny = make_tiny_bert(tmp_path / "tiny", hidden=16)
    runs = tmp_path / "runs"
    cfg = {
        "data": {"sources": [{"name": "wiki", "kind": "text", "path": str(sample_datasets["text"])},
                             {"name": "coco", "kind": "pairs", "path": str(sample_datasets["pairs"])}],
                 "caption_every": 3, "global_batch_size": 16, "num_workers": 1, "max_len": 24},
        "model": {"name_or_path": str(tiny), "pooler": "mean", "proj_dim": 16},
        "optim": {"lr": 5e-4},
        "train": {"max_steps": STEPS, "log_every": 20, "output_dir": str(runs), "checkpoint_every": 1000,
                  "deterministic": True, "record_keys": True, "stop_check_every": 1},
        "eval": {"sts_dir": str(SAMPLE / "senteval"), "every_steps": 0, "at_start": False, "pooler": "mean",
                 "final_tasks": ["stsb_dev"], "align_uniform": False},
        "tracking": {"backend": "none"},
        "distributed": {"heartbeat_timeout_s": 600},
    }
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(cfg))

    def submit(name: str, nodes: int, procs: int) -> str:
        out = cluster.run("sbatch", "--parsable", f"--nodes={nodes}", "--gpus-per-node=0", "--cpus-per-task=1",
                          f"--output={tmp_path}/slurm-%j.out", f"--export=ALL,WEBMCSE_PROCS_PER_NODE={procs}",
                          "launch/slurm.sh", str(config), f"train.run_name={name}", cwd=ROOT)
        return out.stdout.strip().split(";")[0]

    def why(job: str, name: str) -> str:
        return cluster.diagnose(job, tmp_path / f"slurm-{job}.out", runs / name / "slurm")

    plain = submit("plain", nodes=1, procs=2)  # one node, two ranks, never interrupted
    drill = submit("drill", nodes=2, procs=1)  # two nodes, one rank each, preempted mid-run
    deadline = time.time() + 300
    while heartbeat_step(runs / "drill") < 30:
        assert time.time() < deadline, cluster.job(drill)
        time.sleep(0.3)
    cluster.run("scancel", "--signal=USR1", "--batch", drill)  # what Slurm sends before a time limit

    states: dict[str, dict[str, str]] = {}
    released = False
    deadline = time.time() + 900
    while True:
        states = {j: cluster.job(j) for j in (plain, drill)}
        if all(s.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") for s in states.values()):
            break
        d = states[drill]
        if d.get("JobState") == "PENDING" and d.get("Restarts") == "1" and not released:
            # Slurm holds a requeued job back for ~20 min; release it early, but not within the second
            # of the requeue: slurmd refuses a launch credential no newer than the one it revoked
            # ("Job credential revoked") and the job would end FAILED without restarting.
            cluster.run("scontrol", "update", f"JobId={drill}", "StartTime=now+2", check=False)
            released = True
        assert time.time() < deadline, why(drill, "drill")
        time.sleep(1)

    log = (tmp_path / f"slurm-{drill}.out").read_text()
    assert states[plain]["JobState"] == "COMPLETED" and states[plain]["Restarts"] == "0", why(plain, "plain")
    assert states[drill]["JobState"] == "COMPLETED" and states[drill]["Restarts"] == "1", why(drill, "drill")
    assert "received USR1" in log and "requeueing job" in log and "restart 1:" in log
    preempted_at = int(log.split('checkpoint committed ({"step": ')[1].split(",")[0])
    assert 30 <= preempted_at < STEPS
    # With a c10d rendezvous global rank 0 may start on either node: read both nodes' logs.
    node_log = "".join(p.read_text() for p in sorted((runs / "drill" / "slurm" / f"{drill}.1").glob("node*.log")))
    assert f"resumed from {runs / 'drill' / 'checkpoints' / f'step_{preempted_at:08d}'}" in node_log
    assert "2 node(s) x 1 process(es)" in log

    a = load_file(str(runs / "plain" / "final" / "model.safetensors"))
    b = load_file(str(runs / "drill" / "final" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert keys(runs / "plain") == keys(runs / "drill")
    assert not (runs / "plain" / "PREEMPTED").exists()
