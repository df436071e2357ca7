"""The sweep stage on the session store, its students stood in for by runs with chosen metrics: the grid, the
combination names, the results table and results.csv, failures that do not stop the others."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
from conftest import DIGITS
from mlflow.tracking import MlflowClient

from kdtrack import config, tracking
from kdtrack.errors import BadInput, KdtrackError, TrainingError
from kdtrack.stages import sweep

NAN = math.nan
COLUMNS = ("val/acc", "best/val_acc", "test/acc")


class Students:
    """Stands in for the pipeline's teacher, cache and student steps: each student is a real run of the sweep's
    experiment with the metrics chosen for its (combination, seed); `fail` lists the students that raise."""

    def __init__(self, metrics: dict[tuple[str, int], dict[str, float]], fail: tuple[tuple[str, int], ...] = ()):
        self.metrics, self.fail = metrics, fail
        self.teacher, self.cache = SimpleNamespace(run_id="teacher-run"), SimpleNamespace(run_id="cache-run")
        self.versions: list[str] = []
        self.configs: list[config.Config] = []  # what the teacher (and cache) steps were given
        self.calls: list[tuple] = []
        self.run_names: list[str | None] = []

    def teacher_and_cache(self, cfg: config.Config, version: str):
        self.versions.append(version)
        self.configs.append(cfg)
        return self.teacher, self.cache

    def given_teachers_and_caches(self, cfg: config.Config, teacher_run_ids: list[str], version: str):
        self.versions.append(version)
        self.configs.append(cfg)
        teachers = [SimpleNamespace(run_id=t) for t in teacher_run_ids]
        return teachers, [SimpleNamespace(run_id=f"cache-of-{t}") for t in teacher_run_ids]

    def student_step(self, name, cfg, teachers, caches, version, force, run_name=None):
        self.calls.append((name, cfg, teachers, caches, version, force))
        self.run_names.append(run_name)
        key = (name.split("-")[1], cfg.seed)
        if key in self.fail:
            raise KdtrackError(f"student {name} diverged")
        client = MlflowClient()
        sweep_run = mlflow.active_run()  # a real student's run is started nested under the sweep's
        run = client.create_run(client.get_experiment_by_name(cfg.experiment).experiment_id, run_name=run_name,
                                tags={"mlflow.parentRunId": sweep_run.info.run_id})
        for metric, value in self.metrics[key].items():
            client.log_metric(run.info.run_id, metric, value)
        client.set_terminated(run.info.run_id)
        return SimpleNamespace(run_id=run.info.run_id)


@pytest.fixture
def students(monkeypatch: pytest.MonkeyPatch):
    def install(metrics, fail=()):
        fake = Students(metrics, fail)
        monkeypatch.setattr(sweep, "teacher_and_cache", fake.teacher_and_cache)
        monkeypatch.setattr(sweep, "given_teachers_and_caches", fake.given_teachers_and_caches)
        monkeypatch.setattr(sweep, "student_step", fake.student_step)
        return fake
    return install


def _cfg(experiment: str, *sets: str) -> config.Config:
    return config.load(DIGITS, [f"experiment={experiment}", *sets])


def _csv_rows(run_id: str, tmp_path: Path) -> list[dict[str, str]]:
    text = Path(MlflowClient().download_artifacts(run_id, "results.csv", str(tmp_path))).read_text()
    return list(csv.DictReader(io.StringIO(text)))


def _line(name: str, n: int, *cells: str) -> str:
    return name.ljust(40) + " " + str(n).rjust(2) + "  " + "  ".join(cells)


HEADER = _line("combination", 0, *(c.rjust(17) for c in COLUMNS)).replace(" 0  ", " n  ", 1)


def test_sweep_table_csv_and_tags(store: str, students, capsys: pytest.CaptureFixture[str], tmp_path: Path):
    """Mean and sample std over the seeds of each combination; a metric a run lacks, or logged non-finite, is left
    out (one value: std 0; none: mean nan). Every student gets the same teacher, cache and code version."""
    fake = students({
        ("kd.alpha=0.5", 0): {"val/acc": 0.5, "best/val_acc": 0.75, "test/acc": 0.25},
        ("kd.alpha=0.5", 1): {"val/acc": 0.75, "best/val_acc": 0.75, "test/acc": NAN},
        ("kd.alpha=0.9", 0): {"val/acc": 0.5},
        ("kd.alpha=0.9", 1): {"val/acc": 1.0, "best/val_acc": 1.0},
    })
    cfg = _cfg("sweep-table")
    parent = sweep.run(cfg, {"kd.alpha": ["0.5", "0.9"]}, [0, 1], force_restart=True)

    names = ["student-kd.alpha=0.5-seed0", "student-kd.alpha=0.5-seed1", "student-kd.alpha=0.9-seed0",
             "student-kd.alpha=0.9-seed1"]
    assert [c[0] for c in fake.calls] == names
    assert [(c[1].kd.alpha, c[1].seed, c[1].teacher_mode) for c in fake.calls] == [
        (0.5, 0, "cached"), (0.5, 1, "cached"), (0.9, 0, "cached"), (0.9, 1, "cached")]
    assert all(c[2] == [fake.teacher] and c[3] == [fake.cache] and c[5] is True for c in fake.calls)
    (version,) = fake.versions
    assert isinstance(version, str) and version and all(c[4] == version for c in fake.calls)
    assert fake.configs == [cfg]  # the teacher and its cache are of the sweep's config, not a student's

    assert capsys.readouterr().out == "\n".join([
        HEADER,
        # a column with one finite value says so rather than `± 0.0000`; two equal values do have std 0
        _line("kd.alpha=0.5", 2, "  0.6250 ± 0.1768", "  0.7500 ± 0.0000", "  0.2500    (n=1)"),
        _line("kd.alpha=0.9", 2, "  0.7500 ± 0.3536", "  1.0000    (n=1)", "     nan         "),
    ]) + "\n"
    rows = _csv_rows(parent, tmp_path)
    assert list(rows[0]) == ["combination", "seeds", "val/acc mean", "val/acc std", "best/val_acc mean",
                             "best/val_acc std", "test/acc mean", "test/acc std"]
    got = [[r["combination"], int(r["seeds"]), *(float(v) for k, v in r.items() if k not in ("combination", "seeds"))]
           for r in rows]
    expected = [["kd.alpha=0.5", 2, 0.625, 0.1767766952966369, 0.75, 0.0, 0.25, 0.0],
                ["kd.alpha=0.9", 2, 0.75, 0.3535533905932738, 1.0, 0.0, NAN, 0.0]]
    assert len(got) == 2
    for g, e in zip(got, expected):
        assert g[:2] == e[:2]
        assert g[2:] == pytest.approx(e[2:], rel=1e-12, nan_ok=True)

    run = tracking.get_run(parent)
    tags = run.data.tags
    assert (tags["kdtrack.stage"], tags["kdtrack.teacher_run_ids"], tags["kdtrack.cache_run_ids"]) == (
        "sweep", "teacher-run", "cache-run")
    assert tags["mlflow.runName"] == "sweep-sweep-table"
    # each seed replica has a name of its own, saying what differs (item 1 of issue 13)
    assert fake.run_names == ["student-kd-t4-a0.5-seed0", "student-kd-t4-a0.5-seed1", "student-kd-t4-a0.9-seed0",
                              "student-kd-t4-a0.9-seed1"]
    ids = tags["kdtrack.student_run_ids"].split(",")
    experiment = run.info.experiment_id
    assert [tracking.get_run(i).info.run_name for i in ids] == fake.run_names
    assert tags["mlflow.note.content"] == "\n".join([
        "4 students: grid {'kd.alpha': ['0.5', '0.9']}, seeds [0, 1]. Students averaged in results.csv:", "",
        *(f"- kd.alpha={a}, seed {s}: [{n}](#/experiments/{experiment}/runs/{i})"
          for (a, s), n, i in zip([("0.5", 0), ("0.5", 1), ("0.9", 0), ("0.9", 1)], fake.run_names, ids))])
    # the parent's params: what every student shares, and the grid and seeds it varies
    params = run.data.params
    assert (params["grid.kd.alpha"], params["seeds"], params["method"]) == ("0.5,0.9", "0,1", "kd")
    assert "kd.alpha" not in params and "seed" not in params
    assert run.info.status == "FINISHED" and params["kd.temperature"] == str(cfg.kd.temperature)


def test_sweep_without_a_grid_is_one_default_combination(store: str, students, capsys, tmp_path: Path):
    fake = students({("default", 3): {"val/acc": 0.5, "best/val_acc": 0.5, "test/acc": 0.5}})
    parent = sweep.run(_cfg("sweep-default"), {}, [3], force_restart=False)
    assert [(c[0], c[1].seed, c[5]) for c in fake.calls] == [("student-default-seed3", 3, False)]
    assert fake.run_names == ["student-kd-t4-a0.7"]  # digits.yaml's method, T and alpha; one seed: not named
    assert capsys.readouterr().out == "\n".join([
        HEADER, _line("default", 1, "  0.5000    (n=1)", "  0.5000    (n=1)", "  0.5000    (n=1)")]) + "\n"
    assert [(r["combination"], r["seeds"], r["val/acc mean"], r["val/acc std"]) for r in _csv_rows(parent, tmp_path)] \
        == [("default", "1", "0.5", "0.0")]


def test_a_failed_student_does_not_stop_the_others(store: str, students, capsys, tmp_path: Path):
    """The failure is reported, the next seeds and combinations still run, the table covers the others, and the
    sweep ends in one error naming each failed run."""
    fake = students({(f"kd.alpha={a}", s): {"val/acc": 0.5} for a in ("0.5", "0.9") for s in (0, 1)},
                    fail=(("kd.alpha=0.5", 0), ("kd.alpha=0.9", 0)))
    with pytest.raises(TrainingError, match=r"^2 of 4 sweep runs failed \(kd\.alpha=0\.5 seed 0; kd\.alpha=0\.9 seed "
                                            r"0\) — fix the cause"):
        sweep.run(_cfg("sweep-failed"), {"kd.alpha": ["0.5", "0.9"]}, [0, 1], force_restart=False)
    assert len(fake.calls) == 4
    out, err = capsys.readouterr()
    assert "sweep: kd.alpha=0.5 seed 0 failed: student student-kd.alpha=0.5-seed0 diverged\n" in err
    assert out.splitlines()[1:] == [_line("kd.alpha=0.5", 1, "  0.5000    (n=1)", "     nan         ",
                                          "     nan         "),
                                    _line("kd.alpha=0.9", 1, "  0.5000    (n=1)", "     nan         ",
                                          "     nan         ")]


def test_a_sweep_with_every_student_failed_or_no_seeds(store: str, students):
    students({}, fail=(("kd.alpha=0.5", 0), ("kd.alpha=0.9", 0)))
    with pytest.raises(TrainingError, match=r"^all 2 sweep combinations failed"):
        sweep.run(_cfg("sweep-all-failed"), {"kd.alpha": ["0.5", "0.9"]}, [0], force_restart=False)
    client = MlflowClient()
    [parent] = client.search_runs([client.get_experiment_by_name("sweep-all-failed").experiment_id])
    assert parent.info.status == "FAILED"  # and it still says what it was meant to be:
    assert parent.data.tags["mlflow.note.content"] == "2 students: grid {'kd.alpha': ['0.5', '0.9']}, seeds [0]."
    with pytest.raises(BadInput, match="^no seeds given"):
        sweep.run(_cfg("sweep-all-failed"), {"kd.alpha": ["0.5"]}, [], force_restart=False)


@pytest.mark.parametrize("sets, combo, mode", [
    (["method=fitnet"], {}, "online"),  # feature methods need the teacher's features: online unless asked
    (["method=kd"], {"method": "at"}, "online"),
    (["method=kd"], {"method": "at", "teacher_mode": "cached"}, "cached"),
    (["method=kd"], {}, "cached"),
    (["teacher_mode=online"], {"kd.alpha": "0.25"}, "online"),
])
def test_combination_config(sets: list[str], combo: dict[str, str], mode: str):
    cfg = sweep._combo_config(config.load(DIGITS, sets), combo, 9)
    assert (cfg.teacher_mode, cfg.seed) == (mode, 9)
    assert cfg.method == combo.get("method", config.load(DIGITS, sets).method)
    assert cfg.kd.alpha == float(combo.get("kd.alpha", 0.7))


def test_parse_grid():
    assert sweep.parse_grid(["method=kd,none", "kd.alpha=0.5,0.9", "data.root=a=b"]) == {
        "method": ["kd", "none"], "kd.alpha": ["0.5", "0.9"], "data.root": ["a=b"]}
    assert sweep.parse_grid([]) == {}
    for bad in ("kd.alpha", "=0.5", "kd.alpha="):
        with pytest.raises(BadInput, match=rf"^--grid '{bad}' is not of the form key=v1,v2,\.\.\."):
            sweep.parse_grid([bad])


def test_combinations_of_several_keys_are_named_by_all_of_them(store: str, students, tmp_path: Path):
    """Every combination of the grid's values (first key slowest), named `k1=v1, k2=v2`."""
    names = ["kd.alpha=0.5, kd.temperature=2", "kd.alpha=0.5, kd.temperature=8", "kd.alpha=0.9, kd.temperature=2",
             "kd.alpha=0.9, kd.temperature=8"]
    fake = students({(name, 0): {"val/acc": 0.5} for name in names})
    parent = sweep.run(_cfg("sweep-keys"), {"kd.alpha": ["0.5", "0.9"], "kd.temperature": ["2", "8"]}, [0],
                       force_restart=False)
    assert [c[0] for c in fake.calls] == [f"student-{name}-seed0" for name in names]
    assert [(c[1].kd.alpha, c[1].kd.temperature) for c in fake.calls] == [(0.5, 2), (0.5, 8), (0.9, 2), (0.9, 8)]
    assert [r["combination"] for r in _csv_rows(parent, tmp_path)] == names


def test_sweep_of_given_teacher_runs_trains_no_teacher(store: str, students, digits_teacher: str, capsys):
    """--teacher-run-id: every student distils from the teacher runs given (fused when several) and their caches;
    the config's teacher is not trained, and the parent names both."""
    fake = students({("kd.alpha=0.5", 0): {"val/acc": 0.5}})
    fake.teacher_and_cache = None  # a call would fail: no teacher is trained
    cfg = _cfg("sweep-given")
    parent = sweep.run(cfg, {"kd.alpha": ["0.5"]}, [0], force_restart=False,
                       teacher_run_ids=[digits_teacher, digits_teacher])
    assert fake.configs == [cfg] and fake.versions == [tracking.code_version()]
    ((name, _cfg_used, teachers, caches, _version, _force),) = fake.calls
    assert name == "student-kd.alpha=0.5-seed0"
    assert [t.run_id for t in teachers] == [digits_teacher, digits_teacher]
    assert [c.run_id for c in caches] == [f"cache-of-{digits_teacher}"] * 2
    tags = tracking.get_run(parent).data.tags
    assert tags["kdtrack.teacher_run_ids"] == f"{digits_teacher},{digits_teacher}"
    assert tags["kdtrack.cache_run_ids"] == f"cache-of-{digits_teacher},cache-of-{digits_teacher}"


def test_sweep_refuses_a_run_that_is_no_teacher_before_it_starts(store: str, students, digits_teacher: str):
    fake = students({})
    experiment = "sweep-not-a-teacher"
    cfg = _cfg(experiment)
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    cache_run = client.create_run(experiment_id, tags={"kdtrack.stage": "cache"}).info.run_id
    with pytest.raises(KdtrackError, match=f"run {cache_run} .* is a cache run, not a teacher"):
        sweep.run(cfg, {}, [0], force_restart=False, teacher_run_ids=[digits_teacher, cache_run])
    assert client.search_runs([experiment_id], "tags.`kdtrack.stage` = 'sweep'") == [] and fake.calls == []


def test_the_description_links_every_student_and_marks_the_ones_another_run_owns(store: str):
    """Each averaged student is linked by name; a student whose parent is not this sweep (reused from an earlier
    pipeline or sweep) says whose child it is; one of this sweep, or with no parent, says nothing more."""
    client = MlflowClient()
    exp = client.create_experiment("sweep-describe")
    sweep_run = client.create_run(exp, run_name="the-sweep").info.run_id
    earlier = client.create_run(exp, run_name="an-earlier-pipeline").info.run_id
    own = client.create_run(exp, run_name="own", tags={"mlflow.parentRunId": sweep_run}).info.run_id
    reused = client.create_run(exp, run_name="reused", tags={"mlflow.parentRunId": earlier}).info.run_id
    loose = client.create_run(exp, run_name="loose").info.run_id
    text = sweep._describe(sweep_run, 3, {"kd.alpha": ["0.5"]}, [0, 1],
                           [("a", 0, own), ("b", 1, reused), ("c", 1, loose)])
    link = lambda name, run: f"[{name}](#/experiments/{exp}/runs/{run})"  # noqa: E731
    assert text.splitlines() == [
        "3 students: grid {'kd.alpha': ['0.5']}, seeds [0, 1]. Students averaged in results.csv:", "",
        f"- a, seed 0: {link('own', own)}",
        f"- b, seed 1: {link('reused', reused)} (reused, a child of {link('an-earlier-pipeline', earlier)})",
        f"- c, seed 1: {link('loose', loose)}"]


@pytest.mark.parametrize(("method", "combo", "several_seeds", "name"), [
    ("kd", {"kd.alpha": "0.5", "student.optim.lr": "0.1", "kd.warmup_epochs": "2"}, True,
     "student-kd-t4-a0.5-student.optim.lr=0.1-kd.warmup_epochs=2-seed1"),
    ("kd", {"teacher_mode": "online", "kd.temperature": "2"}, False, "student-kd-t2-a0.7-online"),
    ("none", {"kd.alpha": "0.5", "kd.warmup_epochs": "2", "teacher_mode": "online", "student.optim.lr": "0.1"}, False,
     "student-none-student.optim.lr=0.1"),
])
def test_a_sweep_student_is_named_by_what_its_base_name_does_not_show(method, combo, several_seeds, name):
    """The base name shows method, temperature, alpha and an online teacher; the other grid settings follow, less
    the kd.* ones of a student that does not distil; the seed only when the sweep has several."""
    cfg = config.load(DIGITS, [f"method={method}", "kd.temperature=4", "kd.alpha=0.7",
                               *(f"{k}={v}" for k, v in combo.items())])
    assert sweep.student_name(cfg, combo, 1, several_seeds) == name
