"""Recompute saved experts' logits on new splits: one cache run per (expert, split), optional `.npz` export."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdtrack import cache, tracking
from kdtrack.config import Config
from kdtrack.errors import KdtrackError
from kdtrack.stages import cache_logits
from kdtrack.fetch import output_folder
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
    for expert in expert_run_ids if export_npz else ():  # a folder blocked by a file fails before any run starts
        _export_dir(export_npz, expert)
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
        out = _export_dir(export_npz, expert) / f"{split}_logits.npz"
        _save_npz(out, logits=logits, targets=targets, predictions=predictions,
                  sample_ids=np.array(store["sample_ids"][:].tolist()))
        with np.load(out) as reread:
            if not np.array_equal(reread["predictions"], reread["logits"].argmax(axis=1)):
                problems.append("exported predictions do not match argmax of the exported logits")
    tracked = tracking.StageRun.of(cache_run_id)
    tracked.log_metrics({"recompute/accuracy": accuracy, "recompute/passed": float(not problems)}, step=0)
    return SplitCheck(expert, split, cache_run_id, len(logits), accuracy, problems)


def _export_dir(root: str, expert: str) -> Path:
    return output_folder(Path(root) / expert, "--export-npz")


def _save_npz(out: Path, **arrays: np.ndarray) -> None:
    """Written under a temporary name in the same folder, then renamed: a killed export leaves no truncated `out`."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # not mkstemp: the export keeps the umask's mode
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise KdtrackError(f"cannot write {out} ({exc.strerror or type(exc).__name__})",
                               "free some space or pass another --export-npz folder") from exc
        raise
