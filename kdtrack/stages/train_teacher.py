"""Train a teacher; its run holds the artifacts `checkpoints/best.pt` and `checkpoints/last.pt`."""
from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

import torch

from kdtrack import augment, config, engine, mlflow_model, tracking
from kdtrack.config import Config
from kdtrack.data import IndexedDataset, build_dataset, dataset_digest, fit_normalisation
from kdtrack.models import build_model, spec_from_config
from kdtrack.stages.training import (SUMMARY_STEP, Saver, fetch_checkpoints, progress_enabled, rows_name,
                                     split_loaders, teacher_params)

STAGE = "teacher"


def run(cfg: Config, resume_run_id: str | None = None) -> str:
    """Train `cfg.model` on the train split of `cfg.data`, logging metrics and checkpoints; return the run id."""
    engine.seed_everything(cfg.seed)
    device = engine.resolve_device(cfg.device)
    full = build_dataset(cfg.data)
    # the model against the first sample's shape, before the digest reads (or hashes) every file
    spec = spec_from_config(cfg.model, full.num_classes, full.input_shape, prefix="model")
    model = build_model(spec).to(device)
    digest = dataset_digest(full)
    norm = fit_normalisation(full.select(["train"]))
    splits = {s: full.select([s]).with_normalisation(norm) for s in ("train", "val", "test") if s in full.split_counts()}
    optimizer = engine.build_optimizer(model.parameters(), cfg.optim)
    scheduler = engine.build_scheduler(optimizer, cfg.optim)
    amp = engine.amp_dtype(cfg.train.amp, device)
    scaler = engine.make_scaler(amp, device)
    loaders = split_loaders(cfg, splits, device)
    description = (f"Teacher {spec.name} on {full.source} ({len(splits['train'])} train samples, "
                   f"dataset {digest[:12]}), {cfg.optim.epochs} epochs.")
    run_name = f"teacher-{spec.name}-{full.source}"
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        # checked before the run is written to
        fetched = fetch_checkpoints(resume_run_id, Path(tmp)) if resume_run_id else None
        tracked = stack.enter_context(tracking.stage_run(
            STAGE, cfg, run_name=run_name, description=description, resume_run_id=resume_run_id,
            expect={f"{tracking.TAG}dataset_digest": digest}, params=teacher_params(cfg, splits["train"])))
        tracked.set_tags({f"{tracking.TAG}dataset_digest": digest, f"{tracking.TAG}model": spec.name,
                          f"{tracking.TAG}data_source": full.source})
        if not resume_run_id:
            _log_dataset(tracked, full, digest)
        saver = Saver(tracked, Path(tmp), model=model, spec=spec.to_dict(), norm=norm.to_dict(),
                       optimizer=optimizer, scheduler=scheduler, scaler=scaler, cfg=config.to_dict(cfg))
        start_epoch = saver.resume(resume_run_id, fetched) if resume_run_id else 0
        loss_fn = engine.SupervisedLoss(cfg.train.label_smoothing)
        saver.metric_sources.append(loss_fn.pop_stats)
        engine.fit(model, loaders["train"], optimizer,
                   loss_fn=augment.training_loss(loss_fn, cfg.data.augment, cfg.seed), epochs=cfg.optim.epochs,
                   device=device, scheduler=scheduler, val_loader=loaders.get("val"), start_epoch=start_epoch,
                   scaler=scaler, amp_dtype=amp, seed=cfg.seed, on_epoch_end=saver.on_epoch_end,
                   progress=progress_enabled(cfg.train.progress))
        _final_report(tracked, saver, model, loaders.get("test"), device, amp)
        mlflow_model.log(tracked.run_id, saver.workdir / "best.pt", example=full.arrays(range(min(2, len(full)))))
        return tracked.run_id


def _final_report(tracked: tracking.StageRun, saver: Saver, model: torch.nn.Module, test_loader,
                  device: torch.device, amp: torch.dtype | None) -> None:
    """Evaluate the best checkpoint (the one caches use by default) on the test split."""
    saver.load_best(device)
    metrics = saver.best_metrics()
    if test_loader is not None:
        result = engine.evaluate(model, test_loader, device=device, amp_dtype=amp)
        metrics.update({"test/acc": result["acc"], "test/loss": result["loss"]})
        print(f"teacher run {tracked.run_id}: test accuracy {result['acc']:.4f} (best epoch {saver.best_epoch})",
              file=sys.stderr)
    tracked.log_metrics(metrics, step=SUMMARY_STEP)


def _log_dataset(tracked: tracking.StageRun, full: IndexedDataset, digest: str) -> None:
    counts = ",".join(f"{k}={v}" for k, v in sorted(full.split_counts().items()))
    tracked.log_dataset(name=rows_name(full), digest=digest, context="train",
                        source={"source": full.source, "splits": counts, "num_classes": str(full.num_classes),
                                "input_shape": "x".join(map(str, full.input_shape))})

