"""cache_logits' helpers pinned by value: store checks (store_problem, mark_broken), reuse and prior rows, plans, tags
and paths, upload, run_many's runs, and the torchrun protocol of _lead/_follow played by two threads of this process.

Every cache here is of data with data.student_labels=0.35, so of a dataset digest and cache key that no other test
file builds; each scenario has a key of its own (splits x dtype), so that whatever order the tests run in, no
scenario resumes or reuses another's runs. Runs are told apart by the ids made here, never by counting a store."""
from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
import socket
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zarr
from mlflow.tracking import MlflowClient

from conftest import DIGITS
from kdtrack import cache, claims, config, tracking
from kdtrack.data import dataset_digest, student_dataset
from kdtrack.errors import CacheError, TeacherError
from kdtrack.stages import cache_logits
from kdtrack.teachers import load_teacher

EXPERIMENT = "cache-units"
CPU = torch.device("cpu")
CHUNK = 128
T = "kdtrack."
BASE = [f"experiment={EXPERIMENT}", f"cache.chunk_rows={CHUNK}", "data.student_labels=0.35", "train.progress=off"]
TRAIN = [*BASE, "cache.splits=[train]"]  # 440 rows in 4 chunks
UNLABELED = [*BASE, "cache.splits=[unlabeled]"]  # 819 rows in 7 chunks
BOTH = [*BASE, "cache.splits=[train,unlabeled]"]
STORE_TAGS = ("cache_key", "teacher_run_id", "checkpoint_sha256", "dataset_digest")


def _cfg(sets: list[str]) -> config.Config:
    return config.load(DIGITS, sets)


@functools.cache
def _student():
    """The digits data as students see it here: the rows every cache of this file is cut from."""
    return student_dataset(_cfg(BASE).data)


def _split_rows(*splits: str) -> np.ndarray:
    return np.flatnonzero(np.isin(_student().splits, splits))


def _key(teacher, splits: tuple[str, ...], dtype: str = "float32", digest: str | None = None, *,
         output_shape: tuple[int, ...] = (10,), views: dict | None = None) -> str:
    """The cache key of `teacher` over the rows of `splits` in data order, from cache.cache_key's own arguments."""
    rows = _student().take(_split_rows(*splits))
    return cache.cache_key(checkpoint_sha256=teacher.checkpoint_sha256,
                           dataset_digest=dataset_digest(rows) if digest is None else digest, splits=list(splits),
                           dtype=dtype, output_shape=list(output_shape), normalisation=teacher.normalisation.to_dict(),
                           views=views)


def _outputs(teacher, rows: np.ndarray) -> np.ndarray:
    """The teacher's own forward over `rows` of the data, normalised as it was trained."""
    norm = teacher.normalisation
    with torch.inference_mode():
        return teacher.model((torch.from_numpy(_student().features[rows]) - norm.mean) / norm.std).numpy()


# ------------------------------------------------------------------------------------------------ runs made here

_last_start = [0]


def _experiment_id() -> str:
    client = MlflowClient()
    found = client.get_experiment_by_name(EXPERIMENT)
    return found.experiment_id if found else client.create_experiment(EXPERIMENT)


def _now_ms() -> int:
    """Now in ms, later than every run this file started by hand: newest-first orders are then certain."""
    _last_start[0] = max(int(time.time() * 1000), _last_start[0] + 1)
    return _last_start[0]


def _new_run(tags: dict[str, str | None], status: str | None = "FINISHED") -> str:
    """A run in EXPERIMENT with `tags` (None values left out), ended `status` (None: left RUNNING)."""
    client = MlflowClient()
    run = client.create_run(_experiment_id(), start_time=_now_ms(),
                            tags={k: v for k, v in tags.items() if v is not None})
    if status:
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def _artifacts(run_id: str) -> Path:
    return Path(urllib.parse.urlparse(MlflowClient().get_run(run_id).info.artifact_uri).path)


def _forge(source: str, tags: dict[str, str | None] | None = None, *, attrs: dict | None = None,
           undone: tuple[int, ...] = (), store: bool = True, status: str = "FINISHED") -> str:
    """A run claiming to be a copy of cache run `source`: its stage, store and complete tags (`tags` override them,
    a None removes one) and, if `store`, a copy of its store with `attrs` set and chunks `undone` flagged not done."""
    have = MlflowClient().get_run(source).data.tags
    claimed = {f"{T}{name}": have.get(f"{T}{name}") for name in ("stage", "complete", *STORE_TAGS)}
    run_id = _new_run({**claimed, **(tags or {})}, status)
    if store:
        path = _artifacts(run_id) / "logits.zarr"
        shutil.copytree(_artifacts(source) / "logits.zarr", path)
        group = zarr.open_group(str(path), mode="r+")
        group.update_attributes(attrs or {})
        for c in undone:
            group["chunk_done"][c] = False
    return run_id


def _tags(run_id: str) -> dict[str, str]:
    return MlflowClient().get_run(run_id).data.tags


def _metrics(run_id: str) -> dict[str, float]:
    return MlflowClient().get_run(run_id).data.metrics


def _runs_since(start_ms: int, stage: str = "cache") -> list:
    """Runs of `stage` in EXPERIMENT started at or after `start_ms`, oldest first."""
    found = MlflowClient().search_runs([_experiment_id()], f"attributes.start_time >= {start_ms} and "
                                       f"tags.`{T}stage` = '{stage}'", order_by=["attributes.start_time ASC"])
    return list(found)


def _store(run_id: str) -> zarr.Group:
    return zarr.open_group(str(_artifacts(run_id) / "logits.zarr"), mode="r")


@pytest.fixture(scope="module")
def teacher(digits_teacher: str):
    return load_teacher(digits_teacher, CPU)


@pytest.fixture(scope="module")
def built(store: str, digits_teacher: str) -> str:
    """A new cache of the TRAIN rows, built by one process."""
    return cache_logits.run(_cfg(TRAIN), digits_teacher, force=True)


# --------------------------------------------------------------------------------------------- pure helpers

def test_combined_stats_add_up_rows_and_chunks_and_take_the_slowest_rank():
    every = [cache.BuildStats(rows_computed=300, rows_copied=40, chunks_written=3, seconds=2.0, rows_per_s=150.0,
                              batch_size_used=64),
             cache.BuildStats(rows_computed=100, rows_copied=20, chunks_written=2, seconds=4.0, rows_per_s=25.0,
                              batch_size_used=32)]
    assert cache_logits._combined(every) == cache.BuildStats(400, 60, 5, 4.0, 400 / 4.0, 32)


def test_combined_rate_is_zero_when_no_rank_computed_a_row():
    every = [cache.BuildStats(0, 128, 1, 0.0, 0.0, 1024), cache.BuildStats(0, 0, 0, 0.0, 0.0, 1024)]
    assert cache_logits._combined(every) == cache.BuildStats(0, 128, 1, 0.0, 0.0, 1024)


def test_plan_tags_claim_teacher_checkpoint_data_and_an_incomplete_cache():
    plan = cache_logits._Plan(digest="d1", key="k1", compute_key="c1", output_shape=(10,), splits=("train", "val"))
    teacher = SimpleNamespace(run_id="r1", checkpoint_sha256="s1", checkpoint_name="best")
    assert plan.tags(teacher, 1259) == {
        f"{T}teacher_run_id": "r1", f"{T}checkpoint_sha256": "s1", f"{T}checkpoint": "best",
        f"{T}dataset_digest": "d1", f"{T}cache_key": "k1", f"{T}compute_key": "c1", f"{T}num_rows": "1259",
        f"{T}splits": "train,val", f"{T}complete": "false"}


def test_cache_rows_are_the_splits_then_the_split_files_normalised_for_the_teacher(teacher, tmp_path: Path):
    tune = _split_rows("test")[:5]
    path = tmp_path / "tune_indices.json"
    path.write_text(json.dumps(tune[::-1].tolist()))  # a file's rows are taken in data order
    cfg = _cfg([*BASE, "cache.splits=[train,val]", "cache.allow_splits=[val,tune]", f"cache.split_files=[{path}]"])
    rows = cache_logits.cache_rows(cfg, teacher)
    named = _split_rows("train", "val")
    order = np.concatenate([named, tune])
    assert rows.sample_ids == [_student().sample_ids[i] for i in order]
    assert rows.splits.tolist() == [*_student().splits[named].tolist(), *["tune"] * 5]
    assert rows.normalisation == teacher.normalisation
    norm = teacher.normalisation
    np.testing.assert_allclose(rows.batch(np.arange(len(rows)))[0].numpy(),
                               (_student().features[order] - norm.mean) / norm.std, rtol=1e-6, atol=1e-6)


def test_plan_for_keys_the_rows_with_and_without_their_digest(teacher):
    rows = cache_logits.cache_rows(_cfg(BOTH), teacher)
    digest = dataset_digest(_student().take(_split_rows("train", "unlabeled")))
    splits = ("train", "unlabeled")  # in order of first appearance: data row 0 kept its label
    assert _student().splits[_split_rows("train", "unlabeled")[0]] == "train"
    assert cache_logits.plan_for(_cfg(BOTH), teacher, rows, CPU) == cache_logits._Plan(
        digest=digest, key=_key(teacher, splits), compute_key=_key(teacher, splits, digest=""), output_shape=(10,),
        splits=splits)
    given = cache_logits.plan_for(_cfg([*BOTH, "cache.dtype=float16"]), teacher, rows, CPU, digest="d" * 64)
    assert (given.digest, given.key) == ("d" * 64, _key(teacher, splits, "float16", digest="d" * 64))
    assert given.compute_key == _key(teacher, splits, "float16", digest="")


def test_plan_for_keys_the_views_their_seed_and_ops(teacher):
    """A cache of augmented views holds K outputs per row; which views they are (count, seed, ops) is in its key, so
    caches of the same shape but other views are never taken for each other."""
    rows = cache_logits.cache_rows(_cfg(TRAIN), teacher)

    def planned(seed: int, std: float) -> cache_logits._Plan:
        sets = [*TRAIN, f"data.augment=[noise(std={std})]", "cache.views=2", f"cache.view_seed={seed}"]
        return cache_logits.plan_for(_cfg(sets), teacher, rows, CPU)

    plan = planned(5, 0.1)
    views = {"count": 2, "seed": 5, "ops": ["noise(std=0.1)"]}
    assert plan.output_shape == (2, 10)
    assert plan.key == _key(teacher, ("train",), output_shape=(2, 10), views=views)
    assert len({plan.key, planned(6, 0.1).key, planned(5, 0.2).key}) == 3


def test_a_teacher_of_another_class_count_is_cached_when_its_inputs_fit(digits_teacher: str):
    """A cache holds whatever the teacher outputs (signals of any shape too): a 10-class digits teacher over
    5-class data of the same (1, 8, 8) inputs is planned with its own 10 outputs; only the input shape must fit."""
    sets = ["data.source=synthetic", "data.num_classes=5", "data.num_samples=60", "cache.splits=[train]"]
    teacher, rows, plan = cache_logits._prepare(_cfg([*BASE, *sets]), digits_teacher, CPU)
    assert teacher.spec.num_classes == 10 and rows.num_classes == 5 and plan.output_shape == (10,)
    with pytest.raises(TeacherError, match=r"takes inputs of shape \(1, 8, 8\) but the data's samples have shape "
                                           r"\(1, 4, 4\)"):
        cache_logits._prepare(_cfg([*BASE, *sets, "data.input_shape=[1,4,4]"]), digits_teacher, CPU)


def test_store_path_is_in_the_run_artifacts_or_a_build_folder_of_the_key(built: str, monkeypatch):
    plan = SimpleNamespace(key="k" * 64)
    assert cache_logits._store_path(built, plan) == _artifacts(built) / "logits.zarr"
    monkeypatch.setattr(tracking, "local_artifact_dir", lambda run_id: None)  # as for a remote artifact store
    cache_dir = Path(os.environ["KDTRACK_CACHE_DIR"])
    assert cache_logits._store_path(built, plan) == cache_dir / "builds" / ("k" * 64) / "logits.zarr"


# ------------------------------------------------------------------------------------------------ store_problem

def test_store_problem_passes_a_sound_cache_and_reads_the_store_at_path(built: str, tmp_path: Path):
    sound = MlflowClient().get_run(_forge(built))
    assert cache_logits.store_problem(sound) is None
    rows = int(_store(built).attrs["num_rows"])
    assert cache_logits.store_problem(sound, expect={"dtype": "float32", "num_rows": rows}) is None  # as text
    assert cache_logits.store_problem(sound, expect={"dtype": "float16"}) == \
        f"the store of cache run {sound.info.run_id} has dtype=float32, expected float16"
    storeless = MlflowClient().get_run(_forge(built, store=False))
    shutil.copytree(_artifacts(built) / "logits.zarr", tmp_path / "logits.zarr")
    assert cache_logits.store_problem(storeless, path=tmp_path / "logits.zarr") is None


WRONG_CLAIMS = {"cache_key": "f" * 64, "teacher_run_id": "another-teacher", "checkpoint_sha256": "e" * 64,
                "dataset_digest": None}  # None: the tag is missing


def _short(value: str) -> str:
    """A sha256 digest as messages quote it: its first 12 hex digits."""
    return value[:12] if len(value) == 64 else value


def _case(name: str, built: str, teacher_run: str) -> tuple[str, str]:
    """A run with one thing wrong for store_problem, and what it must say."""
    attrs = dict(_store(built).attrs)
    if name == "deleted":
        rid = _forge(built)
        MlflowClient().delete_run(rid)
        return rid, f"cache run {rid} is deleted"
    if name == "teacher run":
        return teacher_run, f"run {teacher_run} is a teacher run, not a cache"
    if name == "no stage":
        rid = _forge(built, {f"{T}stage": None})
        return rid, f"run {rid} is a non-kdtrack run, not a cache"
    if name == "failed":
        rid = _forge(built, status="FAILED")
        return rid, f"cache run {rid} is FAILED, complete=true"
    if name in ("complete false", "complete missing"):
        rid = _forge(built, {f"{T}complete": "false" if name == "complete false" else None})
        return rid, f"cache run {rid} is FINISHED, complete={'false' if name == 'complete false' else '?'}"
    if name == "no store":
        rid = _forge(built, store=False)
        return rid, f"the store of cache run {rid} cannot be opened: no logit cache at {_artifacts(rid)}/logits.zarr"
    if name == "store incomplete":
        rid = _forge(built, attrs={"complete": False})
        return rid, f"the store of cache run {rid} is not marked complete"
    if name == "chunks not done":
        rid = _forge(built, undone=(1, 3))
        return rid, f"the store of cache run {rid} has 2 chunks not done (first: 1)"
    claimed = WRONG_CLAIMS[name]  # a tag that is not the store's attribute of that name
    rid = _forge(built, {f"{T}{name}": claimed})
    return rid, f"the store of cache run {rid} has {name}={_short(attrs[name])}, expected {_short(str(claimed))}"


@pytest.mark.parametrize("name", ["deleted", "teacher run", "no stage", "failed", "complete false", "complete missing",
                                  "no store", *WRONG_CLAIMS, "store incomplete", "chunks not done"])
def test_store_problem_names_what_keeps_a_run_from_being_read(name: str, built: str, digits_teacher: str):
    run_id, expected = _case(name, built, digits_teacher)
    assert cache_logits.store_problem(MlflowClient().get_run(run_id)) == expected


def test_mark_broken_marks_the_run_and_its_store_incomplete(built: str, capsys):
    run_id = _forge(built)
    problem = "p" * 499 + "q" * 101
    cache_logits.mark_broken(MlflowClient().get_run(run_id), problem)
    tags = _tags(run_id)
    assert (tags[f"{T}complete"], tags[f"{T}verified"], tags[f"{T}problem"]) == ("false", "fail", "p" * 499 + "q")
    assert _store(run_id).attrs["complete"] is False
    assert f"not reusing cache run {run_id}: {problem}; marked incomplete" in capsys.readouterr().err


def test_mark_broken_marks_a_run_whose_store_is_gone(built: str):
    run_id = _forge(built, store=False)
    cache_logits.mark_broken(MlflowClient().get_run(run_id), "its store is gone")
    tags = _tags(run_id)
    assert (tags[f"{T}complete"], tags[f"{T}verified"], tags[f"{T}problem"]) == ("false", "fail", "its store is gone")


# ----------------------------------------------------------------------------------------- upload_store

def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def test_upload_store_logs_the_store_packed_and_leaves_no_packed_copy(built: str, tmp_path: Path):
    source = tmp_path / "logits.zarr"
    shutil.copytree(_artifacts(built) / "logits.zarr", source)
    for stale in (False, True):  # a packed folder left by an interrupted upload is replaced
        if stale:
            (tmp_path / "logits.zarr.packed").mkdir()
            (tmp_path / "logits.zarr.packed" / "stale").write_text("left by an interrupted upload")
        run_id = _new_run({}, status=None)
        size = cache_logits.upload_store(tracking.StageRun.of(run_id), source)
        MlflowClient().set_terminated(run_id)
        uploaded = _artifacts(run_id) / "logits.zarr"
        assert size == sum(_files(uploaded).values()) and "stale" not in _files(uploaded)
        assert len(_files(uploaded)) < len(_files(source))  # a few shards, not four files per chunk
        assert not (tmp_path / "logits.zarr.packed").exists()
        group, original = zarr.open_group(str(uploaded), mode="r"), zarr.open_group(str(source), mode="r")
        assert dict(group.attrs) == dict(original.attrs)
        np.testing.assert_array_equal(group["logits"][:], original["logits"][:])


def test_upload_store_of_no_store_raises_cache_error(store: str, tmp_path: Path):
    run_id = _new_run({}, status=None)
    try:
        with pytest.raises(CacheError, match="no logit cache at"):
            cache_logits.upload_store(tracking.StageRun.of(run_id), tmp_path / "logits.zarr")
    finally:
        MlflowClient().set_terminated(run_id)
    assert not (tmp_path / "logits.zarr.packed").exists() and _files(_artifacts(run_id)) == {}


def test_a_cache_claim_is_one_per_key_and_teacher_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Under KDTRACK_CACHE_DIR/claims, one lock per cache key and teacher run saying what its holder does: a build
    holding one never stops the build of another key or of another teacher run's cache of the same key."""
    monkeypatch.setenv("KDTRACK_CACHE_DIR", str(tmp_path))

    def sleep(seconds: float) -> None:  # a claim that would wait for this process's own other claim
        raise AssertionError("waited for a claim this process holds")

    monkeypatch.setattr(claims, "time", SimpleNamespace(sleep=sleep))
    key, other = "a" * 64, "b" * 64
    lock = tmp_path / "claims" / f"cache-{key}-t1.lock"
    with cache_logits._claim(SimpleNamespace(run_id="t1"), SimpleNamespace(key=key)):
        assert lock.read_text() == f"{os.getpid()} {socket.gethostname()} building cache aaaaaaaaaaaa\n"
        with cache_logits.cache_claim(other, "t1", "verifying"), cache_logits.cache_claim(key, "t2"):
            said = (tmp_path / "claims" / f"cache-{other}-t1.lock").read_text()
            assert said.endswith(" verifying cache bbbbbbbbbbbb\n")
        with pytest.raises(AssertionError, match="waited"):
            with cache_logits.cache_claim(key, "t1"):
                pass
    assert sorted(p.name for p in (tmp_path / "claims").iterdir()) == \
        [f"cache-{key}-t1.lock", f"cache-{key}-t2.lock", f"cache-{other}-t1.lock"]


def test_a_cache_built_under_bf16_autocast_is_verified_under_it(store: str, digits_teacher: str, teacher,
                                                                 capsys: pytest.CaptureFixture[str]):
    """train.amp=bf16 rounds the teacher's activations as the cache is built, so verification re-runs it the same way
    and allows bf16 rounding: 4 units of bf16's epsilon (2**-7) of the largest |logit|. An fp32 re-run would
    differ from the cached rows by far more than fp32's 1e-4 and fail the build. train.progress=on: a bar of rows."""
    sets = [*BOTH, "train.amp=bf16", "train.progress=on"]
    run_id = cache_logits.run(_cfg(sets), digits_teacher, force=True)  # a key no other test reads
    rows = _split_rows("train", "unlabeled")
    n = len(rows)
    bar = capsys.readouterr().err.split("\r")[-1]
    assert bar.startswith("cache logits.zarr 100%|") and f" {n}/{n} [" in bar, bar
    group = zarr.open_group(str(_artifacts(run_id) / "logits.zarr"), mode="r")
    fidelity = group.attrs["fidelity"]
    assert fidelity["tolerance"] == pytest.approx(4 * 2**-7 * max(1.0, fidelity["max_abs_logit"]), rel=1e-12)
    cached = group["logits"][:]
    exact = _outputs(teacher, rows)
    assert 1e-3 < np.abs(cached - exact).max() <= fidelity["tolerance"]  # bf16 rounding, and only that


def test_force_and_no_resume_recompute_a_failed_store_left_in_the_build_folder(digits_teacher: str, monkeypatch,
                                                                               tmp_path: Path):
    """With a remote artifact store a cache is filled in KDTRACK_CACHE_DIR/builds/<key> and uploaded once verified;
    a build that fails there leaves its store. The default resumes its chunks; --force and --no-resume compute
    every row again. (Verification fails here by plan, after the fill: every build leaves its store.)"""
    path = tmp_path / "leftover_indices.json"  # split `leftover`: a key no other test builds (val rows alone would
    path.write_text(json.dumps(_split_rows("val")[:200].tolist()))  # be any test's val cache of this teacher)
    cfg = _cfg([*TRAIN, f"cache.split_files=[{path}]", "cache.allow_splits=[val,leftover]"])
    computed = []

    def failing_finish(cfg, tracked, path, teacher, rows, stats, device):
        computed.append(stats.rows_computed)
        raise CacheError("planted verification failure")

    monkeypatch.setattr(tracking, "local_artifact_dir", lambda run_id: None)  # every artifact is uploaded
    monkeypatch.setattr(cache_logits, "_finish", failing_finish)
    for kwargs in ({"force": True}, {"force": True}, {"resume": False}, {}):
        with pytest.raises(CacheError, match="planted verification failure"):
            cache_logits.run(cfg, digits_teacher, **kwargs)
    n = len(_split_rows("train")) + 200
    assert computed == [n, n, n, 0]


# -------------------------------------------------------------------------------------- reuse and prior rows

def test_reusable_passes_over_a_broken_candidate_and_tags_the_launcher(built: str, teacher, monkeypatch, capsys):
    plan = SimpleNamespace(key=_tags(built)[f"{T}cache_key"])
    sound = _forge(built)
    broken = _forge(built, store=False)  # newest: looked at first
    launcher = _new_run({"mlflow.project.entryPoint": "cache_logits"}, status=None)  # an `mlflow run` launch
    monkeypatch.setenv("MLFLOW_RUN_ID", launcher)
    try:
        assert cache_logits._reusable(teacher, plan) == sound
    finally:
        MlflowClient().set_terminated(launcher)
    tags = _tags(broken)
    assert (tags[f"{T}complete"], tags[f"{T}verified"]) == ("false", "fail")
    assert tags[f"{T}problem"].startswith(f"the store of cache run {broken} cannot be opened: no logit cache at")
    assert _tags(launcher)[f"{T}reused_run_id"] == sound
    assert f"reusing cache run {sound} (key {plan.key[:12]})" in capsys.readouterr().err


def test_reusable_finds_nothing_without_a_finished_complete_run_of_the_key(built: str, teacher):
    key = uuid.uuid4().hex * 2
    _forge(built, {f"{T}cache_key": key, f"{T}complete": "false"})
    _forge(built, {f"{T}cache_key": key}, status="FAILED")
    assert cache_logits._reusable(teacher, SimpleNamespace(key=key)) is None


def test_prior_rows_is_the_newest_sound_cache_whose_rows_start_these(built: str, teacher):
    n = len(_split_rows("train"))
    rows = _student().take(np.concatenate([_split_rows("train"), _split_rows("val")[:20]]))  # 20 rows appended
    key = uuid.uuid4().hex
    prior = {f"{T}compute_key": key, f"{T}num_rows": str(n)}
    match = _forge(built, prior)
    # newer, each passed over: a store that is gone, other rows, no rows appended, no rows, no row count, unfinished
    gone = _forge(built, prior, store=False)
    _forge(built, {**prior, f"{T}dataset_digest": "0" * 64})
    _forge(built, {**prior, f"{T}num_rows": str(len(rows)), f"{T}dataset_digest": dataset_digest(rows)},
           attrs={"dataset_digest": dataset_digest(rows)})
    _forge(built, {**prior, f"{T}num_rows": "0"})
    _forge(built, {**prior, f"{T}num_rows": None})
    _forge(built, {**prior, f"{T}complete": "false"})
    assert cache_logits._prior_rows(SimpleNamespace(compute_key=key), rows) == \
        cache.PriorRows(_artifacts(match) / "logits.zarr", n)
    assert _tags(gone)[f"{T}complete"] == "false"  # marked, so that nothing takes it again


def test_prior_rows_of_one_row_and_of_none(built: str):
    rows = _student().take(_split_rows("train"))
    key = uuid.uuid4().hex
    first = dataset_digest(rows.take(np.arange(1)))
    one = _forge(built, {f"{T}compute_key": key, f"{T}num_rows": "1", f"{T}dataset_digest": first},
                 attrs={"dataset_digest": first})
    assert cache_logits._prior_rows(SimpleNamespace(compute_key=key), rows) == \
        cache.PriorRows(_artifacts(one) / "logits.zarr", 1)
    assert cache_logits._prior_rows(SimpleNamespace(compute_key=uuid.uuid4().hex), rows) is None


# ------------------------------------------------------------------------------------------------- run_many

@pytest.mark.slow  # builds and verifies a cache per teacher (over a second on 2 cores)
def test_run_many_nests_the_caches_of_several_teachers_under_one_parent(store: str, digits_teacher: str, teacher):
    t, cfg = digits_teacher, _cfg([*TRAIN, "cache.dtype=float16"])
    tags = {f"{T}stage": "cache", f"{T}cache_key": _key(teacher, ("train",), "float16"), f"{T}teacher_run_id": t}
    # resume (the default): the first cache resumes the unfinished run of its key; the second reuses it
    unfinished = _new_run(tags, status="FAILED")
    start = _now_ms()
    assert cache_logits.run_many(cfg, [t, t]) == [unfinished, unfinished]
    [parent] = _runs_since(start, "cache-group")
    assert parent.info.run_name == "cache-2-teachers" and parent.info.status == "FINISHED"
    assert parent.data.tags["mlflow.note.content"] == f"Logit caches of teachers {t}, {t}."
    params = parent.data.params  # what the group caches: the cache settings and its teachers, no row count
    assert (params["cache.dtype"], params["teacher.run_ids"], "cache.rows" in params) == ("float16", f"{t},{t}", False)
    assert (parent.data.tags[f"{T}teacher_run_ids"], parent.data.tags[f"{T}cache_run_ids"]) == \
        (f"{t},{t}", f"{unfinished},{unfinished}")
    # force, no resume: two new caches, nested; the unfinished run of their key is left alone
    left = _new_run(tags, status="FAILED")
    start = _now_ms()
    ids = cache_logits.run_many(cfg, [t, t], force=True, resume=False)
    [parent] = _runs_since(start, "cache-group")
    assert ids == [run.info.run_id for run in _runs_since(start)] and len(set(ids)) == 2  # both new, in order
    assert [_tags(i)["mlflow.parentRunId"] for i in ids] == [parent.info.run_id] * 2
    assert parent.data.tags[f"{T}cache_run_ids"] == ",".join(ids)
    assert MlflowClient().get_run(left).info.status == "FAILED"


# ----------------------------------------------------------------------------- two ranks as two threads

WAIT_S = 60  # how long a rank waits for the other: far more than any step here takes, so only a bug gets there


class TwoRanks:
    """The kdtrack.distributed calls cache_logits makes, for two ranks played by two threads of this process.

    rank() is per thread; a broadcast or gather meets the other rank's at a rendezvous, which also checks that both
    ranks make the same call. A rank waiting for one that has ended (returned or raised) fails at once."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._cond = threading.Condition()
        self._arrived: list[str] = []
        self._round = 0
        self._ended = False
        self._box = None
        self._slots: list = [None, None]

    def rank(self) -> int:
        return self._local.rank

    def world_size(self) -> int:
        return 2

    def is_distributed(self) -> bool:
        return True

    def device_for(self, device: torch.device) -> torch.device:
        return device

    def process_group(self, device: torch.device):
        assert device.type == "cpu"  # the real one reads device.type to choose its backend
        return contextlib.nullcontext()

    def owned_chunks(self, n_chunks: int) -> list[int]:
        return list(range(self.rank(), n_chunks, 2))

    def broadcast_object(self, obj, src: int = 0):
        if self.rank() == src:
            self._box = obj
        self._meet("broadcast")
        out = self._box
        self._meet("broadcast read")  # nobody writes the box again before both have read it
        return out

    def gather_objects(self, obj) -> list:
        self._slots[self.rank()] = obj
        self._meet("gather")
        out = list(self._slots)
        self._meet("gather read")
        return out

    def _meet(self, call: str) -> None:
        with self._cond:
            this = self._round
            self._arrived.append(call)
            if len(self._arrived) == 2:
                calls, self._arrived, self._round = self._arrived, [], this + 1
                self._cond.notify_all()
                assert calls[0] == calls[1], f"the ranks made different calls: {calls}"
                return
            if not self._cond.wait_for(lambda: self._round != this or self._ended, WAIT_S):
                raise TimeoutError(f"rank {self.rank()} waited {WAIT_S} s in {call}")
            if self._round == this:
                raise RuntimeError(f"rank {self.rank()} waits in {call} for a rank that has ended")

    def play(self, rank0, rank1) -> list:
        """rank0() and rank1() side by side; what each returned, or the exception it raised."""
        results: list = [None, None]

        def one(rank: int, fn) -> None:
            self._local.rank = rank
            try:
                results[rank] = fn()
            except BaseException as exc:  # handed to the test as the rank's result
                results[rank] = exc
            finally:
                with self._cond:
                    self._ended = True
                    self._cond.notify_all()

        threads = [threading.Thread(target=one, args=(r, fn), daemon=True) for r, fn in enumerate((rank0, rank1))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(2 * WAIT_S)
        assert not any(thread.is_alive() for thread in threads), "a rank hangs"
        return results


def _play(monkeypatch, rank0, rank1) -> tuple[list, str]:
    """What rank0() and rank1() give as the two ranks of a torchrun, and what they printed on stderr."""
    monkeypatch.setattr(cache_logits, "distributed", TwoRanks())
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        results = cache_logits.distributed.play(rank0, rank1)
    return results, err.getvalue()


def _share(n_rows: int, first_computed: int, rank: int) -> tuple[int, int]:
    """(chunks, rows computed) of `rank`'s chunks (c % 2 == rank) when rows below `first_computed` are copied."""
    chunks = range(rank, -(-n_rows // CHUNK), 2)
    return len(chunks), sum(max(min((c + 1) * CHUNK, n_rows) - max(c * CHUNK, first_computed), 0) for c in chunks)


@pytest.fixture(scope="module")
def grown(built: str, digits_teacher: str, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """GROWN, the TRAIN rows with 100 val rows appended as train, built by two ranks calling _lead and _follow as
    with a remote artifact store: the ranks fill a store staged in the build folder of its key, which rank 0 uploads
    packed. Its first rows are copied from the TRAIN cache, a prior of the same teacher."""
    val = _split_rows("val")[:100]
    path = tmp_path_factory.mktemp("grown") / "train_indices.json"
    path.write_text(json.dumps(val.tolist()))
    cfg = _cfg([*TRAIN, f"cache.split_files=[{path}]", "cache.allow_splits=[val]"])
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(tracking, "local_artifact_dir", lambda run_id: None)  # every artifact is downloaded
        results, err = _play(monkeypatch,
                             lambda: cache_logits._lead(cfg, digits_teacher, CPU, force=True, resume=True),
                             lambda: cache_logits._follow(cfg, digits_teacher, CPU))
    return SimpleNamespace(results=results, err=err, rows=np.concatenate([_split_rows("train"), val]),
                           prior=len(_split_rows("train")))


def test_two_ranks_end_one_finished_cache_run_with_the_store_uploaded(grown: SimpleNamespace, digits_teacher: str):
    lead, follow = grown.results
    assert isinstance(lead, str) and lead == follow
    run = MlflowClient().get_run(lead)
    assert run.info.status == "FINISHED" and run.info.experiment_id == _experiment_id()
    tags = run.data.tags
    assert (tags[f"{T}stage"], tags[f"{T}complete"], tags[f"{T}teacher_run_id"], tags[f"{T}num_rows"]) == \
        ("cache", "true", digits_teacher, str(len(grown.rows)))
    assert (_artifacts(lead) / "logits.zarr" / "logits" / "c.0.0").is_file()  # packed: one shard, flat keys
    assert not (Path(os.environ["KDTRACK_CACHE_DIR"]) / "builds" / tags[f"{T}cache_key"]).exists()


def test_two_ranks_fill_every_chunk_with_the_teachers_outputs(grown: SimpleNamespace, teacher):
    group = _store(grown.results[0])
    assert group.attrs["complete"] is True and group.attrs["num_rows"] == len(grown.rows)
    assert group["chunk_done"][:].tolist() == [True] * -(-len(grown.rows) // CHUNK)
    assert group["sample_ids"][:].tolist() == [_student().sample_ids[i] for i in grown.rows]
    np.testing.assert_allclose(group["logits"][:], _outputs(teacher, grown.rows), rtol=1e-5, atol=1e-5)


def test_two_ranks_log_each_ranks_chunks_and_the_rows_copied_from_the_prior(grown: SimpleNamespace):
    n, prior = len(grown.rows), grown.prior  # 540 rows, 5 chunks; rows below 440 are copied
    (chunks0, computed0), (chunks1, computed1) = _share(n, prior, 0), _share(n, prior, 1)
    metrics = _metrics(grown.results[0])
    assert (metrics["build/chunks_rank0"], metrics["build/chunks_rank1"]) == (chunks0, chunks1) == (3, 2)
    assert (metrics["build/rows_computed"], metrics["build/rows_copied"]) == (n - prior, prior)
    lines = grown.err.splitlines()
    assert f"rank 0/2: wrote {chunks0} of its {chunks0} chunks ({computed0} rows computed)" in lines
    assert f"rank 1/2: wrote {chunks1} of its {chunks1} chunks ({computed1} rows computed)" in lines


def test_rank1_returns_the_cache_rank0_reuses_and_nothing_is_built(built: str, digits_teacher: str, monkeypatch):
    start = _now_ms()
    (lead, follow), err = _play(
        monkeypatch, lambda: cache_logits._lead(_cfg(TRAIN), digits_teacher, CPU, force=False, resume=True),
        lambda: cache_logits._follow(_cfg(TRAIN), digits_teacher, CPU))
    assert isinstance(lead, str) and lead == follow
    assert _tags(lead)[f"{T}cache_key"] == _tags(built)[f"{T}cache_key"]
    assert MlflowClient().get_run(lead).info.start_time < start and _runs_since(start) == []
    assert f"reusing cache run {lead}" in err and "chunks (" not in err


def test_rank1_fails_naming_the_error_of_rank0_before_the_build(store: str, monkeypatch):
    missing = "0123456789abcdef0123456789abcdef"
    (lead, follow), _ = _play(monkeypatch,
                              lambda: cache_logits._lead(_cfg(TRAIN), missing, CPU, force=False, resume=True),
                              lambda: cache_logits._follow(_cfg(TRAIN), missing, CPU))
    assert isinstance(lead, TeacherError) and isinstance(follow, CacheError)
    assert follow.what.startswith(f"rank 0 failed before the build: TeacherError: teacher run {missing} not found")


def test_ranks_that_compute_different_cache_keys_fail(digits_teacher: str, teacher, monkeypatch):
    start = _now_ms()
    (lead, follow), _ = _play(
        monkeypatch,
        lambda: cache_logits._lead(_cfg([*UNLABELED, "cache.dtype=float16"]), digits_teacher, CPU, force=True,
                                   resume=False),
        lambda: cache_logits._follow(_cfg(UNLABELED), digits_teacher, CPU))
    assert isinstance(follow, CacheError)
    ours, theirs = _key(teacher, ("unlabeled",)), _key(teacher, ("unlabeled",), "float16")
    assert follow.what == f"rank 1 computed cache key {ours[:12]}, rank 0 {theirs[:12]}"
    assert isinstance(lead, RuntimeError)  # left waiting for rank 1's chunks
    [run] = _runs_since(start)
    assert run.info.status == "FAILED" and run.data.tags[f"{T}cache_key"] == theirs


@pytest.mark.slow  # three two-rank cache builds (~2 s on 2 cores)
def test_run_many_on_two_ranks_resumes_rebuilds_and_reuses(store: str, digits_teacher: str, monkeypatch):
    cfg, n = _cfg(UNLABELED), len(_split_rows("unlabeled"))  # 819 rows: rank 0 owns 4 chunks, rank 1 owns 3

    def both(**kwargs) -> tuple[list, str]:
        return _play(monkeypatch, lambda: cache_logits.run_many(cfg, [digits_teacher], **kwargs),
                     lambda: cache_logits.run_many(cfg, [digits_teacher], **kwargs))

    def planted(*args, **kwargs):
        raise CacheError("planted verification failure")

    # rank 0 fails to finish: rank 1 fails too, and the run ends FAILED with every chunk filled
    start = _now_ms()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cache_logits, "_finish", planted)
        (lead, follow), _ = both()
    assert isinstance(lead, CacheError) and lead.what == "planted verification failure"
    assert isinstance(follow, CacheError)
    assert follow.what == "rank 0 could not finish the cache: CacheError: planted verification failure"
    [failed] = _runs_since(start)
    failed = failed.info.run_id
    assert MlflowClient().get_run(failed).info.status == "FAILED" and _tags(failed)[f"{T}complete"] == "false"
    assert _store(failed)["chunk_done"][:].all() and _store(failed).attrs["complete"] is False

    # the defaults resume that run and keep its chunks: nothing is computed
    start = _now_ms()
    (ids, none), err = both()
    assert (ids, none) == ([failed], []) and _runs_since(start) == []  # no new run, no parent run
    assert MlflowClient().get_run(failed).info.status == "FINISHED"
    metrics = _metrics(failed)
    assert (metrics["build/rows_computed"], metrics["build/chunks_rank0"], metrics["build/chunks_rank1"]) == (0, 0, 0)
    assert "rank 1/2: wrote 0 of its 3 chunks (0 rows computed)" in err.splitlines()

    # force without resume: a new run, though an unfinished one of the key is there
    unfinished = _forge(failed, {f"{T}complete": "false"}, status="FAILED")
    start = _now_ms()
    (ids, none), _ = both(force=True, resume=False)
    [fresh] = [run.info.run_id for run in _runs_since(start)]
    assert (ids, none) == ([fresh], []) and _metrics(fresh)["build/rows_computed"] == n
    assert MlflowClient().get_run(unfinished).info.status == "FAILED"

    # force with the default resume: the unfinished run is resumed and its chunks computed again
    (ids, none), _ = both(force=True)
    assert (ids, none) == ([unfinished], []) and _tags(unfinished)[f"{T}complete"] == "true"
    metrics = _metrics(unfinished)
    assert (metrics["build/rows_computed"], metrics["build/chunks_rank0"], metrics["build/chunks_rank1"]) == (n, 4, 3)

    # the defaults again: the newest finished cache is reused, nothing is built
    start = _now_ms()
    (ids, none), err = both()
    assert (ids, none) == ([fresh], []) and _runs_since(start) == [] and "chunks (" not in err
