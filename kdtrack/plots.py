"""Pure plotting: metric histories of runs -> matplotlib figures. No tracking store, no training, no pyplot state."""
from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

History = list[tuple[int, float]]  # (step, value), step = 0-based epoch

LEARNING_CURVES = ("train/loss", "val/loss", "train/acc", "val/acc")
KD_SCHEDULE = ("train/kd_weight", "train/coverage")
EPOCH_SECONDS = "epoch_seconds"
TEST_ACC = "test/acc"
BASELINE_METHOD = "none"

_TEACHER_COLOUR, _STUDENT_COLOUR, _BASELINE_COLOUR = "#4d4d4d", "#1f77b4", "#ff7f0e"
_NON_FINITE_HATCH = "xx"


@dataclass(frozen=True)
class RunHistory:
    """One run as the plots see it: identity, tags, params and the logged history of each metric."""

    run_id: str
    name: str
    stage: str = ""
    method: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, History] = field(default_factory=dict)

    def steps(self, key: str) -> list[int]:
        return [step for step, _ in self._sorted(key)]

    def values(self, key: str) -> list[float]:
        return [value for _, value in self._sorted(key)]

    def last(self, key: str) -> float | None:
        """The value at the highest step (the final value of a metric logged once at the end)."""
        history = self._sorted(key)
        return history[-1][1] if history else None

    def finite(self, key: str) -> History:
        """The points of `key` with a finite value, by step: what a line or a mean can be drawn from."""
        return [(step, value) for step, value in self._sorted(key) if math.isfinite(value)]

    def non_finite(self, key: str) -> int:
        """How many logged values of `key` are NaN or ±Inf (left out of the plots, and said so)."""
        return sum(not math.isfinite(value) for _, value in self._sorted(key))

    def group(self) -> str:
        """What epoch times are compared by: the KD method (`kd (online)` when the teacher ran live), else the stage."""
        if not self.method:
            return self.stage or "run"
        online = self.tags.get("kdtrack.teacher_mode") == "online" and self.method != BASELINE_METHOD
        return f"{self.method} (online)" if online else self.method

    def _sorted(self, key: str) -> History:
        return sorted(self.metrics.get(key, ()), key=lambda point: point[0])


def run_labels(runs: Sequence[RunHistory]) -> dict[str, str]:
    """Run id -> legend label: the run name, with a short run id where two runs share a name."""
    names = [run.name or run.run_id[:8] for run in runs]
    return {run.run_id: name if names.count(name) == 1 else f"{name} ({run.run_id[:6]})"
            for run, name in zip(runs, names)}


def with_any(runs: Sequence[RunHistory], keys: Sequence[str]) -> list[RunHistory]:
    """The runs that logged at least one of `keys`."""
    return [run for run in runs if any(run.metrics.get(key) for key in keys)]


def learning_curves(runs: Sequence[RunHistory]) -> Figure:
    """Train/val loss and accuracy per epoch: one panel per metric, one line per run that logged it."""
    return _line_panels(runs, LEARNING_CURVES, title="Learning curves", ncols=2)


def kd_schedule(runs: Sequence[RunHistory]) -> Figure:
    """The KD loss weight and the share of samples that received teacher targets, per epoch."""
    fig = _line_panels(runs, KD_SCHEDULE, title="KD weight schedule and coverage", ncols=2)
    for ax in fig.axes:
        ax.set_ylim(-0.05, max(1.05, ax.get_ylim()[1]))  # both are fractions: show them on the whole 0..1 scale
    return fig


def metric_curves(runs: Sequence[RunHistory], keys: Sequence[str]) -> Figure:
    """The chosen metrics per step: one panel per metric, one line per run that logged it."""
    return _line_panels(runs, keys, title=", ".join(keys), ncols=min(len(keys), 2))


def compare_students(teachers: Sequence[RunHistory], students: Sequence[RunHistory], key: str = TEST_ACC) -> Figure:
    """Final `key` of the teachers, then of each student; the no-KD baseline (method `none`) stands out."""
    runs = [*teachers, *students]
    labels = run_labels(runs)
    fig = Figure(figsize=(max(6.0, 1.1 * len(runs) + 2), 4.8), layout="constrained")
    ax = fig.add_subplot()
    teacher_ids = {run.run_id for run in teachers}
    colours, names, heights, hatches, texts = [], [], [], [], []
    for run in runs:
        value = run.last(key)
        if value is None:
            continue
        is_teacher = run.run_id in teacher_ids
        baseline = not is_teacher and run.method == BASELINE_METHOD
        colours.append(_TEACHER_COLOUR if is_teacher else _BASELINE_COLOUR if baseline else _STUDENT_COLOUR)
        role = "teacher" if is_teacher else f"{run.method or run.stage}" + (" (no KD)" if baseline else "")
        names.append(f"{labels[run.run_id]}\n{role}")
        finite = math.isfinite(value)  # a NaN/Inf result is marked by an empty crossed bar labelled with it
        hatches.append(_NON_FINITE_HATCH if not finite else "//" if baseline else "")
        heights.append(value if finite else 0.0)
        texts.append(f"{value:.3f}" if finite else str(value))
    bars = ax.bar(range(len(heights)), heights, color=colours, hatch=hatches, edgecolor="white")
    ax.bar_label(bars, labels=texts, padding=2, fontsize=8)
    for height, hatch in zip(heights, hatches):
        if hatch == "//":  # the baseline's level as a reference line across all bars
            ax.axhline(height, color=_BASELINE_COLOUR, linestyle="--", linewidth=1)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(key)
    ax.set_ylim(0, max([1.0, *heights]) * 1.08)
    ax.set_title(f"Students against their teacher{'s' if len(teachers) > 1 else ''} and the no-KD baseline")
    return fig


def epoch_times(runs: Sequence[RunHistory], key: str = EPOCH_SECONDS) -> Figure:
    """Mean seconds per epoch for each method (or stage), pooled over its runs' epochs; error bars are one std."""
    groups: dict[str, list[float]] = {}
    run_counts: dict[str, int] = {}
    skipped = sum(run.non_finite(key) for run in runs)
    for run in runs:
        values = [value for _, value in run.finite(key)]
        if values:
            groups.setdefault(run.group(), []).extend(values)
            run_counts[run.group()] = run_counts.get(run.group(), 0) + 1
    names = list(groups)
    means = [statistics.fmean(groups[name]) for name in names]
    spreads = [statistics.pstdev(groups[name]) for name in names]
    fig = Figure(figsize=(max(5.0, 1.2 * len(names) + 2), 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(range(len(names)), means, yerr=spreads, capsize=4, color=_STUDENT_COLOUR)
    ax.set_xticks(range(len(names)), [f"{n}\n{run_counts[n]} run(s), {len(groups[n])} epochs" for n in names],
                  fontsize=8)
    ax.set_ylabel("seconds per epoch (mean ± std)")
    ax.set_title("Epoch time per method" + _skipped_note(skipped))
    return fig


def _line_panels(runs: Sequence[RunHistory], keys: Sequence[str], *, title: str, ncols: int) -> Figure:
    """One axes per key; each run that logged the key is one line, in the same colour on every axes."""
    ncols = max(ncols, 1)
    nrows = math.ceil(len(keys) / ncols)
    fig = Figure(figsize=(5.0 * ncols, 3.4 * nrows + 0.9), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    labels = run_labels(runs)
    colours = {run.run_id: f"C{i % 10}" for i, run in enumerate(runs)}
    handles = {}
    for ax, key in zip(axes, keys):
        for run in runs:
            if points := run.finite(key):
                (line,) = ax.plot(*zip(*points), marker="o", markersize=3,
                                  color=colours[run.run_id], label=labels[run.run_id])
                handles.setdefault(run.run_id, line)
        ax.set_title(key + _skipped_note(sum(run.non_finite(key) for run in runs)))
        ax.set_xlabel("epoch (step)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[len(keys):]:
        fig.delaxes(ax)
    if handles:
        fig.legend(handles.values(), [labels[r] for r in handles], loc="outside lower center",
                   ncols=min(len(handles), 4), fontsize=8)
    fig.suptitle(title)
    return fig


def _skipped_note(count: int) -> str:
    return f" ({count} NaN/Inf value{'s' if count != 1 else ''} not drawn)" if count else ""
