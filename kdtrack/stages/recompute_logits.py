"""Recompute saved experts' logits on new splits: one cache run per (expert, split), optional `.npz` export."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdtrack import cache, tracking
from kdtrack.config import Config
from kdtrack.stages import cache_logits
from kdtrack.stages.cache_logits import ARTIFACT

T = tracking.TAG


@dataclass
class SplitCheck:
    """Verification of one expert's logits on one split."""

    expert_run_id: str
    split: str
    cache_run_id: str
    rows: int
    accuracy: float  # over labelled rows; nan when the split has none
    problems: list[str]

    @property
    def passed(self) -> bool:
        return not self.problems


def run(cfg: Config, expert_run_ids: list[str], splits: list[str], *, export_npz: str | None = None,
        min_accuracy: float = 0.0) -> list[SplitCheck]:
    """For each expert and split (a split name, or a `<name>_indices.json` file) build or reuse a cache, check it,
    and export `<expert>/<split>_logits.npz` with logits, targets and predictions when `export_npz` is set."""
    checks = []
    with tracking.stage_run("recompute", cfg, run_name=f"recompute-{len(expert_run_ids)}x{len(splits)}",
                            description=f"Logits of experts {', '.join(expert_run_ids)} on {', '.join(splits)}."):
        for expert in expert_run_ids:
            for split in splits:
                name, split_cfg = _split_config(cfg, split)
                cache_run_id = cache_logits.run(split_cfg, expert)
                checks.append(_check(expert, name, cache_run_id, export_npz, min_accuracy))
    return checks


def _split_config(cfg: Config, split: str) -> tuple[str, Config]:
    """The cache config for one split: a split of the data, or the rows of an index file."""
    if split.endswith(".json"):
        name = Path(split).name.removesuffix(".json").removesuffix("_indices")
        chosen = dict(splits=(), split_files=(str(Path(split).resolve()),))
    else:
        name, chosen = split, dict(splits=(split,), split_files=())
    return name, dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, allow_splits=(name,), **chosen))


def _check(expert: str, split: str, cache_run_id: str, export_npz: str | None, min_accuracy: float) -> SplitCheck:
    store = cache.open_store(tracking.artifact_path(cache_run_id, ARTIFACT))
    logits = np.asarray(store["logits"][:], dtype=np.float32)  # (N, C)
    targets = np.asarray(store["labels"][:])
    predictions = logits.reshape(len(logits), -1).argmax(axis=1) if logits.ndim == 2 else np.array([])
    problems = []
    if not (len(logits) == len(targets) == int(store.attrs["num_rows"])):
        problems.append(f"shapes disagree: logits {logits.shape}, targets {targets.shape}")
    if not np.isfinite(logits).all():
        problems.append(f"{int((~np.isfinite(logits)).any(axis=tuple(range(1, logits.ndim))).sum())} rows hold NaN/Inf")
    labelled = targets >= 0
    accuracy = float((predictions[labelled] == targets[labelled]).mean()) if labelled.any() and logits.ndim == 2 \
        else float("nan")
    if np.isfinite(accuracy) and accuracy < min_accuracy:
        problems.append(f"accuracy {accuracy:.4f} is below the minimum {min_accuracy:.4f}")
    if export_npz:
        out = Path(export_npz) / expert / f"{split}_logits.npz"
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out, logits=logits, targets=targets, predictions=predictions,
                 sample_ids=np.array(store["sample_ids"][:].tolist()))
        reread = np.load(out)
        if not np.array_equal(reread["predictions"], reread["logits"].argmax(axis=1)):
            problems.append("exported predictions do not match argmax of the exported logits")
    tracked = tracking.StageRun.of(cache_run_id)
    tracked.log_metrics({"recompute/accuracy": accuracy, "recompute/passed": float(not problems)}, step=0)
    return SplitCheck(expert, split, cache_run_id, len(logits), accuracy, problems)
