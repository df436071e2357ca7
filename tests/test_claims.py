"""Claims without processes: the lock is held through a second open file of this process (a flock belongs to the
open file, so it conflicts with the claim's own), and is let go from inside the claim's wait, at a chosen poll."""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from kdtrack import claims

WAIT = "another process{} is {}; waiting for it\n"


class Holder:
    """An open file of the lock holding its flock, with `text` in the file as the holder's own line."""

    def __init__(self, lock: Path, text: str) -> None:
        lock.parent.mkdir(parents=True, exist_ok=True)
        lock.write_text(text)
        self.handle = open(lock, "r+")
        fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def let_go(self) -> None:
        if not self.handle.closed:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()


def _wait_for(holder_text: str, release_after: int, monkeypatch: pytest.MonkeyPatch,
              capsys: pytest.CaptureFixture[str], tmp_path: Path) -> list[tuple[float, str]]:
    """Take claim `k` while a holder whose file reads `holder_text` holds it, for `release_after` polls; return one
    (seconds slept, stderr written since the previous poll) per poll. Inside the claim, its file names this process
    and the flock is really held; after it, the file is empty."""
    lock = tmp_path / "claims" / "k.lock"
    holder = Holder(lock, holder_text)
    polls: list[tuple[float, str]] = []

    def sleep(seconds: float) -> None:
        polls.append((seconds, capsys.readouterr().err))
        assert len(polls) <= 100, "the waiter never took the claim"
        if len(polls) == release_after:
            holder.let_go()

    monkeypatch.setattr(claims, "time", SimpleNamespace(sleep=sleep))
    capsys.readouterr()
    try:
        with claims.claim(tmp_path / "claims", "k", "testing claims"):
            assert lock.read_text() == f"{os.getpid()} {socket.gethostname()} testing claims\n"
            with open(lock) as other, pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        holder.let_go()
    assert lock.read_text() == ""
    assert capsys.readouterr().err == ""  # said once, before the polls recorded above
    return polls


@pytest.mark.parametrize("holder_text, said", [
    # the holder's pid, host and what it does (which may hold spaces, and differs from what the waiter would do)
    ("4242 node-7 building cache 1a2b3c4d5e6f\n", WAIT.format(" (pid 4242 on node-7)", "building cache 1a2b3c4d5e6f")),
    # a holder that wrote pid and host only: the waiter says what it would do itself
    ("4242 node-7 \n", WAIT.format(" (pid 4242 on node-7)", "testing claims")),
])
def test_a_waiter_names_the_holder_once_before_its_first_poll(holder_text: str, said: str,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str],
                                                              tmp_path: Path) -> None:
    """A claim held by a process that has written who it is: the waiter says so at its first failed try, polls
    every 0.1 s, never repeats itself, and takes the claim at the first try after the holder let go."""
    polls = _wait_for(holder_text, 3, monkeypatch, capsys, tmp_path)
    assert polls == [(0.1, said), (0.1, ""), (0.1, "")]


def test_a_holder_that_has_not_written_yet_is_waited_for_twenty_tries_then_unnamed(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """An empty lock file under a held flock (a new holder that has not written its line yet): the waiter gives it
    20 failed tries, says "another process" at the 21st (before the 21st poll), and says it only once."""
    polls = _wait_for("", 25, monkeypatch, capsys, tmp_path)
    assert polls == [(0.1, "")] * 20 + [(0.1, WAIT.format("", "testing claims"))] + [(0.1, "")] * 4


def test_an_uncontended_claim_neither_waits_nor_says_anything(monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str],
                                                               tmp_path: Path) -> None:
    """Nobody holds it: taken at the first try; the file names this process inside the block and is wiped after."""
    monkeypatch.setattr(claims, "time", SimpleNamespace(sleep=lambda seconds: pytest.fail("waited")))
    lock = tmp_path / "k.lock"
    with claims.claim(tmp_path, "k", "testing claims"):
        assert lock.read_text() == f"{os.getpid()} {socket.gethostname()} testing claims\n"
    with claims.claim(tmp_path, "k", "again"):  # a shorter line replaces a longer one whole
        assert lock.read_text() == f"{os.getpid()} {socket.gethostname()} again\n"
    assert lock.read_text() == "" and capsys.readouterr().err == ""
