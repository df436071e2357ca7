"""What the teacher and student stages share: loaders per split, checkpoint callbacks, the final test report."""
from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kdtrack import checkpoint, tracking
from kdtrack.config import Config
from kdtrack.data import IndexedDataset, make_loader
from kdtrack.errors import CheckpointError, ConfigError
from kdtrack.teachers import HASH_TAGS, check_recorded_hash


def split_loaders(cfg: Config, splits: dict[str, IndexedDataset], device: torch.device,
                  shard: tuple[int, int] = (0, 1)) -> dict[str, torch.utils.data.DataLoader]:
    """A shuffled (seeded, per-epoch) loader for `train`, plain ones for the evaluation splits.

    With `shard=(rank, world)` the train loader yields this rank's share in batches of data.batch_size / world,
    so a step still sees data.batch_size rows in all and one config means the same run at any process count."""
    rank, world = shard
    batch = cfg.data.batch_size
    if batch % world:
        raise ConfigError(f"data.batch_size={batch} does not split evenly over {world} processes",
                          f"use a multiple of {world}, e.g. --set data.batch_size={batch // world * world or world}")
    loaders = {}
    for name, ds in splits.items():
        train = name == "train"
        loaders[name] = make_loader(ds, batch // world if train else cfg.data.eval_batch_size,
                                    shuffle=train, seed=cfg.seed, num_workers=cfg.data.num_workers, device=device,
                                    shard=shard if train else (0, 1))
    return loaders


def progress_enabled(mode: str) -> bool:
    return sys.stderr.isatty() if mode == "auto" else mode == "on"


def fetch_checkpoints(run_id: str, workdir: Path) -> dict[str, str]:
    """Download `last.pt` and `best.pt` of run `run_id` into `workdir`, refusing either unless its weights hash is
    the one the run recorded writing it (or, after a crash between recording and uploading, the one before). Returns
    hash tag -> the hash of the file, for `Saver.resume`. Called before a resumed run is written to."""
    run = tracking.get_run(run_id)
    recorded = {}
    for name, tag in HASH_TAGS.items():
        local = tracking.download_artifact(run_id, f"checkpoints/{name}.pt", workdir / "download")
        local.replace(workdir / f"{name}.pt")
        weights = checkpoint.load(workdir / f"{name}.pt")["weights_sha256"]
        check_recorded_hash(run, name, weights, also=(run.data.tags.get(f"{tag}_prev", ""),))
        recorded[tag] = weights
    return recorded


@dataclass
class Saver:
    """Epoch-end callback: log metrics, write `last.pt` every epoch and `best.pt` when val accuracy improves.

    `modules` are extra trainable parts (e.g. feature-distillation connectors) saved and restored with the model;
    `metric_sources` add per-epoch figures (e.g. the KD weight) before logging. `tracked` is None on DDP ranks
    other than 0, which only `resume`."""

    tracked: tracking.StageRun | None
    workdir: Path
    model: torch.nn.Module
    spec: dict
    norm: dict
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object
    cfg: dict
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    metric_sources: list[Callable[[], dict[str, float]]] = field(default_factory=list)
    best_acc: float = -math.inf
    best_epoch: int = -1
    logged_through: int = -1  # last epoch whose metrics the run already holds (a resumed run may repeat one)
    recorded: dict[str, str] = field(default_factory=dict)  # hash tag -> the hash of the file now on the run

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        for source in self.metric_sources:
            metrics.update({f"train/{k}": v for k, v in source().items()})
        if epoch > self.logged_through:  # a crash between the metrics and last.pt must not log an epoch twice
            self.tracked.log_metrics(metrics, step=epoch)
        val_acc = metrics.get("val/acc", math.nan)
        improved = not math.isfinite(self.best_acc) or (math.isfinite(val_acc) and val_acc > self.best_acc)
        if improved:
            self.best_acc, self.best_epoch = (val_acc if math.isfinite(val_acc) else -math.inf), epoch
        payload = checkpoint.make_payload(
            model=self.model, spec=self.spec, normalisation=self.norm, epoch=epoch, metrics=metrics,
            optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler, config=self.cfg,
            extra={"best_val_acc": self.best_acc, "best_epoch": self.best_epoch,
                   "modules": {name: m.state_dict() for name, m in self.modules.items()}},
        )
        names = ["last", "best"] if improved else ["last"]
        # The hash is recorded before the file goes up, keeping the one it replaces as `_prev`: after a crash in
        # between, the file on the run is one of the two, and a resume can tell it from a foreign file.
        tags = {}
        for name in names:
            tag = HASH_TAGS[name]
            tags[f"{tag}_prev"] = self.recorded.get(tag, "")
            tags[tag] = self.recorded[tag] = payload["weights_sha256"]
        self.tracked.set_tags(tags)
        for name in names:
            checkpoint.save(self.workdir / f"{name}.pt", payload)
            self.tracked.log_artifact(self.workdir / f"{name}.pt", "checkpoints")

    def resume(self, run_id: str, fetched: dict[str, str] | None = None) -> int:
        """Restore model, modules, optimizer, scheduler and scaler from the run's `last.pt`; return the next epoch.
        Both checkpoints must be the ones the run recorded writing: `fetched` is what `fetch_checkpoints` returned
        for this workdir (before the run was written to); without it they are fetched and checked here."""
        self.recorded = fetched if fetched is not None else fetch_checkpoints(run_id, self.workdir)
        if self.tracked is not None:  # after a crash between a hash and its upload, the tag names the file again
            self.tracked.set_tags(self.recorded)
        payload = checkpoint.load(self.workdir / "last.pt")
        if payload["spec"] != self.spec:
            raise CheckpointError(f"run {run_id}'s last.pt holds model {payload['spec']['name']}, "
                                  f"the config asks for {self.spec['name']}", "resume with the run's own config")
        extra = payload.get("extra") or {}
        for name, module in self.modules.items():
            module.load_state_dict(extra["modules"][name])
        self.best_acc, self.best_epoch = extra.get("best_val_acc", -math.inf), extra.get("best_epoch", -1)
        history = tracking.metric_histories({run_id: ["train/loss"]})[run_id]["train/loss"]
        self.logged_through = max((step for step, _ in history), default=-1)
        return checkpoint.restore(payload, model=self.model, optimizer=self.optimizer,
                                  scheduler=self.scheduler, scaler=self.scaler)

    def load_best(self, device: torch.device) -> None:
        """Put the best epoch's weights (the ones later stages use by default) back into the model."""
        best = checkpoint.load(self.workdir / "best.pt", map_location=device)
        self.model.load_state_dict(best["state_dict"])

    def best_metrics(self) -> dict[str, float]:
        metrics = {"best/epoch": float(self.best_epoch)}
        if math.isfinite(self.best_acc):
            metrics["best/val_acc"] = self.best_acc
        return metrics
