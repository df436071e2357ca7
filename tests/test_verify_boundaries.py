"""verify-cache checks content, not tags: changed data, a live build's claim, a missing store, another checkpoint."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from mlflow.tracking import MlflowClient

from conftest import REPO, TINY_TEACHER, cli, subprocess_env
from kdtrack import config, tracking
from kdtrack.data import build_dataset, dataset_digest, distillation_rows
from kdtrack.stages import cache_logits, train_teacher

EXPERIMENT = "verify-boundaries"
FEATURES = 12


def _write_manifest(root: Path, seed: int, n: int = 60) -> Path:
    """n samples of FEATURES floats, 4 classes, every 5th in val (s0001 is the first train row)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(n):
        np.save(root / f"s{i:04d}.npy", (rng.normal(size=FEATURES) + i % 4).astype(np.float32))
        entries.append({"file": f"s{i:04d}.npy", "label": i % 4, "split": "train" if i % 5 else "val"})
    path = root / "manifest.json"
    path.write_text(json.dumps({"num_classes": 4, "samples": entries}))
    return path


def _sets(manifest: Path) -> list[str]:
    return [*TINY_TEACHER, "data.source=manifest", f"data.manifest={manifest}", f"experiment={EXPERIMENT}"]


@pytest.fixture(scope="session")  # built once, whatever order the tests run in
def teacher(store: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny MLP teacher on manifest data of FEATURES floats; each test caches its own data with it."""
    return train_teacher.run(config.load(None, _sets(_write_manifest(tmp_path_factory.mktemp("teacher"), 0))))


def _cache(tmp_path: Path, teacher: str, seed: int) -> tuple[str, config.Config, Path]:
    """A fresh verified cache of 48 train rows in chunks of 16: run id, its config, its data folder."""
    manifest = _write_manifest(tmp_path / "data", seed)
    cfg = config.load(None, [*_sets(manifest), "cache.chunk_rows=16"])
    return cache_logits.run(cfg, teacher), cfg, manifest.parent


def _tags(run_id: str) -> dict[str, str]:
    return MlflowClient().get_run(run_id).data.tags


def _store_path(run_id: str) -> Path:
    return tracking.artifact_path(run_id, "logits.zarr")


def _chunks(path: Path) -> dict[str, bytes]:
    """Every chunk object of the store (flags, ids, labels, logits) by path."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.glob("*/c/**/*")) if p.is_file()}


def _one_error_line(err: str, start: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(start) and "Traceback" not in err, err
    return lines[0]


def _assert_failed_on_record(run_id: str) -> None:
    tags = _tags(run_id)
    assert (tags["kdtrack.complete"], tags["kdtrack.verified"]) == ("false", "fail")


def _digest_now(cfg: config.Config) -> str:
    """The digest of the cached rows as they are on disk now, rebuilt from the manifest."""
    return dataset_digest(distillation_rows(build_dataset(cfg.data), cfg.cache.splits))


@pytest.mark.slow  # a cache, then verify-cache over several recompute counts (~2 s on 2 cores)
def test_edited_sample_fails_verification_whichever_rows_are_recomputed(tmp_path: Path, teacher: str) -> None:
    run_id, cfg, data = _cache(tmp_path, teacher, seed=1)
    built_for = _tags(run_id)["kdtrack.dataset_digest"]
    original = (data / "s0001.npy").read_bytes()
    np.save(data / "s0001.npy", np.full(FEATURES, 5.0, dtype=np.float32))  # edited in place: same id, same label
    now = _digest_now(cfg)
    assert now != built_for
    expected = (f"FAIL provenance: the data changed since this cache was built: digest now {now[:12]}, "
                f"cache built for {built_for[:12]}")
    # Rows 0 (the edited one) is never recomputed with --recompute 0: the verdict must not depend on that.
    for args in (["--recompute", "0"], ["--recompute", "2", "--seed", "3"], ["--recompute", "100"]):
        code, out, err = cli("verify-cache", "--run-id", run_id, *args)
        assert code == 1 and expected in out.splitlines(), (args, out)
        assert out.strip().endswith("cache verification FAILED")
        _one_error_line(err, f"error: cache run {run_id} failed verification")
        _assert_failed_on_record(run_id)
        assert zarr.open_group(str(_store_path(run_id)), mode="r").attrs["complete"] is False
    (data / "s0001.npy").write_bytes(original)  # the data the cache was built for: it passes again
    code, out, err = cli("verify-cache", "--run-id", run_id, "--recompute", "100")
    assert code == 0, out + err
    assert (_tags(run_id)["kdtrack.complete"], _tags(run_id)["kdtrack.verified"]) == ("true", "pass")


@pytest.mark.slow  # a cache, then verify-cache --repair on changed data (~1 s on 2 cores)
def test_repair_refuses_a_cache_of_changed_data_and_writes_no_chunk(tmp_path: Path, teacher: str) -> None:
    run_id, cfg, data = _cache(tmp_path, teacher, seed=2)
    path = _store_path(run_id)
    chunks, attrs = _chunks(path), dict(zarr.open_group(str(path), mode="r").attrs)
    built_for = attrs["dataset_digest"]
    original = (data / "s0001.npy").read_bytes()
    np.save(data / "s0001.npy", np.full(FEATURES, 5.0, dtype=np.float32))
    now = _digest_now(cfg)
    # --recompute 100 covers every row, so the edited one is always among those compared
    code, out, err = cli("verify-cache", "--run-id", run_id, "--repair", "--recompute", "100")
    assert code == 1 and "repaired" not in out, out + err
    line = _one_error_line(err, f"error: cache run {run_id} cannot be repaired: ")
    assert f"digest now {now[:12]}, cache built for {built_for[:12]}" in line and "kdtrack cache-logits" in line
    assert _chunks(path) == chunks
    after = dict(zarr.open_group(str(path), mode="r").attrs)
    assert after == {**attrs, "complete": False}  # still the old digest; only `complete` was cleared
    _assert_failed_on_record(run_id)
    (data / "s0001.npy").write_bytes(original)
    code, out, err = cli("verify-cache", "--run-id", run_id, "--recompute", "100")
    assert code == 0, out + err
    assert _chunks(path) == chunks


HOLDER = """
import sys, time
from pathlib import Path
from kdtrack import claims
lock = Path(sys.argv[1])
with claims.claim(lock.parent, lock.stem, sys.argv[3]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
    released = time.time()
print(released, flush=True)
"""


@pytest.mark.slow  # a process holds the claim for a second while verify-cache waits
def test_verify_waits_for_the_process_holding_the_cache_claim(tmp_path: Path, teacher: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    run_id, _, _ = _cache(tmp_path, teacher, seed=3)
    tags = _tags(run_id)
    key = tags["kdtrack.cache_key"]
    monkeypatch.setenv("KDTRACK_CACHE_DIR", str(tmp_path / "kdtrack-cache"))
    with cache_logits.cache_claim(key, teacher):  # uncontended: only to find the lock file a build would take
        pass
    (lock,) = (tmp_path / "kdtrack-cache" / "claims").glob("*.lock")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), "1.0", f"building cache {key[:12]}"],
                              cwd=REPO, env=subprocess_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n", holder.stderr.read()
        code, out, err = cli("verify-cache", "--run-id", run_id, "--recompute", "8")
        finished = time.time()
        rest, child_err = holder.communicate(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert holder.returncode == 0, child_err
    assert code == 0, out + err
    waiting = [line for line in err.splitlines() if line.endswith("; waiting for it")]
    assert len(waiting) == 1, err
    # what the holder said it does (a build), not what this waiter came for (a verification)
    assert waiting[0] == f"another process (pid {holder.pid} on {socket.gethostname()}) is building cache {key[:12]}; " \
                         "waiting for it"
    assert finished > float(rest.strip())  # verification ended only after the holder let go


@pytest.mark.slow  # a cache per case, each verified twice (~1 s each on 2 cores)
@pytest.mark.parametrize("damage", ["missing", "unreadable"])
def test_missing_or_unreadable_store_fails_and_marks_the_run_incomplete(tmp_path: Path, teacher: str,
                                                                        damage: str) -> None:
    run_id, _, _ = _cache(tmp_path, teacher, seed=4 if damage == "missing" else 5)
    assert _tags(run_id)["kdtrack.complete"] == "true"
    path = _store_path(run_id)
    if damage == "missing":
        shutil.rmtree(path)
        expected = f"FAIL store: no logit cache at {path}"
    else:
        (path / "zarr.json").write_text("{ torn")
        expected = f"FAIL store: {path} is not a readable Zarr group"
    code, out, err = cli("verify-cache", "--run-id", run_id, "--recompute", "8")
    assert code == 1, out + err
    lines = out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(expected) and lines[1] == "cache verification FAILED", out
    _one_error_line(err, f"error: cache run {run_id} failed verification")
    _assert_failed_on_record(run_id)
    code, out, err = cli("verify-cache", "--run-id", run_id, "--repair")
    assert code == 1 and "repaired" not in out, out + err
    _one_error_line(err, f"error: cache run {run_id} cannot be repaired: {expected.removeprefix('FAIL store: ')}")
    _assert_failed_on_record(run_id)
    assert damage != "missing" or not path.exists()  # nothing was rebuilt in its place


@pytest.mark.slow  # trains a second teacher, then three verify-cache commands (~4 s on 2 cores)
def test_changed_teacher_checkpoint_fails_provenance_and_is_not_repaired(tmp_path: Path, teacher: str) -> None:
    """The teacher run now holds (and records) other weights than the cache was built from: a cache of the old ones."""
    run_id, cfg, _ = _cache(tmp_path, teacher, seed=6)
    other = train_teacher.run(config.load(None, [*_sets(Path(cfg.data.manifest)), "seed=1"]))
    built, changed = (_tags(t)["kdtrack.checkpoint_sha256"] for t in (teacher, other))
    assert built != changed
    ckpt = tracking.artifact_path(teacher, "checkpoints/best.pt")
    original = ckpt.read_bytes()
    path = _store_path(run_id)
    chunks = _chunks(path)
    # as a teacher run that wrote a new best.pt would leave it: the file and the hash its run records, both new
    shutil.copyfile(tracking.artifact_path(other, "checkpoints/best.pt"), ckpt)
    MlflowClient().set_tag(teacher, "kdtrack.checkpoint_sha256", changed)
    try:
        code, out, err = cli("verify-cache", "--run-id", run_id, "--recompute", "8")
        expected = f"FAIL provenance: the cache was built from checkpoint {built[:12]}, not the expected {changed[:12]}"
        assert code == 1 and expected in out.splitlines(), out + err
        _one_error_line(err, f"error: cache run {run_id} failed verification")
        _assert_failed_on_record(run_id)
        code, out, err = cli("verify-cache", "--run-id", run_id, "--repair", "--recompute", "100")
        assert code == 1 and "repaired" not in out, out + err
        line = _one_error_line(err, f"error: cache run {run_id} cannot be repaired: ")
        assert f"checkpoint {built[:12]}, not the expected {changed[:12]}" in line
        assert _chunks(path) == chunks
    finally:
        ckpt.write_bytes(original)
        MlflowClient().set_tag(teacher, "kdtrack.checkpoint_sha256", built)
    code, out, err = cli("verify-cache", "--run-id", run_id, "--recompute", "8")
    assert code == 0, out + err


def test_store_that_is_not_the_one_its_run_describes_fails(tmp_path: Path, teacher: str) -> None:
    """The run's tag and the store disagree on the data: whichever is wrong, the pair is not a cache to read."""
    run_id, _, _ = _cache(tmp_path, teacher, seed=7)
    built_for = _tags(run_id)["kdtrack.dataset_digest"]
    MlflowClient().set_tag(run_id, "kdtrack.dataset_digest", "0" * 64)
    code, out, err = cli("verify-cache", "--run-id", run_id, "--recompute", "8")
    assert code == 1, out + err
    assert (f"FAIL provenance: the store's dataset_digest is {built_for[:12]}, the run's tag "
            f"kdtrack.dataset_digest is 000000000000") in out.splitlines(), out
    _assert_failed_on_record(run_id)
