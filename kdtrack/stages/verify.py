"""Verify a cache run's `logits.zarr`: coverage, chunk integrity, no NaN/Inf, fidelity to its teacher."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kdtrack import cache, config, engine, tracking
from kdtrack.errors import BadInput
from kdtrack.stages.cache_logits import ARTIFACT, STAGE, cache_rows, upload_store
from kdtrack.teachers import load_teacher

T = tracking.TAG


@dataclass
class Verdict:
    run_id: str
    passed: bool
    lines: list[str]
    repaired_chunks: list[int]


def run(cache_run_id: str, *, recompute: int = 64, repair: bool = False, seed: int = 0) -> Verdict:
    """Check the cache of run `cache_run_id` (re-running its teacher on `recompute` random rows); with `repair`,
    rebuild only the bad chunks. Results are logged on the cache run; the store is complete only if it passes."""
    run_info = tracking.get_run(cache_run_id)
    stage = run_info.data.tags.get(f"{T}stage")
    if stage != STAGE:
        raise BadInput(f"run {cache_run_id} ({run_info.info.run_name}) is a {stage or 'non-kdtrack'} run, not a cache",
                       "pass a run id printed by `kdtrack cache-logits`")
    cfg = tracking.load_run_config(cache_run_id, config.Config)
    device = engine.resolve_device(cfg.device)
    path = tracking.artifact_path(cache_run_id, ARTIFACT)
    store = cache.open_store(path, mode="r+")
    teacher = load_teacher(store.attrs["teacher_run_id"], device, run_info.data.tags.get(f"{T}checkpoint", "best"))
    rows = cache_rows(cfg, teacher)
    amp = engine.amp_dtype(cfg.train.amp, device)
    check_rows = np.random.default_rng(seed).permutation(len(rows))[:recompute]

    def check() -> cache.VerifyReport:
        return cache.verify_store(store, rows.sample_ids, teacher.model, rows, fidelity_rows=check_rows,
                                  device=device, amp_dtype=amp, expected_checkpoint=teacher.checkpoint_sha256)

    report = check()
    lines = report.lines()
    repaired: list[int] = []
    if not report.passed and repair and report.repairable:
        repaired = report.chunks_to_rebuild()
        cache.build(path, teacher.model, rows, attrs=dict(store.attrs), device=device,
                    batch_size=cfg.cache.batch_size, amp_dtype=amp, dtype=store.attrs["dtype"],
                    chunk_rows=store.attrs["chunk_rows"], resume=True, chunks=repaired, force_chunks=True)
        store = cache.open_store(path, mode="r+")
        report = check()
        lines += [f"repaired chunks {', '.join(map(str, repaired))}", *report.lines()]
    _record(cache_run_id, store, report, path, repaired)
    return Verdict(cache_run_id, report.passed, lines, repaired)


def _record(run_id: str, store, report: cache.VerifyReport, path, repaired: list[int]) -> None:
    """Log the figures on the cache run and keep `complete` true only for a store that passed."""
    tracked = tracking.StageRun.of(run_id)
    if report.passed:
        cache.mark_complete(store, report.fidelity_dict())
    else:
        cache.mark_incomplete(store)
    if repaired and tracking.local_artifact_dir(run_id) is None:
        upload_store(tracked, path)
    tracked.log_metrics({**report.metrics(), "verify/passed": float(report.passed)}, step=0)
    tracked.set_tags({f"{T}complete": str(report.passed).lower(), f"{T}verified": "pass" if report.passed else "fail"})
