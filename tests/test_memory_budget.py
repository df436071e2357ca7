"""Caches bigger than the memory budget: the budget setting, and a student shuffling chunk-aware by itself."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import DIGITS
from kdtrack import config, tracking
from kdtrack.cache import ChunkAwareSampler, default_memory_budget
from kdtrack.stages import cache_logits, train_student


def test_ranks_share_one_chunk_aware_epoch_order() -> None:
    chunk_of_rows = np.arange(103) // 10
    whole = ChunkAwareSampler(chunk_of_rows, seed=4).permutation().tolist()
    shards = [list(ChunkAwareSampler(chunk_of_rows, seed=4, rank=r, world=3)) for r in range(3)]
    assert [len(s) for s in shards] == [35, 35, 35]  # 103 rows padded to 105 by the first two of the order
    padded = whole + whole[:2]
    assert shards == [padded[r::3] for r in range(3)]
    assert sorted(set().union(*shards)) == list(range(103))
    two = [list(ChunkAwareSampler(chunk_of_rows, seed=4, rank=r, world=2)) for r in range(2)]
    assert two == [(whole + whole[:1])[r::2] for r in range(2)]
    one_row = [list(ChunkAwareSampler(np.zeros(1, dtype=np.int64), seed=4, rank=r, world=2)) for r in range(2)]
    assert one_row == [[0], [0]]  # a single row goes to both ranks, as the epoch shuffle pads it
    with pytest.raises(ValueError, match="rank 3 is outside 0..2"):
        ChunkAwareSampler(chunk_of_rows, seed=4, rank=3, world=3)


def test_the_default_budget_is_half_the_available_memory_over_the_local_processes() -> None:
    with open("/proc/meminfo") as meminfo:
        available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    for processes in (1, 4):
        assert default_memory_budget(processes) == pytest.approx(available / 2 / processes, rel=0.05)


@pytest.mark.parametrize("meminfo, expected", [
    ("MemTotal:  8000 kB\nMemFree:  300 kB\nMemAvailable:   6001 kB\n", 1024170),  # 6001 KiB / 6, down
    ("MemTotal:  8000 kB\nMemFree:  300 kB\n", None),  # an old kernel without MemAvailable
    (None, None),  # no /proc/meminfo at all
])
def test_the_default_budget_reads_mem_available_else_the_free_pages(monkeypatch: pytest.MonkeyPatch, tmp_path,
                                                                   meminfo: str | None, expected: int | None) -> None:
    """Half of MemAvailable over 3 processes; without that line (or the file), half the free pages over 3."""
    import builtins

    from kdtrack.cache import reader

    fake = tmp_path / "meminfo"
    if meminfo is not None:
        fake.write_text(meminfo)
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(fake if path == "/proc/meminfo" else path,
                                                                          *a, **k))
    pages = {"SC_AVPHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(reader.os, "sysconf", lambda name: pages[name])
    budget = reader.default_memory_budget(3)
    assert budget == (1000 * 4096 // 2 // 3 if expected is None else expected) and type(budget) is int  # bytes
    assert reader.default_memory_budget() == 3 * budget + (reader.default_memory_budget() % 3)  # one process


@pytest.mark.slow  # builds a cache of small chunks and trains a student on it
def test_a_cache_over_the_budget_is_read_by_chunks_and_shuffled_chunk_aware(store: str, digits_teacher: str,
                                                                            capsys) -> None:
    sets = ["cache.chunk_rows=128", "experiment=budget", "student.optim.epochs=2", "train.progress=off"]
    cache_id = cache_logits.run(config.load(DIGITS, sets), digits_teacher, force=True)
    over = config.load(DIGITS, [*sets, "cache.memory_budget_mb=0.02"])  # 20 KiB: 4 of the 10 chunks of 5 KiB
    student = tracking.get_run(train_student.run(over, [digits_teacher], cache_run_ids=[cache_id]))
    err = capsys.readouterr().err
    assert "(0.05 MiB) exceeds the memory budget (0.02 MiB, cache.memory_budget_mb)" in err
    assert "4 of 10 chunks at a time" in err
    assert student.data.tags["kdtrack.row_order"] == "chunk-aware"
    fits = tracking.get_run(train_student.run(config.load(DIGITS, sets), [digits_teacher], cache_run_ids=[cache_id]))
    assert "kdtrack.row_order" not in fits.data.tags
