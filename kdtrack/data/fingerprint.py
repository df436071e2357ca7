"""Dataset digest: one sha256 that changes whenever any sample, label, split or the row order changes."""
from __future__ import annotations

import hashlib

from kdtrack.data.dataset import IndexedDataset

DIGEST_FORMAT = "kdtrack.dataset-digest/1"


def dataset_digest(ds: IndexedDataset, recompute: bool = False) -> str:
    """sha256 hex over (sample_id, label, split, sha256 of raw float32 feature bytes) for each row in order.

    The per-sample shape is hashed once up front, so a reshape of identical bytes changes it too. A file-backed
    dataset takes unchanged files' content hashes from its sidecar; `recompute=True` re-reads every file.
    """
    hashes = ds.content_hashes(recompute)  # (N, 32) uint8
    outer = hashlib.sha256(f"{DIGEST_FORMAT}\0{ds.input_shape}\0{len(ds)}\n".encode())
    for sid, label, split, content in zip(ds.sample_ids, ds.labels.tolist(), ds.splits.tolist(), hashes):
        # NUL cannot occur in a path-like id or split name, so the fields cannot run into each other
        outer.update(f"{sid}\0{label}\0{split}\0".encode())
        outer.update(content)
    return outer.hexdigest()
