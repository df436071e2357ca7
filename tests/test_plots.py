"""plot_experiments.py on real runs of the session store, and the pure plot functions on hand-made histories."""
from __future__ import annotations

import importlib.util
import io
import math
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.container import BarContainer
from mlflow.tracking import MlflowClient

from conftest import DIGITS, REPO, TINY_TEACHER, interrupted_after_epoch, subprocess_env
from kdtrack import config, plots
from kdtrack.plots import RunHistory
from kdtrack.stages import cache_logits, train_student, train_teacher

SCRIPT = REPO / "plot_experiments.py"
EXPERIMENT = "plots"
STUDENT = ("student.model.name=mlp", "student.model.hidden=[16]", "student.optim.epochs=3", "train.progress=off",
           f"experiment={EXPERIMENT}")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load_script():
    spec = importlib.util.spec_from_file_location("plot_experiments", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


script = _load_script()


@pytest.fixture(scope="session")  # built once, whatever order the tests run in
def runs(store: str) -> dict[str, str]:
    """teacher, cache, a KD student whose weight ramps up, and a method=none student: 3 epochs each."""
    teacher = train_teacher.run(config.load(DIGITS, [*TINY_TEACHER, "optim.epochs=3", f"experiment={EXPERIMENT}"]))
    cache = cache_logits.run(config.load(DIGITS, [f"experiment={EXPERIMENT}"]), teacher)
    kd = train_student.run(config.load(DIGITS, [*STUDENT, "kd.alpha=0.8", "kd.ramp_epochs=2"]), [teacher])
    none = train_student.run(config.load(DIGITS, [*STUDENT, "method=none"]), [teacher])
    return {"teacher": teacher, "cache": cache, "kd": kd, "none": none}


def _history(run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(MlflowClient().get_metric_history(run_id, key), key=lambda m: m.step)]


def _metric(run_id: str, key: str) -> float:
    return MlflowClient().get_run(run_id).data.metrics[key]


def _figures(**selection) -> dict:
    return script.build_figures(script.select(script.Selection(**selection)), [])


def _png_bytes(figure) -> bytes:
    """The figure as the script saves it: PNG at 120 dpi."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, which follows the 8-byte signature and the chunk's length and type."""
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = script.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- the script on the store -----------------------------------------------------------------------------

def test_default_plots_are_written_and_printed(runs, tmp_path, capsys):
    code, out, err = _run(capsys, "--experiment", EXPERIMENT, "--out", str(tmp_path))
    assert code == 0, err
    names = ["learning_curves.png", "students.png", "kd_schedule.png", "epoch_times.png"]
    assert out.splitlines() == [str(tmp_path / n) for n in names]
    figures = _figures(experiment=EXPERIMENT)  # each drawn figure's content is checked by the tests below
    for name in names:
        written = (tmp_path / name).read_bytes()
        assert written[:8] == PNG_MAGIC
        # each file is its own figure, whole, at 120 dpi: the same bytes as that figure rendered here
        figure = figures[name.removesuffix(".png")]
        assert _png_size(written) == tuple(round(v * 120) for v in figure.get_size_inches())
        assert written == _png_bytes(figure), name


def test_learning_curves_have_one_line_per_run(runs):
    figure = _figures(experiment=EXPERIMENT)["learning_curves"]  # the cache run logs no curves
    assert [ax.get_title() for ax in figure.axes] == list(plots.LEARNING_CURVES)
    assert all(len(ax.lines) == 3 for ax in figure.axes)
    figure = _figures(experiment=EXPERIMENT, stage="student")["learning_curves"]
    val_acc = figure.axes[3]
    assert len(val_acc.lines) == 2
    assert [list(line.get_ydata()) for line in val_acc.lines] == [_history(runs["kd"], "val/acc"),
                                                                  _history(runs["none"], "val/acc")]
    assert list(val_acc.lines[0].get_xdata()) == [0, 1, 2]


def test_students_against_teacher_and_baseline(runs):
    # Only the students are selected: the teacher comes from their kdtrack.teacher_run_ids.
    figure = _figures(experiment=EXPERIMENT, stage="student")["students"]
    ax = figure.axes[0]
    heights = [bar.get_height() for bar in ax.patches]
    assert heights == [_metric(runs[r], "test/acc") for r in ("teacher", "kd", "none")]
    labels = [tick.get_text() for tick in ax.get_xticklabels()]
    assert labels[0].startswith("teacher-mlp-digits") and labels[1] == "student-kd-t4-a0.8\nkd"
    assert labels[2] == "student-none\nnone (no KD)"
    assert [bar.get_hatch() for bar in ax.patches] == ["", "", "//"]
    assert ax.patches[2].get_facecolor() != ax.patches[1].get_facecolor() != ax.patches[0].get_facecolor()


def test_kd_schedule_is_the_logged_weight(runs):
    figure = _figures(run_ids=(runs["kd"],))["kd_schedule"]
    weight, coverage = figure.axes
    logged = _history(runs["kd"], "train/kd_weight")
    assert logged == pytest.approx([0.0, 0.4, 0.8])  # the ramp, so a wrong line cannot pass by accident
    assert list(weight.lines[0].get_ydata()) == logged
    assert list(coverage.lines[0].get_ydata()) == _history(runs["kd"], "train/coverage")


def test_epoch_times_per_method(runs):
    ax = _figures(experiment=EXPERIMENT)["epoch_times"].axes[0]
    groups = [tick.get_text().split("\n")[0] for tick in ax.get_xticklabels()]
    assert groups == ["teacher", "kd", "none"]
    expected = [statistics.fmean(_history(runs[r], "epoch_seconds")) for r in ("teacher", "kd", "none")]
    assert [bar.get_height() for bar in ax.patches] == pytest.approx(expected)


def test_named_metric_of_two_runs(runs, tmp_path, capsys):
    code, out, err = _run(capsys, "--metric", "val/acc", "--run-id", runs["kd"], "--run-id", runs["none"],
                          "--out", str(tmp_path), "--svg")
    assert code == 0, err
    assert out.split() == [str(tmp_path / "metrics.png"), str(tmp_path / "metrics.svg")]
    figure = script.build_figures(script.select(script.Selection(run_ids=(runs["kd"], runs["none"]))), ["val/acc"])
    (ax,) = figure["metrics"].axes
    assert ax.get_title() == "val/acc"
    drawn = sorted((list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines)
    assert drawn == sorted(([0, 1, 2], _history(runs[r], "val/acc")) for r in ("kd", "none"))
    assert (tmp_path / "metrics.png").read_bytes() == _png_bytes(figure["metrics"])
    svg = (tmp_path / "metrics.svg").read_bytes()
    assert svg.startswith(b"<?xml") and b"<svg" in svg


def test_log_to_run_puts_the_files_under_plots(runs, tmp_path, capsys):
    code, _out, err = _run(capsys, "--run-id", f"{runs['kd']},{runs['none']}", "--out", str(tmp_path),
                           "--log-to-run", runs["kd"])
    assert code == 0, err
    logged = sorted(f.path for f in MlflowClient().list_artifacts(runs["kd"], "plots"))
    assert logged == sorted(f"plots/{p.name}" for p in tmp_path.iterdir())
    assert "plots/students.png" in logged


def test_empty_selection_is_one_line_exit_2(runs, tmp_path, capsys):
    code, out, err = _run(capsys, "--experiment", EXPERIMENT, "--tag", "kdtrack.method=fitnet", "--out", str(tmp_path))
    assert code == 2 and out == ""
    assert err.startswith(f"error: no runs match experiment '{EXPERIMENT}', tag kdtrack.method=fitnet in ")
    assert err.count("\n") == 1 and " — " in err and "Traceback" not in err
    code, _out, err = _run(capsys, "--experiment", "no-such-experiment")
    assert code == 2 and "experiments there: " in err and EXPERIMENT in err
    code, _out, err = _run(capsys, "--run-id", "0" * 32)
    assert code == 2 and err.startswith(f"error: run {'0' * 32} not found in ")
    assert not list(tmp_path.iterdir())


def test_unknown_metric_names_the_logged_ones(runs, capsys):
    code, _out, err = _run(capsys, "--stage", "student", "--experiment", EXPERIMENT, "--metric", "val/accuracy")
    assert code == 2 and err.startswith("error: unknown metric val/accuracy for the selected runs — metrics they ")
    assert "val/acc," in err and "train/kd_weight" in err and err.count("\n") == 1


@pytest.mark.slow  # plot_experiments.py as a process: imports matplotlib and mlflow
def test_script_as_a_subprocess(runs, tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--experiment", EXPERIMENT, "--stage", "student",
                          "--out", str(tmp_path), "--svg", "true"],
                         capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    written = [Path(p) for p in out.stdout.split()]
    stems = ["learning_curves", "students", "kd_schedule", "epoch_times"]
    assert written == [tmp_path / f"{stem}{suffix}" for stem in stems for suffix in (".png", ".svg")]
    for path in written:
        data = path.read_bytes()
        is_png, is_svg = data.startswith(PNG_MAGIC), data.startswith(b"<?xml") and b"<svg" in data
        assert (is_png, is_svg) == ((True, False) if path.suffix == ".png" else (False, True)), path
    figures = _figures(experiment=EXPERIMENT, stage="student")
    for stem in stems:  # the subprocess drew the same figures as this process does
        assert (tmp_path / f"{stem}.png").read_bytes() == _png_bytes(figures[stem]), stem


def test_nan_and_inf_metrics_are_skipped_and_marked(store, tmp_path, capsys):
    """A run with a NaN epoch time and an infinite accuracy (MLflow's SQL store keeps ±Inf as ±max float)."""
    client = MlflowClient()
    run = client.create_run(client.create_experiment("plots-nonfinite"), run_name="diverged",
                            tags={"kdtrack.stage": "student", "kdtrack.method": "kd"}).info.run_id
    for key, values in {"epoch_seconds": [math.nan, 1.5], "val/acc": [0.5, math.inf], "test/acc": [math.inf]}.items():
        for step, value in enumerate(values):
            client.log_metric(run, key, value, step=step)
    client.set_terminated(run, "FINISHED")
    code, out, err = _run(capsys, "--experiment", "plots-nonfinite", "--out", str(tmp_path))
    assert code == 0 and "Traceback" not in err, err
    assert out.split() == [str(tmp_path / f"{n}.png") for n in ("learning_curves", "students", "epoch_times")]
    figures = _figures(experiment="plots-nonfinite")
    (bar,) = figures["students"].axes[0].patches
    assert bar.get_height() == 0.0 and bar.get_hatch() == "xx"
    assert [t.get_text() for t in figures["students"].axes[0].texts] == ["inf"]
    val_acc = figures["learning_curves"].axes[3]
    assert val_acc.get_title() == "val/acc (1 NaN/Inf value not drawn)"
    assert list(val_acc.lines[0].get_ydata()) == [0.5]
    times = figures["epoch_times"].axes[0]
    assert [b.get_height() for b in times.patches] == [1.5]
    assert times.get_title() == "Epoch time per method (1 NaN/Inf value not drawn)"


# --- pure functions on hand-made histories ---------------------------------------------------------------

def _run_history(name: str, stage: str = "student", method: str = "kd", **metrics) -> RunHistory:
    return RunHistory(run_id=f"{name:0<32}", name=name, stage=stage, method=method,
                      metrics={key.replace("__", "/"): value for key, value in metrics.items()})


TEACHER = _run_history("t", stage="teacher", method="", test__acc=[(4, 0.97)], epoch_seconds=[(0, 2.0), (1, 4.0)])
KD = _run_history("kd", train__loss=[(1, 0.5), (0, 1.0)], val__acc=[(0, 0.6), (1, 0.8)], test__acc=[(1, 0.91)],
                  train__kd_weight=[(0, 0.0), (1, 0.7)], epoch_seconds=[(0, 1.0), (1, 3.0)])
BASE = _run_history("base", method="none", train__loss=[(0, 1.2)], test__acc=[(0, 0.88)],
                    train__kd_weight=[(0, 0.0)], epoch_seconds=[(0, 5.0)])


def test_run_history_sorts_by_step_and_groups_by_method():
    assert KD.steps("train/loss") == [0, 1] and KD.values("train/loss") == [1.0, 0.5]
    assert KD.last("val/acc") == 0.8 and KD.last("missing") is None
    assert (TEACHER.group(), KD.group(), BASE.group()) == ("teacher", "kd", "none")
    online = RunHistory("x" * 32, "s", method="kd", tags={"kdtrack.teacher_mode": "online"})
    assert online.group() == "kd (online)"


def test_pure_learning_curves_draw_only_logged_metrics():
    figure = plots.learning_curves([TEACHER, KD, BASE])
    lines = {ax.get_title(): ax.lines for ax in figure.axes}
    assert [len(lines[k]) for k in plots.LEARNING_CURVES] == [2, 0, 0, 1]
    assert list(lines["train/loss"][0].get_ydata()) == [1.0, 0.5]
    assert lines["train/loss"][0].get_color() != lines["train/loss"][1].get_color()
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["kd", "base"]


def test_pure_compare_students_bars():
    ax = plots.compare_students([TEACHER], [KD, BASE, _run_history("failed")]).axes[0]
    assert [bar.get_height() for bar in ax.patches] == [0.97, 0.91, 0.88]  # the run without test/acc is left out
    assert [bar.get_hatch() for bar in ax.patches] == ["", "", "//"]
    assert [line.get_ydata()[0] for line in ax.lines] == [0.88]  # the baseline's level


def test_pure_kd_schedule_and_metric_curves():
    weight, coverage = plots.kd_schedule([KD, BASE]).axes
    assert [list(line.get_ydata()) for line in weight.lines] == [[0.0, 0.7], [0.0]] and not coverage.lines
    figure = plots.metric_curves([TEACHER, KD, BASE], ["test/acc", "val/acc", "epoch_seconds"])
    assert [(ax.get_title(), len(ax.lines)) for ax in figure.axes] == [("test/acc", 3), ("val/acc", 1),
                                                                        ("epoch_seconds", 3)]


def test_pure_epoch_times_mean_and_spread():
    ax = plots.epoch_times([TEACHER, KD, BASE, _run_history("kd2", epoch_seconds=[(0, 5.0)])]).axes[0]
    assert [t.get_text().split("\n")[0] for t in ax.get_xticklabels()] == ["teacher", "kd", "none"]
    assert [bar.get_height() for bar in ax.patches] == pytest.approx([3.0, 3.0, 5.0])
    (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    segments = bars.errorbar.lines[2][0].get_segments()  # one vertical segment per bar: mean - std .. mean + std
    spread = [np.ptp(s[:, 1]) / 2 for s in segments]
    assert spread == pytest.approx([1.0, statistics.pstdev([1.0, 3.0, 5.0]), 0.0])


def test_pure_labels_tell_same_named_runs_apart():
    a, b = RunHistory("a" * 32, "student-none"), RunHistory("b" * 32, "student-none")
    assert plots.run_labels([a, b, KD]) == {a.run_id: "student-none (aaaaaa)", b.run_id: "student-none (bbbbbb)",
                                            KD.run_id: "kd"}


def test_pure_plots_leave_out_and_mark_non_finite_values():
    nan_time = _run_history("a", epoch_seconds=[(0, math.nan), (1, 2.0), (2, 4.0)], train__loss=[(0, math.inf)])
    only_nan = _run_history("b", method="none", epoch_seconds=[(0, math.nan)], test__acc=[(0, math.nan)])
    ax = plots.epoch_times([nan_time, only_nan]).axes[0]
    assert [b.get_height() for b in ax.patches] == [3.0]  # group `none` has no finite time: no bar
    assert ax.get_title().endswith("(2 NaN/Inf values not drawn)")
    ax = plots.compare_students([TEACHER], [KD, only_nan, _run_history("c", test__acc=[(0, -math.inf)])]).axes[0]
    assert [b.get_height() for b in ax.patches] == [0.97, 0.91, 0.0, 0.0]
    assert [b.get_hatch() for b in ax.patches] == ["", "", "xx", "xx"]
    assert [t.get_text() for t in ax.texts] == ["0.970", "0.910", "nan", "-inf"]
    assert ax.get_ylim() == pytest.approx((0.0, 1.08)) and not ax.lines  # the NaN baseline draws no level
    loss = plots.learning_curves([nan_time, KD]).axes[0]
    assert [list(line.get_ydata()) for line in loss.lines] == [[1.0, 0.5]]
    assert loss.get_title() == "train/loss (1 NaN/Inf value not drawn)"


@pytest.mark.slow  # trains several models end to end in process (1-4 s on 2 cores)
def test_unfinished_runs_are_left_out_or_marked(store: str, tmp_path: Path, capsys):
    experiment = "plots-unfinished"
    cfg = config.load(DIGITS, [*TINY_TEACHER, "optim.epochs=3", f"experiment={experiment}"])
    done = train_teacher.run(cfg)
    with interrupted_after_epoch(0), pytest.raises(KeyboardInterrupt):
        train_teacher.run(cfg)
    killed = next(r for r in script.select(script.Selection(experiment)) if r.info.run_id != done)
    assert killed.info.status == "KILLED"

    code, _out, err = _run(capsys, "--experiment", experiment, "--metric", "val/acc", "--out", str(tmp_path))
    assert code == 0 and "note: left out 1 run(s) that are not FINISHED (KILLED)" in err, err
    for mode, names in (("leave-out", ["teacher-mlp-digits"]),
                        ("mark", ["teacher-mlp-digits", "teacher-mlp-digits [KILLED]"])):
        runs = script.finished(script.select(script.Selection(experiment)), mode)
        figure = script.build_figures(runs, ["val/acc"])["metrics"]
        assert sorted(line.get_label() for line in figure.axes[0].get_lines()) == names, mode
