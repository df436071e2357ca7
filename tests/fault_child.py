"""Faults for tests/test_faults.py: SIGKILL this process at a chosen point, or hand a claim over at a chosen point.

Tests fork these children from a forkserver that has torch, mlflow and kdtrack loaded, so a child costs no import:
`build_killed_before_write` builds the tiny cache of cache_build_child and dies just before one object write;
`run_forked` runs one kdtrack command with one fault. The faults, as `run_forked` or the script take them:

    none                   no fault: the command as a user would run it
    write:KEY[:N]          die just before the N-th write (default the 1st) of the store object KEY, e.g.
                           `zarr.json` (the group's metadata) or `chunk_done/c/7`
    after-mark-complete    die once the cache store is marked complete
    step:EPOCH:STEP        die just before that optimizer step (both counted from 0)
    term:EPOCH:STEP        send itself SIGTERM just before that optimizer step (as `kill` or a scheduler would)
    hand-off:DIR           the cache's claim holder builds only once another process has said it waits
    claim:DIR:NAME[:hold]  no command: take the claim NAME, print "acquired", exit (or hold it until killed)

As a script, `python tests/fault_child.py FAULT -- KDTRACK_ARGS...` does the same in a process of its own.
"""
from __future__ import annotations

import inspect
import os
import signal
import sys
import threading
import time
from pathlib import Path


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def store_key(path: Path) -> str:
    """The key of an object inside the store `<...>/<name>.zarr` or its creation folder `.<name>.zarr.creating-*`."""
    parts = path.parts
    top = max(i for i, part in enumerate(parts) if ".zarr" in part)
    return "/".join(parts[top + 1:])


def kill_before_write(key: str, nth: int = 1) -> None:
    """SIGKILL just before the `nth` write of the store object `key` by any zarr LocalStore, from any thread."""
    from zarr.storage import _local

    put, lock, seen = _local._put, threading.Lock(), [0]

    def hooked(path: Path, value, exclusive: bool = False) -> int:
        with lock:  # zarr writes the chunks of one assignment from several threads
            if store_key(path) == key:
                seen[0] += 1
                if seen[0] == nth:
                    die()
        return put(path, value, exclusive)

    _local._put = hooked  # LocalStore.set / set_sync look `_put` up in the module at each call


def build_killed_before_write(path: str, key: str, nth: int) -> None:
    """Build the tiny cache of cache_build_child at `path`, SIGKILLed before the `nth` write of `key`."""
    import torch
    from cache_build_child import build_tiny_cache

    torch.set_num_threads(1)
    kill_before_write(key, nth)
    build_tiny_cache(path)


def kill_after_mark_complete() -> None:
    from kdtrack import cache

    mark = cache.mark_complete

    def mark_then_die(*args, **kwargs) -> None:
        mark(*args, **kwargs)
        die()

    cache.mark_complete = mark_then_die  # the stage calls it as cache.mark_complete


def kill_before_step(epoch: int, step: int, signum: int = signal.SIGKILL) -> None:
    from kdtrack import engine

    optimizer_step, steps = engine._optimizer_step, [0]
    signature = inspect.signature(optimizer_step)

    def counted(*args, **kwargs):
        if signature.bind(*args, **kwargs).arguments["epoch"] == epoch:
            if steps[0] == step:
                os.kill(os.getpid(), signum)
            steps[0] += 1
        return optimizer_step(*args, **kwargs)

    engine._optimizer_step = counted


def hand_off_claim(folder: Path) -> None:
    """Whichever process holds the cache's claim starts building only once the other one has said it waits."""
    from kdtrack import claims
    from kdtrack.stages import cache_logits

    waiting = folder / "waiting"
    say, build = claims._say_waiting, cache_logits._build_and_verify

    def say_then_mark(*args, **kwargs) -> None:
        say(*args, **kwargs)
        waiting.touch()

    def build_once_waited_for(*args, **kwargs) -> None:
        deadline = time.monotonic() + 60  # a safety net only: without a claim nobody waits, and the test fails
        while not waiting.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        build(*args, **kwargs)

    claims._say_waiting, cache_logits._build_and_verify = say_then_mark, build_once_waited_for


def take_claim(folder: str, name: str, hold: bool) -> None:
    from kdtrack.claims import claim

    with claim(folder, name, "testing claims"):
        print("acquired", flush=True)
        while hold:
            time.sleep(1)


def run_forked(fault: str, cli_args: list[str], env: dict[str, str], cwd: str, threads: int, logs: str) -> None:
    """A forkserver target: `main` in the environment, folder and thread count of the test, which reads the
    command's stdout and stderr from `<logs>.out` and `<logs>.err`."""
    import torch

    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    torch.set_num_threads(threads)
    for fd, suffix in ((1, "out"), (2, "err")):
        with open(f"{logs}.{suffix}", "w") as log:
            os.dup2(log.fileno(), fd)
    main(fault, cli_args)


def main(fault: str, cli_args: list[str]) -> None:
    kind, _, arg = fault.partition(":")
    if kind == "claim":
        folder, name, *hold = arg.split(":")
        take_claim(folder, name, hold == ["hold"])
        return
    if kind == "none":
        pass
    elif kind == "write":
        key, _, nth = arg.partition(":")
        kill_before_write(key, int(nth or 1))
    elif kind == "after-mark-complete":
        kill_after_mark_complete()
    elif kind == "step":
        kill_before_step(*(int(v) for v in arg.split(":")))
    elif kind == "term":
        kill_before_step(*(int(v) for v in arg.split(":")), signum=signal.SIGTERM)
    elif kind == "hand-off":
        hand_off_claim(Path(arg))
    else:
        raise SystemExit(f"unknown fault {fault!r}")
    from kdtrack.cli import main as cli

    cli(cli_args, prog_name="kdtrack")


if __name__ == "__main__":
    dash = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
    main(sys.argv[1], sys.argv[dash + 1:])
