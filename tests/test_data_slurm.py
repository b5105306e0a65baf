"""`sbatch launch/data_slurm.sh` on a real local Slurm cluster: a 4-task job array (one part
each) and the dependent merge job it submits build a dataset equal to a single-machine run
on the same input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_tools.check import verify
from data_tools.commands import shard_pairs
from data_tools.shards import load_manifest

from .conftest import ROOT
from .slurm_cluster import Cluster, available, wait_until_idle
from .test_data_parts import STS, content, web_table

pytestmark = [pytest.mark.slow, pytest.mark.skipif(available() is not None, reason=str(available()))]


def test_job_array_and_merge_job_equal_one_machine(tmp_path: Path) -> None:
    table = web_table(tmp_path)
    single = tmp_path / "single"
    shard_pairs([table], single, max_count=5, eval_sts=STS, progress=False)
    cluster = Cluster(tmp_path / "slurm", nodes=1)
    cluster.start()
    try:
        out = tmp_path / "out"
        logs = tmp_path / "logs"
        logs.mkdir()
        job = cluster.run("sbatch", "--parsable", "--array=0-3", "--cpus-per-task=1",
                          f"--output={logs}/data-%A_%a.out", "launch/data_slurm.sh", str(table), "--out", str(out),
                          "--shard-size", "5", "--eval-sts", str(STS), cwd=ROOT).stdout.strip().split(";")[0]
        left = wait_until_idle(cluster, 300)
        task_logs = {p.name: p.read_text() for p in sorted(logs.glob("data-*.out"))}
        assert not left, (left, task_logs)
    finally:
        cluster.stop()
    assert sorted(task_logs) == [f"data-{job}_{i}.out" for i in range(4)]
    assert all(f"task {i} of 4" in task_logs[f"data-{job}_{i}.out"] for i in range(4))
    assert f"runs after array job {job}" in task_logs[f"data-{job}_0.out"]
    merge_logs = list(logs.glob("webmcse-data-merge-*.out"))
    assert len(merge_logs) == 1 and "merged 4 part(s)" in merge_logs[0].read_text(), task_logs
    ms, mm = load_manifest(single), load_manifest(out)
    assert content(out) == content(single)
    assert mm["counts"] == ms["counts"] and mm["drop_examples"] == ms["drop_examples"]
    assert mm["merged_from_parts"] == 4 and not (out / "parts").exists()
    assert json.loads((out / "sizes.json").read_text()) == {s["name"]: s["n_samples"] for s in mm["shards"]}
    assert verify(out, decode=True).ok
