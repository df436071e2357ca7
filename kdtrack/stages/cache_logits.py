"""Cache a teacher's logits over the distillation rows of cfg.data into the run artifact `logits.zarr`.

One build of a cache at a time: a process takes the cache's claim (kdtrack.claims) before it looks for a finished run
to reuse, so a second process asking for the same cache waits, then reuses the run the first one finished.
"""
from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdtrack import augment, cache, claims, distributed, engine, tracking
from kdtrack.config import Config
from kdtrack.data import IndexedDataset, dataset_digest, distillation_rows, student_dataset
from kdtrack.errors import CacheError, KdtrackError
from kdtrack.stages.training import cache_params, progress_enabled, rows_name
from kdtrack.teachers import Teacher, check_fits, load_teacher

STAGE = "cache"
ARTIFACT = "logits.zarr"
# What a cache run's tags claim about its store, each equal to the store attribute of the same name.
STORE_TAGS = ("cache_key", "teacher_run_id", "checkpoint_sha256", "dataset_digest")
T = tracking.TAG


def run(cfg: Config, teacher_run_id: str, *, force: bool = False, resume: bool = True) -> str:
    """Cache `teacher_run_id`'s logits for cfg.data into the artifact `logits.zarr`; return the cache run id.

    A FINISHED complete cache with the same key is reused (unless `force`); an unfinished one is resumed.
    While another process on this machine builds the same cache, this one waits for it first.
    Under torchrun every rank fills its own chunks of the one store and rank 0 owns the run."""
    device = distributed.device_for(engine.resolve_device(cfg.device))
    if distributed.is_distributed():
        with distributed.process_group(device):
            if distributed.rank() == 0:
                return _lead(cfg, teacher_run_id, device, force=force, resume=resume)
            return _follow(cfg, teacher_run_id, device)
    teacher, rows, plan = _prepare(cfg, teacher_run_id, device)
    with _claim(teacher, plan):  # released after the run below has ended, so a waiter finds it FINISHED
        reused = None if force else _reusable(teacher, plan)
        if reused is not None:
            return reused
        with _cache_run(cfg, teacher, rows, plan, resume) as tracked:
            _build_and_verify(cfg, tracked, teacher, rows, plan, device, resume=resume and not force)
            return tracked.run_id


def run_many(cfg: Config, teacher_run_ids: list[str], *, force: bool = False, resume: bool = True) -> list[str]:
    """One cache run per teacher, nested under one parent run when there are several.

    Under torchrun only rank 0 returns the ids; the other ranks fill chunks and return []."""
    with distributed.process_group(distributed.device_for(engine.resolve_device(cfg.device))):
        if distributed.rank() != 0:
            for teacher_run_id in teacher_run_ids:
                run(cfg, teacher_run_id)  # fills its chunks of rank 0's plan: force and resume are rank 0's
            return []
        if len(teacher_run_ids) == 1:
            return [run(cfg, teacher_run_ids[0], force=force, resume=resume)]
        with tracking.stage_run("cache-group", cfg, run_name=f"cache-{len(teacher_run_ids)}-teachers",
                                description=f"Logit caches of teachers {', '.join(teacher_run_ids)}.",
                                params=cache_params(cfg, teacher_run_ids)) as parent:
            ids = [run(cfg, t, force=force, resume=resume) for t in teacher_run_ids]
            parent.set_tags({f"{T}teacher_run_ids": ",".join(teacher_run_ids), f"{T}cache_run_ids": ",".join(ids)})
        return ids


def cache_rows(cfg: Config, teacher: Teacher) -> IndexedDataset:
    """The rows `cfg` caches, in store order, as the teacher sees them (its normalisation)."""
    rows = distillation_rows(student_dataset(cfg.data), cfg.cache.splits, cfg.cache.allow_splits,
                             cfg.cache.split_files)
    return rows.with_normalisation(teacher.normalisation)


def _prepare(cfg: Config, teacher_run_id: str, device: torch.device) -> tuple[Teacher, IndexedDataset, _Plan]:
    teacher = load_teacher(teacher_run_id, device, cfg.cache.checkpoint)
    rows = cache_rows(cfg, teacher)
    check_fits(teacher, rows, classes=False)  # outputs may be signals of any shape; the inputs must fit
    return teacher, rows, plan_for(cfg, teacher, rows, device)


def _claim(teacher: Teacher, plan: _Plan) -> contextlib.AbstractContextManager[None]:
    return cache_claim(plan.key, teacher.run_id)


def cache_claim(key: str, teacher_run_id: str, doing: str = "building") -> contextlib.AbstractContextManager[None]:
    """The claim of cache `key` of `teacher_run_id`: held by one process on this machine at a time (a build or a
    repair), which then owns its unfinished run and store."""
    return claims.claim(tracking.download_dir() / "claims", f"cache-{key}-{teacher_run_id}",
                        f"{doing} cache {key[:12]}")


def _reusable(teacher: Teacher, plan: _Plan) -> str | None:
    """A FINISHED complete cache run of the same key and teacher run whose store checks out, announced on stderr.
    A candidate whose store does not is marked incomplete, so that nothing reuses it again."""
    # Same key and same teacher run: lineage stays exact even when two teacher runs hold equal weights.
    same = {f"{T}cache_key": plan.key, f"{T}teacher_run_id": teacher.run_id}
    for done in tracking.find_runs({**same, f"{T}complete": "true"}):
        problem = store_problem(done)
        if problem:
            mark_broken(done, problem)
            continue
        print(f"reusing cache run {done.info.run_id} (key {plan.key[:12]}): same teacher checkpoint, "
              "same data; pass --force to rebuild", file=sys.stderr)
        tracking.note_reuse(STAGE, done.info.run_id)
        return done.info.run_id
    return None


def store_problem(run, expect: dict[str, str] | None = None, path: Path | None = None) -> str | None:
    """What keeps cache run `run` from being read, or None: the run must be a FINISHED, complete, live cache run, and
    its store must exist, say complete, have every chunk done, and carry the key, teacher, checkpoint and digest its
    run's tags claim; `expect` adds attribute values the reader needs (e.g. the teacher's checkpoint hash, dtype)."""
    tags, rid = run.data.tags, run.info.run_id
    if run.info.lifecycle_stage == "deleted":
        return f"cache run {rid} is deleted"
    if tags.get(f"{T}stage") != STAGE:
        return f"run {rid} is a {tags.get(f'{T}stage') or 'non-kdtrack'} run, not a cache"
    if run.info.status != "FINISHED" or tags.get(f"{T}complete") != "true":
        return f"cache run {rid} is {run.info.status}, complete={tags.get(f'{T}complete', '?')}"
    try:
        store = cache.open_store(path or tracking.artifact_path(rid, ARTIFACT))
    except KdtrackError as exc:
        return f"the store of cache run {rid} cannot be opened: {exc.what}"
    attrs = dict(store.attrs)
    claimed = {**{name: tags.get(f"{T}{name}") for name in STORE_TAGS}, **(expect or {})}
    for name, want in claimed.items():
        if str(attrs.get(name)) != str(want):
            return (f"the store of cache run {rid} has {name}={tracking.short(str(attrs.get(name)))}, "
                    f"expected {tracking.short(str(want))}")
    if not attrs.get("complete"):
        return f"the store of cache run {rid} is not marked complete"
    not_done = np.flatnonzero(~cache.done_flags(store))
    if len(not_done):
        return f"the store of cache run {rid} has {len(not_done)} chunks not done (first: {not_done[0]})"
    return None


def mark_broken(run, problem: str) -> None:
    """Record on the run (and on its store, when it opens) that it must not be read, and say so."""
    print(f"not reusing cache run {run.info.run_id}: {problem}; marked incomplete", file=sys.stderr)
    tracked = tracking.StageRun.of(run.info.run_id)
    tracked.set_tags({f"{T}complete": "false", f"{T}verified": "fail", f"{T}problem": problem[:500]})
    with contextlib.suppress(KdtrackError):
        path = tracking.artifact_path(run.info.run_id, ARTIFACT)
        cache.mark_incomplete(cache.open_store(path, mode="r+"))
        upload_attributes(tracked, path)


@contextlib.contextmanager
def _cache_run(cfg: Config, teacher: Teacher, rows: IndexedDataset, plan: _Plan,
               resume: bool) -> Iterator[tracking.StageRun]:
    """The cache run: an unfinished one of the same key when resuming, else a new one."""
    unfinished = tracking.find_runs({f"{T}cache_key": plan.key, f"{T}teacher_run_id": teacher.run_id},
                                    statuses=("RUNNING", "FAILED", "KILLED"))
    resume_id = unfinished[0].info.run_id if resume and unfinished else None
    description = (f"Logits of teacher {teacher.run_name} ({teacher.checkpoint_name}.pt, "
                   f"{teacher.checkpoint_sha256[:12]}) over {len(rows)} rows of {rows.source} "
                   f"({', '.join(rows.split_counts())}), {cfg.cache.dtype}.")
    with tracking.stage_run(STAGE, cfg, run_name=f"cache-{teacher.run_name}", description=description,
                            resume_run_id=resume_id, same_config=False,
                            params=cache_params(cfg, [teacher.run_id], rows),
                            expect={f"{T}cache_key": plan.key, f"{T}teacher_run_id": teacher.run_id}) as tracked:
        tracked.set_tags(plan.tags(teacher, len(rows)))
        if resume_id is None:
            tracked.log_dataset(name=rows_name(rows, cfg.data.student_labels), digest=plan.digest, context="cache",
                                source={"source": rows.source, "splits": ",".join(rows.split_counts())})
        yield tracked


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


def plan_for(cfg: Config, teacher: Teacher, rows: IndexedDataset, device: torch.device,
             digest: str | None = None) -> _Plan:
    """The cache of `teacher` over `rows` that `cfg` asks for: digest, key, output shape, splits."""
    digest = digest or dataset_digest(rows)
    views = cache_views(cfg)
    shape = cache.probe_output_shape(augment.with_views(teacher.model, views), rows, device)
    splits = tuple(dict.fromkeys(rows.splits.tolist()))
    common = dict(checkpoint_sha256=teacher.checkpoint_sha256, splits=list(splits), dtype=cfg.cache.dtype,
                  output_shape=list(shape), normalisation=teacher.normalisation.to_dict(),
                  views=views.to_attrs() if views else None)
    return _Plan(digest=digest, key=cache.cache_key(dataset_digest=digest, **common),
                 compute_key=cache.cache_key(dataset_digest="", **common), output_shape=shape, splits=splits)


def cache_views(cfg: Config) -> augment.Views | None:
    """The augmented views `cfg` caches per row (cache.views of data.augment's per-sample ops); None: clean rows."""
    return augment.cache_views(cfg.data.augment, cfg.cache.views, cfg.cache.view_seed)


def _build_and_verify(cfg: Config, tracked: tracking.StageRun, teacher: Teacher, rows: IndexedDataset,
                      plan: _Plan, device: torch.device, *, resume: bool) -> None:
    path = _store_path(tracked.run_id, plan)
    stats = _fill(cfg, path, teacher, rows, plan, device, resume=resume, prior=_prior_rows(plan, rows))
    _finish(cfg, tracked, path, teacher, rows, stats, device)


def _store_path(run_id: str, plan: _Plan) -> Path:
    local_dir = tracking.local_artifact_dir(run_id)
    return (local_dir if local_dir else tracking.download_dir() / "builds" / plan.key) / ARTIFACT


def _fill(cfg: Config, path: Path, teacher: Teacher, rows: IndexedDataset, plan: _Plan, device: torch.device, *,
          resume: bool, prior: cache.PriorRows | None, chunks: list[int] | None = None) -> cache.BuildStats:
    attrs = {"teacher_run_id": teacher.run_id, "checkpoint_sha256": teacher.checkpoint_sha256,
             "dataset_digest": plan.digest, "cache_key": plan.key, "splits": list(plan.splits),
             "normalisation": teacher.normalisation.to_dict(), "model_spec": teacher.spec.to_dict(),
             "num_classes": teacher.spec.num_classes if len(plan.output_shape) == 1 else None}
    views = cache_views(cfg)
    if views:
        attrs.update(views=views.to_attrs(), num_classes=teacher.spec.num_classes if len(plan.output_shape) == 2
                     else None)
    return cache.build(path, augment.with_views(teacher.model, views), rows, attrs=attrs, device=device,
                       batch_size=cfg.cache.batch_size,
                       amp_dtype=engine.amp_dtype(cfg.train.amp, device), dtype=cfg.cache.dtype,
                       chunk_rows=cfg.cache.chunk_rows or None, resume=resume, chunks=chunks, prior=prior,
                       progress=progress_enabled(cfg.train.progress), num_workers=cfg.data.num_workers)


def _finish(cfg: Config, tracked: tracking.StageRun, path: Path, teacher: Teacher, rows: IndexedDataset,
            stats: cache.BuildStats, device: torch.device, extra: dict[str, float] | None = None) -> None:
    """Verify the filled store, mark it complete, upload it when the artifact store is remote, log metrics."""
    store = cache.open_store(path, mode="r+")
    check_rows = np.random.default_rng(cfg.seed).permutation(len(rows))[: cfg.cache.verify_rows]
    report = cache.verify_store(store, rows.sample_ids, augment.with_views(teacher.model, cache_views(cfg)), rows,
                                fidelity_rows=check_rows, device=device,
                                amp_dtype=engine.amp_dtype(cfg.train.amp, device))
    if not report.passed:
        raise CacheError(f"cache verification failed: {'; '.join(report.failures())}",
                         "run again to rebuild the chunks that are not done, or with --no-resume")
    cache.mark_complete(store, report.fidelity_dict())
    size = cache.store_nbytes(path)
    if tracking.local_artifact_dir(tracked.run_id) is None:
        size = upload_store(tracked, path)
        shutil.rmtree(path.parent, ignore_errors=True)
    tracked.log_metrics({"build/seconds": stats.seconds, "build/rows_per_s": stats.rows_per_s,
                         "build/rows_computed": stats.rows_computed, "build/rows_copied": stats.rows_copied,
                         "build/batch_size": stats.batch_size_used, "cache/bytes": size,
                         "cache/bytes_per_sample": size / max(len(rows), 1), **report.metrics(), **(extra or {})},
                        step=0)
    tracked.set_tags({f"{T}complete": "true"})
    print(f"cache run {tracked.run_id}: {len(rows)} rows ({stats.rows_computed} computed, "
          f"{stats.rows_copied} copied) at {stats.rows_per_s:.0f} rows/s; verified", file=sys.stderr)


@dataclass(frozen=True)
class _Job:
    """What rank 0 tells the other ranks: the run, and the store to fill (None when a cache was reused)."""

    run_id: str = ""
    path: Path | None = None
    key: str = ""
    prior: cache.PriorRows | None = None
    error: str = ""


def _lead(cfg: Config, teacher_run_id: str, device: torch.device, *, force: bool, resume: bool) -> str:
    """Rank 0: resolve the plan, own the run and create the store, fill its chunks, then verify and finish."""
    with contextlib.ExitStack() as stack:
        try:
            teacher, rows, plan = _prepare(cfg, teacher_run_id, device)  # downloads before the others read
            stack.enter_context(_claim(teacher, plan))  # let go after the run has ended: the stack unwinds in reverse
            reused = None if force else _reusable(teacher, plan)
            if reused is None:
                tracked = stack.enter_context(_cache_run(cfg, teacher, rows, plan, resume))
                path, prior = _store_path(tracked.run_id, plan), _prior_rows(plan, rows)
                _fill(cfg, path, teacher, rows, plan, device, resume=resume and not force, prior=prior, chunks=[])
        except Exception as exc:
            distributed.broadcast_object(_Job(error=f"{type(exc).__name__}: {exc}"))
            raise
        if reused is not None:
            distributed.broadcast_object(_Job(run_id=reused))
            return reused
        distributed.broadcast_object(_Job(run_id=tracked.run_id, path=path, key=plan.key, prior=prior))
        stats = _fill_owned(cfg, path, teacher, rows, plan, device, prior)
        every = distributed.gather_objects(stats)  # also the barrier: every rank's chunks are on disk
        per_rank = {f"build/chunks_rank{r}": s.chunks_written for r, s in enumerate(every)}
        try:
            _finish(cfg, tracked, path, teacher, rows, _combined(every), device, extra=per_rank)
        except Exception as exc:
            distributed.broadcast_object(f"{type(exc).__name__}: {exc}")
            raise
    distributed.broadcast_object("")  # the run has ended FINISHED: the others may now use the cache
    return tracked.run_id


def _follow(cfg: Config, teacher_run_id: str, device: torch.device) -> str:
    """Rank > 0: wait for rank 0's plan, fill this rank's chunks of its store, wait for rank 0 to finish the run;
    never writes to the tracking store."""
    job: _Job = distributed.broadcast_object(None)
    if job.error:
        raise CacheError(f"rank 0 failed before the build: {job.error}", "see rank 0's error above and fix that")
    if job.path is None:
        return job.run_id
    teacher, rows, plan = _prepare(cfg, teacher_run_id, device)
    if plan.key != job.key:
        raise CacheError(f"rank {distributed.rank()} computed cache key {plan.key[:12]}, rank 0 {job.key[:12]}",
                         "give every rank the same config, data and teacher run")
    distributed.gather_objects(_fill_owned(cfg, job.path, teacher, rows, plan, device, job.prior))
    failure = distributed.broadcast_object(None)  # returns once rank 0 has verified the store and ended the run
    if failure:
        raise CacheError(f"rank 0 could not finish the cache: {failure}", "see rank 0's error above and fix that")
    return job.run_id


def _fill_owned(cfg: Config, path: Path, teacher: Teacher, rows: IndexedDataset, plan: _Plan, device: torch.device,
                prior: cache.PriorRows | None) -> cache.BuildStats:
    """Compute this rank's not-done chunks (c % world_size == rank) of the store rank 0 created."""
    mine = distributed.owned_chunks(cache.num_chunks(cache.open_store(path)))
    stats = _fill(cfg, path, teacher, rows, plan, device, resume=True, prior=prior, chunks=mine)
    print(f"rank {distributed.rank()}/{distributed.world_size()}: wrote {stats.chunks_written} of its "
          f"{len(mine)} chunks ({stats.rows_computed} rows computed)", file=sys.stderr)
    return stats


def _combined(every: list[cache.BuildStats]) -> cache.BuildStats:
    """One build's stats from every rank's: rows add up, the ranks ran side by side."""
    computed = sum(s.rows_computed for s in every)
    seconds = max(s.seconds for s in every)
    return cache.BuildStats(computed, sum(s.rows_copied for s in every), sum(s.chunks_written for s in every),
                            seconds, computed / seconds if computed else 0.0, min(s.batch_size_used for s in every))


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


def upload_attributes(tracked: tracking.StageRun, path: Path) -> None:
    """When the run's store lives on a remote artifact store, `path` is a downloaded copy: upload its group metadata
    (`zarr.json`, which holds `complete` and `fidelity`) so that the server's store says what the run says."""
    if tracking.local_artifact_dir(tracked.run_id) is None:
        tracked.log_artifact(path / "zarr.json", ARTIFACT)


def _prior_rows(plan: _Plan, rows: IndexedDataset) -> cache.PriorRows | None:
    """A finished cache of the same teacher whose rows are a prefix of these (samples were appended). A candidate
    whose store does not check out is marked incomplete and passed over, as `_reusable` does: else a cache whose
    artifact is gone would fail every build of the grown data, --force included."""
    for other in tracking.find_runs({f"{T}compute_key": plan.compute_key, f"{T}complete": "true"}):
        n = int(other.data.tags.get(f"{T}num_rows", "0"))
        if 0 < n < len(rows) and dataset_digest(rows.take(np.arange(n))) == other.data.tags[f"{T}dataset_digest"]:
            problem = store_problem(other)
            if problem:
                mark_broken(other, problem)
                continue
            return cache.PriorRows(tracking.artifact_path(other.info.run_id, ARTIFACT), n)
    return None
