"""Plots of logged kdtrack runs, read from the tracking store; nothing is trained.

    python plot_experiments.py --experiment digits --out plots
    python plot_experiments.py --stage student --tag kdtrack.method=kd --svg
    python plot_experiments.py --run-id A --run-id B --metric val/acc --log-to-run A

Without --metric it draws learning curves, students against their teacher(s) and the no-KD baseline, the KD
weight schedule and coverage, and epoch time per config, each where the selected runs logged the metrics. Runs of
one config (params equal but for the seed) are drawn as one mean bar or curve with its spread and run count.
"""
from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import matplotlib
from matplotlib.figure import Figure

matplotlib.use("Agg")  # files only, never a window

from kdtrack import output, plots  # noqa: E402 (after the backend is chosen)
from kdtrack.cli import expected_errors  # noqa: E402
from kdtrack.errors import BadInput  # noqa: E402
from kdtrack.plots import RunHistory  # noqa: E402

ARTIFACT_DIR = "plots"


@dataclass(frozen=True)
class Selection:
    """Which runs to plot: all given criteria must hold."""

    experiment: str = ""
    tags: tuple[tuple[str, str], ...] = ()
    stage: str = ""
    run_ids: tuple[str, ...] = ()

    def describe(self) -> str:
        parts = [f"experiment {self.experiment!r}"] if self.experiment else []
        parts += [f"stage {self.stage!r}"] if self.stage else []
        parts += [f"tag {k}={v}" for k, v in self.tags]
        parts += [f"run id {', '.join(self.run_ids)}"] if self.run_ids else []
        return ", ".join(parts) or "any run"


def _split(values: tuple[str, ...], separators: str = ", ") -> list[str]:
    """Repeated options, each of which may also hold several values (as MLproject parameters do)."""
    pattern = f"[{re.escape(separators)}]+"
    return list(dict.fromkeys(v for value in values for v in re.split(pattern, value) if v))


def _tags(values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in _split(values, " "):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise BadInput(f"--tag {item!r} is not KEY=VALUE", "write e.g. --tag kdtrack.method=kd")
        pairs.append((key, value))
    return tuple(pairs)


def select(selection: Selection) -> list[Any]:
    """The runs of the selection; a selection that matches nothing is an error that says what to change."""
    from kdtrack import tracking

    if selection.run_ids:
        found = {run.info.run_id for run in tracking.select_runs(run_ids=list(selection.run_ids))}
        missing = [r for r in selection.run_ids if r not in found]
        if missing:
            raise BadInput(f"run {', '.join(missing)} not found in {tracking.tracking_uri()}",
                           "check the run ids (`mlflow ui`, `kdtrack lineage RUN_ID`) and MLFLOW_TRACKING_URI")
    names = tracking.experiment_names() if selection.experiment else []
    if selection.experiment and selection.experiment not in names:
        raise BadInput(f"no runs match: no experiment named {selection.experiment!r} in {tracking.tracking_uri()}",
                       f"experiments there: {', '.join(names) or 'none'}")
    runs = tracking.select_runs(experiment=selection.experiment or None, tags=dict(selection.tags),
                                stage=selection.stage or None, run_ids=list(selection.run_ids) or None)
    if not runs:
        raise BadInput(f"no runs match {selection.describe()} in {tracking.tracking_uri()}",
                       "loosen the selection or check tag values (kdtrack.stage: teacher, cache, student; "
                       "kdtrack.method: kd, none, fitnet, rkd, ft, at)")
    return runs


def finished(runs: list[Any], unfinished: str) -> list[Any]:
    """The FINISHED runs, saying on stderr how many others were left out; with `mark`, every run (each one that is
    not FINISHED is named with its status in the plots). Orphans were marked KILLED when they were selected."""
    others = [run for run in runs if run.info.status != "FINISHED"]
    if unfinished == "mark" or not others:
        return runs
    statuses = ", ".join(sorted({run.info.status for run in others}))
    kept = [run for run in runs if run.info.status == "FINISHED"]
    if not kept:
        raise BadInput(f"none of the {len(runs)} selected runs is FINISHED ({statuses})",
                       "pass --unfinished mark to draw them with their status")
    click.echo(f"note: left out {len(others)} run(s) that are not FINISHED ({statuses}); "
               "--unfinished mark draws them with their status", err=True)
    return kept


def build_figures(runs: list[Any], metrics: list[str]) -> dict[str, Figure]:
    """File stem -> figure: the named metrics only, or every standard plot the runs have metrics for."""
    logged = {key for run in runs for key in run.data.metrics}
    if metrics:
        unknown = [m for m in metrics if m not in logged]
        if unknown:
            raise BadInput(f"unknown metric {', '.join(unknown)} for the selected runs",
                           f"metrics they logged: {', '.join(sorted(logged)) or 'none'}")
        return {"metrics": plots.metric_curves(_histories(runs, metrics), metrics)}
    keys = [*plots.LEARNING_CURVES, *plots.KD_SCHEDULE, plots.EPOCH_SECONDS, plots.TEST_ACC]
    histories = _histories(runs, keys)
    figures = {}
    if curves := plots.with_any(histories, plots.LEARNING_CURVES):
        figures["learning_curves"] = plots.learning_curves(curves)
    students = [h for h in histories if h.stage == "student" and h.last(plots.TEST_ACC) is not None]
    if students:
        figures["students"] = plots.compare_students(_teachers(students, histories), students)
    if schedule := plots.with_any(histories, plots.KD_SCHEDULE):
        figures["kd_schedule"] = plots.kd_schedule(schedule)
    if timed := plots.with_any(histories, [plots.EPOCH_SECONDS]):
        figures["epoch_times"] = plots.epoch_times(timed)
    if not figures:
        raise BadInput(f"the selected runs logged none of {', '.join(keys)}",
                       f"select teacher or student runs, or name metrics with --metric "
                       f"(logged: {', '.join(sorted(logged)) or 'none'})")
    return figures


def _teachers(students: list[RunHistory], selected: list[RunHistory]) -> list[RunHistory]:
    """The teachers the students name in kdtrack.teacher_run_ids, read from the store when not selected."""
    from kdtrack import tracking

    ids = list(dict.fromkeys(t for s in students for t in s.tags.get("kdtrack.teacher_run_ids", "").split(",") if t))
    have = {h.run_id: h for h in selected}
    fetch = [i for i in ids if i not in have]
    if fetch:
        have.update({h.run_id: h for h in _histories(tracking.select_runs(run_ids=fetch), [plots.TEST_ACC])})
    return [have[i] for i in ids if i in have]


def _histories(runs: list[Any], keys: list[str]) -> list[RunHistory]:
    """RunHistory of each run with the histories of those of `keys` it logged."""
    from kdtrack import tracking

    wanted = {run.info.run_id: [k for k in keys if k in run.data.metrics] for run in runs}
    read = {run_id: {key: [(step, _unclamp(value)) for step, value in history] for key, history in metrics.items()}
            for run_id, metrics in tracking.metric_histories(wanted).items()}
    # the status travels too: a killed run is never averaged with finished ones, and its label says so
    return [RunHistory(run_id=run.info.run_id, name=run.info.run_name or "", metrics=read[run.info.run_id],
                       stage=run.data.tags.get("kdtrack.stage", ""), method=run.data.tags.get("kdtrack.method", ""),
                       tags=dict(run.data.tags), params=dict(run.data.params), status=run.info.status)
            for run in runs]


def _unclamp(value: float) -> float:
    """±Inf again: MLflow's SQL stores keep a logged ±Inf as ±(largest float)."""
    return math.copysign(math.inf, value) if abs(value) == sys.float_info.max else value


def save(figures: dict[str, Figure], out: Path, svg: bool) -> list[Path]:
    """Write each figure as <out>/<stem>.png (and .svg); return the paths in order."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, figure in figures.items():
        for suffix in (".png", ".svg") if svg else (".png",):
            figure.savefig(out / f"{stem}{suffix}", dpi=120)
            paths.append(out / f"{stem}{suffix}")
    return paths


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--experiment", default="", help="Experiment name, e.g. digits.")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Tag value, e.g. kdtrack.method=kd; repeatable.")
@click.option("--stage", default="", help="kdtrack.stage: teacher, cache, student, ...")
@click.option("--run-id", "run_ids", multiple=True, metavar="RUN_ID", help="A run; repeatable or comma-separated.")
@click.option("--metric", "metrics", multiple=True, metavar="KEY",
              help="Plot just this metric per step, one line per run, e.g. val/acc; repeatable or comma-separated.")
@click.option("--out", default="plots", show_default=True, type=click.Path(file_okay=False), help="Folder for the files.")
@click.option("--svg", is_flag=False, flag_value=True, default=False, type=click.BOOL,
              help="Also write SVG: --svg, or --svg true|false (MLproject).")
@click.option("--log-to-run", default="", metavar="RUN_ID", help=f"Log the files under {ARTIFACT_DIR}/ of this run.")
@click.option("--unfinished", type=click.Choice(["leave-out", "mark"]), default="leave-out", show_default=True,
              help="Runs that are not FINISHED (RUNNING, KILLED, FAILED): left out, or drawn with their status.")
@expected_errors
def plot(experiment: str, tags: tuple[str, ...], stage: str, run_ids: tuple[str, ...], metrics: tuple[str, ...],
         out: str, svg: bool, log_to_run: str, unfinished: str) -> None:
    """Plot logged metrics of the selected runs into PNG files; prints the paths written."""
    from kdtrack import tracking

    if log_to_run:
        select(Selection(run_ids=(log_to_run,)))  # fail before drawing when the target run is wrong
    runs = finished(select(Selection(experiment, _tags(tags), stage, tuple(_split(run_ids)))), unfinished)
    paths = save(build_figures(runs, _split(metrics, ",")), Path(out), svg)
    for path in paths:
        output.result(str(path))
    if log_to_run:
        tracking.log_files(log_to_run, paths, ARTIFACT_DIR)
        click.echo(f"logged {len(paths)} file(s) under {ARTIFACT_DIR}/ of run {log_to_run}", err=True)


def main(argv: list[str] | None = None) -> int:
    """Run the command on `argv` (default: sys.argv); return its exit code."""
    try:
        plot.main(args=argv, prog_name="plot_experiments.py")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
