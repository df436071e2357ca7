"""Teacher-logit cache: the Zarr store format, the resumable writer, verification, packing into shards for upload
(and, in reader.py, lookup)."""
from kdtrack.cache.format import (
    FORMAT,
    cache_key,
    chunk_bounds,
    create_store,
    default_chunk_rows,
    done_flags,
    mark_complete,
    mark_incomplete,
    num_chunks,
    open_store,
    remove_store,
    store_nbytes,
)
from kdtrack.cache.pack import pack
from kdtrack.cache.verify import (
    CoverageReport,
    FidelityReport,
    IntegrityReport,
    VerifyReport,
    check_coverage,
    check_fidelity,
    check_integrity,
    fidelity_tolerance,
    sample_rows,
    verify_store,
)
from kdtrack.cache.writer import BuildStats, PriorRows, build, probe_output_shape

from kdtrack.cache.reader import ChunkAwareSampler, LogitTable, default_memory_budget

__all__ = [
    "FORMAT",
    "BuildStats",
    "ChunkAwareSampler",
    "default_memory_budget",
    "LogitTable",
    "CoverageReport",
    "FidelityReport",
    "IntegrityReport",
    "PriorRows",
    "VerifyReport",
    "build",
    "cache_key",
    "check_coverage",
    "check_fidelity",
    "check_integrity",
    "chunk_bounds",
    "create_store",
    "default_chunk_rows",
    "done_flags",
    "fidelity_tolerance",
    "mark_complete",
    "mark_incomplete",
    "num_chunks",
    "open_store",
    "pack",
    "probe_output_shape",
    "remove_store",
    "sample_rows",
    "store_nbytes",
    "verify_store",
]
