"""Interleaved timing of variants, and the summary statistics every figure is reported with."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch


def interleaved(
    variants: Mapping[str, Callable[[int], Any]],
    repeats: int,
    *,
    warmup: int = 1,
    device: torch.device | None = None,
    before: Callable[[], Any] | None = None,
) -> dict[str, list[float]]:
    """Seconds of `variants[name](round)` for `repeats` rounds, every variant once per round.

    Rounds alternate the order (A B C, C B A, ...), so slow drift and position effects cancel; warm-up rounds
    (negative round numbers) are not recorded. `before()` runs untimed ahead of every call, so each call starts
    from the same state. On CUDA the device is synchronised around each call.
    """
    names = list(variants)
    before = before or (lambda: None)
    for w in range(warmup):
        for name in names:
            before()
            variants[name](-1 - w)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            before()
            samples[name].append(timed(variants[name], r, device=device))
    return samples


def timed(fn: Callable[[int], Any], arg: int, *, device: torch.device | None = None) -> float:
    """Wall seconds of `fn(arg)`, with queued CUDA work finished before and after."""
    _sync(device)
    start = time.perf_counter()
    fn(arg)
    _sync(device)
    return time.perf_counter() - start


def summarise(values: Sequence[float]) -> dict[str, float]:
    """median, quartiles, min, max and count of `values`."""
    if not values:
        raise ValueError("no values to summarise")
    p25, p75 = np.percentile(np.asarray(values, dtype=np.float64), [25, 75]).tolist()
    return {"median": statistics.median(values), "p25": p25, "p75": p75, "min": min(values), "max": max(values),
            "n": len(values)}


def ratio_of_medians(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """median(numerator) / median(denominator): the value a ratio figure reports."""
    return statistics.median(numerator) / statistics.median(denominator)


def paired_ratio_spread(numerator: Sequence[float], denominator: Sequence[float]) -> tuple[float, float]:
    """Quartiles (p25, p75) of the per-round ratios: how much the figure moved from round to round."""
    ratios = np.asarray(numerator, dtype=np.float64) / np.asarray(denominator, dtype=np.float64)
    p25, p75 = np.percentile(ratios, [25, 75]).tolist()
    return p25, p75


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
