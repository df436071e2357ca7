"""plot_experiments.py on real runs of the session store, and the pure plot functions on hand-made histories."""
from __future__ import annotations

import importlib.util
import io
import math
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.colors
import numpy as np
import pytest
from matplotlib.container import BarContainer
from mlflow.entities import Metric, Param
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

@pytest.mark.slow  # the runs fixture trains a teacher, a cache and two students end to end
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


@pytest.mark.slow  # the runs fixture trains a teacher, a cache and two students end to end
def test_learning_curves_have_one_line_per_config(runs):
    figure = _figures(experiment=EXPERIMENT)["learning_curves"]  # the cache run logs no curves
    assert [ax.get_title() for ax in figure.axes] == list(plots.LEARNING_CURVES)
    assert all(len(ax.lines) == 3 for ax in figure.axes)
    figure = _figures(experiment=EXPERIMENT, stage="student")["learning_curves"]
    val_acc = figure.axes[3]
    assert len(val_acc.lines) == 2
    assert [list(line.get_ydata()) for line in val_acc.lines] == [_history(runs["kd"], "val/acc"),
                                                                  _history(runs["none"], "val/acc")]
    assert list(val_acc.lines[0].get_xdata()) == [0, 1, 2]


@pytest.mark.slow  # the runs fixture trains a teacher, a cache and two students end to end
def test_students_against_teacher_and_baseline(runs):
    # Only the students are selected: the teacher comes from their kdtrack.teacher_run_ids.
    figure = _figures(experiment=EXPERIMENT, stage="student")["students"]
    ax = figure.axes[0]
    widths = [bar.get_width() for bar in ax.patches]
    assert widths == [_metric(runs[r], "test/acc") for r in ("teacher", "kd", "none")]
    labels = [tick.get_text() for tick in ax.get_yticklabels()]
    assert labels[0] == f"teacher, run {runs['teacher'][:6]}"  # the id its students name
    # one config per method: the method says what differs (a KD student's kd.* and a baseline's label smoothing
    # differ because the method does), the teacher says which run it learnt from
    assert labels[1:] == [f"kd, teacher {runs['teacher'][:6]}", "none"]
    assert [t.get_text() for t in ax.texts] == [f"{w:.3f}  (n=1)" for w in widths]
    assert [bar.get_hatch() for bar in ax.patches] == ["", "", "//"]
    assert ax.patches[2].get_facecolor() != ax.patches[1].get_facecolor() != ax.patches[0].get_facecolor()


@pytest.mark.slow  # the runs fixture trains a teacher, a cache and two students end to end
def test_kd_schedule_is_the_logged_weight(runs):
    figure = _figures(run_ids=(runs["kd"],))["kd_schedule"]
    weight, coverage = figure.axes
    logged = _history(runs["kd"], "train/kd_weight")
    assert logged == pytest.approx([0.0, 0.4, 0.8])  # the ramp, so a wrong line cannot pass by accident
    assert list(weight.lines[0].get_ydata()) == logged
    assert list(coverage.lines[0].get_ydata()) == _history(runs["kd"], "train/coverage")


@pytest.mark.slow  # the runs fixture trains a teacher, a cache and two students end to end
def test_epoch_times_per_config(runs):
    ax = _figures(experiment=EXPERIMENT)["epoch_times"].axes[0]
    groups = [tick.get_text().split(",")[0] for tick in ax.get_yticklabels()]
    assert groups == ["teacher", "kd", "none"]
    expected = [statistics.fmean(_history(runs[r], "epoch_seconds")) for r in ("teacher", "kd", "none")]
    assert [bar.get_width() for bar in ax.patches] == pytest.approx(expected)


@pytest.mark.slow  # the runs fixture trains a teacher, a cache and two students end to end
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


@pytest.mark.slow  # the runs fixture trains a teacher, a cache and two students end to end
def test_log_to_run_puts_the_files_under_plots(runs, tmp_path, capsys):
    code, _out, err = _run(capsys, "--run-id", f"{runs['kd']},{runs['none']}", "--out", str(tmp_path),
                           "--log-to-run", runs["kd"])
    assert code == 0, err
    logged = sorted(f.path for f in MlflowClient().list_artifacts(runs["kd"], "plots"))
    assert logged == sorted(f"plots/{p.name}" for p in tmp_path.iterdir())
    assert "plots/students.png" in logged


@pytest.mark.slow  # the runs fixture trains a teacher, a cache and two students end to end
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


@pytest.mark.slow  # the runs fixture trains a teacher, a cache and two students end to end
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


@pytest.mark.slow  # logs a run and draws its plots with matplotlib (~1 s on 2 cores)
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
    assert bar.get_width() == 0.0 and bar.get_hatch() == "xx"
    assert [t.get_text() for t in figures["students"].axes[0].texts] == ["inf  (n=0, 1 NaN/Inf)"]
    val_acc = figures["learning_curves"].axes[3]
    assert val_acc.get_title() == "val/acc (1 NaN/Inf value not drawn)"
    assert list(val_acc.lines[0].get_ydata()) == [0.5]
    times = figures["epoch_times"].axes[0]
    assert [b.get_width() for b in times.patches] == [1.5]
    assert times.get_title() == "Epoch time per config (1 NaN/Inf value not drawn)"


# --- an experiment of 64 runs, logged straight into the store --------------------------------------------

BIG = "plots-64-runs"
EPOCHS = 6
GRID = [(t, a) for t in ("2", "4", "8") for a in ("0.5", "0.9")]


def _big_runs() -> list[RunHistory]:
    """3 teachers (resnet8/14/20), and for each a 3 x 2 grid of kd.temperature x kd.alpha with 3 or 4 seeds: 64 runs
    with kdtrack's tags and params and made-up metric histories (run ids made up too)."""
    runs = []
    for t, model in enumerate(("resnet8", "resnet14", "resnet20")):
        teacher = f"{len(runs):06x}".ljust(32, "a")
        runs.append(RunHistory(teacher, f"teacher-{model}", "teacher", "", tags={"kdtrack.stage": "teacher"},
                               params={"model.name": model, "seed": "0"},
                               metrics={"test/acc": [(0, 0.95 + 0.01 * t)],
                                        "epoch_seconds": [(e, 1.0 + t + 0.01 * e) for e in range(EPOCHS)]}))
        for c, (temperature, alpha) in enumerate(GRID):
            for seed in range(4 if t * len(GRID) + c < 7 else 3):  # 7 configs of 4 seeds, 11 of 3: 61 students
                acc = 0.9 + 0.005 * c + 0.003 * seed * (t + 1)
                params = {"method": "kd", "kd.temperature": temperature, "kd.alpha": alpha, "seed": str(seed)}
                tags = {"kdtrack.stage": "student", "kdtrack.method": "kd", "kdtrack.teacher_run_ids": teacher}
                curve = [acc * (1 - 0.5 ** (e + 1 + seed)) for e in range(EPOCHS)]
                runs.append(RunHistory(f"{len(runs):06x}".ljust(32, "b"), f"student-kd-t{temperature}-a{alpha}-s{seed}",
                                       "student", "kd", tags=tags, params=params,
                                       metrics={"test/acc": [(0, acc)], "val/acc": list(enumerate(curve)),
                                                "epoch_seconds": [(e, 0.1 + 0.01 * seed) for e in range(EPOCHS)]}))
    return runs


def _pure_figures(runs: list[RunHistory]) -> dict:
    """The standard figures of `runs`, as plot_experiments.build_figures draws them."""
    students = [r for r in runs if r.stage == "student"]
    return {"learning_curves": plots.learning_curves(plots.with_any(runs, plots.LEARNING_CURVES)),
            "students": plots.compare_students([r for r in runs if r.stage == "teacher"], students),
            "epoch_times": plots.epoch_times(plots.with_any(runs, [plots.EPOCH_SECONDS]))}


@pytest.fixture(scope="module")
def big_store(store: str) -> list[RunHistory]:
    """_big_runs logged into the store (nothing trained), with the ids the store gave them."""
    client = MlflowClient()
    experiment = client.create_experiment(BIG)
    stamp = int(time.time() * 1000)
    ids: dict[str, str] = {}
    logged = []
    for run in _big_runs():
        tags = {k: ",".join(ids[t] for t in v.split(",")) if k == plots.TEACHERS_TAG else v
                for k, v in run.tags.items()}
        run_id = client.create_run(experiment, run_name=run.name, tags=tags).info.run_id
        client.log_batch(run_id, params=[Param(k, v) for k, v in run.params.items()],
                         metrics=[Metric(k, v, stamp, step) for k, h in run.metrics.items() for step, v in h])
        client.set_terminated(run_id, "FINISHED")
        ids[run.run_id] = run_id
        logged.append(RunHistory(run_id, run.name, run.stage, run.method, tags, run.params, run.metrics))
    return logged


def _big_configs(runs: list[RunHistory]) -> dict[str, list[RunHistory]]:
    """Label a group of the plots should have -> the students it stands for, grouped here by hand."""
    configs: dict[str, list[RunHistory]] = {}
    for r in runs:
        if r.stage == "student":
            label = (f"kd, kd.alpha={r.params['kd.alpha']}, kd.temperature={r.params['kd.temperature']}, "
                     f"teacher {r.tags[plots.TEACHERS_TAG][:6]}")
            configs.setdefault(label, []).append(r)
    return configs


def _teacher_label(runs: list[RunHistory], model: str) -> str:
    (teacher,) = [r for r in runs if r.params.get("model.name") == model]
    return f"teacher, model.name={model}, run {teacher.run_id[:6]}"


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"\d+\.\d+|\d+", text)]


def check_students(figure, runs: list[RunHistory]) -> None:
    ax = figure.axes[0]
    labels = [t.get_text().replace("\n", " ") for t in ax.get_yticklabels()]
    configs = _big_configs(runs)
    assert len(runs) == 64 and len(configs) == 18
    assert labels[:3] == [_teacher_label(runs, m) for m in ("resnet8", "resnet14", "resnet20")]
    assert sorted(labels[3:]) == sorted(configs)
    (dots,) = [c for c in ax.collections if c.get_gid() == "runs"]
    for row, label in enumerate(labels[3:], start=3):
        accs = [r.last("test/acc") for r in configs[label]]
        assert ax.patches[row].get_width() == pytest.approx(np.mean(accs))
        mean, std, n = _numbers(ax.texts[row].get_text())  # "0.912 ± 0.003  (n=4)"
        assert (mean, std, n) == pytest.approx((np.mean(accs), np.std(accs, ddof=1), len(accs)), abs=6e-4)
        assert sorted(x for x, y in dots.get_offsets() if y == row) == pytest.approx(sorted(accs))
    (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    half = [np.ptp(seg[:, 0]) / 2 for seg in bars.errorbar.lines[2][0].get_segments()[3:]]
    assert half == pytest.approx([np.std([r.last("test/acc") for r in configs[label]], ddof=1)
                                  for label in labels[3:]])
    # the axis fits the values (0.9 .. 0.97), so the differences between configs show
    low, high = ax.get_xlim()
    assert 0.85 < low < 0.9 and 0.97 < high < 1.02
    width, height = figure.get_size_inches() * 120
    assert width <= 1920 and height <= 1440


def check_learning_curves(figure, runs: list[RunHistory]) -> None:
    val_acc = figure.axes[3]
    configs = _big_configs(runs)
    assert len(val_acc.lines) == 18  # the teachers logged no val/acc
    for line in val_acc.lines:
        label, n = line.get_label().replace("\n", " ").rsplit(" (n=", 1)
        group = configs[label]
        assert int(n.rstrip(")")) == len(group)
        assert list(line.get_ydata()) == pytest.approx(np.mean([r.values("val/acc") for r in group], axis=0))
    assert len(val_acc.collections) == 18  # every config has several seeds: a band each
    assert len({tuple(matplotlib.colors.to_rgba(line.get_color())) for line in val_acc.lines}) == 18
    width, height = figure.get_size_inches() * 120
    assert width <= 1920 and height <= 1440


def check_epoch_times(figure, runs: list[RunHistory]) -> None:
    ax = figure.axes[0]
    labels = [t.get_text().replace("\n", " ") for t in ax.get_yticklabels()]
    assert len(labels) == 21
    for t, model in enumerate(("resnet8", "resnet14", "resnet20")):  # three teachers, three bars
        row = labels.index(_teacher_label(runs, model))
        assert ax.patches[row].get_width() == pytest.approx(np.mean([1.0 + t + 0.01 * e for e in range(EPOCHS)]))


def test_64_runs_one_bar_per_config_and_one_curve_per_config():
    runs = _big_runs()
    figures = _pure_figures(runs)
    check_students(figures["students"], runs)
    check_learning_curves(figures["learning_curves"], runs)
    check_epoch_times(figures["epoch_times"], runs)


@pytest.mark.slow  # logs 64 runs into the sqlite store: about 200 commits, 5-20 s on 2 busy cores
def test_64_runs_from_the_store(big_store: list[RunHistory]):
    figures = _figures(experiment=BIG)
    check_students(figures["students"], big_store)
    check_learning_curves(figures["learning_curves"], big_store)
    check_epoch_times(figures["epoch_times"], big_store)


# --- pure functions on hand-made histories ---------------------------------------------------------------

def _run_history(name: str, stage: str = "student", method: str = "kd", params: dict | None = None,
                 **metrics) -> RunHistory:
    return RunHistory(run_id=f"{name:0<32}", name=name, stage=stage, method=method, params=params or {},
                      metrics={key.replace("__", "/"): value for key, value in metrics.items()})


TEACHER = _run_history("t", stage="teacher", method="", test__acc=[(4, 0.97)], epoch_seconds=[(0, 2.0), (1, 4.0)])
KD = _run_history("kd", train__loss=[(1, 0.5), (0, 1.0)], val__acc=[(0, 0.6), (1, 0.8)], test__acc=[(1, 0.91)],
                  train__kd_weight=[(0, 0.0), (1, 0.7)], epoch_seconds=[(0, 1.0), (1, 3.0)])
BASE = _run_history("base", method="none", train__loss=[(0, 1.2)], test__acc=[(0, 0.88)],
                    train__kd_weight=[(0, 0.0)], epoch_seconds=[(0, 5.0)])


def _seeds(name: str, alpha: str, accs: list[float], **metrics) -> list[RunHistory]:
    """Seed replicas of one KD config: equal params but for `seed`."""
    return [_run_history(f"{name}{seed}", params={"method": "kd", "kd.alpha": alpha, "seed": str(seed)},
                         test__acc=[(0, acc)], **metrics) for seed, acc in enumerate(accs)]


def test_run_history_sorts_by_step_and_names_its_method():
    assert KD.steps("train/loss") == [0, 1] and KD.values("train/loss") == [1.0, 0.5]
    assert KD.last("val/acc") == 0.8 and KD.last("missing") is None
    assert (TEACHER.group(), KD.group(), BASE.group()) == ("teacher", "kd", "none")
    online = RunHistory("x" * 32, "s", method="kd", tags={"kdtrack.teacher_mode": "online"})
    assert online.group() == "kd (online)"


def test_runs_group_by_their_params_but_the_seed():
    a, b = _seeds("a", "0.5", [0.8, 0.9, 0.7]), _seeds("b", "0.9", [0.6])
    killed = RunHistory("k" * 32, "k", stage="student", method="kd", status="KILLED", params=a[0].params)
    other_teacher = RunHistory("o" * 32, "o", stage="student", method="kd", params=a[1].params,
                               tags={"kdtrack.teacher_run_ids": "f" * 32})
    groups = plots.group_runs([a[0], b[0], a[1], killed, a[2], other_teacher])
    assert [[r.run_id for r in g.runs] for g in groups] == [
        [a[0].run_id, a[1].run_id, a[2].run_id], [b[0].run_id], [killed.run_id], [other_teacher.run_id]]
    assert [g.label for g in groups] == ["kd, kd.alpha=0.5", "kd, kd.alpha=0.9", "kd, kd.alpha=0.5 [KILLED]",
                                         "kd, kd.alpha=0.5, teacher ffffff"]
    # runs that logged no params are never averaged: each is its own group, by its name
    assert [g.label for g in plots.group_runs([KD, _run_history("kd2")])] == ["kd", "kd2"]


def test_students_bars_are_mean_and_std_over_seeds():
    a, b = _seeds("a", "0.5", [0.8, 0.9, 0.7]), _seeds("b", "0.9", [0.6])
    ax = plots.compare_students([TEACHER], [*a, *b]).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["t", "kd, kd.alpha=0.5", "kd, kd.alpha=0.9"]
    assert [bar.get_width() for bar in ax.patches] == pytest.approx([0.97, 0.8, 0.6])
    (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    half = [np.ptp(seg[:, 0]) / 2 for seg in bars.errorbar.lines[2][0].get_segments() if len(seg)]
    assert half == pytest.approx([np.std([0.8, 0.9, 0.7], ddof=1)])  # one-run bars have no error bar
    assert [t.get_text() for t in ax.texts] == ["0.970  (n=1)", "0.800 ± 0.100  (n=3)", "0.600  (n=1)"]
    (dots,) = [c for c in ax.collections if c.get_gid() == "runs"]
    assert sorted(map(tuple, dots.get_offsets())) == sorted([(0.97, 0), (0.8, 1), (0.9, 1), (0.7, 1), (0.6, 2)])
    low, high = ax.get_xlim()  # fitted to the values, not 0..1
    assert 0.5 < low < 0.6 and 0.97 < high < 1.2


def test_pure_learning_curves_are_mean_curves_with_a_band():
    a = _seeds("a", "0.5", [0.8, 0.9], val__acc=[(0, 0.5), (1, 0.7)])
    a[1] = RunHistory(a[1].run_id, a[1].name, "student", "kd", params=a[1].params,
                      metrics={"val/acc": [(0, 0.7), (1, 0.8), (2, 0.9)]})
    figure = plots.learning_curves([*a, KD])
    val_acc = figure.axes[3]
    mean, single = val_acc.lines
    assert list(mean.get_xdata()) == [0, 1, 2]
    assert list(mean.get_ydata()) == pytest.approx([0.6, 0.75, 0.9])  # step 2: one run
    assert mean.get_label() == "kd, kd.alpha=0.5 (n=2)" and single.get_label() == "kd (n=1)"
    (band,) = val_acc.collections  # the config of two runs has a band, the single run none
    ys = band.get_paths()[0].vertices[:, 1]
    std = np.std([0.5, 0.7], ddof=1)
    assert min(ys) == pytest.approx(0.6 - std) and max(ys) == pytest.approx(0.9)
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["kd, kd.alpha=0.5 (n=2)", "kd (n=1)"]


def test_pure_kd_schedule_and_metric_curves():
    weight, coverage = plots.kd_schedule([KD, BASE]).axes
    assert [list(line.get_ydata()) for line in weight.lines] == [[0.0, 0.7], [0.0]] and not coverage.lines
    figure = plots.metric_curves([TEACHER, KD, BASE], ["test/acc", "val/acc", "epoch_seconds"])
    assert [(ax.get_title(), len(ax.lines)) for ax in figure.axes] == [("test/acc", 3), ("val/acc", 1),
                                                                        ("epoch_seconds", 3)]


def test_pure_epoch_times_mean_and_spread_per_config():
    kd2 = _run_history("kd2", epoch_seconds=[(0, 5.0)])
    ax = plots.epoch_times([TEACHER, KD, BASE, kd2]).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["t", "kd", "base", "kd2"]
    assert [bar.get_width() for bar in ax.patches] == pytest.approx([3.0, 2.0, 5.0, 5.0])
    (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    spread = [np.ptp(s[:, 0]) / 2 for s in bars.errorbar.lines[2][0].get_segments() if len(s)]
    assert spread == pytest.approx([np.std([2.0, 4.0], ddof=1), np.std([1.0, 3.0], ddof=1)])  # pooled epochs
    assert ax.texts[0].get_text() == f"3.000 ± {np.std([2.0, 4.0], ddof=1):.3f}  (1 run(s), 2 epochs)"


def test_pure_plots_leave_out_and_mark_non_finite_values():
    nan_time = _run_history("a", epoch_seconds=[(0, math.nan), (1, 2.0), (2, 4.0)], train__loss=[(0, math.inf)])
    only_nan = _run_history("b", method="none", epoch_seconds=[(0, math.nan)], test__acc=[(0, math.nan)])
    ax = plots.epoch_times([nan_time, only_nan]).axes[0]
    assert [b.get_width() for b in ax.patches] == [3.0]  # `b` has no finite time: no bar
    assert ax.get_title().endswith("(2 NaN/Inf values not drawn)")
    ax = plots.compare_students([TEACHER], [KD, only_nan, _run_history("c", test__acc=[(0, -math.inf)])]).axes[0]
    assert [b.get_width() for b in ax.patches] == [0.97, 0.91, 0.0, 0.0]
    assert [b.get_hatch() for b in ax.patches] == ["", "", "xx", "xx"]
    assert [t.get_text().split()[0] for t in ax.texts] == ["0.970", "0.910", "nan", "-inf"]
    assert not [line for line in ax.lines if line.get_linestyle() == "--"]  # the NaN baseline draws no level
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
    # the killed run has the finished one's config, but is never averaged with it: its own curve, its status shown
    for mode, names in (("leave-out", ["teacher (n=1)"]), ("mark", ["teacher (n=1)", "teacher [KILLED] (n=1)"])):
        runs = script.finished(script.select(script.Selection(experiment)), mode)
        figure = script.build_figures(runs, ["val/acc"])["metrics"]
        assert sorted(line.get_label() for line in figure.axes[0].get_lines()) == names, mode
