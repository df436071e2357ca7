"""cache-logits, verify-cache and recompute-logits end to end on the session store, through the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from mlflow.tracking import MlflowClient

from conftest import DIGITS, REPO, TINY_TEACHER, cli, subprocess_env
from kdtrack import checkpoint, config, tracking
from kdtrack.data import build_dataset, dataset_digest, distillation_rows
from kdtrack.stages import cache_logits, train_teacher
from kdtrack.teachers import load_teacher


def _store_path(run_id: str) -> Path:
    return tracking.artifact_path(run_id, "logits.zarr")


@pytest.fixture(scope="session")  # built once, whatever order the tests run in
def digits_cache(digits_teacher: str) -> str:
    code, out, err = cli("cache-logits", "--teacher-run-id", digits_teacher, "--config", str(DIGITS),
                          "--set", "cache.chunk_rows=256", "--set", "experiment=caches")
    assert code == 0, err
    return out.strip()


def test_cache_run_lineage_and_contents(digits_teacher: str, digits_cache: str):
    run = MlflowClient().get_run(digits_cache)
    teacher = MlflowClient().get_run(digits_teacher)
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert tags["kdtrack.stage"] == "cache" and tags["kdtrack.teacher_run_id"] == digits_teacher
    assert tags["kdtrack.checkpoint_sha256"] == teacher.data.tags["kdtrack.checkpoint_sha256"]
    assert tags["kdtrack.complete"] == "true" and len(tags["kdtrack.cache_key"]) == 64
    rows = distillation_rows(build_dataset(config.load(DIGITS).data), ("train", "unlabeled"))
    assert tags["kdtrack.dataset_digest"] == dataset_digest(rows)
    assert run.inputs.dataset_inputs[0].dataset.digest == dataset_digest(rows)[:32]
    metrics = run.data.metrics
    assert metrics["fidelity/top1_agreement"] == 1.0
    # the build's figures, logged once at step 0: every row computed here, none copied from another cache
    assert (metrics["build/rows_computed"], metrics["build/rows_copied"]) == (len(rows), 0)
    assert metrics["build/seconds"] > 0
    assert metrics["build/rows_per_s"] == pytest.approx(len(rows) / metrics["build/seconds"], rel=1e-9)
    assert [(m.step, m.value) for m in MlflowClient().get_metric_history(digits_cache, "build/seconds")] == \
        [(0, metrics["build/seconds"])]
    # A plain zarr client, no kdtrack code: the teacher's own forward gives the same numbers.
    group = zarr.open_group(str(_store_path(digits_cache)), mode="r")
    assert group.attrs["complete"] is True and group.attrs["format"] == "kdtrack.logits/2"
    fidelity = group.attrs["fidelity"]  # the store carries the figures its run logged
    assert (fidelity["rows_checked"], fidelity["top1_agreement"]) == (64, 1.0)  # cache.verify_rows
    assert fidelity["max_abs_diff"] == metrics["fidelity/max_abs_diff"] <= fidelity["tolerance"]
    assert list(group["sample_ids"][:]) == rows.sample_ids
    teacher_model = load_teacher(digits_teacher, torch.device("cpu"))
    x, *_ = rows.with_normalisation(teacher_model.normalisation).batch(np.arange(len(rows)))
    with torch.inference_mode():
        expected = teacher_model.model(x).numpy()
    np.testing.assert_allclose(group["logits"][:], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(group["labels"][:], rows.labels)


def test_finished_cache_is_reused_and_force_rebuilds(digits_teacher: str, digits_cache: str):
    args = ("cache-logits", "--teacher-run-id", digits_teacher, "--config", str(DIGITS),
            "--set", "cache.chunk_rows=256", "--set", "experiment=caches")
    code, out, err = cli(*args)
    reused = out.strip()
    assert code == 0 and f"reusing cache run {reused}" in err
    key = "kdtrack.cache_key"  # other tests may have built a cache of the same key first: any finished one is reused
    assert MlflowClient().get_run(reused).data.tags[key] == MlflowClient().get_run(digits_cache).data.tags[key]
    code, out, _ = cli(*args, "--force")
    assert code == 0 and out.strip() not in (digits_cache, reused)
    np.testing.assert_array_equal(zarr.open_group(str(_store_path(out.strip())))["logits"][:],
                                  zarr.open_group(str(_store_path(digits_cache)))["logits"][:])


def test_leakage_is_refused_naming_the_sample(digits_teacher: str):
    code, _out, err = cli("cache-logits", "--teacher-run-id", digits_teacher, "--config", str(DIGITS),
                           "--split", "train", "--split", "test")
    assert code == 2
    test_ids = build_dataset(config.load(DIGITS).data).select(["test"]).sample_ids
    assert err.startswith(f"error: sample {test_ids[0]} is in split 'test', which is held out")
    assert "--allow-split test" in err


@pytest.mark.parametrize("case", ["not-found", "not-a-teacher", "missing-checkpoint"])
def test_teacher_resolution_errors(case: str, digits_cache: str, tmp_path: Path):
    run_id = {"not-found": "0123456789abcdef0123456789abcdef", "not-a-teacher": digits_cache}.get(case)
    extra = []
    if case == "missing-checkpoint":
        run_id = train_teacher.run(config.load(DIGITS, [*TINY_TEACHER, "optim.epochs=1", "experiment=broken"]))
        (tracking.local_artifact_dir(run_id) / "checkpoints" / "last.pt").unlink()
        extra = ["--checkpoint", "last"]
    code, _out, err = cli("cache-logits", "--teacher-run-id", run_id, "--config", str(DIGITS), *extra)
    assert code == 2 and "Traceback" not in err
    expected = {
        "not-found": f"error: teacher run {run_id} not found",
        "not-a-teacher": f"error: run {run_id} (cache-teacher-mlp-digits) is a cache run, not a teacher",
        "missing-checkpoint": f"error: teacher run {run_id} has no checkpoint 'last' (it has: best)",
    }[case]
    assert err.startswith(expected), err


def _rewrite_checkpoint(run_id: str, edit) -> None:
    path = tracking.local_artifact_dir(run_id) / "checkpoints" / "best.pt"
    payload = checkpoint.load(path)
    edit(payload)
    payload["weights_sha256"] = checkpoint.weights_sha256(payload["state_dict"])
    checkpoint.save(path, payload)
    # recorded as the run's own, so that the load reaches the architecture check (a file swapped behind the run's
    # back is refused earlier: tests/test_boundaries.py)
    tracking.StageRun.of(run_id).set_tags({"kdtrack.checkpoint_sha256": payload["weights_sha256"]})


@pytest.mark.slow  # trains several models end to end in process (1-4 s on 2 cores)
def test_architecture_and_size_mismatch_are_named(store: str):
    cfg = config.load(DIGITS, [*TINY_TEACHER, "optim.epochs=1", "experiment=broken"])
    renamed, resized = train_teacher.run(cfg), train_teacher.run(cfg)
    _rewrite_checkpoint(renamed, lambda p: p["state_dict"].update(extra_layer=p["state_dict"].pop("fc.weight")))
    _rewrite_checkpoint(resized, lambda p: p["spec"]["kwargs"].update(hidden=[48]))
    code, _out, err = cli("cache-logits", "--teacher-run-id", renamed, "--config", str(DIGITS))
    assert code == 1 and "does not match its architecture: 1 missing keys (fc.weight), 1 unexpected keys " \
                          "(extra_layer)" in err
    code, _out, err = cli("cache-logits", "--teacher-run-id", resized, "--config", str(DIGITS))
    assert code == 1 and "layer blocks.0.0.weight has shape (32, 64) in the checkpoint but (48, 64)" in err, err


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow  # builds a cache, then verify-cache with and without repair (over a second on 2 cores)
def test_corrupted_chunk_is_named_and_repaired(digits_teacher: str):
    code, out, _ = cli("cache-logits", "--teacher-run-id", digits_teacher, "--config", str(DIGITS),
                        "--set", "cache.chunk_rows=256", "--set", "experiment=corrupt", "--force")
    run_id = out.strip()
    path = _store_path(run_id)
    good = zarr.open_group(str(path))["logits"][:]
    _flip_byte(path / "logits" / "c" / "2" / "0")
    code, out, err = cli("verify-cache", "--run-id", run_id, "--recompute", "8")
    assert code == 1 and "chunk 2" in out and err.startswith(f"error: cache run {run_id} failed verification")
    assert MlflowClient().get_run(run_id).data.tags["kdtrack.complete"] == "false"
    assert zarr.open_group(str(path)).attrs["complete"] is False
    code, out, err = cli("verify-cache", "--run-id", run_id, "--repair")
    assert code == 0, out + err
    assert "repaired chunks 2" in out
    np.testing.assert_array_equal(zarr.open_group(str(path))["logits"][:], good)
    assert MlflowClient().get_run(run_id).data.tags["kdtrack.complete"] == "true"


@pytest.mark.slow  # builds a cache, then verify-cache twice (over a second on 2 cores)
def test_verify_fails_on_nan_row_and_missing_sample(digits_teacher: str):
    code, out, _ = cli("cache-logits", "--teacher-run-id", digits_teacher, "--config", str(DIGITS),
                        "--set", "cache.chunk_rows=256", "--set", "experiment=nan", "--force")
    run_id = out.strip()
    group = zarr.open_group(str(_store_path(run_id)), mode="r+")
    row = group["logits"][5].copy()
    group["logits"][5] = np.full_like(row, np.nan)
    code, out, _ = cli("verify-cache", "--run-id", run_id, "--recompute", "0")
    assert code == 1 and "NaN/Inf" in out
    group["logits"][5] = row
    missing = str(group["sample_ids"][7])
    group["sample_ids"][7] = "digits/not-a-sample"
    code, out, _ = cli("verify-cache", "--run-id", run_id, "--recompute", "0")
    assert code == 1 and missing in out
    group["sample_ids"][7] = missing
    code, out, err = cli("verify-cache", "--run-id", run_id, "--recompute", "0")
    assert code == 0, out + err


def _write_manifest(root: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(n):
        label = i % 4
        np.save(root / f"s{i:04d}.npy", (rng.normal(size=12) + label).astype(np.float32))
        entries.append({"file": f"s{i:04d}.npy", "label": label, "split": "train" if i % 5 else "val"})
    path = root / "manifest.json"
    path.write_text(json.dumps({"num_classes": 4, "samples": entries}))
    return path


@pytest.mark.slow  # trains several models end to end in process (1-4 s on 2 cores)
def test_appended_samples_are_the_only_ones_computed_and_stale_data_is_not_reused(tmp_path: Path):
    manifest = _write_manifest(tmp_path, 120)
    sets = [*TINY_TEACHER, "data.source=manifest", f"data.manifest={manifest}", "experiment=manifest"]
    teacher = train_teacher.run(config.load(None, sets))
    cfg = config.load(None, [*sets, "cache.chunk_rows=32"])
    first = cache_logits.run(cfg, teacher)
    entries = json.loads(manifest.read_text())
    rng = np.random.default_rng(1)
    for i in range(120, 150):  # 30 new samples appended, 24 of them train
        np.save(tmp_path / f"s{i:04d}.npy", rng.normal(size=12).astype(np.float32))
        entries["samples"].append({"file": f"s{i:04d}.npy", "label": i % 4, "split": "train" if i % 5 else "val"})
    manifest.write_text(json.dumps(entries))
    grown = cache_logits.run(cfg, teacher)
    metrics = MlflowClient().get_run(grown).data.metrics
    assert grown != first
    assert (metrics["build/rows_computed"], metrics["build/rows_copied"]) == (24, 96)
    old, new = (zarr.open_group(str(_store_path(r)))["logits"][:] for r in (first, grown))
    np.testing.assert_array_equal(new[:96], old)
    # one label changed: a different dataset digest, so a new cache, never the old one
    entries["samples"][1]["label"] = (entries["samples"][1]["label"] + 1) % 4
    manifest.write_text(json.dumps(entries))
    relabelled = cache_logits.run(cfg, teacher)
    assert relabelled not in (first, grown)
    tags = MlflowClient().get_run(relabelled).data.tags
    assert tags["kdtrack.dataset_digest"] != MlflowClient().get_run(grown).data.tags["kdtrack.dataset_digest"]


@pytest.mark.slow  # trains several models end to end in process (1-4 s on 2 cores)
def test_retrained_teacher_gets_its_own_cache(digits_cache: str):
    retrained = train_teacher.run(config.load(DIGITS, [*TINY_TEACHER, "seed=1", "experiment=caches"]))
    code, out, err = cli("cache-logits", "--teacher-run-id", retrained, "--config", str(DIGITS),
                          "--set", "cache.chunk_rows=256", "--set", "experiment=caches")
    assert code == 0 and out.strip() != digits_cache and "reusing" not in err


def test_interrupted_build_resumes_in_the_same_run(digits_teacher: str, monkeypatch: pytest.MonkeyPatch):
    from kdtrack import cache

    cfg = config.load(DIGITS, ["cache.chunk_rows=128", "cache.batch_size=64", "experiment=interrupted",
                               "cache.dtype=float16"])
    original = cache.verify_store

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, "verify_store", crash)
    with pytest.raises(KeyboardInterrupt):
        cache_logits.run(cfg, digits_teacher)
    monkeypatch.setattr(cache, "verify_store", original)
    client = MlflowClient()
    (killed,) = client.search_runs([client.get_experiment_by_name("interrupted").experiment_id])
    assert killed.info.status == "KILLED" and killed.data.tags["kdtrack.complete"] == "false"
    resumed = cache_logits.run(cfg, digits_teacher)
    assert resumed == killed.info.run_id
    run = client.get_run(resumed)
    assert run.info.status == "FINISHED" and run.data.metrics["build/rows_computed"] == 0


@pytest.mark.slow  # trains several models end to end in process (1-4 s on 2 cores)
def test_several_teachers_nest_under_one_parent(digits_teacher: str, digits_cache: str):
    other = train_teacher.run(config.load(DIGITS, [*TINY_TEACHER, "seed=2", "experiment=caches"]))
    code, out, err = cli("cache-logits", "--teacher-run-id", digits_teacher, "--teacher-run-id", other,
                          "--config", str(DIGITS), "--set", "cache.chunk_rows=256", "--set", "experiment=caches")
    assert code == 0, err
    first, second = out.split()
    key = MlflowClient().get_run(digits_cache).data.tags["kdtrack.cache_key"]
    assert f"reusing cache run {first}" in err and MlflowClient().get_run(first).data.tags["kdtrack.cache_key"] == key
    child = MlflowClient().get_run(second)
    parent = MlflowClient().get_run(child.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["kdtrack.cache_run_ids"] == f"{first},{second}"


@pytest.mark.slow  # trains several models end to end in process (1-4 s on 2 cores)
def test_recompute_logits_exports_npz_matching_the_cache(digits_teacher: str, tmp_path: Path):
    split_file = tmp_path / "tunev_indices.json"
    split_file.write_text(json.dumps([3, 1, 4, 15, 9, 26]))
    code, out, err = cli("recompute-logits", "--teacher-run-id", digits_teacher, "--config", str(DIGITS),
                          "--set", "experiment=recompute", "--export-npz", str(tmp_path / "out"),
                          "--splits", "val", "test", str(split_file))
    assert code == 0, err
    table = [line.split() for line in out.strip().splitlines()[1:]]
    assert [row[1] for row in table] == ["val", "test", "tunev"]
    full = build_dataset(config.load(DIGITS).data)
    for _expert, split, rows, accuracy, cache_run in table:
        npz = np.load(tmp_path / "out" / digits_teacher / f"{split}_logits.npz")
        group = zarr.open_group(str(_store_path(cache_run)))
        np.testing.assert_array_equal(npz["logits"], group["logits"][:])
        np.testing.assert_array_equal(npz["predictions"], npz["logits"].argmax(axis=1))
        assert int(rows) == len(npz["targets"])
        assert float(accuracy) == pytest.approx((npz["predictions"] == npz["targets"]).mean(), abs=1e-4)
    tunev = np.load(tmp_path / "out" / digits_teacher / "tunev_logits.npz")
    assert list(tunev["sample_ids"]) == [full.sample_ids[i] for i in sorted([3, 1, 4, 15, 9, 26])]
    code, out, err = cli("recompute-logits", "--teacher-run-id", digits_teacher, "--config", str(DIGITS),
                          "--set", "experiment=recompute", "--splits", "val", "--min-accuracy", "1.0")
    assert code == 1 and "below the minimum" in out


@pytest.mark.slow  # `mlflow run`: a process that imports mlflow, then kdtrack in another
def test_mlflow_run_cache_logits(digits_teacher: str, tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "cache_logits", "--env-manager", "local",
         "--experiment-name", "mlflow-run-cache", "-P", f"teacher_run_id={digits_teacher}",
         "-P", "overrides=cache.dtype=float16 data.seed=3"],
        env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("mlflow-run-cache").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["kdtrack.complete"] == "true"
    assert zarr.open_group(str(_store_path(run.info.run_id)))["logits"].dtype == np.float16
    # The same request again reuses that cache; the launcher's own run says which one.
    again = subprocess.run(proc.args, env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    runs = client.search_runs([client.get_experiment_by_name("mlflow-run-cache").experiment_id])
    launcher = next(r for r in runs if r.info.run_id != run.info.run_id)
    assert launcher.data.tags["kdtrack.reused_run_id"] == run.info.run_id
