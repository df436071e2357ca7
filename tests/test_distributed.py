"""torchrun with two CPU ranks: one cache split by chunks, and a DDP student, each equal to a single process's."""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from kdtrack import cache, checkpoint, config, distributed, tracking
from kdtrack.data import EpochShuffleSampler, student_dataset
from kdtrack.errors import ConfigError, DataError
from kdtrack.stages import cache_logits, train_student
from kdtrack.stages.training import split_loaders
from conftest import DIGITS, free_port, set_args, subprocess_env

OVERRIDES = ["cache.chunk_rows=128", "experiment=ddp-cache"]


def _logits(run_id: str) -> tuple[np.ndarray, np.ndarray]:
    group = cache.open_store(tracking.artifact_path(run_id, cache_logits.ARTIFACT))
    return np.asarray(group["logits"][:]), cache.done_flags(group)


@pytest.mark.slow  # torchrun: two ranks, each its own process
def test_two_ranks_build_one_cache_equal_to_one_process(store: str, digits_teacher: str) -> None:
    sets = set_args(*OVERRIDES)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(free_port()), "-m", "kdtrack", "cache-logits", "--teacher-run-id", digits_teacher,
               "--config", str(DIGITS), *sets, "--force"]
    proc = subprocess.run(command, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    printed = proc.stdout.split()
    assert len(printed) == 1, proc.stdout  # only rank 0 prints, and only the run id
    run_id = printed[0]

    run = tracking.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[f"{tracking.TAG}complete"] == "true"
    assert run.data.tags[f"{tracking.TAG}stage"] == cache_logits.STAGE
    logits, done = _logits(run_id)
    n_chunks = -(-len(logits) // 128)
    assert len(done) == n_chunks and done.all()
    # chunk c belongs to rank c % 2: both ranks computed their share
    for rank in (0, 1):
        mine = len(range(rank, n_chunks, 2))
        assert run.data.metrics[f"build/chunks_rank{rank}"] == mine > 0
        assert re.search(rf"rank {rank}/2: wrote {mine} of its {mine} chunks", proc.stderr), proc.stderr[-4000:]

    cfg = config.load(DIGITS, OVERRIDES)
    single_id = cache_logits.run(cfg, digits_teacher, force=True)
    single = tracking.get_run(single_id)
    key = f"{tracking.TAG}cache_key"
    assert single_id != run_id and single.data.tags[key] == run.data.tags[key]
    assert "build/chunks_rank0" not in single.data.metrics  # one process logs as before
    reference, _ = _logits(single_id)
    assert np.isfinite(logits).all() and np.array_equal(logits, reference)


def test_single_process_owns_every_chunk(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.is_distributed() and distributed.rank() == 0
    assert distributed.owned_chunks(5) == [0, 1, 2, 3, 4]
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}


def test_ranks_own_disjoint_chunks_covering_the_store(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "3")
    owned = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        owned.append(distributed.owned_chunks(8))
    assert owned == [[0, 3, 6], [1, 4, 7], [2, 5]]


def _recorded_group(monkeypatch) -> list[str]:
    """torch.distributed's group calls replaced by a log of their names, as for rank 1 of 2 on CPU."""
    calls: list[str] = []
    joined = {"now": False}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    dist = distributed.dist

    def init_process_group(backend: str) -> None:
        calls.append(f"init {backend}")
        joined["now"] = True

    def destroy_process_group() -> None:
        calls.append("destroy")
        joined["now"] = False

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(dist, "destroy_process_group", destroy_process_group)
    monkeypatch.setattr(dist, "is_initialized", lambda: joined["now"])
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(dist, "barrier", lambda device_ids=None: calls.append("barrier"))
    return calls


def test_ranks_leave_the_group_together_after_their_work(monkeypatch) -> None:
    """A rank done early waits for the others before tearing the group down (one that did not aborted at exit)."""
    calls = _recorded_group(monkeypatch)
    with distributed.process_group(torch.device("cpu")):
        calls.append("work")
    assert calls == ["init gloo", "work", "barrier", "destroy"]


def test_a_failing_rank_leaves_at_once(monkeypatch) -> None:
    """No barrier on an exception: the other ranks may never get there; torchrun stops them."""
    calls = _recorded_group(monkeypatch)
    with pytest.raises(RuntimeError, match="rank failed"), distributed.process_group(torch.device("cpu")):
        raise RuntimeError("rank failed")
    assert calls == ["init gloo", "destroy"]


def test_a_joined_group_is_left_to_whoever_joined_it(monkeypatch) -> None:
    calls = _recorded_group(monkeypatch)
    with distributed.process_group(torch.device("cpu")):
        with distributed.process_group(torch.device("cpu")):
            calls.append("inner")
        calls.append("outer")
    assert calls == ["init gloo", "inner", "outer", "barrier", "destroy"]


# ---------------------------------------------------------------- DDP students

STUDENT = ["student.optim.epochs=3", "train.progress=off", "experiment=ddp-student",
           "data.val_fraction=0.14"]  # 1278 training rows: even, so no rank pads its share


@pytest.mark.slow  # torchrun: two ranks, each its own process
def test_ddp_student_trains_as_one_process_would(store: str, digits_teacher: str) -> None:
    """Two gloo ranks with half batches each take the same steps as one process with whole batches: the
    shards of a step are that step's batch, and DDP averages the gradients. So the weights and the logged
    losses agree to float rounding; they would not if the ranks shared rows, or kept their own gradients."""
    sets = set_args(*STUDENT)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(free_port()), "-m", "kdtrack", "train-student", "--teacher-run-id",
               digits_teacher, "--config", str(DIGITS), *sets, "--build-missing-cache"]
    proc = subprocess.run(command, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    printed = proc.stdout.split()
    assert len(printed) == 1, proc.stdout  # only rank 0 prints its run id
    ddp = tracking.get_run(printed[0])
    assert ddp.info.status == "FINISHED"
    assert ddp.data.tags[f"{tracking.TAG}processes"] == "2"

    single_id = train_student.run(config.load(DIGITS, STUDENT), [digits_teacher])
    single = tracking.get_run(single_id)
    assert single.data.tags[f"{tracking.TAG}processes"] == "1"
    assert single.data.tags[f"{tracking.TAG}cache_run_ids"] == ddp.data.tags[f"{tracking.TAG}cache_run_ids"]
    for key in ("train/loss", "train/acc", "val/acc"):
        ddp_points, single_points = _history(ddp.info.run_id, key), _history(single_id, key)
        assert [step for step, _ in ddp_points] == [0, 1, 2], f"{key}: one point per epoch, from rank 0 only"
        ddp_values, single_values = [v for _, v in ddp_points], [v for _, v in single_points]
        assert np.allclose(ddp_values, single_values, rtol=1e-6), (key, ddp_values, single_values)
    ddp_weights, single_weights = _weights(ddp.info.run_id), _weights(single_id)
    assert ddp_weights.keys() == single_weights.keys()  # the inner model's names, no DDP "module." prefix
    diffs = {name: float((ddp_weights[name] - value).abs().max() / value.abs().max())
             for name, value in single_weights.items()}
    assert max(diffs.values()) < 1e-5, diffs  # float rounding: summation order differs
    assert abs(ddp.data.metrics["test/acc"] - single.data.metrics["test/acc"]) < 0.01


def _history(run_id: str, key: str) -> list[tuple[int, float]]:
    return tracking.metric_histories({run_id: [key]})[run_id][key]


def _weights(run_id: str) -> dict[str, torch.Tensor]:
    path = tracking.artifact_path(run_id, "checkpoints/last.pt")
    return checkpoint.load(path)["state_dict"]


@pytest.mark.parametrize("n,world", [(12, 3), (10, 4), (2, 3), (0, 2)])
def test_rank_shards_split_one_epoch_permutation(n: int, world: int) -> None:
    whole = EpochShuffleSampler(n, seed=7)
    whole.set_epoch(3)
    shards = []
    for rank in range(world):
        sampler = EpochShuffleSampler(n, seed=7, rank=rank, world=world)
        sampler.set_epoch(3)
        shards.append(list(sampler))
        assert len(shards[-1]) == len(sampler) == -(-n // world)  # equal lengths: every rank takes as many steps
    order = whole.permutation().tolist()
    interleaved = [shards[i % world][i // world] for i in range(world * len(shards[0]))]
    assert interleaved[:n] == order  # rank r holds positions r, r + world, ... of the one permutation
    assert interleaved[n:] == (order * world)[: len(interleaved) - n]  # padding repeats the first rows


def test_shards_change_with_the_epoch_and_reject_a_bad_rank() -> None:
    sampler = EpochShuffleSampler(50, seed=0, rank=1, world=2)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    with pytest.raises(DataError):
        EpochShuffleSampler(50, seed=0, rank=2, world=2)


def test_batch_size_must_split_over_the_ranks() -> None:
    cfg = config.load(DIGITS, ["data.batch_size=64"])
    data = student_dataset(cfg.data).select(["train"])
    with pytest.raises(ConfigError, match="does not split evenly over 3 processes"):
        split_loaders(cfg, {"train": data}, torch.device("cpu"), shard=(0, 3))
    loader = split_loaders(cfg, {"train": data}, torch.device("cpu"), shard=(1, 2))["train"]
    assert loader.batch_size == 32 and len(loader.sampler) == -(-len(data) // 2)
