"""MLflow tracking a team can rely on: a real `mlflow server` on 127.0.0.1 that the tests
start, kill and restart; spooling and replay; resuming into the same run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT, SAMPLE, make_tiny_bert

pytestmark = pytest.mark.slow


class Server:
    """`mlflow server` with a sqlite backend and proxied artifacts, on loopback."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        mlflow = Path(sys.executable).parent / "mlflow"
        self.proc = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
             "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            cwd=self.folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            assert time.time() < deadline, "mlflow server did not start"
            time.sleep(0.5)

    def kill(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
            self.proc = None

    def steps(self, run_id: str, key: str) -> list[int]:
        url = f"{self.uri}/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key={key}&max_results=10000"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return sorted(m["step"] for m in json.loads(resp.read()).get("metrics", []))

    def runs(self, experiment: str) -> list[dict]:
        try:
            with urllib.request.urlopen(
                    f"{self.uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name={experiment}",
                    timeout=5) as resp:
                exp_id = json.loads(resp.read())["experiment"]["experiment_id"]
        except urllib.error.HTTPError as exc:
            if exc.code == 404:  # not created yet
                return []
            raise
        body = json.dumps({"experiment_ids": [exp_id]}).encode()
        req = urllib.request.Request(f"{self.uri}/api/2.0/mlflow/runs/search", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read()).get("runs", [])


@pytest.fixture()
def server(tmp_path: Path):
    s = Server(tmp_path)
    s.start()
    yield s
    s.kill()


def config(tmp_path: Path, tiny: Path, datasets: dict[str, Path], **train) -> Path:
    cfg = {
        "data": {"sources": [{"name": "wiki", "kind": "text", "path": str(datasets["text"])},
                             {"name": "coco", "kind": "pairs", "path": str(datasets["pairs"])}],
                 "caption_every": 4, "global_batch_size": 8, "num_workers": 1, "max_len": 24},
        "model": {"name_or_path": str(tiny), "pooler": "mean", "proj_dim": 16},
        "optim": {"lr": 5e-4},
        "train": {"log_every": 1, "output_dir": str(tmp_path / "runs"), **train},
        "eval": {"sts_dir": str(SAMPLE / "senteval"), "every_steps": 0, "at_start": False, "pooler": "mean",
                 "final_tasks": ["stsb_dev"]},
        "tracking": {"experiment": "outage"},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_server_outage_mid_run_loses_no_metric(tmp_path: Path, server: Server, sample_datasets) -> None:
    tiny = make_tiny_bert(tmp_path / "tiny", hidden=16)
    steps = 120
    cfg = config(tmp_path, tiny, sample_datasets, max_steps=steps, run_name="outage")
    proc = subprocess.Popen([sys.executable, str(ROOT / "trainer" / "run.py"), "--config", str(cfg),
                             f"tracking.uri={server.uri}", "tracking.flush_timeout_s=120"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    run_id = None
    while run_id is None or len(server.steps(run_id, "train/loss")) < 3:
        assert time.time() < deadline and proc.poll() is None, "training did not log in time"
        runs = server.runs("outage") if run_id is None else []
        run_id = run_id or (runs[0]["info"]["run_id"] if runs else None)
        time.sleep(0.2)
    server.kill()  # the tracking server dies mid-run ...
    time.sleep(3)
    server.start()  # ... and comes back
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "metrics are kept and sent when it is back" in out
    assert server.steps(run_id, "train/loss") == list(range(1, steps + 1))
    (run,) = server.runs("outage")
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["train.max_steps"] == str(steps)


def test_unsent_operations_are_spooled_and_replayed(tmp_path: Path) -> None:
    from trainer.config import TrackingConfig
    from trainer.tracking import SPOOL, MLflowTracker, replay

    s = Server(tmp_path)
    s.start()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracker = MLflowTracker(TrackingConfig(uri=s.uri, experiment="spool", flush_timeout_s=3, system_metrics=False),
                            "spool", run_dir=run_dir)
    tracker.log_metrics({"m": 1.0}, 1)
    assert tracker.flush(30)
    s.kill()  # down until after the run ends
    for step in range(2, 6):
        tracker.log_metrics({"m": float(step)}, step)
    tracker.log_params({"p": "v"})
    t0 = time.time()
    tracker.finish("FINISHED")
    assert time.time() - t0 < 15  # bounded: training is never held hostage
    assert (run_dir / SPOOL).is_file()
    s.start()
    assert replay(run_dir) == 0
    assert not (run_dir / SPOOL).exists()
    assert s.steps(tracker.run_id, "m") == [1, 2, 3, 4, 5]
    (run,) = s.runs("spool")
    assert run["info"]["status"] == "FINISHED" and run["data"]["params"] == [{"key": "p", "value": "v"}]
    s.kill()


def test_resumed_job_continues_the_same_run(tmp_path: Path, sample_datasets) -> None:
    tiny = make_tiny_bert(tmp_path / "tiny", hidden=16)
    cfg = config(tmp_path, tiny, sample_datasets, max_steps=20, run_name="again", checkpoint_every=5)
    args = ["--config", str(cfg), "tracking.system_metrics=false"]
    spec = {"jobs": [{"name": "killed", "args": args, "world": 1,
                      "faults": [{"kind": "kill_after_step", "rank": 0, "step": 12}]},
                     {"name": "resumed", "args": args, "world": 1}],
            "logs": str(tmp_path / "logs")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    subprocess.run([sys.executable, str(ROOT / "tests" / "harness.py"), str(tmp_path / "spec.json"),
                    str(tmp_path / "out.json")], cwd=tmp_path, check=True, timeout=600)
    killed, resumed = json.loads((tmp_path / "out.json").read_text())
    assert not killed["ok"] and resumed["ok"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["webmcse.resumed_at_step"] == "10"
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert steps == set(range(1, 21))
