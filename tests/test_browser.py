"""What a user sees: `mlflow ui` on a finished run, opened in a real (headless) Chromium.

A tiny run is trained by the real entry point into MLflow's default local store; the test then
starts `mlflow ui` in that folder on loopback, drives Chromium through the DevTools protocol and
waits for the rendered page to show what the store holds: the run's name, a metric's value,
the logged model (linked from the run, with its own page and a "Register model" button) and a
plot artifact. Set WEBMCSE_UI_SCREENSHOT=PATH to keep the run page's screenshot
(docs/mlflow-run.png is made that way).
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import ROOT, SAMPLE, make_tiny_bert

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium")
# The flags a sandbox-less CI container needs, and nothing that talks to the outside.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1700"]
RUN_NAME = "browser-tiny-run"
EXPERIMENT = "webmcse-browser"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Chromium:
    """Headless Chromium driven over the DevTools protocol (one page, one websocket)."""

    def __init__(self, profile: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.proc = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                      "--remote-debugging-port=0", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        # With port 0 Chromium picks a free port and writes it to DevToolsActivePort.
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.is_file() and len(port_file.read_text().splitlines()) >= 2):
            assert self.proc.poll() is None, f"chromium exited with {self.proc.returncode}"
            assert time.time() < deadline, "chromium did not open its DevTools port in 60 s"
            time.sleep(0.1)
        self.port = int(port_file.read_text().splitlines()[0])
        self._id = 0
        self.session, self.ws = self.loop.run_until_complete(self._connect())

    async def _connect(self) -> tuple[Any, Any]:
        import aiohttp

        session = aiohttp.ClientSession()
        async with session.get(f"http://127.0.0.1:{self.port}/json/list") as resp:
            targets = await resp.json()
        page = next(t for t in targets if t["type"] == "page")
        ws = await session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        return session, ws

    async def _call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self._id += 1
        await self.ws.send_json({"id": self._id, "method": method, "params": params})
        while True:  # events (no id) are not needed here
            msg = await self.ws.receive_json(timeout=60)
            if msg.get("id") == self._id:
                assert "error" not in msg, f"{method}: {msg['error']}"
                return msg["result"]

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        return self.loop.run_until_complete(self._call(method, params))

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def wait_for_text(self, *texts: str, timeout: float = 90) -> str:
        """Poll the rendered page until every text is visible in it; returns the page's text."""
        deadline = time.time() + timeout
        while True:
            body = self.js("document.body ? document.body.innerText : ''") or ""
            missing = [t for t in texts if t not in body]
            if not missing:
                return body
            if time.time() > deadline:
                raise AssertionError(f"{self.js('location.href')} never showed {missing}; it shows:\n{body[:3000]}")
            time.sleep(0.5)

    def wait_for_js(self, expression: str, timeout: float = 90) -> Any:
        deadline = time.time() + timeout
        while not (value := self.js(expression)):
            assert time.time() < deadline, f"{self.js('location.href')}: `{expression}` stayed false"
            time.sleep(0.5)
        return value

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.ws.close())
            self.loop.run_until_complete(self.session.close())
        finally:
            self.loop.close()
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, sample_datasets: dict[str, Path]) -> dict[str, Any]:
    """A tiny run trained by the real entry point into the folder's default MLflow store."""
    folder = tmp_path_factory.mktemp("browser")
    tiny = make_tiny_bert(folder / "tiny", hidden=16)
    cfg = {
        "data": {"sources": [{"name": "wiki", "kind": "text", "path": str(sample_datasets["text"])},
                             {"name": "coco", "kind": "pairs", "path": str(sample_datasets["pairs"])}],
                 "caption_every": 2, "global_batch_size": 8, "num_workers": 1, "max_len": 24},
        "model": {"name_or_path": str(tiny), "pooler": "mean", "proj_dim": 16},
        "optim": {"lr": 5e-4},
        "train": {"max_steps": 6, "log_every": 1, "run_name": RUN_NAME, "output_dir": str(folder / "runs")},
        # No dev evaluation (the last step's model is exported and logged), one final task.
        "eval": {"sts_dir": str(SAMPLE / "senteval"), "dev_task": "", "at_start": False, "pooler": "mean",
                 "final_tasks": ["stsb_dev"], "align_uniform": False, "max_len": 32, "batch_size": 256},
        "tracking": {"experiment": EXPERIMENT, "system_metrics": False},
    }
    (folder / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([sys.executable, str(ROOT / "trainer" / "run.py"), "--config", str(folder / "cfg.yaml")],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([exp.experiment_id])
    (model,) = client.search_logged_models([exp.experiment_id])
    plots = [a.path for a in client.list_artifacts(run.info.run_id, "plots")]
    return {"folder": folder, "experiment_id": exp.experiment_id, "run": run, "model": model, "plots": plots,
            "stdout": proc.stdout}


@pytest.fixture(scope="module")
def ui(finished_run: dict[str, Any]):
    """A bare `mlflow ui` in the run's folder, on loopback, stopped after the tests."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "ui", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], cwd=finished_run["folder"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        assert proc.poll() is None and time.time() < deadline, "mlflow ui did not start"
        time.sleep(0.5)
    yield base
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (launch/install_chromium.sh installs it where the suite runs "
                    "as root with apt-get)")
    with tempfile.TemporaryDirectory(prefix="webmcse-chromium-") as profile:
        chromium = Chromium(Path(profile))
        yield chromium
        chromium.close()


def _shown(value: float) -> str:
    """A metric value as MLflow's run page prints it: JavaScript's shortest round-trip form of
    the double, which is Python's repr for a non-integral value between 1e-4 and 1e16."""
    assert 1e-4 <= abs(value) < 1e16 and not float(value).is_integer(), value
    return repr(float(value))


def test_run_page_shows_run_metric_and_logged_model(finished_run: dict[str, Any], ui: str,
                                                         browser: Chromium, tmp_path: Path) -> None:
    from trainer.tracking import run_url

    run, model = finished_run["run"], finished_run["model"]
    loss = run.data.metrics["train/loss"]  # the latest value, as the store holds it
    # The link the trainer prints opens the model-training view (not the GenAI one).
    browser.open(run_url(ui, finished_run["experiment_id"], run.info.run_id))
    text = browser.wait_for_text(RUN_NAME, "train/loss", _shown(loss), "Logged models (1)")
    assert "Model training" in text and "Model registry" in text  # the training view's side bar
    assert "Evaluation runs" not in text and "Judges" not in text  # ... not the GenAI one
    links = browser.js("[...document.querySelectorAll('a')].map(a => a.getAttribute('href'))")
    assert f"#/experiments/{finished_run['experiment_id']}/models/{model.model_id}" in links
    # The results table is the run's description, shown on its overview.
    assert "Exported model:" in run.data.tags["mlflow.note.content"]
    browser.wait_for_text("Exported model:")

    # The picture docs/TRACKING.md shows, without the assistant panel MLflow opens on first load.
    browser.js("document.querySelector('button[data-component-id=\"mlflow.assistant.chat_panel.close\"]')?.click()")
    time.sleep(1)
    png = browser.screenshot()
    from PIL import Image

    shot = Image.open(io.BytesIO(png))
    assert shot.size[0] >= 1000 and shot.size[1] >= 800
    small = io.BytesIO()
    shot.convert("RGB").quantize(colors=64).save(small, format="PNG", optimize=True)
    (tmp_path / "run.png").write_bytes(small.getvalue())
    if os.environ.get("WEBMCSE_UI_SCREENSHOT"):
        Path(os.environ["WEBMCSE_UI_SCREENSHOT"]).write_bytes(small.getvalue())


def test_logged_model_page_is_registrable(finished_run: dict[str, Any], ui: str, browser: Chromium) -> None:
    run, model = finished_run["run"], finished_run["model"]
    browser.open(f"{ui}/#/experiments/{finished_run['experiment_id']}/models/{model.model_id}"
                 "?workflowType=machine_learning")
    linked = sorted({m.key for m in model.metrics or []})
    assert "final/stsb_dev" in linked  # the final evaluation of this very model
    assert model.params and model.params.items() <= run.data.params.items()
    # The page shows the model, its source run, its description, the run's params (the resolved
    # config) and the metrics linked to it.
    browser.wait_for_text(model.model_id, "Register model", "Ready", RUN_NAME, run.info.run_id,
                          "Sentence encoder (mean pooling)", f"Metrics ({len(linked)})", *linked,
                          "optim.lr", "train.max_steps")


def test_plot_artifact_is_displayed(finished_run: dict[str, Any], ui: str, browser: Chromium) -> None:
    from PIL import Image

    run = finished_run["run"]
    assert "plots/loss.png" in finished_run["plots"]
    local = run.info.artifact_uri.removeprefix("file://") + "/plots/loss.png"
    width, height = Image.open(local).size
    browser.open(f"{ui}/#/experiments/{finished_run['experiment_id']}/runs/{run.info.run_id}/artifacts/"
                 "plots/loss.png?workflowType=machine_learning")
    browser.wait_for_text("plots/loss.png")
    # The preview is the stored PNG itself, decoded by the browser at its own size.
    shown = browser.wait_for_js(
        "[...document.images].filter(i => i.complete && i.naturalWidth > 0 && i.src.startsWith('blob:'))"
        ".map(i => [i.naturalWidth, i.naturalHeight])[0]")
    assert shown == [width, height]


def test_the_trainer_prints_the_run_page_link(finished_run: dict[str, Any]) -> None:
    from trainer.tracking import run_url

    run = finished_run["run"]
    # A bare `mlflow ui` in the run's folder serves this link (the test above opens it on its port).
    assert run_url("sqlite:///mlflow.db", finished_run["experiment_id"], run.info.run_id) in finished_run["stdout"]
