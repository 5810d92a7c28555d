"""Experiment trackers a job reports to (the spec's `integrations`): TensorBoard, MLflow and Weights
& Biases, through transformers' own callbacks (TensorBoardCallback, MLflowCallback, WandbCallback),
each configured for the job and wrapped so that a tracker that fails is dropped with an event
(`tracker_failed`) and never fails the job. They get what transformers sends them (the training
arguments and model config as hyperparameters, every step log), this service's figures in each
step log (GPU memory, tokens/s), the data report when training begins, and the final model's
location at the end. Only rank 0 reports (the callbacks check it themselves)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from core.spec import Integration, JobSpec, MlflowIntegration, TensorBoardIntegration, WandbIntegration

logger = logging.getLogger(__name__)

# TrainerCallback's events: each is passed on to the tracker's callback, guarded.
CALLBACK_EVENTS = (
    "on_init_end",
    "on_train_begin",
    "on_train_end",
    "on_epoch_begin",
    "on_epoch_end",
    "on_step_begin",
    "on_pre_optimizer_step",
    "on_optimizer_step",
    "on_substep_end",
    "on_step_end",
    "on_evaluate",
    "on_predict",
    "on_save",
    "on_log",
    "on_prediction_step",
    "on_push_begin",
)
# An MLflow server that does not answer costs the job this long per request, not MLflow's default
# of several minutes of retries.
MLFLOW_HTTP_TIMEOUT_S = 10
MLFLOW_HTTP_RETRIES = 1
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"

Report = Callable[[str, str], None]  # (event kind, message)


class Tracker(TrainerCallback):
    """One tracker: transformers' callback for it, guarded. The first exception it raises drops it
    for the rest of the run and is reported once; the job goes on."""

    def __init__(self, name: str, make: Callable[[], TrainerCallback], report: Report) -> None:
        self.name = name
        self.report = report
        self.failed = False
        self.inner: TrainerCallback | None = None
        self._guard("starting", lambda: setattr(self, "inner", make()))

    def _guard(self, what: str, action: Callable[[], Any]) -> Any:
        if self.failed:
            return None
        try:
            return action()
        except Exception as exc:  # any failure of a tracker is the tracker's, never the job's
            self.failed = True
            logger.warning("tracker %s failed while %s", self.name, what, exc_info=True)
            self.report(
                "tracker_failed",
                f"{self.name}: {what} failed ({type(exc).__name__}: {str(exc)[:300]}); the job goes on without it",
            )
            return None

    def on_final(self, args: Any, state: Any, details: dict[str, Any]) -> None:
        """The data report and the final model's location, after training (the callbacks have
        closed their runs by then: each tracker reopens its own)."""


def _forwarding(event: str) -> Callable[..., Any]:
    """Tracker's method for a TrainerCallback event: the tracker's callback's, guarded."""
    what = event.removeprefix("on_").replace("_", " ")

    def forward(self: Tracker, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        inner = self.inner
        if inner is None or self.failed:
            return None
        return self._guard(what, lambda: getattr(inner, event)(args, state, control, **kwargs))

    forward.__name__ = event
    return forward


for _event in CALLBACK_EVENTS:
    setattr(Tracker, _event, _forwarding(_event))


class TensorBoard(Tracker):
    def __init__(self, folder: Path, report: Report) -> None:
        self.folder = folder

        def make() -> TrainerCallback:
            from transformers.integrations.integration_utils import TensorBoardCallback

            folder.mkdir(parents=True, exist_ok=True)
            callback = TensorBoardCallback()  # type: ignore[no-untyped-call]
            callback.logging_dir = str(folder)  # transformers' own: TENSORBOARD_LOGGING_DIR's place
            return callback

        super().__init__("tensorboard", make, report)

    def on_final(self, args: Any, state: Any, details: dict[str, Any]) -> None:
        def write() -> None:
            inner = self.inner
            writer_class = getattr(inner, "_SummaryWriter", None)
            if writer_class is None:
                return
            writer = writer_class(log_dir=str(self.folder))
            try:
                for key, value in details.items():
                    writer.add_text(key, json.dumps(value, indent=1), state.global_step)
            finally:
                writer.close()

        self._guard("writing the data report and final model", write)


class Mlflow(Tracker):
    def __init__(self, integration: MlflowIntegration, run_name: str, report: Report) -> None:
        options = integration.mlflow
        self.run_id: str | None = None
        os.environ["MLFLOW_TRACKING_URI"] = options.tracking_uri
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(MLFLOW_HTTP_TIMEOUT_S))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(MLFLOW_HTTP_RETRIES))
        if options.experiment_name:
            os.environ["MLFLOW_EXPERIMENT_NAME"] = options.experiment_name
        tags = {"finetune.run_name": run_name, **(options.tags or {})}
        os.environ["MLFLOW_TAGS"] = json.dumps(tags)
        os.environ["MLFLOW_FLATTEN_PARAMS"] = "1"

        def make() -> TrainerCallback:
            from transformers.integrations.integration_utils import MLflowCallback

            return MLflowCallback()  # type: ignore[no-untyped-call]

        super().__init__("mlflow", make, report)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """transformers' callback starts the run; its id is kept for on_final (the callback ends
        the run when training ends)."""
        answer = Tracker.on_train_begin(self, args, state, control, **kwargs)

        def run_id() -> None:
            import mlflow

            active = mlflow.active_run()
            self.run_id = active.info.run_id if active is not None else None

        self._guard("reading its run", run_id)
        return answer

    def on_final(self, args: Any, state: Any, details: dict[str, Any]) -> None:
        def write() -> None:
            import mlflow

            if self.run_id is None:
                return
            client = mlflow.MlflowClient()
            for key, value in details.items():
                if isinstance(value, dict):
                    client.log_dict(self.run_id, value, f"{key}.json")
                else:
                    client.set_tag(self.run_id, key, str(value))

        self._guard("writing the data report and final model", write)


class Wandb(Tracker):
    def __init__(self, integration: WandbIntegration, job_dir: Path, report: Report) -> None:
        options = integration.wandb
        self.folder = job_dir / WANDB_DIR
        os.environ["WANDB_PROJECT"] = options.project
        os.environ["WANDB_MODE"] = options.mode
        os.environ["WANDB_DIR"] = str(self.folder)
        os.environ.setdefault("WANDB_SILENT", "true")
        if options.entity:
            os.environ["WANDB_ENTITY"] = options.entity
        if options.tags:
            os.environ["WANDB_TAGS"] = ",".join(options.tags)

        def make() -> TrainerCallback:
            from transformers.integrations.integration_utils import WandbCallback

            self.folder.mkdir(parents=True, exist_ok=True)
            return WandbCallback()  # type: ignore[no-untyped-call]

        super().__init__("wandb", make, report)

    def on_final(self, args: Any, state: Any, details: dict[str, Any]) -> None:
        def write() -> None:
            import wandb

            if wandb.run is None:
                return
            for key, value in details.items():
                wandb.run.summary[key] = value
            wandb.finish()

        self._guard("writing the data report and final model", write)


def trackers(integrations: list[Integration], *, job_dir: Path, run_name: str, report: Report) -> list[Tracker]:
    """The job's trackers, in the order the spec names them."""
    made: list[Tracker] = []
    for integration in integrations:
        if isinstance(integration, TensorBoardIntegration):
            made.append(TensorBoard(job_dir / TENSORBOARD_DIR, report))
        elif isinstance(integration, MlflowIntegration):
            made.append(Mlflow(integration, run_name, report))
        elif isinstance(integration, WandbIntegration):
            made.append(Wandb(integration, job_dir, report))
    return made


class ServiceFigures(TrainerCallback):
    """Put before the trackers: adds this service's own figures of each step log (GPU memory in
    GiB, tokens/s) to the logs the trackers get, from the job's reporter."""

    def __init__(self, figures: Callable[[], dict[str, float]]) -> None:
        self.figures = figures

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is not None and "loss" in logs:
            try:
                logs.update(self.figures())
            except Exception:  # the figures are extras: never a reason to stop
                logger.warning("could not add the step's figures for the trackers", exc_info=True)


def tracker_places(spec: JobSpec, job_dir: Path) -> str:
    places = []
    for integration in spec.integrations:
        if integration.type == "tensorboard":
            places.append(f"tensorboard: {job_dir / TENSORBOARD_DIR}")
        elif integration.type == "mlflow":
            places.append(f"mlflow: {integration.mlflow.tracking_uri}")
        elif integration.type == "wandb":
            options = integration.wandb
            places.append(f"wandb: project {options.project}, {options.mode}")
    return "; ".join(places)
