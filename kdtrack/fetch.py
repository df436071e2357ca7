"""`kdtrack fetch`: a run's reusable artifacts (checkpoints, the logit cache) copied into a folder."""
from __future__ import annotations

import contextlib
from pathlib import Path

from kdtrack import cache, checkpoint, tracking
from kdtrack.errors import BadInput, CacheError, KdtrackError
from kdtrack.stages.cache_logits import store_problem
from kdtrack.teachers import HASH_TAGS, check_recorded_hash

# What each stage leaves for reuse elsewhere.
REUSABLE = {"teacher": ("checkpoints",), "student": ("checkpoints",), "cache": ("logits.zarr",)}


def fetch(run_id: str, out: str | Path) -> list[Path]:
    """Download the reusable artifacts of run `run_id` into `out`; returns their local paths."""
    run = tracking.get_run(run_id)
    stage = run.data.tags.get(f"{tracking.TAG}stage")
    if stage not in REUSABLE:
        raise BadInput(f"run {run_id} ({run.info.run_name}) is a {stage or 'non-kdtrack'} run with nothing to fetch",
                       f"fetch a {', '.join(REUSABLE)} run")
    if stage == "cache":
        _refuse_incomplete_cache(run)  # before anything is downloaded
    target = output_folder(Path(out) / run_id, "--out")
    paths = [tracking.download_artifact(run_id, name, target) for name in REUSABLE[stage]]
    _check_content(run, paths)
    return paths


def output_folder(folder: Path, option: str) -> Path:
    """`folder`, created; a path blocked by a file (or not writable) is one line naming it and the option."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"cannot create output folder {folder} ({exc.strerror or type(exc).__name__})",
                       f"pass an {option} folder you can write to") from exc
    return folder


def _refuse_incomplete_cache(run) -> None:
    """A cache run that is not FINISHED and tagged complete (e.g. verify-cache failed it) is refused, undownloaded."""
    tags, rid = run.data.tags, run.info.run_id
    complete = tags.get(f"{tracking.TAG}complete", "?")
    if run.info.status != "FINISHED" or complete != "true":
        why = tags.get(f"{tracking.TAG}problem") or f"verification: {tags.get(f'{tracking.TAG}verified', 'none')}"
        raise CacheError(f"cache run {rid} is incomplete ({run.info.status}, {tracking.TAG}complete={complete}, "
                         f"{why}); nothing was downloaded",
                         f"repair it with: kdtrack verify-cache --run-id {rid} --repair, "
                         "or build a new cache with kdtrack cache-logits")


def _check_content(run, paths: list[Path]) -> None:
    """Refuse what was downloaded unless it is what the run recorded: each checkpoint's weights hash equals the run's
    tag for it, and a cache store checks out against the run's tags."""
    if run.data.tags.get(f"{tracking.TAG}stage") == "cache":
        problem = store_problem(run, path=paths[0])
        if problem:
            with contextlib.suppress(KdtrackError):  # the copy must not look complete: it is not usable
                cache.mark_incomplete(cache.open_store(paths[0], mode="r+"))
            raise CacheError(f"fetched cache of run {run.info.run_id} is not usable: {problem}; the copy at "
                             f"{paths[0]} is marked incomplete",
                             f"verify it: kdtrack verify-cache --run-id {run.info.run_id}")
        return
    for folder in paths:
        for which in HASH_TAGS:
            if (folder / f"{which}.pt").is_file():
                payload = checkpoint.load(folder / f"{which}.pt")
                check_recorded_hash(run, which, payload["weights_sha256"])
