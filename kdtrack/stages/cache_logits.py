"""Cache a teacher's logits over the distillation rows of cfg.data into the run artifact `logits.zarr`."""
from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdtrack import cache, engine, tracking
from kdtrack.config import Config
from kdtrack.data import IndexedDataset, dataset_digest, distillation_rows, student_dataset
from kdtrack.errors import CacheError
from kdtrack.teachers import Teacher, check_fits, load_teacher

STAGE = "cache"
ARTIFACT = "logits.zarr"
T = tracking.TAG


def run(cfg: Config, teacher_run_id: str, *, force: bool = False, resume: bool = True) -> str:
    """Cache `teacher_run_id`'s logits for cfg.data into the artifact `logits.zarr`; return the cache run id.

    A FINISHED complete cache with the same key is reused (unless `force`); an unfinished one is resumed."""
    device = engine.resolve_device(cfg.device)
    teacher = load_teacher(teacher_run_id, device, cfg.cache.checkpoint)
    rows = distillation_rows(student_dataset(cfg.data), cfg.cache.splits, cfg.cache.allow_splits,
                             cfg.cache.split_files).with_normalisation(teacher.normalisation)
    check_fits(teacher, rows, classes=False)  # outputs may be signals of any shape; the inputs must fit
    plan = _plan(cfg, teacher, rows, device)
    if not force:
        # Same key and same teacher run: lineage stays exact even when two teacher runs hold equal weights.
        same = {f"{T}cache_key": plan.key, f"{T}teacher_run_id": teacher.run_id}
        for done in tracking.find_runs({**same, f"{T}complete": "true"}):
            print(f"reusing cache run {done.info.run_id} (key {plan.key[:12]}): same teacher checkpoint, "
                  "same data; pass --force to rebuild", file=sys.stderr)
            tracking.note_reuse(STAGE, done.info.run_id)
            return done.info.run_id
    unfinished = tracking.find_runs({f"{T}cache_key": plan.key, f"{T}teacher_run_id": teacher.run_id},
                                    statuses=("RUNNING", "FAILED", "KILLED"))
    resume_id = unfinished[0].info.run_id if resume and unfinished else None
    description = (f"Logits of teacher {teacher.run_name} ({teacher.checkpoint_name}.pt, "
                   f"{teacher.checkpoint_sha256[:12]}) over {len(rows)} rows of {rows.source} "
                   f"({', '.join(rows.split_counts())}), {cfg.cache.dtype}.")
    with tracking.stage_run(STAGE, cfg, run_name=f"cache-{teacher.run_name}", description=description,
                            resume_run_id=resume_id) as tracked:
        tracked.set_tags(plan.tags(teacher, len(rows)))
        if resume_id is None:
            tracked.log_dataset(name=rows.source, digest=plan.digest, context="cache",
                                source={"source": rows.source, "splits": ",".join(rows.split_counts())})
        _build_and_verify(cfg, tracked, teacher, rows, plan, device, resume=resume and not force)
        return tracked.run_id


def run_many(cfg: Config, teacher_run_ids: list[str], *, force: bool = False, resume: bool = True) -> list[str]:
    """One cache run per teacher, nested under one parent run when there are several."""
    if len(teacher_run_ids) == 1:
        return [run(cfg, teacher_run_ids[0], force=force, resume=resume)]
    with tracking.stage_run("cache-group", cfg, run_name=f"cache-{len(teacher_run_ids)}-teachers",
                            description=f"Logit caches of teachers {', '.join(teacher_run_ids)}.") as parent:
        ids = [run(cfg, t, force=force, resume=resume) for t in teacher_run_ids]
        parent.set_tags({f"{T}teacher_run_ids": ",".join(teacher_run_ids), f"{T}cache_run_ids": ",".join(ids)})
    return ids


@dataclass(frozen=True)
class _Plan:
    digest: str
    key: str
    compute_key: str  # the key without the data: caches sharing it can lend each other rows
    output_shape: tuple[int, ...]
    splits: tuple[str, ...]

    def tags(self, teacher: Teacher, num_rows: int) -> dict[str, str]:
        return {f"{T}teacher_run_id": teacher.run_id, f"{T}checkpoint_sha256": teacher.checkpoint_sha256,
                f"{T}checkpoint": teacher.checkpoint_name, f"{T}dataset_digest": self.digest,
                f"{T}cache_key": self.key, f"{T}compute_key": self.compute_key, f"{T}num_rows": str(num_rows),
                f"{T}splits": ",".join(self.splits), f"{T}complete": "false"}


def _plan(cfg: Config, teacher: Teacher, rows: IndexedDataset, device: torch.device) -> _Plan:
    digest = dataset_digest(rows)
    shape = cache.probe_output_shape(teacher.model, rows, device)
    splits = tuple(dict.fromkeys(rows.splits.tolist()))
    common = dict(checkpoint_sha256=teacher.checkpoint_sha256, splits=list(splits), dtype=cfg.cache.dtype,
                  output_shape=list(shape), normalisation=teacher.normalisation.to_dict())
    return _Plan(digest=digest, key=cache.cache_key(dataset_digest=digest, **common),
                 compute_key=cache.cache_key(dataset_digest="", **common), output_shape=shape, splits=splits)


def _build_and_verify(cfg: Config, tracked: tracking.StageRun, teacher: Teacher, rows: IndexedDataset,
                      plan: _Plan, device: torch.device, *, resume: bool) -> None:
    local_dir = tracking.local_artifact_dir(tracked.run_id)
    path = (local_dir if local_dir else tracking.download_dir() / "builds" / plan.key) / ARTIFACT
    attrs = {"teacher_run_id": teacher.run_id, "checkpoint_sha256": teacher.checkpoint_sha256,
             "dataset_digest": plan.digest, "cache_key": plan.key, "splits": list(plan.splits),
             "normalisation": teacher.normalisation.to_dict(), "model_spec": teacher.spec.to_dict(),
             "num_classes": teacher.spec.num_classes if len(plan.output_shape) == 1 else None}
    amp = engine.amp_dtype(cfg.train.amp, device)
    stats = cache.build(path, teacher.model, rows, attrs=attrs, device=device, batch_size=cfg.cache.batch_size,
                        amp_dtype=amp, dtype=cfg.cache.dtype, chunk_rows=cfg.cache.chunk_rows or None,
                        resume=resume, prior=_prior_rows(plan, rows), progress=_progress(cfg))
    store = cache.open_store(path, mode="r+")
    check_rows = np.random.default_rng(cfg.seed).permutation(len(rows))[: cfg.cache.verify_rows]
    report = cache.verify_store(store, rows.sample_ids, teacher.model, rows, fidelity_rows=check_rows,
                                device=device, amp_dtype=amp)
    if not report.passed:
        raise CacheError(f"cache verification failed: {'; '.join(report.failures())}",
                         "run again to rebuild the chunks that are not done, or with --no-resume")
    cache.mark_complete(store, report.fidelity_dict())
    size = cache.store_nbytes(path)
    if local_dir is None:
        size = upload_store(tracked, path)
        shutil.rmtree(path.parent, ignore_errors=True)
    tracked.log_metrics({"build/seconds": stats.seconds, "build/rows_per_s": stats.rows_per_s,
                         "build/rows_computed": stats.rows_computed, "build/rows_copied": stats.rows_copied,
                         "build/batch_size": stats.batch_size_used, "cache/bytes": size,
                         "cache/bytes_per_sample": size / max(len(rows), 1), **report.metrics()}, step=0)
    tracked.set_tags({f"{T}complete": "true"})
    print(f"cache run {tracked.run_id}: {len(rows)} rows ({stats.rows_computed} computed, "
          f"{stats.rows_copied} copied) at {stats.rows_per_s:.0f} rows/s; verified", file=sys.stderr)


def upload_store(tracked: tracking.StageRun, path: Path) -> int:
    """Upload the store at `path` as the run's `logits.zarr`, packed into a few shard files; return their bytes.

    A remote artifact store takes one request per file, and an unpacked store has four files per chunk.
    """
    packed = path.with_name(f"{path.name}.packed")
    shutil.rmtree(packed, ignore_errors=True)  # left by an interrupted earlier upload
    try:
        cache.pack(path, packed)
        # Files of an earlier upload under the same names are replaced; the packed layout is the same each time.
        tracked.log_artifacts(packed, ARTIFACT)
        return cache.store_nbytes(packed)
    finally:
        shutil.rmtree(packed, ignore_errors=True)


def _prior_rows(plan: _Plan, rows: IndexedDataset) -> cache.PriorRows | None:
    """A finished cache of the same teacher whose rows are a prefix of these (samples were appended)."""
    for other in tracking.find_runs({f"{T}compute_key": plan.compute_key, f"{T}complete": "true"}):
        n = int(other.data.tags.get(f"{T}num_rows", "0"))
        if 0 < n < len(rows) and dataset_digest(rows.take(np.arange(n))) == other.data.tags[f"{T}dataset_digest"]:
            return cache.PriorRows(tracking.artifact_path(other.info.run_id, ARTIFACT), n)
    return None


def _progress(cfg: Config) -> bool | None:
    return None if cfg.train.progress == "auto" else cfg.train.progress == "on"
