"""A command's stdout holds its result alone (run ids, report lines, result tables), so `RUN=$(kdtrack ...)` works
whatever else runs inside: everything else printed while the command runs, MLflow's "View run" links over HTTP
included, goes to stderr."""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TextIO

_results: list[TextIO] = []  # the stdout of each command running, innermost last


def result(text: str) -> None:
    """Print `text` as (part of) the running command's result: on its stdout; plain stdout outside a command."""
    print(text, file=_results[-1] if _results else sys.stdout, flush=True)


@contextlib.contextmanager
def results_only() -> Iterator[None]:
    """Within the block stdout takes only what `result` prints; anything else written to it goes to stderr."""
    _results.append(sys.stdout)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _results.pop()
