"""Behaviours pinned by value: each expectation is computed here by another path (plain zarr, the teacher's own
forward, a formula), never by the kdtrack function under test."""
from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from mlflow.tracking import MlflowClient

from conftest import DIGITS, TINY_TEACHER, cli, set_args
from kdtrack import config, tracking
from kdtrack.data import build_dataset, dataset_digest, distillation_rows, student_dataset
from kdtrack.models import build_model, spec_from_config
from kdtrack.stages import cache_logits, train_teacher
from kdtrack.stages.distillation import build_distillation
from kdtrack.teachers import load_teacher

CPU = torch.device("cpu")
EXPERIMENT = "experiment=pinned"
STUDENT = ("student.model.name=mlp", "student.model.hidden=[8]", "student.optim.epochs=1", "train.progress=off")


def _store(run_id: str) -> zarr.Group:
    return zarr.open_group(str(tracking.local_artifact_dir(run_id) / "logits.zarr"), mode="r")


def _tags(run_id: str) -> dict[str, str]:
    return MlflowClient().get_run(run_id).data.tags


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _student_inputs(cfg: config.Config, teacher_run_id: str):
    """What train-student hands build_distillation: the teacher, a student model, the raw training rows, digest."""
    teacher = load_teacher(teacher_run_id, CPU)
    data = student_dataset(cfg.data)
    train = distillation_rows(data, cfg.cache.splits) if cfg.method != "none" else data.select(["train"])
    torch.manual_seed(0)
    student = build_model(spec_from_config(cfg.student.model, data.num_classes, data.input_shape,
                                           prefix="student.model"))
    return teacher, student, train, dataset_digest(train)


@pytest.fixture(scope="session")  # built once, whatever order the tests run in
def two_teachers(digits_teacher: str) -> tuple[str, str, str, str]:
    """Two teachers of different weights and their float32 caches of the default rows: (t1, t2, cache1, cache2)."""
    other = train_teacher.run(config.load(DIGITS, [*TINY_TEACHER, "seed=3", EXPERIMENT]))
    cfg = config.load(DIGITS, [EXPERIMENT, "cache.chunk_rows=512"])
    return digits_teacher, other, cache_logits.run(cfg, digits_teacher), cache_logits.run(cfg, other)


# 1. The leakage guard covers every part of the selection, split files included.

def _cache_cmd(teacher: str, *args: str) -> tuple[str, ...]:
    return ("cache-logits", "--teacher-run-id", teacher, "--config", str(DIGITS), *args,
            *set_args("cache.chunk_rows=512", "experiment=pinned-leak"))


def _all_cache_runs() -> int:
    return len(tracking.find_runs({"kdtrack.stage": "cache"}, statuses=("RUNNING", "FINISHED", "FAILED", "KILLED")))


@pytest.mark.parametrize("layout", ["split-then-file", "two-files"])
def test_held_out_rows_in_a_later_part_are_refused(digits_teacher: str, tmp_path: Path, layout: str):
    full = build_dataset(config.load(DIGITS).data)
    train_rows = np.flatnonzero(full.splits == "train")
    test_rows = [int(r) for r in np.flatnonzero(full.splits == "test")[5:9]]
    (tmp_path / "test_indices.json").write_text(json.dumps(test_rows[::-1]))
    if layout == "split-then-file":  # the train split, then a file of test rows
        args = ("--split", "train", *set_args(f"cache.split_files=[{tmp_path / 'test_indices.json'}]"))
        first_part = [full.sample_ids[r] for r in train_rows]
    else:  # no split, a file of train rows, then a file of test rows
        (tmp_path / "train_indices.json").write_text(json.dumps([int(r) for r in train_rows[:6]]))
        files = f"{tmp_path / 'train_indices.json'},{tmp_path / 'test_indices.json'}"
        args = tuple(set_args("cache.splits=[]", f"cache.split_files=[{files}]"))
        first_part = [full.sample_ids[r] for r in train_rows[:6]]
    before = _all_cache_runs()
    code, _out, err = cli(*_cache_cmd(digits_teacher, *args))
    assert code == 2, err
    first_test = full.sample_ids[min(test_rows)]  # a file's rows are taken in row order
    assert err.startswith(f"error: sample {first_test} is in split 'test', which is held out from distillation"), err
    assert "--allow-split test" in err
    assert _all_cache_runs() == before  # refused before any run was written
    # Allowed, the same selection is cached: the first part, then the file's rows in row order.
    code, out, err = cli(*_cache_cmd(digits_teacher, *args, "--allow-split", "test"))
    assert code == 0, err
    expected = [*first_part, *(full.sample_ids[r] for r in sorted(test_rows))]
    assert list(_store(out.strip())["sample_ids"][:]) == expected


def test_held_out_rows_cannot_enter_through_a_file_named_train(digits_teacher: str, tmp_path: Path):
    full = build_dataset(config.load(DIGITS).data)
    rows = [*np.flatnonzero(full.splits == "train")[:3], *np.flatnonzero(full.splits == "test")[:4]]
    split_file = tmp_path / "train_indices.json"
    split_file.write_text(json.dumps([int(r) for r in rows]))
    args = set_args("cache.splits=[]", f"cache.split_files=[{split_file}]")
    code, _out, err = cli(*_cache_cmd(digits_teacher, *args))
    assert code == 2 and "is in split 'test', which is held out" in err and f"(listed in {split_file})" in err, err


# 2. A cache that verification marked incomplete is never reused, by cache-logits or by a student.

def test_cache_marked_incomplete_by_verify_is_not_reused(digits_teacher: str):
    sets = set_args("data.seed=17", "cache.chunk_rows=256", "experiment=pinned-verify")  # a key of this test alone
    code, out, err = cli("cache-logits", "--teacher-run-id", digits_teacher, "--config", str(DIGITS), *sets)
    assert code == 0, err
    broken = out.strip()
    path = tracking.local_artifact_dir(broken) / "logits.zarr"
    _flip_byte(path / "logits" / "c" / "1" / "0")
    code, out, err = cli("verify-cache", "--run-id", broken, "--recompute", "8")
    assert code == 1 and "chunk 1" in out, out + err
    assert _tags(broken)["kdtrack.complete"] == "false" and _store(broken).attrs["complete"] is False

    student = ("train-student", "--config", str(DIGITS), "--teacher-run-id", digits_teacher, *sets,
               *set_args(*STUDENT))
    code, _out, err = cli(*student)
    assert code == 2 and f"no finished cache for teacher run {digits_teacher}" in err, err

    code, out, err = cli("cache-logits", "--teacher-run-id", digits_teacher, "--config", str(DIGITS), *sets)
    assert code == 0, err
    rebuilt = out.strip()
    assert rebuilt != broken
    assert not any(line.startswith(f"reusing cache run {broken}") for line in err.splitlines()), err
    assert _tags(rebuilt)["kdtrack.complete"] == "true" and _tags(broken)["kdtrack.complete"] == "false"
    assert _tags(rebuilt)["kdtrack.cache_key"] == _tags(broken)["kdtrack.cache_key"]
    # the new store holds the teacher's own outputs where the old one was corrupted
    cfg = config.load(DIGITS, ["data.seed=17"])
    teacher = load_teacher(digits_teacher, CPU)
    rows = distillation_rows(student_dataset(cfg.data), ("train", "unlabeled"))
    x, *_ = rows.with_normalisation(teacher.normalisation).batch(np.arange(256, 512))
    with torch.inference_mode():
        expected = teacher.model(x).numpy()
    np.testing.assert_allclose(_store(rebuilt)["logits"][256:512], expected, rtol=1e-5, atol=1e-5)

    # a student now finds the rebuilt cache, never the broken one
    cfg = config.override(cfg, ["method=kd", *STUDENT])
    loaded, model, train, digest = _student_inputs(cfg, digits_teacher)
    assert build_distillation(cfg, [loaded], model, train, digest, CPU).caches[0].run_id == rebuilt


# 3. Several cached teachers are fused by value.

def _fusion_targets(cfg: config.Config, teachers: list[str], rows: np.ndarray) -> tuple[torch.Tensor, list[str]]:
    loaded, student, train, digest = _student_inputs(cfg, teachers[0])
    distill = build_distillation(cfg, [loaded, load_teacher(teachers[1], CPU)], student, train, digest, CPU)
    batch = train.with_normalisation(loaded.normalisation).batch(rows)
    return distill.loss.teacher_logits_fn(batch).double(), [train.sample_ids[r] for r in rows]


def _cached(cache_run: str, ids: list[str]) -> np.ndarray:
    group = _store(cache_run)
    where = {sid: i for i, sid in enumerate(group["sample_ids"][:])}
    return np.asarray(group["logits"][:], dtype=np.float64)[[where[s] for s in ids]]


def test_fusion_of_two_cached_teachers_by_value(two_teachers: tuple[str, str, str, str]):
    t1, t2, c1, c2 = two_teachers
    rows = np.arange(0, 1200, 37)
    base = [EXPERIMENT, "method=kd", "teacher_mode=cached", *STUDENT]
    fused, ids = _fusion_targets(config.load(DIGITS, [*base, "kd.fusion=mean"]), [t1, t2], rows)
    a, b = _cached(c1, ids), _cached(c2, ids)
    assert np.abs(a - b).max() > 0.1  # the teachers really differ
    np.testing.assert_allclose(fused.numpy(), (a + b) / 2, rtol=1e-6, atol=1e-6)

    fused, _ = _fusion_targets(config.load(DIGITS, [*base, "kd.fusion=weighted", "kd.fusion_weights=[3,1]"]),
                               [t1, t2], rows)
    np.testing.assert_allclose(fused.numpy(), 0.75 * a + 0.25 * b, rtol=1e-6, atol=1e-6)

    fused, _ = _fusion_targets(config.load(DIGITS, [*base, "kd.fusion=most_confident"]), [t1, t2], rows)

    def pmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return (e / e.sum(axis=1, keepdims=True)).max(axis=1)

    pick_b = pmax(b) > pmax(a)
    assert 0 < pick_b.sum() < len(rows)  # both teachers win somewhere
    np.testing.assert_allclose(fused.numpy(), np.where(pick_b[:, None], b, a), rtol=1e-6, atol=1e-6)


# 4. Feature methods: (1 - alpha)·CE + alpha·feature, by value (FitNet on two MLPs).

def test_fitnet_total_is_alpha_weighted_by_value(digits_teacher: str):
    cfg = config.load(DIGITS, [EXPERIMENT, "method=fitnet", "teacher_mode=online", "kd.alpha=0.3",
                               "student.model.hidden=[16]"])
    teacher, student, train, digest = _student_inputs(cfg, digits_teacher)
    distill = build_distillation(cfg, [teacher], student, train, digest, CPU)
    fitnet = distill.modules["method"]
    assert (fitnet.student_layers, fitnet.teacher_layers) == (("blocks.0",), ("blocks.0",))
    x, y, *rest = train.with_normalisation(teacher.normalisation).batch(np.arange(40))
    y = y.clone()
    y[::3] = -1  # unlabelled rows get no CE
    logits, terms = distill.loss(student, (x, y, *rest), 0)
    total = sum(terms.values())

    def hidden(model: torch.nn.Module) -> torch.Tensor:  # relu(W x + b) of the first block
        lin = model.blocks[0][0]
        return torch.relu(x.flatten(1) @ lin.weight.T + lin.bias)

    with torch.no_grad():
        h_s, h_t = hidden(student), hidden(teacher.model)
        regressed = h_s @ fitnet.regressor.weight.T + fitnet.regressor.bias
        mse = ((regressed - h_t) ** 2).mean()
        z = h_s @ student.fc.weight.T + student.fc.bias
        log_p = z - torch.logsumexp(z, dim=1, keepdim=True)
        labelled = y >= 0
        ce = -log_p[labelled, y[labelled]].mean()
    assert torch.allclose(logits.detach(), z, atol=1e-5)
    assert total.item() == pytest.approx(0.7 * ce.item() + 0.3 * mse.item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(0.7 * ce.item(), rel=1e-5)


# 5. data.student_labels: the transfer set loses its labels; round(fraction · n) labels per class remain.

@pytest.mark.parametrize("fraction", [0.1, 0.001])
def test_student_labels_keep_round_fraction_per_class(fraction: float):
    full = build_dataset(config.load(DIGITS).data)
    ds = student_dataset(config.load(DIGITS, [f"data.student_labels={fraction}"]).data)
    assert ds.sample_ids == full.sample_ids
    np.testing.assert_array_equal(ds.features, full.features)
    moved = (full.splits == "train") & (ds.splits != "train")
    assert set(ds.splits[moved]) == {"unlabeled"}
    np.testing.assert_array_equal(ds.labels[moved], -1)
    assert (ds.labels[ds.splits == "unlabeled"] == -1).all()
    kept = ds.splits == "train"
    np.testing.assert_array_equal(ds.labels[kept], full.labels[kept])
    held = full.splits != "train"
    np.testing.assert_array_equal(ds.splits[held], full.splits[held])
    np.testing.assert_array_equal(ds.labels[held], full.labels[held])
    for label in range(10):
        n = int(((full.splits == "train") & (full.labels == label)).sum())
        assert int((kept & (ds.labels == label)).sum()) == max(1, round(fraction * n)), label


# 6. Label smoothing never reaches the CE term of KD.

def _ce_by_hand(logits: torch.Tensor, y: torch.Tensor, eps: float) -> float:
    log_p = torch.log_softmax(logits.double(), dim=1)
    nll = -log_p[torch.arange(len(y)), y]
    uniform = -log_p.mean(dim=1)
    return ((1 - eps) * nll + eps * uniform).mean().item()


@pytest.mark.parametrize("method", ["kd", "none"])
def test_label_smoothing_is_zero_under_kd(digits_teacher: str, method: str):
    cfg = config.load(DIGITS, [EXPERIMENT, f"method={method}", "teacher_mode=online", "kd.alpha=0.4",
                               "train.label_smoothing=0.2", *STUDENT])
    teacher, student, train, digest = _student_inputs(cfg, digits_teacher)
    distill = build_distillation(cfg, [teacher] if method == "kd" else [], student, train, digest, CPU)
    batch = train.with_normalisation(teacher.normalisation).batch(np.arange(32))
    with torch.no_grad():
        logits, terms = distill.loss(student, batch, 0)
    plain, smoothed = _ce_by_hand(logits, batch[1], 0.0), _ce_by_hand(logits, batch[1], 0.2)
    assert abs(plain - smoothed) > 1e-3
    if method == "kd":
        assert terms["ce"].item() == pytest.approx(0.6 * plain, rel=1e-5)
    else:
        assert terms["ce"].item() == pytest.approx(smoothed, rel=1e-5)


# 7. The sweep's results.csv: mean and sample std over seeds of each student run's own metrics.

@pytest.mark.slow  # a sweep through the CLI: a cache check and four student trainings end to end
def test_sweep_results_are_mean_and_sample_std(store: str, digits_teacher: str):
    """A sweep of students of a teacher trained before (--teacher-run-id): no teacher is trained for it."""
    sets = set_args(*TINY_TEACHER, "student.model.hidden=[6]", "student.optim.epochs=1", "cache.chunk_rows=512",
                    "experiment=pinned-sweep")
    code, out, err = cli("sweep", "--config", str(DIGITS), "--grid", "kd.alpha=0.5,0.9", "--seeds", "0,1",
                         "--teacher-run-id", digits_teacher, "--force-restart", *sets)
    assert code == 0, err
    parent = out.strip().splitlines()[-1]
    client = MlflowClient()
    experiment = client.get_experiment_by_name("pinned-sweep").experiment_id
    assert client.search_runs([experiment], "tags.`kdtrack.stage` = 'teacher'") == []
    assert tracking.get_run(parent).data.tags["kdtrack.teacher_run_ids"] == digits_teacher
    children = client.search_runs([experiment],
                                  f"tags.mlflow.parentRunId = '{parent}' AND tags.`kdtrack.stage` = 'student'")
    assert {r.data.tags["kdtrack.teacher_run_ids"] for r in children} == {digits_teacher}
    by_alpha: dict[str, list[dict[str, float]]] = {}
    for run in children:
        by_alpha.setdefault(run.data.params["kd.alpha"], []).append(run.data.metrics)
    assert sorted(by_alpha) == ["0.5", "0.9"] and all(len(v) == 2 for v in by_alpha.values())
    rows = {r["combination"]: r for r in csv.DictReader(io.StringIO(
        Path(tracking.artifact_path(parent, "results.csv")).read_text()))}
    assert sorted(rows) == ["kd.alpha=0.5", "kd.alpha=0.9"]
    spread = 0.0
    for alpha, metrics in by_alpha.items():
        row = rows[f"kd.alpha={alpha}"]
        assert int(row["seeds"]) == 2
        for column in ("val/acc", "best/val_acc", "test/acc"):
            values = [m[column] for m in metrics]
            assert float(row[f"{column} mean"]) == pytest.approx(statistics.fmean(values), rel=1e-12, abs=1e-12)
            assert float(row[f"{column} std"]) == pytest.approx(statistics.stdev(values), rel=1e-12, abs=1e-12)
            spread += statistics.stdev(values)
    assert spread > 0  # the seeds differ, so the std is really checked


# 8. The dtype is part of the cache key.

def test_float32_and_float16_caches_are_distinct_and_each_reused(two_teachers: tuple[str, str, str, str]):
    _t1, teacher, _c1, c32 = two_teachers
    cfg16 = config.load(DIGITS, [EXPERIMENT, "cache.chunk_rows=512", "cache.dtype=float16"])
    cfg32 = config.load(DIGITS, [EXPERIMENT, "cache.chunk_rows=512"])
    c16 = cache_logits.run(cfg16, teacher)
    assert c16 != c32
    assert _tags(c16)["kdtrack.cache_key"] != _tags(c32)["kdtrack.cache_key"]
    s16, s32 = _store(c16), _store(c32)
    assert s16["logits"].dtype == np.float16 and s32["logits"].dtype == np.float32
    assert (s16.attrs["dtype"], s32.attrs["dtype"]) == ("float16", "float32")
    np.testing.assert_allclose(s16["logits"][:].astype(np.float32), s32["logits"][:], rtol=2e-3, atol=2e-3)
    assert cache_logits.run(cfg16, teacher) == c16 and cache_logits.run(cfg32, teacher) == c32
    # and a student asking for float16 reads the float16 cache, one asking for float32 the float32 one
    for cfg, expected in ((cfg16, c16), (cfg32, c32)):
        cfg = config.override(cfg, ["method=kd", *STUDENT])
        loaded, student, train, digest = _student_inputs(cfg, teacher)
        assert build_distillation(cfg, [loaded], student, train, digest, CPU).caches[0].run_id == expected
