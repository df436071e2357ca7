"""Pure plotting: metric histories of runs -> matplotlib figures. No tracking store, no training, no pyplot state.

Runs are drawn by config: runs whose logged params differ only in `seed` (and that share stage, method, teachers and
status) form one group, drawn as one bar (mean ± sample std over its runs, each run a dot) or one curve (the mean per
epoch in a band of ± std), labelled by the params that tell the groups apart and with the number of runs it stands for.
Figures keep a bounded size whatever the number of runs.
"""
from __future__ import annotations

import math
import statistics
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

History = list[tuple[int, float]]  # (step, value), step = 0-based epoch

LEARNING_CURVES = ("train/loss", "val/loss", "train/acc", "val/acc")
KD_SCHEDULE = ("train/kd_weight", "train/coverage")
EPOCH_SECONDS = "epoch_seconds"
TEST_ACC = "test/acc"
BASELINE_METHOD = "none"
SEED_PARAM = "seed"  # the one param that replicates a config rather than changing it
TEACHERS_TAG = "kdtrack.teacher_run_ids"
MAX_INCHES = (16.0, 12.0)  # width, height: at most 1920 x 1440 px at the script's 120 dpi
_ROW_INCHES = 0.3  # one bar of a bar chart
_SHOWN_ELSEWHERE = ("method", "teacher_mode")  # in a group's label already, as `kd (online)`

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
    status: str = "FINISHED"

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
        """The KD method (`kd (online)` when the teacher ran live), else the stage."""
        if not self.method:
            return self.stage or "run"
        online = self.tags.get("kdtrack.teacher_mode") == "online" and self.method != BASELINE_METHOD
        return f"{self.method} (online)" if online else self.method

    def config_key(self) -> tuple:
        """What runs share when they are seed replicas of one config: stage, method, teachers, status and every logged
        param but the seed. A run that logged no params is never averaged with another."""
        params = tuple(sorted((k, v) for k, v in self.params.items() if k != SEED_PARAM))
        return (self.stage, self.group(), self.tags.get(TEACHERS_TAG, ""), self.status,
                params if self.params else ("run", self.run_id))

    def _sorted(self, key: str) -> History:
        return sorted(self.metrics.get(key, ()), key=lambda point: point[0])


@dataclass(frozen=True)
class RunGroup:
    """The runs of one config: what one bar or one curve stands for."""

    label: str
    runs: tuple[RunHistory, ...]

    @property
    def method(self) -> str:
        return self.runs[0].method

    def finals(self, key: str) -> list[float]:
        """The final value of `key` of each run that logged it."""
        return [value for value in (run.last(key) for run in self.runs) if value is not None]

    def curve(self, key: str) -> tuple[list[int], list[float], list[float], list[int]]:
        """Per step: mean, sample std and count of the finite values the runs logged at that step."""
        by_step: dict[int, list[float]] = {}
        for run in self.runs:
            for step, value in run.finite(key):
                by_step.setdefault(step, []).append(value)
        steps = sorted(by_step)
        return (steps, [statistics.fmean(by_step[s]) for s in steps], [spread(by_step[s]) for s in steps],
                [len(by_step[s]) for s in steps])


def spread(values: Sequence[float]) -> float:
    """Sample standard deviation; 0 for a single value (one run has no spread to show)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def group_runs(runs: Sequence[RunHistory], named: Sequence[str] = ()) -> list[RunGroup]:
    """Runs grouped by `RunHistory.config_key`, in order of first appearance, each labelled by what sets it apart; a
    group holding a run that a student names as its teacher (here or in `named`) carries that run's short id."""
    grouped: dict[tuple, list[RunHistory]] = {}
    for run in runs:
        grouped.setdefault(run.config_key(), []).append(run)
    members = list(grouped.values())
    named = {*named, *(t for run in runs for t in run.tags.get(TEACHERS_TAG, "").split(",") if t)}
    return [RunGroup(label, tuple(runs)) for label, runs in zip(_labels(members, named), members)]


def _labels(members: list[list[RunHistory]], named: set[str]) -> list[str]:
    """`kd, kd.alpha=0.5, kd.temperature=4`: the method or stage, then the params whose values differ between the
    groups of that method or stage (and the teachers, when those differ); a run without params goes by its name.
    Params that differ because the method differs (a KD student's kd.*, a baseline's label smoothing) are left
    out: the method says them."""
    firsts = [runs[0] for runs in members]
    varying: dict[tuple[str, str], list[str]] = {}
    for kind in {(run.stage, run.group()) for run in firsts}:
        peers = [run for run in firsts if (run.stage, run.group()) == kind]
        keys = sorted({k for run in peers for k in run.params} - {SEED_PARAM, *_SHOWN_ELSEWHERE})
        varying[kind] = [k for k in keys if len({run.params.get(k) for run in peers}) > 1]
    teachers_vary = len({run.tags.get(TEACHERS_TAG, "") for run in firsts if run.stage == "student"}) > 1
    labels = []
    for run, runs in zip(firsts, members):
        parts = [run.group()] if run.params else [run.name or run.run_id[:8]]
        parts += [f"{k}={run.params[k]}" for k in varying[run.stage, run.group()] if k in run.params]
        if teachers_vary and run.tags.get(TEACHERS_TAG):
            parts.append("teacher " + "+".join(t[:6] for t in run.tags[TEACHERS_TAG].split(",")))
        if ids := [r.run_id[:6] for r in runs if r.run_id in named]:
            parts.append(f"run {'+'.join(ids)}")
        labels.append(", ".join(parts) + ("" if run.status == "FINISHED" else f" [{run.status}]"))
    return [label if labels.count(label) == 1 else f"{label} #{i + 1}" for i, label in enumerate(labels)]


def with_any(runs: Sequence[RunHistory], keys: Sequence[str]) -> list[RunHistory]:
    """The runs that logged at least one of `keys`."""
    return [run for run in runs if any(run.metrics.get(key) for key in keys)]


def learning_curves(runs: Sequence[RunHistory]) -> Figure:
    """Train/val loss and accuracy per epoch: one panel per metric, one mean curve (± std band) per config."""
    return _line_panels(runs, LEARNING_CURVES, title="Learning curves", ncols=2)


def kd_schedule(runs: Sequence[RunHistory]) -> Figure:
    """The KD loss weight and the share of samples that received teacher targets, per epoch."""
    fig = _line_panels(runs, KD_SCHEDULE, title="KD weight schedule and coverage", ncols=2)
    for ax in fig.axes:
        ax.set_ylim(-0.05, max(1.05, ax.get_ylim()[1]))  # both are fractions: show them on the whole 0..1 scale
    return fig


def metric_curves(runs: Sequence[RunHistory], keys: Sequence[str]) -> Figure:
    """The chosen metrics per step: one panel per metric, one mean curve (± std band) per config."""
    return _line_panels(runs, keys, title=", ".join(keys), ncols=min(len(keys), 2))


def compare_students(teachers: Sequence[RunHistory], students: Sequence[RunHistory], key: str = TEST_ACC) -> Figure:
    """Final `key` per config, teachers first: a bar at the mean over its runs, ± one sample std, a dot per run; the
    no-KD baseline (method `none`) hatched, its mean a dashed line across. The axis fits the values drawn."""
    rows: list[_Row] = []
    named = [t for run in students for t in run.tags.get(TEACHERS_TAG, "").split(",") if t]
    for role, groups in (("teacher", group_runs(teachers, named)), ("student", group_runs(students))):
        for group in groups:
            if finals := group.finals(key):
                colour = (_TEACHER_COLOUR if role == "teacher" else
                          _BASELINE_COLOUR if group.method == BASELINE_METHOD else _STUDENT_COLOUR)
                rows.append(_Row.of(group, finals, colour, baseline=role == "student"
                                    and group.method == BASELINE_METHOD))
    fig = _bar_figure(len(rows))
    ax = fig.axes[0]
    _draw_rows(ax, rows)
    for row in rows:
        if row.baseline and math.isfinite(row.mean):  # the baseline's level as a reference line across all bars
            ax.axvline(row.mean, color=_BASELINE_COLOUR, linestyle="--", linewidth=1)
    ax.set_xlim(*_fit([v for row in rows for v in (*row.values, row.mean - row.std, row.mean + row.std)]))
    ax.set_xlabel(f"{key} (mean ± std over seeds; dots: runs)")
    ax.set_title(f"Students against their teacher{'s' if len(teachers) > 1 else ''} and the no-KD baseline")
    return fig


def epoch_times(runs: Sequence[RunHistory], key: str = EPOCH_SECONDS) -> Figure:
    """Mean seconds per epoch for each config, pooled over its runs' epochs; error bars are one sample std."""
    rows = []
    for group in group_runs(runs):
        pooled = [value for run in group.runs for _, value in run.finite(key)]
        if pooled:
            runs_timed = sum(bool(run.finite(key)) for run in group.runs)
            rows.append(_Row.of(group, pooled, _STUDENT_COLOUR, n_text=f"{runs_timed} run(s), {len(pooled)} epochs"))
    fig = _bar_figure(len(rows))
    ax = fig.axes[0]
    _draw_rows(ax, rows, digits=3)
    ax.set_xlim(0, max([row.mean + row.std for row in rows] or [1.0]) * 1.15)
    ax.set_xlabel("seconds per epoch (mean ± std)")
    ax.set_title("Epoch time per config" + _skipped_note(sum(run.non_finite(key) for run in runs)))
    return fig


@dataclass(frozen=True)
class _Row:
    """One bar: a group's label, the values it summarises, their mean and spread, and how it is drawn."""

    label: str
    values: tuple[float, ...]  # finite ones only: the dots
    mean: float  # the non-finite value itself when no value is finite
    std: float
    colour: str
    baseline: bool
    n_text: str

    @classmethod
    def of(cls, group: RunGroup, values: list[float], colour: str, *, baseline: bool = False,
           n_text: str = "") -> _Row:
        finite = [v for v in values if math.isfinite(v)]
        mean = statistics.fmean(finite) if finite else values[0]
        n_text = n_text or f"n={len(finite)}" + (f", {len(values) - len(finite)} NaN/Inf" if len(finite) < len(values)
                                                  else "")
        return cls(group.label, tuple(finite), mean, spread(finite), colour, baseline, n_text)


def _bar_figure(rows: int) -> Figure:
    fig = Figure(figsize=_inches(10.0, 1.6 + _ROW_INCHES * max(rows, 1)), layout="constrained")
    fig.add_subplot()
    return fig


def _inches(width: float, height: float) -> tuple[float, float]:
    """Within MAX_INCHES, in whole 1/20 inches (so whole pixels at 120 dpi)."""
    return round(min(width, MAX_INCHES[0]) * 20) / 20, round(min(height, MAX_INCHES[1]) * 20) / 20


def _wrap(label: str, width: int) -> str:
    """A long label on several lines, broken after its commas."""
    return "\n".join(textwrap.wrap(label, width, break_long_words=False, break_on_hyphens=False)) or label


def _draw_rows(ax: Axes, rows: list[_Row], digits: int = 3) -> None:
    """Horizontal bars, first row on top; a NaN/Inf result is an empty crossed bar labelled with it."""
    y = np.arange(len(rows))
    finite = [math.isfinite(row.mean) for row in rows]
    widths = [row.mean if ok else 0.0 for row, ok in zip(rows, finite)]
    errors = [row.std if len(row.values) > 1 else math.nan for row in rows]  # one run: no error bar
    hatches = ["//" if row.baseline and ok else "" if ok else _NON_FINITE_HATCH for row, ok in zip(rows, finite)]
    bars = ax.barh(y, widths, xerr=errors, capsize=3, color=[row.colour for row in rows], hatch=hatches,
                   edgecolor="white", height=0.7)
    texts = [(f"{row.mean:.{digits}f} ± {row.std:.{digits}f}" if len(row.values) > 1 else
              f"{row.mean:.{digits}f}" if ok else str(row.mean)) + f"  ({row.n_text})" for row, ok in zip(rows, finite)]
    ax.bar_label(bars, labels=texts, padding=4, fontsize=7)
    dots = [(value, i) for i, row in enumerate(rows) for value in row.values]
    if dots:
        ax.scatter(*zip(*dots), s=9, color="black", zorder=3, gid="runs")
    ax.set_yticks(y, [_wrap(row.label, 45) for row in rows], fontsize=8 if len(rows) <= 30 else 6)
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)


def _fit(values: list[float]) -> tuple[float, float]:
    """Axis limits around the finite values, with room on the right for the bar labels; never below 0 for values
    that are not."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    low, high = min(finite), max(finite)
    pad = max(0.08 * (high - low), 0.005 * max(abs(low), abs(high)), 1e-3)
    left = max(0.0, low - pad) if low >= 0 else low - pad
    return left, high + pad + 0.3 * (high + pad - left)


def _palette(n: int) -> list:
    """n distinct colours: matplotlib's cycle up to 10, tab20 up to 20, else evenly spaced along `turbo`."""
    if n <= 10:
        return [f"C{i}" for i in range(n)]
    if n <= 20:
        return [matplotlib.colormaps["tab20"](i) for i in range(n)]
    return [tuple(c) for c in matplotlib.colormaps["turbo"](np.linspace(0.05, 0.95, n))]


def _line_panels(runs: Sequence[RunHistory], keys: Sequence[str], *, title: str, ncols: int) -> Figure:
    """One axes per key; each config is a mean curve with a ± std band, in the same colour on every axes."""
    ncols = max(ncols, 1)
    nrows = math.ceil(len(keys) / ncols)
    groups = group_runs(runs)
    legend_cols = 1 if len(groups) > 8 else min(len(groups), 2) or 1
    legend_rows = math.ceil(len(groups) / legend_cols)
    fig = Figure(figsize=_inches(5.0 * ncols, 3.4 * nrows + 0.9 + 0.18 * legend_rows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colours = dict(zip((g.label for g in groups), _palette(len(groups))))
    handles = {}
    for ax, key in zip(axes, keys):
        for group in groups:
            steps, mean, std, _ = group.curve(key)
            if not steps:
                continue
            (line,) = ax.plot(steps, mean, marker="o" if len(steps) <= 30 else None, markersize=3,
                              color=colours[group.label], label=_wrap(f"{group.label} (n={len(group.runs)})", 110))
            if len(group.runs) > 1:
                ax.fill_between(steps, np.subtract(mean, std), np.add(mean, std), color=colours[group.label],
                                alpha=0.2, linewidth=0)
            handles.setdefault(group.label, line)
        ax.set_title(key + _skipped_note(sum(run.non_finite(key) for run in runs)))
        ax.set_xlabel("epoch (step)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[len(keys):]:
        fig.delaxes(ax)
    if handles:
        ordered = [handles[g.label] for g in groups if g.label in handles]
        fig.legend(ordered, [line.get_label() for line in ordered], loc="outside lower center",
                   ncols=legend_cols, fontsize=7 if len(handles) > 12 else 8,
                   title="mean over the n runs of each config (seeds); band: ± std", title_fontsize=8)
    fig.suptitle(title)
    return fig


def _skipped_note(count: int) -> str:
    return f" ({count} NaN/Inf value{'s' if count != 1 else ''} not drawn)" if count else ""
