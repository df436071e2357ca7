"""Verify a cache run's `logits.zarr`: the data it was built for, coverage, chunk integrity, no NaN/Inf, fidelity to
its teacher; repair bad chunks under the cache's claim."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from kdtrack import augment, cache, config, engine, tracking
from kdtrack.data import dataset_digest
from kdtrack.errors import BadInput, CacheError, TrackingError
from kdtrack.stages.cache_logits import (ARTIFACT, STAGE, STORE_TAGS, cache_claim, cache_rows, upload_attributes,
                                         upload_store)
from kdtrack.teachers import load_teacher

T = tracking.TAG


@dataclass
class Verdict:
    run_id: str
    passed: bool
    lines: list[str]
    repaired_chunks: list[int]
    repairable: bool = False  # failed only in chunks that --repair can rebuild
    refusal: str = ""  # why a repair that was asked for cannot be done, e.g. the data changed


def run(cache_run_id: str, *, recompute: int = 64, repair: bool = False, seed: int = 0) -> Verdict:
    """Check the cache of run `cache_run_id` (re-running its teacher on `recompute` random rows); with `repair`,
    rebuild only the bad chunks. Results are logged on the cache run; the store is complete only if it passes.

    The check, the repair and the record happen under the cache's claim: never beside a build or another repair."""
    tags = _cache_tags(cache_run_id)
    with cache_claim(tags[f"{T}cache_key"], tags[f"{T}teacher_run_id"], doing="repairing" if repair else "verifying"):
        try:
            path = tracking.artifact_path(cache_run_id, ARTIFACT)
            store = cache.open_store(path, mode="r+")
        except (CacheError, TrackingError) as exc:
            return _unusable(cache_run_id, exc.what, repair)
        return _verify(cache_run_id, tags, path, store, recompute=recompute, repair=repair, seed=seed)


def _cache_tags(run_id: str) -> dict[str, str]:
    """The tags of cache run `run_id`; BadInput for a run of another stage."""
    run_info = tracking.get_run(run_id)
    tags = run_info.data.tags
    stage = tags.get(f"{T}stage")
    if stage != STAGE:
        raise BadInput(f"run {run_id} ({run_info.info.run_name}) is a {stage or 'non-kdtrack'} run, not a cache",
                       "pass a run id printed by `kdtrack cache-logits`")
    absent = [f"{T}{name}" for name in ("cache_key", "teacher_run_id") if f"{T}{name}" not in tags]
    if absent:
        raise CacheError(f"cache run {run_id} lacks the tags {', '.join(absent)}",
                         "it was not finished by kdtrack cache-logits; build a new cache with kdtrack cache-logits")
    return tags


def _verify(run_id: str, tags: dict[str, str], path: Path, store: zarr.Group, *, recompute: int, repair: bool,
            seed: int) -> Verdict:
    """Check the open store against its run's data (digest first), teacher and tags; repair only what a rebuild of
    whole chunks of the same data and checkpoint can fix; record the result."""
    cfg = tracking.load_run_config(run_id, config.Config)
    device = engine.resolve_device(cfg.device)
    teacher = load_teacher(store.attrs["teacher_run_id"], device, tags.get(f"{T}checkpoint", "best"))
    rows = cache_rows(cfg, teacher)
    digest = dataset_digest(rows, recompute=True)  # every file re-read: the rows as they are on disk now
    amp = engine.amp_dtype(cfg.train.amp, device)
    check_rows = np.random.default_rng(seed).permutation(len(rows))[:recompute]
    model = augment.with_views(teacher.model, augment.Views.from_attrs(store.attrs.get("views")))  # views replayed

    def check() -> cache.VerifyReport:
        report = cache.verify_store(store, rows.sample_ids, model, rows, fidelity_rows=check_rows,
                                    device=device, amp_dtype=amp, expected_checkpoint=teacher.checkpoint_sha256,
                                    data_digest=digest)
        report.provenance += _tag_mismatches(tags, store)
        return report

    report = check()
    lines, repaired, refusal, repairable = report.lines(), [], "", report.repairable
    if repair and not report.passed and not repairable:
        refusal = "; ".join(report.failures())  # e.g. other data: rebuilt chunks would hold its logits, old digest
    elif repair and not report.passed:
        repaired = report.chunks_to_rebuild()
        cache.build(path, model, rows, attrs=dict(store.attrs), device=device,
                    batch_size=cfg.cache.batch_size, amp_dtype=amp, dtype=store.attrs["dtype"],
                    chunk_rows=store.attrs["chunk_rows"], resume=True, chunks=repaired, force_chunks=True)
        store = cache.open_store(path, mode="r+")
        report = check()
        lines += [f"repaired chunks {', '.join(map(str, repaired))}", *report.lines()]
    _record(run_id, store, report, path, repaired)
    return Verdict(run_id, report.passed, lines, repaired, repairable, refusal)


def _tag_mismatches(tags: dict[str, str], store: zarr.Group) -> list[str]:
    """The run's tags against the store's attributes: a store that is not the one its run describes fails."""
    out = []
    for name in STORE_TAGS:
        tagged, stored = tags.get(f"{T}{name}"), store.attrs.get(name)
        if tagged is not None and str(stored) != tagged:
            out.append(f"the store's {name} is {str(stored)[:12]}, the run's tag {T}{name} is {tagged[:12]}")
    return out


def _unusable(run_id: str, problem: str, repair: bool) -> Verdict:
    """A store that is missing or cannot be opened fails, and the run says so; there is nothing to repair in it."""
    tracked = tracking.StageRun.of(run_id)
    tracked.log_metrics({"verify/passed": 0.0}, step=0)
    tracked.set_tags({f"{T}complete": "false", f"{T}verified": "fail"})
    return Verdict(run_id, False, [f"FAIL store: {problem}", "cache verification FAILED"], [],
                   refusal=problem if repair else "")


def _record(run_id: str, store: zarr.Group, report: cache.VerifyReport, path: Path, repaired: list[int]) -> None:
    """Log the figures on the cache run and keep `complete` true only for a store that passed, in the run's tags and in
    the store, also on a remote artifact store (where `path` is a downloaded copy).

    A failure reaches the run's tags first and a pass last, so an interrupted record never claims more than is true."""
    tracked = tracking.StageRun.of(run_id)
    verdict = {f"{T}complete": str(report.passed).lower(), f"{T}verified": "pass" if report.passed else "fail"}
    if not report.passed:
        tracked.set_tags(verdict)
        cache.mark_incomplete(store)
    else:
        cache.mark_complete(store, report.fidelity_dict())
    if repaired and tracking.local_artifact_dir(run_id) is None:
        upload_store(tracked, path)  # the rebuilt chunks, and the attributes with them
    else:
        upload_attributes(tracked, path)
    tracked.log_metrics({**report.metrics(), "verify/passed": float(report.passed)}, step=0)
    tracked.set_tags(verdict)
