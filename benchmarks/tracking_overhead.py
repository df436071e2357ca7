"""Tracking overhead: a student epoch with its metrics logged to a real sqlite MLflow store vs not logged."""
from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from benchmarks import fixtures
from benchmarks.measure import interleaved
from benchmarks.report import Figure, Result, Target
from benchmarks.settings import Settings
from kdtrack import engine, tracking
from kdtrack.config import Config
from kdtrack.data import make_loader

NAME = "tracking_overhead"
TARGET = Target("<=", 1.02)


def run(settings: Settings) -> Result:
    """Seconds per `engine.fit` epoch with `on_epoch_end` logging through `StageRun.log_metrics`, and without."""
    device = settings.torch_device
    ds = fixtures.dataset(settings.epoch_rows, settings.input_shape, settings.num_classes)
    loader = make_loader(ds, settings.train_batch, shuffle=True, seed=0, device=device, drop_last=True)
    student = fixtures.model(settings.student, ds, device, seed=2)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    scaler = engine.make_scaler(settings.amp_dtype, device)
    epochs = itertools.count()  # one model trains on; every call is the next epoch
    log_seconds: list[float] = []

    with _sqlite_store(settings.workdir / "tracking"), \
            tracking.stage_run("benchmark", Config(experiment="kdtrack-benchmarks"),
                               run_name="tracking-overhead") as stage:

        def log(epoch: int, metrics: dict[str, float]) -> None:
            start = time.perf_counter()
            stage.log_metrics(metrics, step=epoch)
            log_seconds.append(time.perf_counter() - start)

        def epoch_fn(callback: engine.EpochCallback | None) -> Callable[[int], None]:
            def one_epoch(_round: int) -> None:
                e = next(epochs)
                engine.fit(student, loader, optimizer, loss_fn=engine.SupervisedLoss(), epochs=e + 1, start_epoch=e,
                           device=device, scaler=scaler, amp_dtype=settings.amp_dtype, on_epoch_end=callback)
            return one_epoch

        raw = interleaved({"logging_off": epoch_fn(None), "logging_on": epoch_fn(log)}, settings.repeats,
                          device=device)
    raw["log_metrics_call"] = log_seconds[-settings.repeats:]  # the warm-up round's first call is left out
    figures = [Figure.ratio("logged / unlogged epoch time", raw, "logging_on", "logging_off", TARGET),
               Figure.ratio("log_metrics call / unlogged epoch", raw, "log_metrics_call", "logging_off")]
    params = {"student": settings.student, "rows": len(ds), "batch_size": settings.train_batch,
              "steps_per_epoch": len(loader), "tracking_uri": "sqlite:///<workdir>/tracking/mlflow.db",
              "metrics_per_epoch": "fit's epoch metrics, one log_batch request"}
    notes = [f"plain {settings.student} epochs of {len(loader)} steps (the shortest epoch, so the largest share), "
             "logged to a fresh sqlite store"]
    return Result(NAME, "Tracking overhead", params, raw, {k: "s" for k in raw}, figures, notes)


@contextlib.contextmanager
def _sqlite_store(root: Path) -> Iterator[str]:
    """A fresh sqlite tracking store in `root`, which is also the working directory (its ./mlruns lands there).

    The MLflow variables a run exports (experiment and run ids) are restored too, so nothing points at it afterwards.
    """
    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    old_cwd, old_env = os.getcwd(), {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.chdir(root)
    try:
        yield uri
    finally:
        os.chdir(old_cwd)
        for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
            del os.environ[key]
        os.environ.update(old_env)
