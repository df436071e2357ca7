"""torchrun with two CPU ranks builds one cache, split by chunks, equal to a single-process build."""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np

from kdtrack import cache, config, distributed, tracking
from kdtrack.stages import cache_logits
from conftest import DIGITS, free_port, subprocess_env

OVERRIDES = ["cache.chunk_rows=128", "experiment=ddp-cache"]


def _logits(run_id: str) -> tuple[np.ndarray, np.ndarray]:
    group = cache.open_store(tracking.artifact_path(run_id, cache_logits.ARTIFACT))
    return np.asarray(group["logits"][:]), cache.done_flags(group)


def test_two_ranks_build_one_cache_equal_to_one_process(store: str, digits_teacher: str) -> None:
    sets = [arg for item in OVERRIDES for arg in ("--set", item)]
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
