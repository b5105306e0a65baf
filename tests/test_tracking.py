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

SENTENCES = ["A man is playing a guitar.", "Two dogs run along the beach.", "short"]

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
    tracker.log_model(exported_model(tmp_path), "mean")
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
    # The model logged during the outage arrives as a logged model of the run, at the last step.
    assert [(o["model_id"][:2], o["step"]) for o in run["outputs"]["model_outputs"]] == [("m-", 5)]
    from mlflow.tracking import MlflowClient

    model = MlflowClient(tracking_uri=s.uri).get_logged_model(run["outputs"]["model_outputs"][0]["model_id"])
    assert model.source_run_id == tracker.run_id and model.status.to_int() == 2  # READY
    assert {m.key: (m.value, m.step) for m in model.metrics} == {"m": (5.0, 5)}
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


def exported_model(folder: Path, step: int = 3) -> Path:
    """A tiny MCSE model exported the way the trainer exports its best checkpoint."""
    from transformers import AutoTokenizer

    from trainer.checkpoint import export_model
    from trainer.model import MCSEModel

    tiny = make_tiny_bert(folder / "tiny", hidden=16)
    model = MCSEModel.from_pretrained_encoder(str(tiny), image_dim=8, proj_dim=8, pooler="mean")
    return export_model(model, AutoTokenizer.from_pretrained(tiny), folder / "best",
                        {"step": step, "select_metric": "stsb_dev", "select_value": 12.5, "eval_pooler": "mean"})


def mean_pooled(model_dir: Path, sentences: list[str]):
    """Mean pooling over the encoder's last layer, computed straight from transformers."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = AutoModel.from_pretrained(model_dir).eval()
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = enc(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return ((hidden * mask).sum(1) / mask.sum(1)).numpy()


def test_model_is_a_logged_model_of_its_run_and_step_and_registrable(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # a sqlite store keeps artifacts in ./mlruns of the working folder
    import mlflow
    import numpy as np
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from trainer.config import TrackingConfig
    from trainer.tracking import MLflowTracker

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    best = exported_model(tmp_path, step=3)
    tracker = MLflowTracker(TrackingConfig(uri=store, experiment="models", system_metrics=False), "with-model",
                            run_dir=tmp_path)
    tracker.log_params({"optim.lr": "0.001", "train.max_steps": "4"})
    for step in range(1, 5):
        tracker.log_metrics({"train/loss": 3.0 - step / 4}, step)
    tracker.log_metrics({"final/stsb_test": 41.25, "final/sts12": 30.5}, 4)
    table = "| task | Spearman x100 |\n| --- | ---: |\n| stsb_test | 41.25 |\n"
    tracker.set_description(table)
    tracker.log_model(best, "mean", step=4, link_metrics=("final/",))
    tracker.finish()

    client = MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name("models")
    # The tag MLflow 3's UI reads for an experiment's kind (its bundle's "custom_model_development").
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    run = client.get_run(tracker.run_id)
    assert run.data.tags["mlflow.note.content"] == table  # the run's description on its overview
    ((out_id, out_step),) = [(o.model_id, o.step) for o in run.outputs.model_outputs]
    assert out_step == 4 and tracker.model_ids == [out_id]
    model = client.get_logged_model(out_id)
    assert model.name == "model" and model.source_run_id == run.info.run_id
    assert model.status.to_int() == 2  # READY: upload complete
    assert model.params == {"optim.lr": "0.001", "train.max_steps": "4"}  # the run's config
    assert sorted((m.key, m.value, m.step) for m in model.metrics) == [("final/sts12", 30.5, 4),
                                                                         ("final/stsb_test", 41.25, 4)]
    assert model.tags["webmcse.step"] == "3" and model.tags["webmcse.pooler"] == "mean"

    mlflow.set_tracking_uri(store)
    try:
        info = mlflow.models.get_model_info(f"models:/{out_id}")
        assert info.model_id == out_id and info.run_id == run.info.run_id
        sig = info.signature.to_dict()
        assert json.loads(sig["inputs"]) == [{"type": "string", "required": True}]
        assert json.loads(sig["outputs"]) == [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 16]}}]
        local = mlflow.artifacts.download_artifacts(f"models:/{out_id}")
        example = mlflow.models.Model.load(local).load_input_example(local)
        assert isinstance(example, list) and example and all(isinstance(t, str) for t in example)
        version = mlflow.register_model(f"models:/{out_id}", "webmcse-encoder")
        assert int(version.version) == 1 and version.status == "READY"
        assert client.get_registered_model("webmcse-encoder").latest_versions[0].run_id == run.info.run_id
        loaded = mlflow.pyfunc.load_model("models:/webmcse-encoder/1")
        same = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")  # the MLflow 2 style URI
    finally:
        mlflow.set_tracking_uri("")
    expected = mean_pooled(best, SENTENCES)
    np.testing.assert_allclose(loaded.predict(SENTENCES), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(same.predict(pd.DataFrame({"sentence": SENTENCES})), expected, rtol=1e-5, atol=1e-6)


def test_an_experiment_keeps_the_kind_someone_chose(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    from mlflow.tracking import MlflowClient

    from trainer.config import TrackingConfig
    from trainer.tracking import MLflowTracker

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store)
    client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    client.create_experiment("untagged")
    for name in ("chosen", "untagged"):
        MLflowTracker(TrackingConfig(uri=store, experiment=name, system_metrics=False), name).finish()
    kinds = {name: client.get_experiment_by_name(name).tags.get("mlflow.experimentKind")
             for name in ("chosen", "untagged")}
    assert kinds == {"chosen": "genai_development", "untagged": "custom_model_development"}


def test_a_failure_while_uploading_the_model_leaves_one_model(tmp_path: Path, monkeypatch) -> None:
    """The server fails after the model was created and linked: the retry finishes that model."""
    monkeypatch.chdir(tmp_path)
    from mlflow.tracking import MlflowClient

    from trainer.config import TrackingConfig
    from trainer.tracking import MLflowTracker

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MLflowTracker(TrackingConfig(uri=store, experiment="flaky", system_metrics=False), "flaky",
                            run_dir=tmp_path)
    upload = tracker.client.log_model_artifacts
    calls = []

    def flaky_upload(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise ConnectionError("connection reset by peer")
        return upload(*args, **kwargs)

    tracker.client.log_model_artifacts = flaky_upload
    tracker.log_metrics({"final/stsb_test": 40.0}, 7)
    tracker.log_model(exported_model(tmp_path), "mean")
    tracker.finish()
    assert len(calls) == 2
    client = MlflowClient(tracking_uri=store)
    (model,) = client.search_logged_models([client.get_experiment_by_name("flaky").experiment_id])
    assert model.status.to_int() == 2 and {m.key for m in model.metrics} == {"final/stsb_test"}
    run = client.get_run(tracker.run_id)
    assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(model.model_id, 7)]
