"""`kdtrack lineage RUN_ID`: the chain of runs a result came from, read from the runs' kdtrack tags."""
from __future__ import annotations

from typing import Any

from kdtrack import tracking
from kdtrack.errors import RunNotFound

T = tracking.TAG


def describe(run_id: str, depth: int = 0) -> list[str]:
    """One line per run, indented by depth: the run, then (recursively) the runs it was built from. A link that
    cannot be followed (an upstream run garbage-collected, or in another store) is printed as MISSING."""
    prefix = "  " * depth + ("<- " if depth else "")
    try:
        run = tracking.get_run(run_id)
    except RunNotFound:
        if depth == 0:
            raise
        return [f"{prefix}MISSING run {run_id}: not in {tracking.tracking_uri()} (garbage-collected, or recorded "
                "in another tracking store)"]
    lines = [prefix + _line(run)]
    for upstream in _upstream(run.data.tags):
        lines += describe(upstream, depth + 1)
    return lines


def _upstream(tags: dict[str, str]) -> list[str]:
    """Cache runs for a cached student; teacher runs for caches and online students."""
    caches = [r for r in tags.get(f"{T}cache_run_ids", "").split(",") if r]
    if caches:
        return caches
    if tags.get(f"{T}teacher_run_id"):
        return [tags[f"{T}teacher_run_id"]]
    return [r for r in tags.get(f"{T}teacher_run_ids", "").split(",") if r]


def _line(run: Any) -> str:
    tags = run.data.tags
    deleted = ", DELETED" if run.info.lifecycle_stage == "deleted" else ""
    parts = [f"{run.info.run_name} [{tags.get(f'{T}stage', 'not kdtrack')}] run {run.info.run_id} "
             f"({run.info.status}{deleted})"]
    if tags.get(f"{T}method"):
        parts.append(f"method {tags[f'{T}method']}")
    if tags.get(f"{T}dataset_digest"):
        parts.append(f"dataset {tags[f'{T}dataset_digest'][:12]}")
    if tags.get(f"{T}source_file"):  # a teacher registered from a checkpoint written elsewhere
        parts.append(f"registered from {tags[f'{T}source_file']} (sha256 {tags.get(f'{T}source_sha256', '?')[:12]}), "
                     f"model {tags.get(f'{T}model_definition', '?')} ({tags.get(f'{T}model_code_version', '?')[:19]})")
    if tags.get(f"{T}checkpoint_sha256"):
        parts.append(f"checkpoint {tags[f'{T}checkpoint_sha256'][:12]}")
    if tags.get(f"{T}cache_key"):
        parts.append(f"key {tags[f'{T}cache_key'][:12]}, complete={tags.get(f'{T}complete', '?')}")
    return ", ".join(parts)
