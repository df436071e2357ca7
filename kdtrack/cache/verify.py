"""Cache verification: chunk integrity (checksums, finiteness, done flags), id coverage, and teacher fidelity.

Repair is a rebuild of the named chunks: `build(..., chunks=report.chunks_to_rebuild(), force_chunks=True)`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zarr
from torch import nn

from kdtrack.cache.format import ARRAYS, LABEL_FILL, chunk_bounds, done_flags, num_chunks
from kdtrack.cache.ids import decode_ids
from kdtrack.cache.writer import forward
from kdtrack.data import IndexedDataset

_SHOW = 10  # ids / rows named in a report before "and N more"
_FIDELITY_BATCH = 256


@dataclass
class IntegrityReport:
    """Per-chunk findings: unreadable or invalid chunks with a reason, chunks not done, non-finite rows."""

    chunks_checked: int
    schema_errors: list[str] = field(default_factory=list)
    bad_chunks: dict[int, str] = field(default_factory=dict)  # chunk -> reason, e.g. "logits: checksum mismatch"
    not_done: list[int] = field(default_factory=list)
    nonfinite_rows: list[int] = field(default_factory=list)  # the first few only
    nonfinite_count: int = 0

    @property
    def passed(self) -> bool:
        return not (self.schema_errors or self.bad_chunks or self.not_done)

    @property
    def to_repair(self) -> list[int]:
        """Chunks to rebuild: bad ones and those not done."""
        return sorted(set(self.bad_chunks) | set(self.not_done))

    def lines(self) -> list[str]:
        """PASS line, or one FAIL line per kind of problem with the chunks named."""
        if self.passed:
            return [f"PASS integrity: {self.chunks_checked} chunk(s) done, readable, checksums valid, logits finite"]
        out = [f"FAIL integrity: {e}" for e in self.schema_errors]
        out += [f"FAIL integrity: chunk {c}: {why}" for c, why in sorted(self.bad_chunks.items())]
        if self.not_done:
            out.append(f"FAIL integrity: {len(self.not_done)} chunk(s) not done: {_head(self.not_done)}")
        if self.nonfinite_count:
            out.append(f"FAIL integrity: {self.nonfinite_count} row(s) with NaN/Inf logits, "
                       f"e.g. rows {_head(self.nonfinite_rows)}")
        return out


@dataclass
class CoverageReport:
    """How many of the dataset's sample ids resolve to a cache row."""

    requested: int
    found: int
    missing: list[str]  # the first few only
    missing_count: int
    duplicate_ids: int  # store rows whose id another row already has: lookups would be ambiguous

    @property
    def hit_rate(self) -> float:
        return self.found / self.requested if self.requested else 1.0

    @property
    def passed(self) -> bool:
        return self.missing_count == 0 and self.duplicate_ids == 0

    def lines(self) -> list[str]:
        """One line, plus one for duplicate ids in the store."""
        status = "PASS" if self.missing_count == 0 else "FAIL"
        line = f"{status} coverage: {self.found}/{self.requested} sample ids found (hit rate {self.hit_rate:.2%})"
        if self.missing_count:
            extra = self.missing_count - len(self.missing)
            more = f" and {extra} more" if extra else ""
            line += f"; missing {', '.join(repr(s) for s in self.missing)}{more}"
        out = [line]
        if self.duplicate_ids:
            out.append(f"FAIL coverage: {self.duplicate_ids} store row(s) repeat an earlier sample id")
        return out


@dataclass
class FidelityReport:
    """Recomputed teacher outputs against the cached ones on a sample of rows."""

    rows_checked: int
    max_abs_diff: float
    max_abs_logit: float
    tolerance: float
    top1_agreement: float | None  # None for signal outputs
    worst_sample_id: str | None
    missing_ids: int = 0
    bad_chunks: list[int] = field(default_factory=list)  # chunks holding a row that failed; rebuilding them repairs

    @property
    def passed(self) -> bool:
        top1_ok = self.top1_agreement is None or self.top1_agreement == 1.0
        return self.missing_ids == 0 and self.rows_checked > 0 and self.max_abs_diff <= self.tolerance and top1_ok

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe figures for the store's `fidelity` attribute (non-finite numbers become None)."""
        def clean(v: float | None) -> float | None:
            return None if v is None or not math.isfinite(v) else float(v)
        return {"rows_checked": self.rows_checked, "max_abs_diff": clean(self.max_abs_diff),
                "max_abs_logit": clean(self.max_abs_logit), "tolerance": clean(self.tolerance),
                "top1_agreement": clean(self.top1_agreement), "passed": self.passed}

    def lines(self) -> list[str]:
        """One line with the figures."""
        status = "PASS" if self.passed else "FAIL"
        top1 = "" if self.top1_agreement is None else f", top-1 agreement {self.top1_agreement:.2%}"
        worst = f" (worst: {self.worst_sample_id!r})" if not self.passed and self.worst_sample_id else ""
        gone = f", {self.missing_ids} sampled id(s) not in the cache" if self.missing_ids else ""
        return [f"{status} fidelity: {self.rows_checked} row(s) recomputed, max |diff| {self.max_abs_diff:.3g} "
                f"(tolerance {self.tolerance:.3g}, max |logit| {self.max_abs_logit:.3g}){top1}{gone}{worst}"]


@dataclass
class VerifyReport:
    """All checks together; `passed` only when every check that ran passed."""

    integrity: IntegrityReport
    coverage: CoverageReport | None = None
    fidelity: FidelityReport | None = None
    provenance: list[str] = field(default_factory=list)  # store-level mismatches, e.g. another checkpoint

    @property
    def passed(self) -> bool:
        checks = (self.integrity, self.coverage, self.fidelity)
        return not self.provenance and all(r.passed for r in checks if r is not None)

    @property
    def repairable(self) -> bool:
        """Failed, but only in whole chunks that a rebuild of those chunks can fix."""
        whole_store = self.provenance or self.integrity.schema_errors or (self.coverage and not self.coverage.passed)
        return not self.passed and not whole_store and bool(self.chunks_to_rebuild())

    def chunks_to_rebuild(self) -> list[int]:
        """Bad or unfinished chunks, plus the chunks of rows that failed the fidelity check."""
        failing = set(self.fidelity.bad_chunks) if self.fidelity is not None else set()
        return sorted(set(self.integrity.to_repair) | failing)

    def lines(self) -> list[str]:
        """Human-readable report: every check's lines, then the verdict."""
        out = [f"FAIL provenance: {p}" for p in self.provenance]
        out += [line for r in (self.integrity, self.coverage, self.fidelity) if r is not None for line in r.lines()]
        return out + [f"cache verification {'PASSED' if self.passed else 'FAILED'}"]

    def failures(self) -> list[str]:
        """The FAIL lines without their prefix, e.g. "integrity: chunk 3: rows 96..127: logits unreadable (...)"."""
        return [line.removeprefix("FAIL ") for line in self.lines() if line.startswith("FAIL ")]

    def fidelity_dict(self) -> dict[str, Any] | None:
        """The store's `fidelity` attribute: the fidelity figures, or None when fidelity was not checked."""
        return None if self.fidelity is None else self.fidelity.to_dict()

    def metrics(self) -> dict[str, float]:
        """Numbers to log, e.g. `integrity/bad_chunks`, `coverage/hit_rate`, `fidelity/max_abs_diff`."""
        out = {"integrity/bad_chunks": float(len(self.integrity.bad_chunks)),
               "integrity/not_done_chunks": float(len(self.integrity.not_done)),
               "integrity/nonfinite_rows": float(self.integrity.nonfinite_count)}
        if self.coverage is not None:
            out.update({"coverage/hit_rate": self.coverage.hit_rate,
                        "coverage/missing": float(self.coverage.missing_count)})
        if self.fidelity is not None:
            figures = self.fidelity.to_dict()
            out.update({f"fidelity/{k}": float(v) for k, v in figures.items() if v is not None})
        return out


def check_integrity(group: zarr.Group) -> IntegrityReport:
    """Read every chunk of every array, one chunk at a time; report what fails."""
    total = num_chunks(group)
    report = IntegrityReport(chunks_checked=total, schema_errors=_schema_errors(group, total))
    if report.schema_errors:
        return report
    done = done_flags(group)
    for c in range(total):
        if not done[c]:
            report.not_done.append(c)
            continue  # its rows were never promised to be there
        start, stop = chunk_bounds(group, None, c)
        why = _chunk_problem(group, start, stop, report)
        if why:
            report.bad_chunks[c] = f"rows {start}..{stop - 1}: {why}"
    return report


def readable_ids(group: zarr.Group) -> tuple[dict[str, int], int]:
    """Cache row of every stored sample id and how many rows repeat an earlier id, read chunk by chunk; ids in
    a chunk that fails its checksum are left out (integrity names that chunk; its samples do not resolve)."""
    index: dict[str, int] = {}
    duplicates = 0
    for c in range(num_chunks(group)):
        start, stop = chunk_bounds(group, None, c)
        try:
            ids = group["sample_ids"][start:stop].tolist()
        except (ValueError, OSError):
            continue
        for i, sid in enumerate(ids):
            if sid in index:
                duplicates += 1
            elif sid:
                index[sid] = start + i
    return index, duplicates


def check_coverage(group: zarr.Group, sample_ids: Sequence[str]) -> CoverageReport:
    """Does every id of `sample_ids` resolve to exactly one cache row?"""
    index, duplicates = readable_ids(group)
    missing = [sid for sid in sample_ids if sid not in index]
    return CoverageReport(requested=len(sample_ids), found=len(sample_ids) - len(missing), missing=missing[:_SHOW],
                          missing_count=len(missing), duplicate_ids=duplicates)


def fidelity_tolerance(dtype: str, amp_dtype: torch.dtype | None, max_abs_logit: float) -> float:
    """Largest |cached - recomputed| explained by rounding alone for storage `dtype` and compute `amp_dtype`."""
    m = max(1.0, max_abs_logit)
    # float32: both sides are fp32 forwards of the same inputs; only the batch composition differs, which
    # changes the reduction order in matmul/conv kernels by a few ulps (~1e-7 relative). 1e-4 leaves a wide
    # margin while a different checkpoint or row is off by O(|logit|).
    tol = 1e-4 * m
    if dtype == "float16":
        # Rounding to fp16 moves a normal value by at most half an ulp, 2**-11 relative; twice that covers the
        # fp32 noise above as well, and 1e-3 absolute covers values near zero (subnormals, cancellation).
        tol = max(tol, 2.0**-10 * max_abs_logit + 1e-3)
    if amp_dtype is not None:
        # Autocast rounds activations to fp16/bf16 between layers; a different batch shape may pick other
        # kernels, so allow a few units of that format's epsilon (fp16: 2**-8, bf16: 2**-5 relative).
        tol = max(tol, 4.0 * torch.finfo(amp_dtype).eps * m)
    return tol


def sample_rows(n: int, k: int, seed: int) -> np.ndarray:
    """`min(k, n)` distinct rows of `range(n)`, seeded, sorted."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(k, n), replace=False))


def check_fidelity(
    group: zarr.Group,
    model: nn.Module,
    dataset: IndexedDataset,
    *,
    rows: Sequence[int] | np.ndarray,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> FidelityReport:
    """Recompute `model` on dataset `rows` and compare with the cache rows holding the same sample ids."""
    rows = np.asarray(rows, dtype=np.int64)
    index, _ = readable_ids(group)
    ids = [dataset.sample_ids[r] for r in rows.tolist()]
    keep = [i for i, sid in enumerate(ids) if sid in index]
    missing = len(ids) - len(keep)  # ids the cache lacks cannot be compared; coverage names them
    rows, ids = rows[keep], [ids[i] for i in keep]
    store_rows = np.array([index[sid] for sid in ids], dtype=np.int64)
    cached = _read_rows(group["logits"], store_rows, int(group.attrs["chunk_rows"]))  # (K, *output_shape)
    fresh = _recompute(model, dataset, rows, device, amp_dtype).reshape(cached.shape)  # (K, *output_shape)
    diff = np.abs(fresh - cached).reshape(len(rows), math.prod(cached.shape[1:]))  # (K, C); K may be 0
    diff = np.where(np.isfinite(diff), diff, np.inf)  # a NaN in the cache must not compare as "no difference"
    per_row = diff.max(axis=1, initial=0.0)
    max_abs = float(np.abs(fresh[np.isfinite(fresh)]).max(initial=0.0))  # a NaN here would make tol NaN
    tol = fidelity_tolerance(str(group.attrs["dtype"]), amp_dtype, max_abs)
    row_bad = per_row > tol
    top1 = None
    if fresh.ndim == 2 and len(rows):
        # A row agrees when the recomputed winner is also a winner in the cache up to the tolerance, so a
        # near-tie that storage rounding merged or reordered does not count as a disagreement.
        agree = cached[np.arange(len(rows)), fresh.argmax(axis=1)] >= cached.max(axis=1) - tol
        top1, row_bad = float(agree.mean()), row_bad | ~agree
    worst = ids[int(per_row.argmax())] if len(rows) else None
    bad_chunks = np.unique(store_rows[row_bad] // int(group.attrs["chunk_rows"])).tolist()
    return FidelityReport(rows_checked=len(rows), max_abs_diff=float(per_row.max(initial=0.0)), max_abs_logit=max_abs,
                          tolerance=tol, top1_agreement=top1, worst_sample_id=worst, missing_ids=missing,
                          bad_chunks=bad_chunks)


def verify_store(
    group: zarr.Group,
    sample_ids: Sequence[str],
    model: nn.Module | None,
    dataset: IndexedDataset | None,
    *,
    device: torch.device,
    fidelity_rows: int | Sequence[int] | np.ndarray,
    seed: int = 0,
    amp_dtype: torch.dtype | None = None,
    expected_checkpoint: str | None = None,
    data_digest: str | None = None,
) -> VerifyReport:
    """Integrity of every chunk, coverage of `sample_ids`, and fidelity of `model` on `dataset` rows.

    `fidelity_rows` is a list of dataset rows, or a count of seeded random rows; fidelity needs a model and a dataset.
    `data_digest` is the digest of the rows as they are now: a store built for other data fails whichever rows are
    recomputed, and fidelity is skipped (it would compare the teacher on other data with these logits).
    """
    provenance = []
    stored = group.attrs.get("checkpoint_sha256")
    if expected_checkpoint is not None and stored != expected_checkpoint:
        provenance.append(f"the cache was built from checkpoint {str(stored)[:12]}, "
                          f"not the expected {expected_checkpoint[:12]}")
    built_for = group.attrs.get("dataset_digest")
    data_changed = data_digest is not None and built_for != data_digest
    if data_changed:
        provenance.append(f"the data changed since this cache was built: digest now {data_digest[:12]}, "
                          f"cache built for {str(built_for)[:12]}")
    report = VerifyReport(check_integrity(group), check_coverage(group, sample_ids), provenance=provenance)
    if model is not None and dataset is not None and not data_changed:
        rows = (sample_rows(len(dataset), fidelity_rows, seed) if isinstance(fidelity_rows, int)
                else np.asarray(fidelity_rows, dtype=np.int64))
        if len(rows):
            report.fidelity = check_fidelity(group, model, dataset, rows=rows, device=device, amp_dtype=amp_dtype)
    return report


def _schema_errors(group: zarr.Group, total: int) -> list[str]:
    absent = [name for name in ARRAYS if name not in group]
    if absent:
        return [f"arrays {absent} are missing"]
    n, shape = int(group.attrs["num_rows"]), tuple(group.attrs["output_shape"])
    width = group["sample_ids_utf8"].shape[1:2] or (0,)  # any width, but two dimensions
    expected = {"logits": (n, *shape), "sample_ids": (n,), "sample_ids_utf8": (n, *width), "labels": (n,),
                "chunk_done": (total,)}
    errors = [f"{name} has shape {group[name].shape}, attributes say {want}"
              for name, want in expected.items() if tuple(group[name].shape) != want]
    if str(group["logits"].dtype) != group.attrs["dtype"]:
        errors.append(f"logits are {group['logits'].dtype}, attributes say {group.attrs['dtype']}")
    return errors


def _chunk_problem(group: zarr.Group, start: int, stop: int, report: IntegrityReport) -> str:
    """Why the chunk of rows `[start, stop)` is bad ('' when it is fine); records its non-finite rows in `report`."""
    problems, ids = [], None
    for name in ("logits", "sample_ids", "sample_ids_utf8", "labels"):
        try:
            values = group[name][start:stop]
        except Exception as exc:  # any decode failure (checksum, torn object, codec) is a finding, not a crash
            problems.append(f"{name} unreadable ({_first_line(exc)})")
            continue
        if name == "logits":
            bad = np.flatnonzero(~np.isfinite(values.reshape(stop - start, -1)).all(axis=1)) + start
            if bad.size:
                problems.append(f"{bad.size} row(s) with NaN/Inf logits (NaN fill: object removed?)"
                                if bad.size == stop - start else f"{bad.size} row(s) with NaN/Inf logits")
                report.nonfinite_count += int(bad.size)
                report.nonfinite_rows.extend(bad[: max(_SHOW - len(report.nonfinite_rows), 0)].tolist())
        elif name == "sample_ids":
            ids = values.tolist()
            if "" in ids:
                problems.append("empty sample ids (object removed?)")
        elif name == "sample_ids_utf8":
            # foreign readers take ids from these bytes: they must be the very ids kdtrack reads
            decoded = decode_ids(values)
            if "" in decoded:
                problems.append("empty sample_ids_utf8 (object removed?)")
            elif ids is not None and "" not in ids and decoded != ids:
                problems.append("sample_ids_utf8 disagrees with sample_ids")
        elif name == "labels" and (values <= LABEL_FILL).any():
            problems.append("invalid labels (object removed?)")
    return "; ".join(problems)


def _read_rows(array: zarr.Array, rows: np.ndarray, chunk_rows: int) -> np.ndarray:
    """`array[rows]` for rows in any order, read chunk by chunk; rows of an unreadable chunk come back NaN."""
    out = np.full((len(rows), *array.shape[1:]), np.nan, dtype=np.float32)
    chunk_of = rows // chunk_rows
    for c in np.unique(chunk_of).tolist():
        where = np.flatnonzero(chunk_of == c)
        unique, inverse = np.unique(rows[where], return_inverse=True)
        try:
            out[where] = array.get_orthogonal_selection((unique,))[inverse]
        except Exception:  # any decode failure: integrity names the chunk; here its rows simply fail
            continue
    return out


def _recompute(model: nn.Module, dataset: IndexedDataset, rows: np.ndarray, device: torch.device,
               amp_dtype: torch.dtype | None) -> np.ndarray:
    model.eval()
    parts = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        for lo in range(0, len(rows), _FIDELITY_BATCH):
            some = rows[lo:lo + _FIDELITY_BATCH]
            x = dataset.batch(some)[0].to(device)
            parts.append(forward(model, x, torch.as_tensor(some)).float().cpu().numpy())
    return np.concatenate(parts) if parts else np.empty((0,), dtype=np.float32)  # reshaped by the caller


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:160]


def _head(values: Sequence[Any]) -> str:
    shown = ", ".join(str(v) for v in values[:_SHOW])
    return f"[{shown}{', ...' if len(values) > _SHOW else ''}]"
