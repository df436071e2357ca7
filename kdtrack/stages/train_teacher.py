"""Train a teacher; its run holds the artifacts `checkpoints/best.pt` and `checkpoints/last.pt`."""
from __future__ import annotations

import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from kdtrack import checkpoint, config, engine, tracking
from kdtrack.config import Config
from kdtrack.data import IndexedDataset, build_dataset, dataset_digest, fit_normalisation, make_loader
from kdtrack.errors import CheckpointError
from kdtrack.models import build_model, spec_from_config

STAGE = "teacher"


def run(cfg: Config, resume_run_id: str | None = None) -> str:
    """Train `cfg.model` on the train split of `cfg.data`, logging metrics and checkpoints; return the run id."""
    engine.seed_everything(cfg.seed)
    device = engine.resolve_device(cfg.device)
    full = build_dataset(cfg.data)
    digest = dataset_digest(full)
    norm = fit_normalisation(full.select(["train"]))
    splits = {s: full.select([s]).with_normalisation(norm) for s in ("train", "val", "test") if s in full.split_counts()}
    spec = spec_from_config(cfg.model, full.num_classes, full.input_shape)
    model = build_model(spec).to(device)
    optimizer = engine.build_optimizer(model.parameters(), cfg.optim)
    scheduler = engine.build_scheduler(optimizer, cfg.optim)
    amp = engine.amp_dtype(cfg.train.amp, device)
    scaler = engine.make_scaler(amp, device)
    loaders = {
        name: make_loader(ds, cfg.data.batch_size if name == "train" else cfg.data.eval_batch_size,
                          shuffle=name == "train", seed=cfg.seed, num_workers=cfg.data.num_workers, device=device)
        for name, ds in splits.items()
    }
    description = (f"Teacher {spec.name} on {full.source} ({len(splits['train'])} train samples, "
                   f"dataset {digest[:12]}), {cfg.optim.epochs} epochs.")
    run_name = f"teacher-{spec.name}-{full.source}"
    with tracking.stage_run(STAGE, cfg, run_name=run_name, description=description,
                            resume_run_id=resume_run_id) as tracked, tempfile.TemporaryDirectory() as tmp:
        tracked.set_tags({f"{tracking.TAG}dataset_digest": digest, f"{tracking.TAG}model": spec.name,
                          f"{tracking.TAG}data_source": full.source})
        if not resume_run_id:
            _log_dataset(tracked, full, digest)
        saver = _Saver(tracked, Path(tmp), model=model, spec=spec.to_dict(), norm=norm.to_dict(),
                       optimizer=optimizer, scheduler=scheduler, scaler=scaler, cfg=config.to_dict(cfg))
        start_epoch = saver.resume(resume_run_id) if resume_run_id else 0
        engine.fit(model, loaders["train"], optimizer, loss_fn=engine.SupervisedLoss(cfg.train.label_smoothing),
                   epochs=cfg.optim.epochs, device=device, scheduler=scheduler, val_loader=loaders.get("val"),
                   start_epoch=start_epoch, scaler=scaler, amp_dtype=amp, seed=cfg.seed,
                   on_epoch_end=saver.on_epoch_end, progress=_progress(cfg.train.progress))
        _final_report(tracked, saver, model, loaders.get("test"), device, amp, cfg.optim.epochs)
        return tracked.run_id


@dataclass
class _Saver:
    """Epoch-end callback: log metrics, write `last.pt` every epoch and `best.pt` when val accuracy improves."""

    tracked: tracking.StageRun
    workdir: Path
    model: torch.nn.Module
    spec: dict
    norm: dict
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object
    cfg: dict
    best_acc: float = -math.inf
    best_epoch: int = -1

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.tracked.log_metrics(metrics, step=epoch)
        val_acc = metrics.get("val/acc", math.nan)
        improved = not math.isfinite(self.best_acc) or (math.isfinite(val_acc) and val_acc > self.best_acc)
        if improved:
            self.best_acc, self.best_epoch = (val_acc if math.isfinite(val_acc) else -math.inf), epoch
        payload = checkpoint.make_payload(
            model=self.model, spec=self.spec, normalisation=self.norm, epoch=epoch, metrics=metrics,
            optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler, config=self.cfg,
            extra={"best_val_acc": self.best_acc, "best_epoch": self.best_epoch},
        )
        names = ["last.pt", "best.pt"] if improved else ["last.pt"]
        for name in names:
            checkpoint.save(self.workdir / name, payload)
            self.tracked.log_artifact(self.workdir / name, "checkpoints")
        tags = {f"{tracking.TAG}checkpoint_sha256_last": payload["weights_sha256"]}
        if improved:
            tags[f"{tracking.TAG}checkpoint_sha256"] = payload["weights_sha256"]
        self.tracked.set_tags(tags)

    def resume(self, run_id: str) -> int:
        """Restore model, optimizer, scheduler and scaler from the run's `last.pt`; return the next epoch."""
        for name in ("last.pt", "best.pt"):
            local = tracking.download_artifact(run_id, f"checkpoints/{name}", self.workdir / "download")
            local.replace(self.workdir / name)
        payload = checkpoint.load(self.workdir / "last.pt")
        if payload["spec"] != self.spec:
            raise CheckpointError(f"run {run_id}'s last.pt holds model {payload['spec']['name']}, "
                                  f"the config asks for {self.spec['name']}", "resume with the run's own config")
        extra = payload.get("extra") or {}
        self.best_acc, self.best_epoch = extra.get("best_val_acc", -math.inf), extra.get("best_epoch", -1)
        return checkpoint.restore(payload, model=self.model, optimizer=self.optimizer,
                                  scheduler=self.scheduler, scaler=self.scaler)


def _final_report(tracked: tracking.StageRun, saver: _Saver, model: torch.nn.Module, test_loader,
                  device: torch.device, amp: torch.dtype | None, epochs: int) -> None:
    """Evaluate the best checkpoint (the one caches use by default) on the test split."""
    best = checkpoint.load(saver.workdir / "best.pt", map_location=device)
    model.load_state_dict(best["state_dict"])
    metrics = {"best/epoch": float(saver.best_epoch)}
    if math.isfinite(saver.best_acc):
        metrics["best/val_acc"] = saver.best_acc
    if test_loader is not None:
        result = engine.evaluate(model, test_loader, device=device, amp_dtype=amp)
        metrics.update({"test/acc": result["acc"], "test/loss": result["loss"]})
        print(f"teacher run {tracked.run_id}: test accuracy {result['acc']:.4f} (best epoch {saver.best_epoch})",
              file=sys.stderr)
    tracked.log_metrics(metrics, step=max(epochs - 1, 0))


def _log_dataset(tracked: tracking.StageRun, full: IndexedDataset, digest: str) -> None:
    counts = ",".join(f"{k}={v}" for k, v in sorted(full.split_counts().items()))
    tracked.log_dataset(name=full.source, digest=digest, context="train",
                        source={"source": full.source, "splits": counts, "num_classes": str(full.num_classes),
                                "input_shape": "x".join(map(str, full.input_shape))})


def _progress(mode: str) -> bool:
    return sys.stderr.isatty() if mode == "auto" else mode == "on"
