"""Dataset digest: one sha256 that changes whenever any sample, label, split or the row order changes."""
from __future__ import annotations

import hashlib

import numpy as np

from kdtrack.data.dataset import IndexedDataset

DIGEST_FORMAT = "kdtrack.dataset-digest/1"


def dataset_digest(ds: IndexedDataset) -> str:
    """sha256 hex over (sample_id, label, split, sha256 of raw float32 feature bytes) for each row in order.

    The per-sample shape is hashed once up front, so a reshape of identical bytes changes it too.
    """
    flat = np.ascontiguousarray(ds.features, dtype="<f4").reshape(len(ds), -1)
    row_bytes = flat.shape[1] * flat.itemsize
    raw = memoryview(flat.reshape(-1).view(np.uint8))  # slicing a memoryview copies nothing
    outer = hashlib.sha256(f"{DIGEST_FORMAT}\0{ds.input_shape}\0{len(ds)}\n".encode())
    for i, (sid, label, split) in enumerate(zip(ds.sample_ids, ds.labels.tolist(), ds.splits.tolist())):
        content = hashlib.sha256(raw[i * row_bytes:(i + 1) * row_bytes]).digest()
        # NUL cannot occur in a path-like id or split name, so the fields cannot run into each other
        outer.update(f"{sid}\0{label}\0{split}\0".encode())
        outer.update(content)
    return outer.hexdigest()
