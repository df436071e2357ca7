"""Who owns a run: the process that writes it, recorded so that a later command can tell a live run from an orphan.

An owner is `"<host> <pid> <boot id>:<start ticks>"`: the pid alone could be reused by another process after the owner
died, and the boot id tells a pid of an earlier boot apart. Only owners on this host can be judged; an owner on
another host is never declared gone.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path


def me() -> str:
    """This process as an owner."""
    return describe(os.getpid())


def describe(pid: int) -> str:
    return f"{socket.gethostname()} {pid} {_boot_id()}:{_start_ticks(pid)}"


def parse(owner: str) -> tuple[str, int, str] | None:
    """(host, pid, identity) of an owner string; None when it is not one."""
    parts = owner.split()
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1]), parts[2]


def gone(owner: str) -> bool:
    """True when `owner` ran on this host and that process no longer exists (or its pid now names another)."""
    parsed = parse(owner)
    if parsed is None:
        return False
    host, pid, identity = parsed
    if host != socket.gethostname():
        return False
    if not _alive(pid):
        return True
    return identity != f"{_boot_id()}:{_start_ticks(pid)}"


def label(owner: str) -> str:
    """`pid 123 on host` for messages."""
    parsed = parse(owner)
    return f"pid {parsed[1]} on {parsed[0]}" if parsed else owner


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        return "-"


def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat), '-' where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "-"
    # The command name (field 2) may hold spaces and parentheses: count fields after its closing parenthesis.
    return stat.rsplit(")", 1)[1].split()[19]
