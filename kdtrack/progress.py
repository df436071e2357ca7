"""A small terminal progress bar (stdlib only): `desc  45%|████▌     | 450/1000 [812 rows/s, ETA 0:12]`."""
from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any, TextIO

_BAR_WIDTH = 10
_PARTIAL = " ▏▎▍▌▋▊▉"  # eighths of a cell


class Progress:
    """Context manager drawing one bar line with `\\r`, at most ~10 redraws/s; a newline on close.

    `enabled=None` draws only when `stream` is a terminal; `total <= 0` means unknown (count and rate only).
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "it",
        enabled: bool | None = None,
        stream: TextIO | None = None,
        min_interval: float = 0.1,
    ) -> None:
        self.total = int(total or 0)
        self.desc = desc
        self.unit = unit
        # Resolved at call time rather than import time, so redirected or captured stderr is honoured.
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _is_tty(self.stream) if enabled is None else bool(enabled)
        self.min_interval = min_interval
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self._start = time.perf_counter()
        self._last_draw = float("-inf")
        self._last_len = 0
        self._drawn_n = -1
        self._closed = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """Advance by `n` units; redraws only when the throttle allows or the bar is full."""
        self.n += n
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last_draw >= self.min_interval or (self.total and self.n >= self.total):
            self._draw(now)

    def set_postfix(self, **values: Any) -> None:
        """Show `key=value` pairs after the rate (floats with 4 significant digits) from the next redraw on."""
        self.postfix = values

    def close(self) -> None:
        """Draw the final state and end the line; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self.enabled:
            if self._drawn_n != self.n:
                self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()

    def render(self, now: float | None = None) -> str:
        """The bar line for the current state (without `\\r`)."""
        elapsed = max((now if now is not None else time.perf_counter()) - self._start, 1e-9)
        rate = self.n / elapsed
        stats = [f"{_format_rate(rate)} {self.unit}/s"]
        if self.total > 0:
            remaining = max(self.total - self.n, 0)
            stats.append(f"ETA {_format_duration(remaining / rate) if rate > 0 else '?'}")
            frac = min(self.n / self.total, 1.0)
            head = f"{self.desc} {frac * 100:3.0f}%|{_bar(frac)}| {self.n}/{self.total}"
        else:
            head = f"{self.desc} {self.n} {self.unit}"
        stats += [f"{key}={_format_value(value)}" for key, value in self.postfix.items()]
        return f"{head} [{', '.join(stats)}]"

    def _draw(self, now: float) -> None:
        line = self.render(now)
        # Pad over the remains of a longer previous line.
        self.stream.write("\r" + line + " " * max(self._last_len - len(line), 0))
        self.stream.flush()
        self._last_len = len(line)
        self._last_draw = now
        self._drawn_n = self.n


def _bar(frac: float) -> str:
    eighths = int(frac * _BAR_WIDTH * 8 + 1e-9)  # 0.45 * 80 must give 36, not 35
    full, part = divmod(eighths, 8)
    cells = "█" * full + (_PARTIAL[part] if full < _BAR_WIDTH else "")
    return cells.ljust(_BAR_WIDTH)


def _format_rate(rate: float) -> str:
    return f"{rate:.0f}" if rate >= 100 else f"{rate:.1f}" if rate >= 1 else f"{rate:.2f}"


def _format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _format_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
