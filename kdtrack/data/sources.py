"""Built-in sources (digits, synthetic) and `build_dataset`, which picks the source a DataConfig names."""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kdtrack.config import DataConfig
from kdtrack.data.dataset import UNLABELED, IndexedDataset
from kdtrack.data.index_splits import apply_index_splits
from kdtrack.data.manifest import load_manifest
from kdtrack.errors import DataError

_SPLIT_NAMES = np.array(["train", "val", "test"])
_MODES_PER_CLASS = 3  # several prototypes per class, so a linear model is clearly beaten by an MLP/CNN
_PROTOTYPE_NORM = 4.0  # expected prototype length in units of the per-feature noise std; sets the difficulty
_FILL_CHUNK_ROWS = 65536  # bounds the temporary made when adding prototypes to the noise


def build_dataset(cfg: DataConfig) -> IndexedDataset:
    """The full dataset (every split) for `cfg.source`, its samples reshaped to `cfg.input_shape` when that is set
    (synthetic data is generated in that shape), re-split by `cfg.index_splits` when that is set."""
    builders: dict[str, Callable[[DataConfig], IndexedDataset]] = {
        "digits": load_digits_dataset,
        "synthetic": make_synthetic,
        "manifest": _from_manifest,
    }
    if cfg.source not in builders:
        raise DataError(f"unknown data source {cfg.source!r}", f"set data.source to one of: {', '.join(builders)}")
    ds = builders[cfg.source](cfg)
    if cfg.input_shape and cfg.source != "synthetic" and tuple(cfg.input_shape) != ds.input_shape:
        ds = ds.reshaped(cfg.input_shape)  # e.g. (40,) files read as (1, 40); refused unless the value counts agree
    if cfg.index_splits:
        ds = apply_index_splits(ds, cfg.index_splits)
    return ds


def stratified_splits(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Split name per row: within each class a seeded random `test_fraction` goes to test, `val_fraction` to val."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(f"val_fraction={val_fraction} and test_fraction={test_fraction} leave no training data",
                        "use fractions in [0, 1) whose sum is below 1, "
                        "e.g. --set data.val_fraction=0.15 --set data.test_fraction=0.15")
    n = len(labels)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5B17]))
    perm = rng.permutation(n)
    order = perm[np.argsort(labels[perm], kind="stable")]  # grouped by class, random within a class
    sorted_labels = labels[order]
    classes, starts, counts = np.unique(sorted_labels, return_index=True, return_counts=True)
    slot = np.searchsorted(classes, sorted_labels)
    rank = np.arange(n) - starts[slot]  # position of each row within its class
    n_test = np.rint(counts * test_fraction)[slot]
    n_val = np.rint(counts * val_fraction)[slot]
    codes = np.where(rank < n_test, 2, np.where(rank < n_test + n_val, 1, 0))
    splits = np.empty(n, dtype=_SPLIT_NAMES.dtype)
    splits[order] = _SPLIT_NAMES[codes]
    return splits


def load_digits_dataset(cfg: DataConfig) -> IndexedDataset:
    """scikit-learn's 1797 8x8 handwritten digits (values 0..16) as (N, 1, 8, 8), split by cfg's fractions."""
    images, targets = _digits()
    features, labels = images.astype(np.float32).reshape(-1, 1, 8, 8), targets.astype(np.int64)  # copies
    n = len(labels)
    return IndexedDataset(
        features=features,
        labels=labels,
        sample_ids=[f"digits/{i}" for i in range(n)],
        splits=stratified_splits(labels, cfg.val_fraction, cfg.test_fraction, cfg.seed),
        domains=np.full(n, "default"),
        num_classes=10,
        source="digits",
    )


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits, parsed once per process (its CSV parse takes ~40 ms); callers copy them."""
    from sklearn.datasets import load_digits  # slow import; only this source needs it

    bunch = load_digits()
    bunch.images.flags.writeable = bunch.target.flags.writeable = False
    return bunch.images, bunch.target


def make_synthetic(cfg: DataConfig) -> IndexedDataset:
    """Seeded Gaussian clusters: `num_samples` labelled rows split by fractions, then `unlabeled_samples` more."""
    _check_synthetic(cfg)
    dim = math.prod(cfg.input_shape)
    n_lab, n_unl = cfg.num_samples, cfg.unlabeled_samples
    # separate streams, so adding unlabelled rows leaves the labelled rows and their splits unchanged
    proto_rng, lab_rng, unl_rng = (np.random.default_rng(np.random.SeedSequence([cfg.seed, k])) for k in range(3))
    scale = _PROTOTYPE_NORM / math.sqrt(dim)
    prototypes = proto_rng.standard_normal((cfg.num_classes * _MODES_PER_CLASS, dim), dtype=np.float32) * scale
    features = np.empty((n_lab + n_unl, dim), dtype=np.float32)
    labels = np.empty(n_lab + n_unl, dtype=np.int64)
    for rng, part in ((lab_rng, slice(0, n_lab)), (unl_rng, slice(n_lab, n_lab + n_unl))):
        labels[part] = _fill_clusters(rng, prototypes, cfg.num_classes, features[part])
    splits = np.empty(n_lab + n_unl, dtype="<U9")
    splits[:n_lab] = stratified_splits(labels[:n_lab], cfg.val_fraction, cfg.test_fraction, cfg.seed)
    splits[n_lab:] = "unlabeled"
    labels[n_lab:] = UNLABELED  # drawn from the same classes, but hidden like real unlabelled data
    return IndexedDataset(
        features=features.reshape(-1, *cfg.input_shape),
        labels=labels,
        sample_ids=[f"synthetic/{i}" for i in range(n_lab + n_unl)],
        splits=splits,
        domains=np.full(n_lab + n_unl, "default"),
        num_classes=cfg.num_classes,
        source="synthetic",
    )


def _fill_clusters(rng: np.random.Generator, prototypes: np.ndarray, num_classes: int, out: np.ndarray) -> np.ndarray:
    """Write noise + a random prototype of a random class into `out` (n, dim) in place; return the classes."""
    n = len(out)
    classes = rng.integers(0, num_classes, n)
    modes = rng.integers(0, _MODES_PER_CLASS, n)
    rng.standard_normal(out=out, dtype=np.float32)
    which = classes * _MODES_PER_CLASS + modes
    for start in range(0, n, _FILL_CHUNK_ROWS):
        out[start:start + _FILL_CHUNK_ROWS] += prototypes[which[start:start + _FILL_CHUNK_ROWS]]
    return classes


def _check_synthetic(cfg: DataConfig) -> None:
    if cfg.num_samples < 1 or cfg.unlabeled_samples < 0:
        raise DataError(f"synthetic needs num_samples >= 1 and unlabeled_samples >= 0, got "
                        f"{cfg.num_samples} and {cfg.unlabeled_samples}", "e.g. --set data.num_samples=2000")
    if cfg.num_classes < 2:
        raise DataError(f"synthetic needs at least 2 classes, got num_classes={cfg.num_classes}",
                        "e.g. --set data.num_classes=10")
    if not cfg.input_shape or any(d < 1 for d in cfg.input_shape):
        raise DataError(f"synthetic input_shape {cfg.input_shape} has no or empty dimensions",
                        "e.g. --set data.input_shape=[1,8,8]")


def _from_manifest(cfg: DataConfig) -> IndexedDataset:
    if not cfg.manifest:
        raise DataError("data.source is manifest but data.manifest is empty",
                        "point data.manifest at the manifest JSON, e.g. --set data.manifest=data/manifest.json")
    return load_manifest(Path(cfg.manifest), Path(cfg.root) if cfg.root else None, cfg.num_classes,
                         lazy=not cfg.in_memory)
