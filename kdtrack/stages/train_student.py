"""Train a student against its teachers' cached logits (or live teachers); its run holds checkpoints and KD metrics."""
from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

import torch

from kdtrack import config, distributed, engine, mlflow_model, tracking
from kdtrack.cache import ChunkAwareSampler
from kdtrack.config import Config
from kdtrack.data import IndexedDataset, dataset_digest, distillation_rows, fit_normalisation, student_dataset
from kdtrack.errors import BadInput
from kdtrack.losses.kd import kd_loss
from kdtrack.models import build_model, spec_from_config
from kdtrack.stages.distillation import Distillation, build_distillation
from kdtrack.stages.training import (SUMMARY_STEP, Saver, fetch_checkpoints, progress_enabled, rows_name,
                                     split_loaders, student_params)
from kdtrack.teachers import Teacher, check_fits, load_teacher

STAGE = "student"
T = tracking.TAG


def run(cfg: Config, teacher_run_ids: list[str] = (), *, build_missing_cache: bool = False,
        resume_run_id: str | None = None, cache_run_ids: list[str] = (), name: str | None = None) -> str:
    """Train `cfg.student.model` by `cfg.method` from the teachers (none: plain CE); return the student run id.
    `cache_run_ids` (one per teacher) pins the caches to read; by default the newest matching ones are found.
    `name` names a new run (default `run_name(cfg)`; a sweep adds what differs, e.g. the seed).

    Under torchrun the student trains with DDP: each rank takes its share of every batch and holds its own
    LogitTable; rank 0 owns the run, logs, checkpoints and tests, and alone returns the run id (others: "")."""
    engine.seed_everything(cfg.seed)
    device = distributed.device_for(engine.resolve_device(cfg.device))
    if cfg.method != "none" and not teacher_run_ids:
        raise BadInput(f"method {cfg.method} needs a teacher", "pass --teacher-run-id, or --set method=none")
    if cfg.method == "none" and teacher_run_ids:
        # A baseline is a function of its own config and data: a teacher named beside it changes nothing.
        print(f"note: method none uses no teacher; ignoring {', '.join(teacher_run_ids)}", file=sys.stderr)
        teacher_run_ids, cache_run_ids = [], []
    with distributed.process_group(device):
        return _train(cfg, list(teacher_run_ids), device, build_missing_cache, resume_run_id, list(cache_run_ids),
                      name or run_name(cfg))


def _train(cfg: Config, teacher_run_ids: list[str], device: torch.device, build_missing_cache: bool,
           resume_run_id: str | None, cache_run_ids: list[str], name: str) -> str:
    teachers = [load_teacher(t, device, cfg.cache.checkpoint) for t in teacher_run_ids]
    data = student_dataset(cfg.data)
    for teacher in teachers:
        check_fits(teacher, data, classes=cfg.kd.regression == "none")
    # A baseline learns from labels alone; a distilling student also gets the unlabelled transfer set.
    train = distillation_rows(data, cfg.cache.splits) if cfg.method != "none" else data.select(["train"])
    norm = teachers[0].normalisation if teachers else fit_normalisation(data.select(["train"]))
    splits = {"train": train, **{s: data.select([s]) for s in ("val", "test") if s in data.split_counts()}}
    splits = {name: ds.with_normalisation(norm) for name, ds in splits.items()}
    spec = spec_from_config(cfg.student.model, data.num_classes, data.input_shape, prefix="student.model")
    model = build_model(spec).to(device)
    digest = dataset_digest(train)
    distill = build_distillation(cfg, teachers, model, train, digest, device, build_missing_cache=build_missing_cache,
                                 cache_run_ids=cache_run_ids)
    loaders = split_loaders(cfg, splits, device, shard=(distributed.rank(), distributed.world_size()),
                            order=_chunk_aware_order(cfg, distill))
    params = [*model.parameters(), *(p for m in distill.modules.values() for p in m.parameters() if p.requires_grad)]
    optimizer = engine.build_optimizer(params, cfg.student.optim, prefix="student.optim")
    scheduler = engine.build_scheduler(optimizer, cfg.student.optim, prefix="student.optim")
    amp = engine.amp_dtype(cfg.train.amp, device)
    scaler = engine.make_scaler(amp, device)
    lead = distributed.rank() == 0
    expect = {f"{T}dataset_digest": digest, f"{T}teacher_run_ids": ",".join(teacher_run_ids),
              **{k: v for k, v in distill.tags.items() if k == f"{T}cache_run_ids"}}
    tracked_run = (tracking.stage_run(STAGE, cfg, run_name=name, resume_run_id=resume_run_id,
                                      description=_describe(cfg, spec.name, teachers, train, distill), expect=expect,
                                      params=student_params(cfg, teachers, train))
                   if lead else contextlib.nullcontext())
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        # checked before the run is written to (the other ranks, which write nothing, fetch in saver.resume)
        fetched = fetch_checkpoints(resume_run_id, Path(tmp)) if resume_run_id and lead else None
        tracked = stack.enter_context(tracked_run)
        if lead:
            _log_inputs(tracked, cfg, teacher_run_ids, digest, spec.name, train, distill, resumed=bool(resume_run_id))
        saver = Saver(tracked, Path(tmp), model=model, spec=spec.to_dict(), norm=norm.to_dict(), optimizer=optimizer,
                      scheduler=scheduler, scaler=scaler, cfg=config.to_dict(cfg), modules=distill.modules,
                      metric_sources=[distill.loss.pop_stats] if hasattr(distill.loss, "pop_stats") else [])
        start_epoch = saver.resume(resume_run_id, fetched) if resume_run_id else 0  # every rank restores the same state
        for module in distill.modules.values():
            distributed.average_gradients(module)
        engine.fit(distributed.wrap(model, device), loaders["train"], optimizer,
                   loss_fn=distill.training_loss,
                   epochs=cfg.student.optim.epochs, device=device, scheduler=scheduler, start_epoch=start_epoch,
                   val_loader=loaders.get("val") if lead else None, eval_model=model, scaler=scaler, amp_dtype=amp,
                   seed=cfg.seed, on_epoch_end=saver.on_epoch_end if lead else None,
                   progress=lead and progress_enabled(cfg.train.progress))
        if not lead:
            return ""
        saver.load_best(device)
        final = {**saver.best_metrics(), **_test_report(model, teachers, loaders.get("test"), device, amp)}
        tracked.log_metrics(final, step=SUMMARY_STEP)
        mlflow_model.log(tracked.run_id, saver.workdir / "best.pt", example=train.arrays(range(min(2, len(train)))))
        accuracy = final.get("test/acc", float("nan"))
        print(f"student run {tracked.run_id} ({tracking.get_run(tracked.run_id).info.run_name}): "
              f"test accuracy {accuracy:.4f}",
              file=sys.stderr)
        return tracked.run_id


def _chunk_aware_order(cfg: Config, distill: Distillation) -> ChunkAwareSampler | None:
    """For a cache over the memory budget (read by whole chunks): an epoch order that visits its chunks a window at
    a time, said once on stderr; None (the uniform shuffle) when every cache fits."""
    table = distill.chunked
    if table is None:
        return None
    order = ChunkAwareSampler(table, cfg.seed, rank=distributed.rank(), world=distributed.world_size())
    if distributed.rank() == 0:
        print(f"note: the cache {table.path} ({table.nbytes / 2**20:.2f} MiB) exceeds the memory budget "
              f"({table.memory_budget_bytes / 2**20:.2f} MiB, cache.memory_budget_mb): it is read by whole chunks and "
              f"the rows are shuffled chunk-aware ({order.window_chunks} of {table.num_chunks} chunks at a time)",
              file=sys.stderr)
    distill.tags[f"{T}row_order"] = "chunk-aware"
    return order


def _log_inputs(tracked: tracking.StageRun, cfg: Config, teacher_run_ids: list[str], digest: str, model_name: str,
                train: IndexedDataset, distill: Distillation, *, resumed: bool) -> None:
    """Lineage tags, and (once, not again on resume) the training rows and teacher caches as dataset inputs."""
    tracked.set_tags({f"{T}method": cfg.method, f"{T}teacher_mode": cfg.teacher_mode,
                      f"{T}teacher_run_ids": ",".join(teacher_run_ids), f"{T}dataset_digest": digest,
                      f"{T}model": model_name, f"{T}processes": str(distributed.world_size()), **distill.tags})
    if resumed:
        return
    tracked.log_dataset(name=rows_name(train, cfg.data.student_labels), digest=digest, context="train",
                        source={"source": train.source, "splits": ",".join(train.split_counts())})
    for cache in distill.caches:  # named as its run, `cache-<teacher run name>`; identified by its cache key
        tracked.log_dataset(name=tracking.get_run(cache.run_id).info.run_name, digest=cache.cache_key,
                            context="teacher_logits", digest_tag="cache_key",
                            source={"cache_run_id": cache.run_id, "teacher_run_id": cache.teacher_run_id})


def run_name(cfg: Config) -> str:
    """`student-none`, `student-kd-t4-a0.7`, `student-rkd-a0.75`: what the run is, at a glance in the UI."""
    if cfg.method == "none":
        return "student-none"
    temperature = f"-t{cfg.kd.temperature:g}" if cfg.method == "kd" else ""
    online = "-online" if cfg.teacher_mode == "online" and cfg.method == "kd" else ""
    return f"student-{cfg.method}{temperature}-a{cfg.kd.alpha:g}{online}"


def _describe(cfg: Config, model_name: str, teachers: list[Teacher], train: IndexedDataset,
              distill: Distillation) -> str:
    """Markdown: what the student learnt from, with links to its teacher and cache runs, and its rows."""
    rows = f"{len(train)} training rows ({', '.join(f'{k}={v}' for k, v in train.split_counts().items())})"
    if cfg.method == "none":
        return f"Student {model_name} without distillation, from labels only; {rows}."
    of = f"teacher{'s' if len(teachers) > 1 else ''} {', '.join(tracking.run_link(t.run_id) for t in teachers)}"
    if distill.caches:
        caches = ", ".join(tracking.run_link(c.run_id) for c in distill.caches)
        source = f"the cached logits of {of} (cache{'s' if len(distill.caches) > 1 else ''} {caches})"
    else:
        source = f"the {'live logits' if cfg.method == 'kd' else 'features'} of {of}"
    return f"Student {model_name} by {cfg.method} from {source}; {rows}."


def _test_report(model: torch.nn.Module, teachers: list[Teacher], test_loader, device: torch.device,
                 amp: torch.dtype | None) -> dict[str, float]:
    """Test accuracy, and against the first teacher: top-1 agreement and KL(teacher || student) at T=1."""
    if test_loader is None:
        return {}
    metrics = {"test/acc": engine.evaluate(model, test_loader, device=device, amp_dtype=amp)["acc"]}
    if not teachers or teachers[0].normalisation != teachers[-1].normalisation:
        return metrics
    model.eval()
    agree, kl, n = 0.0, 0.0, 0
    with torch.inference_mode():
        for x, *_ in test_loader:
            x = x.to(device, non_blocking=True)
            student, teacher = model(x).float(), teachers[0].model(x).float()
            agree += (student.argmax(1) == teacher.argmax(1)).sum().item()
            kl += kd_loss(student, teacher, temperature=1.0, reduction="sum").item()
            n += len(x)
    return {**metrics, "test/agreement": agree / n, "test/kl_to_teacher": kl / n}
