"""What the teacher and student stages share: loaders per split, checkpoint callbacks, the params a run logs."""
from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kdtrack import checkpoint, config, tracking
from kdtrack.config import CacheConfig, Config, DataConfig, KDConfig, ModelConfig, OptimConfig
from kdtrack.data import IndexedDataset, make_loader
from kdtrack.errors import CheckpointError, ConfigError
from kdtrack.teachers import HASH_TAGS, Teacher, check_recorded_hash


def split_loaders(cfg: Config, splits: dict[str, IndexedDataset], device: torch.device,
                  shard: tuple[int, int] = (0, 1), order: torch.utils.data.Sampler | None = None,
                  ) -> dict[str, torch.utils.data.DataLoader]:
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
                                    shard=shard if train else (0, 1), order=order if train else None)
    return loaders


# A run's params are the settings that define it, each under its config key (so `--set KEY=VALUE` reproduces it),
# plus the row counts its data view gives; a setting its choices do not use is left out. `config.yaml` holds all.
_MODEL_KEYS = {"mlp": ("hidden", "dropout"), "cnn": ("channels", "dropout", "conv")}  # resnets: conv alone
_OPTIM_KEYS = {"sgd": ("lr", "momentum", "nesterov", "weight_decay"), "adamw": ("lr", "weight_decay")}
_SYNTHETIC_KEYS = ("num_samples", "num_classes", "input_shape", "unlabeled_samples")
_DATA_UNUSED = ("eval_batch_size", "num_workers")  # change how fast, not what is learnt


def data_params(data: DataConfig, *, student: bool) -> dict[str, object]:
    """`data.*` settings that choose the rows; the label budget `student_labels` on student-side runs only."""
    dropped = {*_DATA_UNUSED, *(() if data.source == "synthetic" else _SYNTHETIC_KEYS),
               *(() if student else ("student_labels",))}
    return {f"data.{k}": v for k, v in config.flatten(data).items() if k not in dropped and v != ""}


def model_params(prefix: str, model: ModelConfig) -> dict[str, object]:
    return {f"{prefix}.{k}": getattr(model, k) for k in ("name", *_MODEL_KEYS.get(model.name, ("conv",)))}


def optim_params(prefix: str, optim: OptimConfig) -> dict[str, object]:
    keys = ("name", *_OPTIM_KEYS[optim.name], "epochs", "schedule", *(("step_size", "gamma")
                                                                       if optim.schedule == "step" else ()))
    return {f"{prefix}.{k}": getattr(optim, k) for k in keys}


def teacher_params(cfg: Config, train: IndexedDataset) -> dict[str, object]:
    """A teacher: seed, data, its model and optimiser, AMP, label smoothing, and its training-row count."""
    return {"seed": cfg.seed, **data_params(cfg.data, student=False), "data.train_rows": len(train),
            **model_params("model", cfg.model), **optim_params("optim", cfg.optim), "train.amp": cfg.train.amp,
            "train.label_smoothing": cfg.train.label_smoothing}


def student_params(cfg: Config, teachers: list[Teacher], train: IndexedDataset) -> dict[str, object]:
    """A student: method, seed, its data view (splits, rows, labelled rows, label budget), its own model and
    optimiser, and only when it distils: its teachers (`teacher.*`) and the `kd.*` settings its method reads."""
    params = {"method": cfg.method, "seed": cfg.seed, **data_params(cfg.data, student=True),
              "data.train_splits": ",".join(train.split_counts()), "data.train_rows": len(train),
              "data.labelled_rows": int((train.labels >= 0).sum()),
              **model_params("student.model", cfg.student.model), **optim_params("student.optim", cfg.student.optim),
              "train.amp": cfg.train.amp}
    if cfg.method == "none":
        return {**params, "train.label_smoothing": cfg.train.label_smoothing}  # forced to 0 under KD
    params.update({"teacher_mode": cfg.teacher_mode, "teacher.run_ids": ",".join(t.run_id for t in teachers),
                   "teacher.models": ",".join(t.spec.name for t in teachers), "cache.checkpoint": cfg.cache.checkpoint})
    if cfg.method == "kd" and cfg.teacher_mode == "cached":
        params["cache.dtype"] = cfg.cache.dtype
        params.update(_views_params(cfg.cache))
        if cfg.kd.clean_targets:
            params["kd.clean_targets"] = True
    return {**params, **kd_params(cfg.method, cfg.kd, len(teachers))}


def cache_params(cfg: Config, teacher_run_ids: list[str], rows: IndexedDataset | None = None) -> dict[str, object]:
    """A cache run (or the parent of several): the student-side data view, the `cache.*` settings that choose what
    is stored, the teacher run(s), and (for one cache) the number of rows it holds."""
    cache = cfg.cache
    params = {**data_params(cfg.data, student=True), "cache.splits": cache.splits,
              **({"cache.allow_splits": cache.allow_splits} if cache.allow_splits else {}),
              **({"cache.split_files": cache.split_files} if cache.split_files else {}),
              "cache.dtype": cache.dtype, "cache.checkpoint": cache.checkpoint, "cache.verify_rows": cache.verify_rows,
              "train.amp": cfg.train.amp, "teacher.run_ids": ",".join(teacher_run_ids), **_views_params(cache)}
    return params if rows is None else {**params, "cache.rows": len(rows)}


def _views_params(cache: CacheConfig) -> dict[str, object]:
    """`cache.views` (0: clean samples) and, for a cache of views, the seed they are drawn with."""
    return {"cache.views": cache.views, **({"cache.view_seed": cache.view_seed} if cache.views else {})}


def kd_params(method: str, kd: KDConfig, teachers: int) -> dict[str, object]:
    """The `kd.*` settings `method` reads: logit KD its loss, schedule, weighting and fusion; feature methods alpha."""
    if method != "kd":
        return {"kd.alpha": kd.alpha, **({"kd.paraphraser_epochs": kd.paraphraser_epochs} if method == "ft" else {})}
    if kd.regression != "none":  # the regression term alone: no temperature, alpha, schedule or weighting
        keys = ["regression"]
    else:
        keys = ["alpha", "temperature", "loss_type", "weighting", "warmup_epochs", "ramp_epochs"]
        keys += ["confidence_threshold"] if kd.weighting == "threshold" else []
    keys += (["fusion"] + (["fusion_weights"] if kd.fusion == "weighted" else [])) if teachers > 1 else []
    keys += ["domain"] if kd.domain else []
    return {f"kd.{k}": getattr(kd, k) for k in keys}


def rows_name(rows: IndexedDataset, labels: float = 1.0) -> str:
    """A dataset input's name that tells data views apart: source, label budget, splits (`digits/5% labels/train`)."""
    budget = [f"{labels * 100:.4g}% labels"] if labels < 1.0 else []
    order = ("train", "unlabeled", "val", "test")
    splits = sorted(rows.split_counts(), key=lambda s: (order.index(s) if s in order else len(order), s))
    return "/".join([rows.source, *budget, "+".join(splits)])


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
        """`best/epoch` and `best/val_acc`: end-of-run summaries, logged at step 0 (see SUMMARY_STEP)."""
        metrics = {"best/epoch": float(self.best_epoch)}
        if math.isfinite(self.best_acc):
            metrics["best/val_acc"] = self.best_acc
        return metrics


# End-of-run summaries (`test/*`, `best/*`) are logged once at this step, so the MLflow UI draws them as bars, not as
# a lone dot at the last epoch of a line chart; per-epoch metrics use step = epoch.
SUMMARY_STEP = 0
