"""Experiment tracking on rank 0: MLflow, or a null tracker.

Only the main process ever constructs an :class:`MLflowTracker`; every other rank gets a
:class:`NullTracker`, so no worker rank can block on a tracking server. Tracking failures are
reported once as a warning and never raised into the training loop: losing a metric is
better than losing a run.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from trainer.config import TrackingConfig

log = logging.getLogger("webmcse.tracking")

_PARAM_BATCH = 100
_METRIC_BATCH = 1000


class NullTracker:
    run_id: str | None = None
    experiment_id: str | None = None

    def log_params(self, params: dict[str, str]) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def finish(self, status: str = "FINISHED") -> None: ...

    def describe(self) -> str:
        return "tracking disabled (tracking.backend=none)"


class MLflowTracker(NullTracker):
    def __init__(self, cfg: TrackingConfig, run_name: str) -> None:
        from mlflow.tracking import MlflowClient

        # No URI configured: MLflow's own default (MLFLOW_TRACKING_URI, else the local
        # sqlite:///mlflow.db of the working folder) is exactly what a bare `mlflow ui` reads.
        self.client = MlflowClient(tracking_uri=cfg.uri or None)
        self.uri = self.client.tracking_uri
        exp = self.client.get_experiment_by_name(cfg.experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(cfg.experiment)
        run = self.client.create_run(self.experiment_id, run_name=run_name)
        self.run_id = run.info.run_id
        self.run_name = run_name
        self._warned = False

    def _guard(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # tracking must never stop training
            if not self._warned:
                log.warning("MLflow %s failed (%s: %s); training continues, later failures are "
                            "silent", what, type(exc).__name__, str(exc)[:300])
                self._warned = True

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), _PARAM_BATCH):
            self._guard("log_params", self.client.log_batch, self.run_id,
                        params=items[i:i + _PARAM_BATCH])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._guard("set_tags", self.client.log_batch, self.run_id,
                    tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), _METRIC_BATCH):
            self._guard("log_metrics", self.client.log_batch, self.run_id,
                        metrics=items[i:i + _METRIC_BATCH])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._guard("log_artifact", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self._guard("finish", self.client.set_terminated, self.run_id, status)

    def describe(self) -> str:
        return (f"MLflow run {self.run_name} ({self.run_id}) in experiment {self.experiment_id} "
                f"at {self.uri}. View it: {ui_command(self.uri)}")


def ui_command(uri: str) -> str:
    """The command that shows runs stored at ``uri``."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if db.resolve() == (Path.cwd() / "mlflow.db").resolve():
            return "mlflow ui   (in this folder), then open http://127.0.0.1:5000"
    return f"mlflow ui --backend-store-uri {uri}, then open http://127.0.0.1:5000"


def make_tracker(cfg: TrackingConfig, run_name: str, is_main: bool) -> NullTracker:
    if not is_main or cfg.backend == "none":
        return NullTracker()
    return MLflowTracker(cfg, run_name)


def run_tags(world_size: int, manifests: dict[str, str]) -> dict[str, str]:
    """Provenance: code version, data identity, and where it ran."""
    import torch

    tags = {
        "webmcse.world_size": str(world_size),
        "webmcse.python": platform.python_version(),
        "webmcse.torch": torch.__version__,
        "webmcse.host": platform.node(),
        "webmcse.hardware": (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                             else f"cpu x{os.cpu_count()}"),
    }
    for name, sha in manifests.items():
        tags[f"webmcse.data.{name}.manifest_sha256"] = sha
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5, check=False).stdout.strip()
        if commit:
            tags["mlflow.source.git.commit"] = commit
    except (OSError, subprocess.SubprocessError):
        pass
    return tags
