"""Data sources, the IndexedDataset they produce, its digest and its loaders."""
from kdtrack.data.dataset import UNLABELED, IndexedDataset, Normalisation, fit_normalisation
from kdtrack.data.fingerprint import dataset_digest
from kdtrack.data.index_splits import apply_index_splits
from kdtrack.data.loaders import EpochShuffleSampler, make_loader
from kdtrack.data.manifest import load_manifest
from kdtrack.data.selection import DISTILL_SPLITS, distillation_rows, student_dataset
from kdtrack.data.sources import build_dataset, load_digits_dataset, make_synthetic

__all__ = [
    "DISTILL_SPLITS",
    "UNLABELED",
    "EpochShuffleSampler",
    "IndexedDataset",
    "Normalisation",
    "apply_index_splits",
    "build_dataset",
    "dataset_digest",
    "distillation_rows",
    "fit_normalisation",
    "load_digits_dataset",
    "load_manifest",
    "make_loader",
    "make_synthetic",
    "student_dataset",
]
