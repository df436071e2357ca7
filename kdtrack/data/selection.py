"""Which rows a teacher may label: the student's training data by default, held-out splits only when allowed."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kdtrack.config import DataConfig
from kdtrack.data.dataset import UNLABELED, IndexedDataset
from kdtrack.data.file_samples import FileSamples
from kdtrack.data.index_splits import SUFFIX, read_index_file
from kdtrack.data.sources import build_dataset
from kdtrack.errors import DataError, LeakageError

DISTILL_SPLITS = ("train", "unlabeled")  # what a student trains on; every other split is held out


def student_dataset(cfg: DataConfig) -> IndexedDataset:
    """The data as students see it: `cfg.student_labels` of each class's train labels kept, the other train
    rows moved to split `unlabeled` as a transfer set (seeded by cfg.seed). Teachers train on `build_dataset`."""
    full = build_dataset(cfg)
    if not 0.0 < cfg.student_labels <= 1.0:
        raise DataError(f"data.student_labels={cfg.student_labels} is outside (0, 1]",
                        "give the fraction of train labels a student keeps, e.g. 0.1")
    if cfg.student_labels == 1.0:
        return full
    rng = np.random.default_rng([cfg.seed, 7])
    drop = []
    for label in np.unique(full.labels[full.splits == "train"]):
        rows = rng.permutation(np.flatnonzero((full.splits == "train") & (full.labels == label)))
        drop.append(rows[max(1, round(cfg.student_labels * len(rows))):])  # every class keeps a label
    dropped = np.concatenate(drop)
    labels, splits = full.labels.copy(), full.splits.astype(object)
    labels[dropped], splits[dropped] = UNLABELED, "unlabeled"
    return IndexedDataset(features=full.storage, labels=labels, sample_ids=full.sample_ids,
                          splits=splits.astype(str), domains=full.domains, num_classes=full.num_classes,
                          source=full.source, attributes=full.attributes)


def distillation_rows(full: IndexedDataset, splits: Sequence[str], allow: Sequence[str] = (),
                      split_files: Sequence[str] = ()) -> IndexedDataset:
    """Rows of `splits` (absent default splits skipped), then each `<name>_indices.json` file's rows as split
    `<name>`; a held-out split that is not in `allow` is refused, naming a sample in it."""
    present = full.split_counts()
    named = [s for s in splits if s in present or s not in DISTILL_SPLITS]
    missing = [s for s in named if s not in present]
    if missing:
        raise DataError(f"split {missing[0]!r} is not in this {full.source} dataset",
                        f"choose from the splits present: {', '.join(sorted(present))}")
    parts = [full.take(np.flatnonzero(np.isin(full.splits, named)))] if named else []
    for path in map(Path, split_files):
        if not path.name.endswith(SUFFIX):
            raise DataError(f"split file {path} is not named <split>{SUFFIX}", f"rename it, e.g. tunev{SUFFIX}")
        rows = read_index_file(path, len(full))
        name, taken = path.name[: -len(SUFFIX)], full.take(np.sort(rows))
        if name not in allow or name in DISTILL_SPLITS:
            # A file's name does not make held-out rows cacheable (a train_indices.json listing test rows): each row
            # answers for the split it has, unless the file's own held-out name was allowed explicitly.
            _guard(taken, allow, f" (listed in {path})")
        parts.append(taken.with_splits(np.full(len(rows), name)))
    if not parts or sum(map(len, parts)) == 0:
        raise DataError(f"no rows to cache: splits {list(splits)} are empty in this {full.source} dataset",
                        f"choose from the splits present: {', '.join(sorted(present))}")
    chosen = parts[0] if len(parts) == 1 else _concat(parts)
    _guard(chosen, allow)
    return chosen


def _guard(ds: IndexedDataset, allow: Sequence[str], where: str = "") -> None:
    for split in dict.fromkeys(ds.splits.tolist()):
        if split not in DISTILL_SPLITS and split not in allow:
            sample = ds.sample_ids[int(np.flatnonzero(ds.splits == split)[0])]
            raise LeakageError(
                f"sample {sample} is in split {split!r}, which is held out from distillation{where}",
                f"cache only {' and '.join(DISTILL_SPLITS)} rows, or allow it explicitly with --allow-split {split}",
            )


def _concat(parts: list[IndexedDataset]) -> IndexedDataset:
    first = parts[0]
    return IndexedDataset(
        features=(FileSamples.concat([p.storage for p in parts]) if first.lazy
                  else np.concatenate([p.storage for p in parts])),
        labels=np.concatenate([p.labels for p in parts]),
        sample_ids=[i for p in parts for i in p.sample_ids],
        splits=np.concatenate([p.splits for p in parts]),
        domains=np.concatenate([p.domains for p in parts]),
        num_classes=first.num_classes,
        source=first.source,
        attributes={k: np.concatenate([p.attributes[k] for p in parts]) for k in first.attributes},
        normalisation=first.normalisation,
    )
