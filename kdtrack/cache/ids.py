"""Sample ids in a form every Zarr v3 reader knows: UTF-8 bytes, zero-padded to one width, in a `uint8` array.

zarr-python's variable-length `string` data type is an extension outside the Zarr v3 core spec, so readers such as
tensorstore cannot open `sample_ids`. The store therefore keeps the same ids a second time in `sample_ids_utf8`
(N, width) uint8: row r's id is its bytes with the trailing zeros removed, decoded as UTF-8. An id never holds a
NUL character (paths and `<source>/<index>` cannot), so the padding is never part of an id.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kdtrack.errors import BadInput


def id_width(sample_ids: Sequence[str]) -> int:
    """Bytes of the longest UTF-8 id (at least 1, so the array is never zero-wide); BadInput for an id holding NUL."""
    bad = next((sid for sid in sample_ids if "\0" in sid), None)
    if bad is not None:
        raise BadInput(f"sample id {bad!r} holds a NUL character", "use ids without NUL (file paths never hold one)")
    return max(1, max((len(sid.encode()) for sid in sample_ids), default=0))


def encode_ids(sample_ids: Sequence[str], width: int) -> np.ndarray:
    """(len(ids), width) uint8: each id's UTF-8 bytes, zero-padded on the right."""
    encoded = [sid.encode() for sid in sample_ids]
    longest = max((len(b) for b in encoded), default=0)
    if longest > width or any(b"\0" in b for b in encoded):
        raise BadInput(f"a sample id of {longest} bytes (or one holding NUL) does not fit ids of {width} bytes",
                       "rebuild the cache: its ids were stored for other data")
    fixed = np.array(encoded, dtype=f"S{width}")  # numpy pads with zeros; nothing is cut (checked above)
    return fixed.view(np.uint8).reshape(len(encoded), width)


def decode_ids(rows: np.ndarray) -> list[str]:
    """The ids held by (n, width) uint8 rows of `sample_ids_utf8`; bytes that are not UTF-8 decode as U+FFFD."""
    rows = np.ascontiguousarray(rows, dtype=np.uint8)
    fixed = rows.view(f"S{rows.shape[1]}").reshape(-1)  # numpy's `S` drops the trailing zeros
    return [b.decode(errors="replace") for b in fixed.tolist()]
