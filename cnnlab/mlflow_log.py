"""Logging a run to MLflow (``--mlflow [URI]``), as a callback of the loop: the settings once,
every epoch's history row at its epoch number, then the test scores and the run's files (plots,
history, metrics, config; ``model.onnx`` when the run is exported). A folder (the default
``mlruns``) is MLflow's file store; any other URI (``sqlite:///mlflow.db``, ``http://host:5000``)
goes to MLflow as it is. The MLflow run's id is kept in the run directory (``mlflow.json``), so a
resumed run and a later export log to the same MLflow run."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

from . import distributed
from .callbacks import Callback
from .errors import CnnlabError

EXPERIMENT = "cnnlab"
RECORD = "mlflow.json"
ARTIFACTS = ("config.json", "metrics.json", "history.csv", "loss.png", "accuracy.png", "confusion_matrix.png",
             "mistakes.png", "lr_find.png", "model.onnx", "test_predictions.csv")  # the last: --multi-label
MAX_PARAM = 6000  # characters MLflow keeps of a parameter's value


def tracking_uri(where: str) -> str:
    """``where`` as MLflow's tracking URI: a folder becomes a file store URI."""
    if ("://" in where or where.startswith(("sqlite:", "databricks"))) and not where.startswith("file:"):
        return where
    # MLflow 3 keeps its file store in maintenance mode behind this switch; a folder asks for it
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return where if where.startswith("file:") else Path(where).expanduser().resolve().as_uri()


def require(where: str | None) -> None:
    """A one-line error, before anything is written, when ``--mlflow`` is asked for without MLflow."""
    if where is not None:
        _client_class()


def _client_class():
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise CnnlabError("--mlflow needs the mlflow package: pip install mlflow-skinny (or mlflow), or drop "
                          "--mlflow") from None
    return MlflowClient


def _client(uri: str):
    return _client_class()(tracking_uri=uri)


class MlflowLogger(Callback):
    """One cnnlab run as one MLflow run of the experiment "cnnlab" (rank 0 only)."""

    def __init__(self, where: str, run_dir: Path, settings: dict, log: Callable[[str], None] = print):
        self.uri = tracking_uri(where)
        self.client = _client(self.uri)  # before any training: without the package, one line now
        self.run_dir, self.settings, self.log = Path(run_dir), settings, log
        self.run_id: str | None = None
        self.steps = 0  # epochs logged, over every phase: each row's step

    def on_train_begin(self, run) -> None:
        if self.run_id is None:
            self._open()
        self.steps = max(self.steps, run.epoch)  # a resumed phase goes on from its checkpoint's epoch

    def _open(self) -> None:
        known = self.run_dir / RECORD
        if known.is_file():  # a resumed run: the MLflow run it started
            record = json.loads(known.read_text())
            if record.get("tracking_uri") == self.uri:
                self.run_id = record["run_id"]
                return
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(EXPERIMENT)
        run = self.client.create_run(experiment_id, run_name=self.run_dir.name,
                                     tags={"cnnlab.run_dir": str(self.run_dir.resolve())})
        self.run_id = run.info.run_id
        from mlflow.entities import Param
        params = [Param(k, str(v)[:MAX_PARAM]) for k, v in self.settings.items() if v is not None]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        known.write_text(json.dumps({"tracking_uri": self.uri, "run_id": self.run_id}))
        self.log(f"MLflow: run {self.run_id} in {self.uri}")

    def on_epoch_end(self, epoch: int, logs: dict) -> None:
        self.steps += 1
        self._metrics(logs, self.steps)

    def _metrics(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        numbers = [Metric(k, float(v), now, step) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"]
        if numbers:
            self.client.log_batch(self.run_id, metrics=numbers)

    def on_run_end(self, run_dir, metrics: dict) -> None:
        self._metrics(metrics, self.steps)
        log_files(self.client, self.run_id, Path(run_dir))
        self.client.set_terminated(self.run_id)


def log_files(client, run_id: str, run_dir: Path) -> None:
    """The run's files MLflow keeps (``ARTIFACTS`` that are there)."""
    for name in ARTIFACTS:
        if (run_dir / name).is_file():
            client.log_artifact(run_id, str(run_dir / name))


def tracker(where: str | None, run_dir: Path, settings: dict, log: Callable[[str], None] = print):
    """A logger for ``--mlflow where`` on the rank that writes; None without --mlflow or on others."""
    if where is None or not distributed.is_main():
        return None
    return MlflowLogger(where, run_dir, settings, log)


def log_export(run_dir: Path, path: Path) -> bool:
    """An exported file joins the MLflow run the run logged to, when it did; True if it did."""
    known = Path(run_dir) / RECORD
    if not known.is_file():
        return False
    record = json.loads(known.read_text())
    try:
        client = _client(tracking_uri(record["tracking_uri"]))
    except CnnlabError:  # MLflow gone since the run: the export stands without it
        return False
    client.log_artifact(record["run_id"], str(path))
    return True
