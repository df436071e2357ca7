"""Claims: while one process builds something, another that wants the same thing waits for it instead of also writing.

A claim is an exclusive `flock` on a lock file named by what is claimed. The kernel drops a flock when its holder
exits however it exits, SIGKILL included, so a killed build never leaves a stale claim behind; a tag in the tracking
store could promise neither that nor an atomic take. The holder writes its pid, host and what it does into the file, so that a
waiter can say whom it waits for, and wipes them as it lets go.

A claim covers the processes of one machine that share the lock folder (kdtrack uses `<download dir>/claims`, see
`tracking.download_dir`). Builds on different machines against one tracking server are not serialised by it. Lock
files are never deleted: a process still waiting on a deleted file would hold a lock that nobody else can see.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from kdtrack.errors import KdtrackError

_POLL_S = 0.1  # between tries while another process holds the claim
_PATIENCE = 20  # tries to wait for a new holder to write who it is, before saying just "another process"


@contextlib.contextmanager
def claim(folder: str | Path, name: str, doing: str) -> Iterator[None]:
    """Hold the exclusive claim `name` (the file `<folder>/<name>.lock`) for the block, saying in the file that this
    process is `doing` it (e.g. "building cache 1a2b3c4d5e6f"). While another process holds it, say once on stderr
    what that one is doing and wait for it to let go."""
    path = Path(folder) / f"{name}.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()  # opened with r+ below: never truncated by the opening, which would erase the holder's pid
    except OSError as exc:
        raise KdtrackError(f"cannot create the claim file {path}: {exc}",
                           "set KDTRACK_CACHE_DIR to a folder this user can write") from exc
    with open(path, "r+") as handle:  # the flock lives as long as this open file, or as this process if it dies
        _take(handle, doing)
        _write(handle, f"{os.getpid()} {socket.gethostname()} {doing}\n")
        try:
            yield
        finally:
            _write(handle, "")  # letting go: no waiter should name this process any more


def _take(handle: IO[str], doing: str) -> None:
    """Take the flock on `handle`, trying again every _POLL_S while another process holds it."""
    said, tries = False, 0
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            tries += 1
        if not said:
            handle.seek(0)
            # "<pid> <host> <what it does>", or nothing until a new holder has written it
            holder = handle.read().strip().split(maxsplit=2)
            if len(holder) >= 2 or tries > _PATIENCE:
                _say_waiting(f"pid {holder[0]} on {holder[1]}" if len(holder) >= 2 else "",
                             holder[2] if len(holder) == 3 else doing)
                said = True
        time.sleep(_POLL_S)  # Ctrl-C interrupts the wait here


def _say_waiting(holder: str, doing: str) -> None:
    who = f"another process ({holder})" if holder else "another process"
    print(f"{who} is {doing}; waiting for it", file=sys.stderr, flush=True)


def _write(handle: IO[str], text: str) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(text)
    handle.flush()
