"""The tracking store's failures as one line: a sqlite store's file checked before MLflow opens it (not a database, cut
short, locked, `./mlruns` a file), and database errors named by what they mean. Nothing here imports mlflow."""
from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from kdtrack.errors import TrackingError

SQLITE_BUSY_S = 20.0  # how long to wait for another process's write lock: MLflow's own sqlite busy_timeout
_SQLITE_MAGIC = b"SQLite format 3\x00"
_LOCKED = ("database is locked", "database is busy", "database table is locked")
_CORRUPT = ("file is not a database", "database disk image is malformed", "file is encrypted or is not a database")


def store_error(exc: BaseException, uri: str, otherwise: TrackingError | None = None) -> TrackingError:
    """A failure of the tracking store as one line: locked by another process (retry), corrupt (restore it), or
    else `otherwise` (default: the store is not usable). For errors raised by MLflow, SQLAlchemy or sqlite3."""
    text = _chain_text(exc)
    if any(m in text for m in _LOCKED):
        return TrackingError(f"tracking store {uri} is locked by another process (database is locked)",
                             "retry once the other process has finished writing to it")
    if any(m in text for m in _CORRUPT):
        cause = next(m for m in _CORRUPT if m in text)
        return TrackingError(f"tracking store {uri} is corrupt or truncated ({cause})",
                             "restore it from a backup, or point MLFLOW_TRACKING_URI at another store")
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return otherwise or TrackingError(f"tracking store {uri} is not usable: {first}",
                                      "start the server or fix MLFLOW_TRACKING_URI")


def _chain_text(exc: BaseException) -> str:
    """The messages of `exc` and of the exceptions it was raised from, lower-cased."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return " ".join(parts).lower()


def check_sqlite_store(uri: str) -> None:
    """Refuse in one line what MLflow would meet with a traceback: `./mlruns` (its default artifact root) a
    file, the database file not a database or cut short, or locked by another process."""
    mlruns = Path("mlruns")
    if mlruns.exists() and not mlruns.is_dir():
        raise TrackingError(f"{mlruns.resolve()} is a file, but the tracking store {uri} keeps its artifacts in "
                            f"a folder of that name", "move the file away, or run kdtrack from another folder")
    path = _sqlite_path(uri)
    if path is None or not path.exists():
        return  # MLflow creates it
    problem = _sqlite_file_problem(path)
    if problem:
        raise TrackingError(f"tracking store {uri} is unusable: {path.resolve()} {problem}",
                            "restore it from a backup, or point MLFLOW_TRACKING_URI at another store")
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=SQLITE_BUSY_S)) as db:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()  # waits out another writer's lock, or fails
    except sqlite3.Error as exc:
        raise store_error(exc, uri) from exc


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite URI (relative to the working directory), None for an in-memory one."""
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    return Path(database) if database and database != ":memory:" else None


def _sqlite_file_problem(path: Path) -> str | None:
    """What is wrong with the file by its header: not SQLite, or shorter than the page count it records."""
    if path.is_dir():
        return "is a folder, not a database file"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(100)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or type(exc).__name__})"
    if size == 0:
        return None  # an empty file is an empty database: MLflow creates the tables
    if not header.startswith(_SQLITE_MAGIC):
        return "is corrupt: not an SQLite database"
    if len(header) < 100:
        return f"is truncated: {size} bytes"
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    # The page count is valid when the change counter matches its copy; with a WAL file pages may live there.
    counted = header[24:28] == header[92:96] and not path.with_name(f"{path.name}-wal").exists()
    if counted and size < pages * page_size:
        return f"is truncated: {size} of {pages * page_size} bytes"
    return None
