"""Results of a suite run: figures with targets, the raw timings behind them, the JSON file and the printed table."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.measure import paired_ratio_spread, ratio_of_medians, summarise

SCHEMA = "kdtrack.benchmarks/1"
_OPS = {"<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b}


@dataclass(frozen=True)
class Target:
    """`value op bound`, e.g. Target("<=", 1.05)."""

    op: str
    bound: float

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f"target op {self.op!r} is not one of {list(_OPS)}")

    def holds(self, value: float) -> bool:
        return math.isfinite(value) and _OPS[self.op](value, self.bound)

    def __str__(self) -> str:
        return f"{self.op} {self.bound:g}"


@dataclass(frozen=True)
class Figure:
    """One reported number. A ratio figure names the raw series it divides (medians, with per-round quartiles)."""

    name: str
    value: float
    unit: str
    target: Target | None = None
    numerator: str | None = None
    denominator: str | None = None
    spread: tuple[float, float] | None = None  # p25, p75 of the per-round ratios
    note: str = ""

    @classmethod
    def ratio(cls, name: str, raw: dict[str, list[float]], numerator: str, denominator: str,
              target: Target | None = None, note: str = "") -> Figure:
        """median(raw[numerator]) / median(raw[denominator]), spread over rounds paired by index."""
        num, den = raw[numerator], raw[denominator]
        spread = paired_ratio_spread(num, den) if len(num) == len(den) else None
        return cls(name, ratio_of_medians(num, den), "x", target, numerator, denominator, spread, note)

    @property
    def passed(self) -> bool | None:
        """None when the figure is reported without a target."""
        return None if self.target is None else self.target.holds(self.value)


@dataclass
class Result:
    """What one benchmark measured: raw series (one value per round), their units, figures, sizes and notes."""

    name: str
    title: str
    params: dict[str, Any]
    raw: dict[str, list[float]]
    units: dict[str, str]
    figures: list[Figure]
    notes: list[str] = field(default_factory=list)

    @property
    def stats(self) -> dict[str, dict[str, float]]:
        return {series: summarise(values) for series, values in self.raw.items()}

    @property
    def passed(self) -> bool:
        return all(f.passed is not False for f in self.figures)


@dataclass
class Report:
    """A whole suite run: where and how it ran, and every benchmark's result."""

    command: str
    created_at: str
    machine: dict[str, Any]
    versions: dict[str, str]
    settings: dict[str, Any]
    results: list[Result]
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "command": self.command, "created_at": self.created_at, "seconds": self.seconds,
                "passed": self.passed, "machine": self.machine, "versions": self.versions, "settings": self.settings,
                "results": [_result_dict(r) for r in self.results]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        """Inverse of `to_dict`; the derived fields (stats, passed) are recomputed, not read."""
        if d.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} report (schema {d.get('schema')!r})")
        results = [Result(r["name"], r["title"], r["params"], r["raw"], r["units"],
                          [_figure(f) for f in r["figures"]], r["notes"]) for r in d["results"]]
        return cls(d["command"], d["created_at"], d["machine"], d["versions"], d["settings"], results, d["seconds"])

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> Report:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def table(self) -> str:
        """Figures (value, per-round spread, target, pass/fail), then the median of every raw series."""
        rows = [("benchmark", "figure", "value", "spread p25-p75", "target", "result")]
        for r in self.results:
            for f in r.figures:
                spread = "" if f.spread is None else f"{_num(f.spread[0])}-{_num(f.spread[1])}"
                verdict = {None: "reported", True: "pass", False: "FAIL"}[f.passed]
                rows.append((r.name, f.name, _fmt(f.value, f.unit), spread, str(f.target or ""), verdict))
        series = [("benchmark", "series", "median", "p25-p75", "n")]
        for r in self.results:
            for name, s in r.stats.items():
                unit = r.units.get(name, "")
                series.append((r.name, name, _fmt(s["median"], unit),
                               f"{_fmt(s['p25'], unit)} - {_fmt(s['p75'], unit)}", str(s["n"])))
        notes = [f"- {r.name}: {n}" for r in self.results for n in r.notes]
        return "\n".join([_columns(rows), "", _columns(series), "", *notes])


def _result_dict(r: Result) -> dict[str, Any]:
    figures = [{"name": f.name, "value": f.value, "unit": f.unit,
                "target": None if f.target is None else {"op": f.target.op, "bound": f.target.bound},
                "passed": f.passed, "numerator": f.numerator, "denominator": f.denominator,
                "spread": None if f.spread is None else list(f.spread), "note": f.note} for f in r.figures]
    return {"name": r.name, "title": r.title, "passed": r.passed, "params": r.params, "raw": r.raw,
            "units": r.units, "stats": r.stats, "figures": figures, "notes": r.notes}


def _figure(d: dict[str, Any]) -> Figure:
    target = None if d["target"] is None else Target(d["target"]["op"], d["target"]["bound"])
    spread = None if d["spread"] is None else tuple(d["spread"])
    return Figure(d["name"], d["value"], d["unit"], target, d["numerator"], d["denominator"], spread, d["note"])


def _columns(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _num(value: float) -> str:
    return f"{value:.4g}"


def _fmt(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value * 1e3:.4g} ms" if abs(value) < 1 else f"{value:.4g} s"
    if unit == "B":
        for scale, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if abs(value) >= scale:
                return f"{value / scale:.4g} {name}"
        return f"{value:.4g} B"
    if unit == "x":
        return f"{value:.4g}x"
    return f"{value:.4g} {unit}".rstrip()
