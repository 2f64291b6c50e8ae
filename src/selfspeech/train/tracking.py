"""Experiment tracking behind one small interface: ``log(record)`` and ``close()``.

The training loop always keeps its JSONL log (the resumable source of truth);
``LoopConfig.tracking`` adds backends that mirror the numeric scalars:

- ``tensorboard``: event files in ``OUT/tensorboard`` (``tensorboard --logdir OUT``);
- ``mlflow``: a run in a local SQLite store, ``sqlite:///OUT/mlflow.db`` by
  default (no server; ``mlflow ui --backend-store-uri sqlite:///OUT/mlflow.db``),
  or ``MLFLOW_TRACKING_URI`` when set. Parameters = the run config, flattened.

Backends are optional extras imported lazily; a missing one is an error that
says what to install, before training starts.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

BACKENDS = ("tensorboard", "mlflow")


class Tracker(Protocol):
    def log(self, rec: dict) -> None: ...

    def close(self) -> None: ...


def scalars(rec: dict) -> dict[str, float]:
    """The numeric fields of a log record, ``step`` excluded (it is the x axis)."""
    return {k: float(v) for k, v in rec.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


class TensorBoardTracker:
    def __init__(self, out: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("tracking 'tensorboard' needs tensorboard: pip install 'selfspeech[tensorboard]'") from None
        self.writer = SummaryWriter(str(out / "tensorboard"))

    def log(self, rec: dict) -> None:
        if "step" in rec:
            for k, v in scalars(rec).items():
                self.writer.add_scalar(k, v, int(rec["step"]))

    def close(self) -> None:
        self.writer.close()


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:500]  # MLflow caps parameter values
    return out


class MLflowTracker:
    """One MLflow run per training directory; a resumed training continues the same run."""

    def __init__(self, out: Path, run_config: dict, experiment: str = "selfspeech"):
        try:
            import mlflow
        except ImportError:
            raise ImportError("tracking 'mlflow' needs mlflow: pip install 'selfspeech[mlflow]'") from None
        self.mlflow = mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(out / 'mlflow.db').resolve()}"
        self.client = mlflow.tracking.MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        id_file = out / "mlflow_run_id"
        if id_file.is_file():  # resume: same run
            self.run_id = id_file.read_text().strip()
        else:
            self.run_id = self.client.create_run(exp_id, run_name=out.name).info.run_id
            id_file.write_text(self.run_id + "\n")
            params = flatten(run_config)
            for k, v in list(params.items())[:500]:
                self.client.log_param(self.run_id, k, v)
        self.uri = uri

    def log(self, rec: dict) -> None:
        if "step" in rec:
            for k, v in scalars(rec).items():
                self.client.log_metric(self.run_id, k, v, step=int(rec["step"]))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def make_trackers(names, out: Path, run_config: dict) -> list[Tracker]:
    unknown = sorted(set(names) - set(BACKENDS))
    if unknown:
        raise ValueError(f"tracking {unknown}: choose from {BACKENDS} (JSONL is always written)")
    made: list[Tracker] = []
    for name in names:
        made.append(TensorBoardTracker(out) if name == "tensorboard" else MLflowTracker(out, run_config))
    return made
