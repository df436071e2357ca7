"""The content-hash sidecar of a manifest: per file (size, mtime, shape, sha256 of its float32 values, sum and
squared deviations of its values), so a start-up re-reads only the files whose size or modification time changed.

A content change that keeps both size and mtime goes unseen: that is the trade-off. `KDTRACK_REHASH=1` (or
`dataset_digest(ds, recompute=True)`, which verify-cache uses) re-reads every file. The sidecar sits next to
the manifest (`.<manifest name>.kdtrack-hashes.json`), or under `$KDTRACK_CACHE_DIR/content-hashes/` when that
folder is read-only; it is written atomically, and a corrupt one is ignored and rewritten.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

FORMAT = "kdtrack.content-hashes/1"


class Facts(NamedTuple):
    """What one file contributes: to the digest (its content hash) and to a normalisation (sum, squared deviations
    from its own mean, over its float32 values taken as float64)."""

    size: int
    mtime_ns: int
    shape: tuple[int, ...]
    sha256: bytes
    total: float
    sq_dev: float


def facts_of(arr: np.ndarray, size: int, mtime_ns: int) -> Facts:
    """The facts of a float32 sample `arr` whose file has this size and mtime."""
    flat = np.ascontiguousarray(arr, dtype="<f4")
    wide = flat.reshape(-1).astype(np.float64)
    total = float(wide.sum())
    return Facts(int(size), int(mtime_ns), tuple(int(d) for d in arr.shape), hashlib.sha256(flat.tobytes()).digest(),
                 total, float(np.square(wide - total / max(wide.size, 1)).sum()))


def rehash_forced() -> bool:
    """True when the environment asks every file to be re-read (`KDTRACK_REHASH=1`)."""
    return os.environ.get("KDTRACK_REHASH", "") not in ("", "0")


class Sidecar:
    """Where the facts of one manifest's files (under one data root) are kept between commands."""

    def __init__(self, manifest: Path, real_root: Path) -> None:
        self.root = str(real_root)
        self.primary = manifest.parent / f".{manifest.name}.kdtrack-hashes.json"
        key = hashlib.sha256(f"{manifest.resolve()}\0{real_root}".encode()).hexdigest()[:24]
        cache_dir = Path(os.environ.get("KDTRACK_CACHE_DIR") or Path.home() / ".cache" / "kdtrack")
        self.fallback = cache_dir / "content-hashes" / f"{key}.json"

    def load(self) -> dict[str, Facts]:
        """Known facts by sample id; the fallback's entries win (it is only written when the primary cannot be)."""
        return {**self._read(self.primary), **self._read(self.fallback)}

    def save(self, facts: dict[str, Facts]) -> Path | None:
        """Write `facts` atomically next to the manifest, else under the cache dir; the path written, or None."""
        doc = {"format": FORMAT, "root": self.root,
               "files": {sid: [f.size, f.mtime_ns, list(f.shape), f.sha256.hex(), f.total, f.sq_dev]
                         for sid, f in facts.items()}}
        text = json.dumps(doc, separators=(",", ":"))
        for path in (self.primary, self.fallback):
            try:
                _write_atomic(path, text)
                return path
            except OSError:
                continue
        print(f"note: could not save content hashes to {self.primary} or {self.fallback}; the next command re-reads "
              "every sample file (set KDTRACK_CACHE_DIR to a writable folder)", file=sys.stderr)
        return None

    def _read(self, path: Path) -> dict[str, Facts]:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # absent, unreadable or corrupt: recomputed and rewritten
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("root") != self.root:
            return {}
        try:
            return {sid: _parse(v) for sid, v in doc["files"].items()}
        except (KeyError, AttributeError, TypeError, ValueError):
            return {}


def _parse(v: Any) -> Facts:
    size, mtime, shape, digest, total, sq_dev = v
    if not all(isinstance(x, int) for x in (size, mtime, *shape)) or not all(
            isinstance(x, (int, float)) for x in (total, sq_dev)):
        raise TypeError("malformed entry")
    sha = bytes.fromhex(digest)
    if len(sha) != 32:
        raise ValueError("malformed hash")
    return Facts(size, mtime, tuple(shape), sha, float(total), float(sq_dev))


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
