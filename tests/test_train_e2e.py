"""The user's command, end to end: `accelerate launch trainer/run.py --config ...`.

A tiny random-init BERT trains for 20 steps on the bundled sample (text + captions with
EfficientNet-Lite0 features); the run is then read back from MLflow's default local store
with the MLflow client, and the exported best model is reloaded and re-evaluated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT, SAMPLE

pytestmark = pytest.mark.slow


def test_train_20_steps_loss_drops_and_mlflow_has_the_run(tmp_path: Path, tiny_bert: Path,
                                                          sample_datasets: dict[str, Path]) -> None:
    cfg = {
        "data": {
            "sources": [{"name": "wiki", "kind": "text", "path": str(sample_datasets["text"])},
                        {"name": "coco", "kind": "pairs", "path": str(sample_datasets["pairs"])}],
            "schedule": "mcse", "caption_every": 4, "global_batch_size": 16, "max_len": 24,
            "num_workers": 1, "shuffle_shards": 2,
        },
        "model": {"name_or_path": str(tiny_bert), "pooler": "mean", "proj_dim": 32},
        "loss": {"lambda_mm": 0.1},
        "optim": {"lr": 5e-4, "schedule": "constant"},
        "train": {"max_steps": 20, "log_every": 1, "seed": 3, "run_name": "e2e"},
        "eval": {"sts_dir": str(SAMPLE / "senteval"), "every_steps": 10, "pooler": "mean",
                 "final_tasks": ["stsb_dev", "stsb_test"], "retrieval_path": str(sample_datasets["pairs"]),
                 "retrieval_max_images": 50},
        "tracking": {"experiment": "e2e-test"},
    }
    config = tmp_path / "e2e.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    accelerate = Path(sys.executable).parent / "accelerate"
    proc = subprocess.run(
        [str(accelerate), "launch", "--config_file", str(ROOT / "configs/accelerate/cpu.yaml"),
         str(ROOT / "trainer/run.py"), "--config", str(config), "eval.batch_size=256"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "before training" in proc.stdout and "best checkpoint" in proc.stdout
    assert "mlflow ui" in proc.stdout

    run_dir = tmp_path / "runs" / "e2e"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["eval"]["batch_size"] == 256  # the CLI override is in the resolved config
    results = json.loads((run_dir / "results.json").read_text())
    assert results["state"]["step"] == 20 and results["state"]["caption_steps"] == 5
    assert results["retrieval"]["images"] == 50 and "i2t_R@10" in results["retrieval"]
    assert results["alignment_uniformity"]["uniformity"] < 0
    assert (run_dir / "best" / "modules.json").is_file()  # also a sentence-transformers model

    # MLflow: the default store of the working folder, read back through the client.
    from mlflow.tracking import MlflowClient

    assert (tmp_path / "mlflow.db").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("e2e-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "e2e"
    assert run.data.params["optim.lr"] == "0.0005"
    assert run.data.params["data.sources.1.kind"] == "pairs"
    assert run.data.tags["webmcse.world_size"] == "1"
    assert "webmcse.data.coco.manifest_sha256" in run.data.tags
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < 0.5 * (sum(losses[:5]) / 5), losses
    assert len(client.get_metric_history(run.info.run_id, "train/loss_mm")) == 5
    assert client.get_metric_history(run.info.run_id, "final/retrieval_t2i_R_at_5")
    assert client.get_metric_history(run.info.run_id, "final/uniformity")
    dev = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/stsb_dev")}
    assert set(dev) == {0, 10, 20}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "results.json", "results.md", "plots"} <= artifacts
    (logged,) = client.search_logged_models([exp.experiment_id])
    assert [(o.model_id, o.step) for o in client.get_run(run.info.run_id).outputs.model_outputs] == \
        [(logged.model_id, 20)]
    assert "Exported model:" in run.data.tags["mlflow.note.content"]  # the results, on the run's page
    assert {"plots/loss.png", "plots/dev.png", "plots/sts.png"} <= {a.path for a in client.list_artifacts(run.info.run_id, "plots")}

    # The exported best model reloads and gives the dev score it was selected with.
    from transformers import AutoTokenizer

    from trainer.evaluate import evaluate_tasks, make_encoder
    from trainer.model import MCSEModel

    best = run_dir / "best"
    assert (best / "COMMITTED").is_file()
    info = json.loads((best / "webmcse.json").read_text())
    assert dev[info["step"]] == pytest.approx(max(dev[10], dev[20]))
    model = MCSEModel.load(best)
    enc = make_encoder(model, AutoTokenizer.from_pretrained(best), "mean", progress=False)
    score = evaluate_tasks(enc, SAMPLE / "senteval", ["stsb_dev"])["stsb_dev"]["spearman"]
    assert info["select_metric"] == "stsb_dev" and score == pytest.approx(info["select_value"], abs=1e-6)

    # The logged MLflow model (pyfunc flavour) loads and embeds sentences like the evaluator.
    import mlflow.pyfunc
    import numpy as np
    import pandas as pd

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        loaded = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    finally:
        mlflow.set_tracking_uri("")
    sentences = ["a man is playing a guitar .", "two dogs run on the beach ."]
    np.testing.assert_allclose(loaded.predict(sentences), enc(sentences), rtol=1e-5, atol=1e-6)
    frame = pd.DataFrame({"sentence": sentences})  # what `mlflow models serve` passes
    np.testing.assert_allclose(loaded.predict(frame), enc(sentences), rtol=1e-5, atol=1e-6)

    # A bare `mlflow ui` started in the working folder serves the run (REST search lists it).
    ui_lists_run(tmp_path, run.info.run_id, exp.experiment_id)


def ui_lists_run(folder: Path, run_id: str, experiment_id: str) -> None:
    import json as _json
    import signal
    import socket
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen([str(mlflow_bin), "ui", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        body = _json.dumps({"experiment_ids": [experiment_id]}).encode()
        deadline = time.time() + 90
        while True:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search", data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=5) as resp:
                    runs = _json.loads(resp.read())["runs"]
                break
            except OSError:
                assert time.time() < deadline, "mlflow ui did not answer"
                time.sleep(1)
        assert [r["info"]["run_id"] for r in runs] == [run_id]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
