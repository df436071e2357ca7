"""`kdtrack fetch`: a run's reusable artifacts (checkpoints, the logit cache) copied into a folder."""
from __future__ import annotations

from pathlib import Path

from kdtrack import tracking
from kdtrack.errors import BadInput

# What each stage leaves for reuse elsewhere.
REUSABLE = {"teacher": ("checkpoints",), "student": ("checkpoints",), "cache": ("logits.zarr",)}


def fetch(run_id: str, out: str | Path) -> list[Path]:
    """Download the reusable artifacts of run `run_id` into `out`; returns their local paths."""
    run = tracking.get_run(run_id)
    stage = run.data.tags.get(f"{tracking.TAG}stage")
    if stage not in REUSABLE:
        raise BadInput(f"run {run_id} ({run.info.run_name}) is a {stage or 'non-kdtrack'} run with nothing to fetch",
                       f"fetch a {', '.join(REUSABLE)} run")
    target = Path(out) / run_id
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"cannot create output folder {target} ({exc.strerror or type(exc).__name__})",
                       "pass an --out folder you can write to") from exc
    return [tracking.download_artifact(run_id, name, target) for name in REUSABLE[stage]]
