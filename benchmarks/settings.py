"""Sizes of every benchmark at each scale, and the device, threads and scratch folder they run with."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdtrack import engine


@dataclass(frozen=True)
class Settings:
    """One suite run. Row counts are per benchmark; `repeats` is the number of interleaved rounds per variant."""

    scale: str
    device: str
    threads: int
    workdir: Path
    repeats: int
    input_shape: tuple[int, ...]
    num_classes: int
    teacher: str  # epoch cost and cache build: the realistic pair
    student: str
    epoch_rows: int
    train_batch: int
    build_rows: int
    build_batch: int
    lookup_rows: int  # store rows, and .npy files of the per-sample baseline
    lookup_batch: int
    lookup_rounds: int
    storage_rows: int
    data_files: int  # data loading: one .npy file per sample
    scaling_rows: int  # N of N, 4N, 16N
    scaling_repeats: int
    scaling_input_shape: tuple[int, ...]
    scaling_num_classes: int

    @property
    def torch_device(self) -> torch.device:
        return engine.resolve_device(self.device)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """fp16 autocast on CUDA, as the cache-logits stage uses by default; none on CPU."""
        return engine.amp_dtype("auto", self.torch_device)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["workdir"] = str(self.workdir)
        return out


# The realistic pair is resnet32x4 -> resnet8x4 (CIFAR-100 KD benchmarks); on two CPU cores it would take hours,
# so the CPU scale uses resnet20 -> resnet8 on the same 3x32x32, 100-class data. Scaling builds 1000-class
# float32 logits with a cheap teacher, so the logits of 16N rows are large next to the fixed working memory and a
# build that held them would show; N is large enough (16 chunks) that the write pipeline is full already at N.
# Many short rounds (9 on CPU) keep the medians steady on a shared machine.
SCALES: dict[str, dict[str, Any]] = {
    "quick": dict(repeats=2, input_shape=(3, 8, 8), num_classes=100, teacher="resnet8", student="resnet8",
                  epoch_rows=128, train_batch=32, build_rows=256, build_batch=64,
                  lookup_rows=2_000, lookup_batch=256, lookup_rounds=5, storage_rows=2_000, data_files=500,
                  scaling_rows=256, scaling_repeats=1, scaling_input_shape=(3, 8, 8), scaling_num_classes=1000),
    "small": dict(repeats=9, input_shape=(3, 32, 32), num_classes=100, teacher="resnet20", student="resnet8",
                  epoch_rows=1_024, train_batch=64, build_rows=2_048, build_batch=256,
                  lookup_rows=1_000_000, lookup_batch=256, lookup_rounds=30, storage_rows=100_000, data_files=20_000,
                  scaling_rows=16_384, scaling_repeats=3, scaling_input_shape=(3, 16, 16), scaling_num_classes=1000),
    "large": dict(repeats=5, input_shape=(3, 32, 32), num_classes=100, teacher="resnet32x4", student="resnet8x4",
                  epoch_rows=50_000, train_batch=128, build_rows=100_000, build_batch=1024,
                  lookup_rows=1_000_000, lookup_batch=256, lookup_rounds=30, storage_rows=1_000_000, data_files=60_000,
                  scaling_rows=32_768, scaling_repeats=3, scaling_input_shape=(3, 16, 16), scaling_num_classes=1000),
}


def make_settings(scale: str, *, device: str, threads: int, workdir: Path, repeats: int | None = None,
                  **overrides: Any) -> Settings:
    """Settings of a named scale; `overrides` replace single sizes (tests use tiny ones)."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    sizes = {**SCALES[scale], **overrides}
    if repeats is not None:
        sizes["repeats"] = repeats
    return Settings(scale=scale, device=device, threads=threads, workdir=Path(workdir), **sizes)
