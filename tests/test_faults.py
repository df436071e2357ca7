"""Faults: SIGKILL a cache build, the cache-logits stage and a student at fixed points, then resume; two builds of one
cache at once; the claim that serialises them. Every kill point is a chosen write or step, never a timer."""
from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import fault_child
import pytest
import torch
from cache_build_child import CHUNK_ROWS, N_ROWS, build_tiny_cache
from conftest import DIGITS, cli, set_args, subprocess_env
from mlflow.tracking import MlflowClient

from kdtrack import checkpoint, claims, config, tracking
from kdtrack.cache import done_flags, open_store
from kdtrack.stages import cache_logits, train_student

FAULT_CHILD = str(Path(__file__).resolve().parent / "fault_child.py")
KILLED = -signal.SIGKILL
ANY_STATUS = ("RUNNING", "FINISHED", "FAILED", "KILLED")


def _script(fault: str) -> subprocess.Popen:
    """fault_child.py as a process of its own (no torch to import for a claim), its output on pipes."""
    return subprocess.Popen([sys.executable, FAULT_CHILD, fault], env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def forkserver() -> multiprocessing.context.ForkServerContext:
    """Children forked from a server that has torch, mlflow and kdtrack loaded: a child costs no import."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([
        "torch", "zarr", "mlflow", "kdtrack.cli", "kdtrack.stages.cache_logits", "kdtrack.stages.train_student",
        "cache_build_child", "fault_child",
        "mlflow.store.tracking.sqlalchemy_store", "sklearn.datasets",  # imported on first use: the store, digits
    ])
    return context


class _Command:
    """`kdtrack ARGS` with one fault (fault_child.py) in a child forked from the forkserver, started at once."""

    def __init__(self, forkserver: multiprocessing.context.ForkServerContext, logs: Path, fault: str,
                 *args: str) -> None:
        threads = torch.get_num_threads()  # as here: what a killed child computed must equal what this process does
        self.logs = logs
        self.process = forkserver.Process(target=fault_child.run_forked,
                                          args=(fault, list(args), subprocess_env(), os.getcwd(), threads, str(logs)))
        self.process.start()
        self.pid = self.process.pid

    def wait(self) -> tuple[int, str, str]:
        """Exit code (-9 when SIGKILLed), stdout, stderr."""
        self.process.join(300)
        out, err = (Path(f"{self.logs}.{suffix}").read_text() for suffix in ("out", "err"))
        return self.process.exitcode, out, err


def _contents(store: Path) -> dict[str, object]:
    """Every file of a store by relative path: its bytes; the group's metadata parsed, less `created_at`."""
    files = {str(f.relative_to(store)): f.read_bytes() for f in sorted(store.rglob("*")) if f.is_file()}
    group = json.loads(files.pop("zarr.json"))
    del group["attributes"]["created_at"]
    return {**files, "zarr.json": group}


def _creation_folders(store: Path) -> list[Path]:
    return list(store.parent.glob(f".{store.name}.creating-*"))


# ---------------------------------------------------------------- cache build: SIGKILL just before one write

# A clean build writes, in this order: the group's zarr.json; each array's zarr.json, each followed by the group's
# again; the ids and labels chunks; the group's zarr.json with initialised=True (all of that in a creation folder,
# renamed into place after); then each chunk's logits and its done flag. (store key, which write of it) -> die before.
BUILD_KILLS = [
    ("zarr.json", 1),  # the store's folder made, nothing in it yet
    ("logits/zarr.json", 1),  # group metadata only
    ("zarr.json", 3),  # two of the four arrays
    ("chunk_done/zarr.json", 1),
    ("sample_ids/c/0", 1),  # metadata complete, no ids yet
    ("labels/c/15", 1),  # all but the last labels chunk
    ("zarr.json", 6),  # all but initialised=True
    ("logits/c/0/0", 1),  # the store in place, no chunk computed
    ("chunk_done/c/0", 1),  # chunk 0's logits written, its flag not
    ("logits/c/1/0", 1),
    ("chunk_done/c/7", 1),
    ("logits/c/8/0", 1),
    ("logits/c/15/0", 1),
    ("chunk_done/c/15", 1),  # the last flag
]


def _done_before(key: str) -> int | None:
    """Chunks done when the build dies before writing `key`; None while the store is still being created."""
    found = re.fullmatch(r"(?:logits/c/(\d+)/0|chunk_done/c/(\d+))", key)
    return None if found is None else int(found[1] or found[2])


@pytest.mark.slow  # 14 forkserver children, each SIGKILLed mid-build, then 14 resumed builds
def test_build_killed_at_any_write_resumes_to_a_bit_identical_store(tmp_path: Path, forkserver) -> None:
    total = N_ROWS // CHUNK_ROWS
    build_tiny_cache(tmp_path / "clean.zarr")
    clean = _contents(tmp_path / "clean.zarr")
    for i, (key, nth) in enumerate(BUILD_KILLS):
        path = tmp_path / f"kill{i}" / "c.zarr"
        path.parent.mkdir()
        child = forkserver.Process(target=fault_child.build_killed_before_write, args=(str(path), key, nth))
        child.start()
        child.join()
        assert child.exitcode == KILLED, (key, nth, child.exitcode)
        done = _done_before(key)
        if done is None:  # killed while creating: nothing at the path, only the creation folder beside it
            assert not path.exists() and len(_creation_folders(path)) == 1, (key, nth)
            done = 0
        else:
            assert done_flags(open_store(path)).tolist() == [c < done for c in range(total)], (key, nth)

        stats = build_tiny_cache(path)  # resume, in this process
        assert (stats.chunks_written, stats.rows_computed) == (total - done, (total - done) * CHUNK_ROWS), (key, nth)
        assert os.listdir(path.parent) == ["c.zarr"], (key, nth)  # a stale creation folder was removed
        assert _contents(path) == clean, (key, nth)


# ---------------------------------------------------------------- the cache-logits stage killed, then run again

# point -> (fault, data.seed): a seed of its own gives each point its own data digest, so its own cache key
STAGE_KILLS = {
    "creating": ("write:zarr.json", 21),  # the store's folder made in the run's artifacts, nothing in it
    "mid-build": ("write:chunk_done/c/4", 22),  # chunks 0-3 done, chunk 4's logits written but not its flag
    "marked-complete": ("after-mark-complete", 23),  # the store complete; the run neither tagged nor FINISHED
}


@pytest.mark.slow  # forkserver children (torch, mlflow and kdtrack preloaded), each killed and rerun
@pytest.mark.parametrize("point", STAGE_KILLS)
def test_killed_cache_stage_resumes_its_run_to_a_bit_identical_store(point: str, digits_teacher: str, forkserver,
                                                                     tmp_path: Path) -> None:
    fault, seed = STAGE_KILLS[point]
    sets = ("cache.chunk_rows=128", f"data.seed={seed}", f"experiment=faults-{point}")
    args = ("cache-logits", "--teacher-run-id", digits_teacher, "--config", str(DIGITS), *set_args(*sets))
    code, _out, err = _Command(forkserver, tmp_path / "killed", fault, *args).wait()
    assert code == KILLED, err[-3000:]
    client = MlflowClient()
    (killed,) = client.search_runs([client.get_experiment_by_name(f"faults-{point}").experiment_id])
    run_id, tags = killed.info.run_id, killed.data.tags
    assert killed.info.status == "RUNNING" and tags["kdtrack.complete"] == "false"
    path = tracking.artifact_path(run_id, cache_logits.ARTIFACT)
    rows, chunks = int(tags["kdtrack.num_rows"]), -(-int(tags["kdtrack.num_rows"]) // 128)
    computed = {"creating": rows, "mid-build": rows - 4 * 128, "marked-complete": 0}[point]
    if point == "creating":
        assert not path.exists() and len(_creation_folders(path)) == 1
    elif point == "mid-build":
        assert done_flags(open_store(path)).tolist() == [c < 4 for c in range(chunks)]
    else:
        assert open_store(path).attrs["complete"] is True

    code, out, err = _Command(forkserver, tmp_path / "rerun", "none", *args).wait()  # the same command again
    assert code == 0 and out.strip() == run_id, err[-3000:]
    resumed = tracking.get_run(run_id)
    assert resumed.info.status == "FINISHED" and resumed.data.tags["kdtrack.complete"] == "true"
    assert resumed.data.metrics["build/rows_computed"] == computed
    same_key = {"kdtrack.cache_key": tags["kdtrack.cache_key"], "kdtrack.teacher_run_id": digits_teacher}
    assert [r.info.run_id for r in tracking.find_runs(same_key, statuses=ANY_STATUS)] == [run_id]
    assert _creation_folders(path) == []
    clean = cache_logits.run(config.load(DIGITS, list(sets)), digits_teacher, force=True)
    assert clean != run_id and _contents(path) == _contents(tracking.artifact_path(clean, cache_logits.ARTIFACT))


# ---------------------------------------------------------------- two builds of one cache at once


@pytest.mark.slow  # two forkserver children building one cache
def test_two_builds_of_one_cache_at_once_end_with_one_run(digits_teacher: str, forkserver, tmp_path: Path) -> None:
    args = ("cache-logits", "--teacher-run-id", digits_teacher, "--config", str(DIGITS),
            *set_args("cache.chunk_rows=128", "data.seed=24", "experiment=faults-concurrent"))
    # Whichever takes the claim builds only once the other has said it waits: an overlap by construction.
    children = [_Command(forkserver, tmp_path / f"build{i}", f"hand-off:{tmp_path}", *args) for i in range(2)]
    results = [(child.pid, *child.wait()) for child in children]  # (pid, exit code, stdout, stderr)
    assert [code for _, code, _, _ in results] == [0, 0], [err[-3000:] for *_, err in results]
    printed = {out.strip() for _, _, out, _ in results}
    assert len(printed) == 1, f"two runs built one cache: {printed}"
    run_id = printed.pop()
    key = tracking.get_run(run_id).data.tags["kdtrack.cache_key"]
    same_key = {"kdtrack.cache_key": key, "kdtrack.teacher_run_id": digits_teacher}
    assert [r.info.run_id for r in tracking.find_runs(same_key, statuses=ANY_STATUS)] == [run_id]
    waits = [(pid, err) for pid, _, _, err in results if "waiting for it" in err]
    assert len(waits) == 1, [err for *_, err in results]
    (builder,) = {pid for pid, *_ in results} - {waits[0][0]}
    assert (f"another process (pid {builder} on {socket.gethostname()}) is building cache {key[:12]}; "
            "waiting for it") in waits[0][1]
    assert f"reusing cache run {run_id}" in waits[0][1]
    code, out, err = cli("verify-cache", "--run-id", run_id)
    assert code == 0, out + err


def test_claim_waits_for_its_holder_and_a_killed_holder_lets_go(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    folder, host = tmp_path / "claims", socket.gethostname()
    with claims.claim(folder, "k", "testing claims"):
        waiter = _script(f"claim:{folder}:k")
        # one line, written once the waiter found the claim taken; it cannot go on while this block holds it
        assert waiter.stderr.readline() == (f"another process (pid {os.getpid()} on {host}) is testing claims; "
                                            "waiting for it\n")
        assert waiter.poll() is None
    out, err = waiter.communicate(timeout=60)
    assert (waiter.returncode, out, err) == (0, "acquired\n", "")
    assert (folder / "k.lock").read_text() == ""  # each holder wiped its name as it let go

    holder = _script(f"claim:{folder}:k:hold")
    assert holder.stdout.readline() == "acquired\n"
    lock = folder / "k.lock"
    assert lock.read_text() == f"{holder.pid} {host} testing claims\n"
    with open(lock) as other, pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    holder.kill()
    holder.communicate(timeout=60)
    assert holder.returncode == KILLED
    capsys.readouterr()
    with claims.claim(folder, "k", "testing claims"):  # the kernel released the dead holder's flock
        assert lock.read_text() == f"{os.getpid()} {host} testing claims\n"
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- a student killed mid-epoch


@pytest.mark.slow  # forkserver children (torch, mlflow and kdtrack preloaded), each killed and rerun
def test_student_killed_mid_epoch_resumes_from_last_pt(digits_teacher: str, forkserver, tmp_path: Path) -> None:
    sets = ("student.model.name=mlp", "student.model.hidden=[16]", "student.optim.epochs=3", "train.progress=off",
            "experiment=faults-student")
    cfg = config.load(DIGITS, list(sets))
    cache_logits.run(cfg, digits_teacher)
    straight = train_student.run(cfg, [digits_teacher])
    code, _out, err = _Command(forkserver, tmp_path / "killed", "step:1:2", "train-student", "--teacher-run-id",
                               digits_teacher, "--config", str(DIGITS), *set_args(*sets)).wait()
    assert code == KILLED, err[-3000:]
    client = MlflowClient()
    experiment = client.get_experiment_by_name("faults-student").experiment_id
    (killed,) = client.search_runs([experiment], "attributes.status = 'RUNNING'")
    run_id = killed.info.run_id
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [0]  # epoch 0 saved, epoch 1 not
    assert _last_pt(run_id, tmp_path / "killed-last")["epoch"] == 0

    code, out, err = _Command(forkserver, tmp_path / "resume", "none", "train-student", "--resume", run_id).wait()
    assert code == 0 and out.strip() == run_id, err[-3000:]
    assert client.get_run(run_id).info.status == "FINISHED"
    for key in ("train/loss", "val/acc"):  # one point per epoch: the killed epoch was never logged, then once
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [0, 1, 2], key
    weights = {r: _last_pt(r, tmp_path / r)["weights_sha256"] for r in (run_id, straight)}
    assert weights[run_id] == weights[straight]
    tag = "kdtrack.checkpoint_sha256_last"
    assert client.get_run(run_id).data.tags[tag] == client.get_run(straight).data.tags[tag] == weights[straight]


def _last_pt(run_id: str, folder: Path) -> dict:
    return checkpoint.load(tracking.download_artifact(run_id, "checkpoints/last.pt", folder))


@pytest.mark.slow  # processes against the session's mlflow server
def test_one_artifact_is_downloaded_once_by_concurrent_readers(tracking_server, tmp_path: Path) -> None:
    """DDP ranks (and parallel jobs) read a remote artifact at the same moment: one downloads, the others wait.

    Three processes call `tracking.artifact_path` for one artifact of a run on the session's real `mlflow server`,
    sharing one KDTRACK_CACHE_DIR. Each counts its real downloads (`tracking.download_artifact`, wrapped) in a shared
    file. Whichever process downloads does so only once both others have said they wait for its claim: an overlap by
    construction, not a timing window (without the claim, each would download, and the count would show it)."""
    import hashlib

    readers, artifact = 3, "data/blob.bin"
    payload = os.urandom(3 * 2**20)  # 3 MiB: several reads and writes, so a partial file would show
    (tmp_path / "upload").mkdir()
    (tmp_path / "upload" / "blob.bin").write_bytes(payload)
    client = MlflowClient(tracking_uri=tracking_server.url)
    run_id = client.create_run(client.create_experiment("faults-download-once")).info.run_id
    client.log_artifact(run_id, str(tmp_path / "upload" / "blob.bin"), "data")
    client.set_terminated(run_id)
    shared, cache_dir = tmp_path / "shared", tmp_path / "kdtrack-cache"
    shared.mkdir()
    child = """
import hashlib, os, sys, time
from pathlib import Path
from kdtrack import claims, tracking

shared, run_id, artifact, readers = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
say, download = claims._say_waiting, tracking.download_artifact

def say_then_mark(*args, **kwargs):
    say(*args, **kwargs)
    (shared / f"waiting.{os.getpid()}").touch()

def counted(*args, **kwargs):
    with open(shared / "downloads", "a") as log:
        log.write(f"{os.getpid()}\\n")
    deadline = time.monotonic() + 60  # a safety net only: with the claim, the others wait for this process
    while len(list(shared.glob("waiting.*"))) < readers - 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    return download(*args, **kwargs)

claims._say_waiting, tracking.download_artifact = say_then_mark, counted
(shared / f"ready.{os.getpid()}").touch()  # start together, once every reader has imported kdtrack
deadline = time.monotonic() + 120
while len(list(shared.glob("ready.*"))) < readers and time.monotonic() < deadline:
    time.sleep(0.01)
path = tracking.artifact_path(run_id, artifact)
print(path, hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_ino)
"""
    env = subprocess_env(MLFLOW_TRACKING_URI=tracking_server.url, KDTRACK_CACHE_DIR=str(cache_dir))
    procs = [subprocess.Popen([sys.executable, "-c", child, str(shared), run_id, artifact, str(readers)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(readers)]
    results = [(proc.pid, *proc.communicate(timeout=300)) for proc in procs]  # (pid, stdout, stderr)
    assert [proc.returncode for proc in procs] == [0] * readers, [err[-3000:] for *_, err in results]

    downloaders = [int(pid) for pid in (shared / "downloads").read_text().split()]
    assert len(downloaders) == 1, f"{len(downloaders)} downloads of one artifact: {downloaders}"
    waiters = sorted(int(p.name.split(".")[1]) for p in shared.glob("waiting.*"))
    assert waiters == sorted(set(pid for pid, *_ in results) - set(downloaders))
    for pid, _out, err in results:
        said = f"another process (pid {downloaders[0]} on {socket.gethostname()}) is downloading {artifact} of run"
        assert (said in err) == (pid in waiters), err
    # Every reader got the same complete file, in the shared folder, byte-identical to what was logged.
    printed = {tuple(out.split()) for _pid, out, _err in results}
    assert len(printed) == 1, printed
    ((path, digest, _inode),) = printed
    assert Path(path) == cache_dir / run_id / artifact
    assert digest == hashlib.sha256(payload).hexdigest() and Path(path).read_bytes() == payload


# ---------------------------------------------------------------- SIGTERM, orphans, equal steps at once

STUDENT_SETS = ("student.model.name=mlp", "student.model.hidden=[16]", "student.optim.epochs=3", "train.progress=off")


def _runs(experiment: str) -> dict[str, list]:
    """The runs of an experiment by kdtrack stage, oldest first."""
    client = MlflowClient()
    found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], order_by=["start_time"])
    by_stage: dict[str, list] = {}
    for run in found:
        by_stage.setdefault(run.data.tags.get("kdtrack.stage", "?"), []).append(run)
    return by_stage


@pytest.mark.slow  # forkserver children (torch, mlflow and kdtrack preloaded), each killed and rerun
def test_sigterm_ends_the_run_killed_and_it_resumes(digits_teacher: str, forkserver, tmp_path: Path) -> None:
    sets = (*STUDENT_SETS, "experiment=faults-sigterm")
    cache_logits.run(config.load(DIGITS, list(sets)), digits_teacher)
    code, _out, err = _Command(forkserver, tmp_path / "term", "term:1:0", "train-student", "--teacher-run-id",
                               digits_teacher, "--config", str(DIGITS), *set_args(*sets)).wait()
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert "terminated (SIGTERM): the run was ended KILLED" in err and "Traceback" not in err
    (run,) = _runs("faults-sigterm")["student"]
    assert run.info.status == "KILLED"
    code, out, err = cli("train-student", "--resume", run.info.run_id)
    assert code == 0 and out.strip() == run.info.run_id, err
    assert sorted(m.step for m in MlflowClient().get_metric_history(run.info.run_id, "train/loss")) == [0, 1, 2]


@pytest.mark.slow  # forkserver children (torch, mlflow and kdtrack preloaded), each killed and rerun
def test_an_orphan_is_marked_killed_and_a_pipeline_rerun_resumes_its_student(store: str, forkserver,
                                                                             tmp_path: Path) -> None:
    sets = set_args("model.name=mlp", "model.hidden=[32]", "optim.epochs=1", *STUDENT_SETS, "experiment=faults-orphan")
    args = ("pipeline", "--config", str(DIGITS), "--students", "kd", *sets)
    code, _out, err = _Command(forkserver, tmp_path / "killed", "step:1:0", *args).wait()  # the student's epoch 1
    assert code == KILLED, err[-3000:]
    before = _runs("faults-orphan")
    assert [r.info.status for r in before["pipeline"] + before["student"]] == ["RUNNING", "RUNNING"]
    orphan = before["student"][0].info.run_id

    code, out, err = cli(*args)
    assert code == 0, err
    assert f"note: run {orphan} (student-kd-t4-a0.7) was RUNNING but its process (pid " in err
    steps = json.loads(MlflowClient().get_run(out.strip().splitlines()[-1]).data.tags["kdtrack.steps"])
    assert steps["student-kd"] == [orphan, False] and f"student-kd: resuming interrupted run {orphan}" in err
    assert MlflowClient().get_run(orphan).info.status == "FINISHED"
    assert sorted(m.step for m in MlflowClient().get_metric_history(orphan, "train/loss")) == [0, 1, 2]
    old_parent = before["pipeline"][0].info.run_id
    assert tracking.get_run(old_parent).info.status == "KILLED"  # met by this command: marked
    assert "its owner (pid" in MlflowClient().get_run(old_parent).data.tags["kdtrack.ended_by"]


@pytest.mark.slow  # two whole pipelines in forkserver children at once
def test_two_equal_pipelines_at_once_do_each_step_once(store: str, forkserver, tmp_path: Path) -> None:
    tracking.experiment_names()  # the store's tables exist before two processes open it
    sets = set_args("model.name=mlp", "model.hidden=[24]", "optim.epochs=1", *STUDENT_SETS,  # a teacher of its own
                    "student.optim.epochs=1", "experiment=faults-twins")
    args = ("pipeline", "--config", str(DIGITS), "--students", "kd,none", *sets)
    twins = [_Command(forkserver, tmp_path / f"twin{i}", "none", *args) for i in range(2)]
    results = [twin.wait() for twin in twins]
    assert [code for code, *_ in results] == [0, 0], [err[-2000:] for *_, err in results]
    runs = _runs("faults-twins")
    assert {stage: len(found) for stage, found in runs.items()} == {"pipeline": 2, "teacher": 1, "cache": 1,
                                                                     "student": 2}
    steps = [json.loads(r.data.tags["kdtrack.steps"]) for r in _runs("faults-twins")["pipeline"]]
    assert {k: v[0] for k, v in steps[0].items()} == {k: v[0] for k, v in steps[1].items()}
    assert any("waiting for it" in err for *_, err in results)
