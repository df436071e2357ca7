"""Student epoch cost: plain training vs KD from the logit cache vs KD with the teacher running online."""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from benchmarks import fixtures
from benchmarks.measure import interleaved
from benchmarks.report import Figure, Result, Target
from benchmarks.settings import Settings
from kdtrack import engine
from kdtrack.data import make_loader
from kdtrack.losses.kd import KDLossConfig, LogitKD

NAME = "epoch_cost"
TARGET = Target("<=", 1.05)


def run(settings: Settings) -> Result:
    """Seconds per student epoch for each variant, rounds interleaved; cached/plain has the target."""
    device = settings.torch_device
    ds = fixtures.dataset(settings.epoch_rows, settings.input_shape, settings.num_classes)
    teacher = fixtures.model(settings.teacher, ds, device, seed=1).eval()
    table = fixtures.cached_table(settings.workdir / "epoch_cost.zarr", settings.teacher, teacher, ds, device,
                                  batch_size=settings.build_batch, amp_dtype=settings.amp_dtype)
    loader = make_loader(ds, settings.train_batch, shuffle=True, seed=0, device=device, drop_last=True)

    def online(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        with torch.no_grad():
            return teacher(batch[0])  # (B, C), under the engine's autocast

    student = fixtures.model(settings.student, ds, device, seed=2)
    losses = {"plain": engine.SupervisedLoss(),
              "cached": LogitKD(lambda batch: table[batch[2]], KDLossConfig()),  # rows are dataset rows
              "online": LogitKD(online, KDLossConfig())}
    variants = {name: _epoch_fn(copy.deepcopy(student), loader, loss, settings) for name, loss in losses.items()}
    raw = interleaved(variants, settings.repeats, device=device)
    figures = [Figure.ratio("cached KD / plain epoch time", raw, "cached", "plain", TARGET),
               Figure.ratio("online KD / cached KD epoch time", raw, "online", "cached")]
    params = {"teacher": settings.teacher, "student": settings.student, "rows": len(ds),
              "batch_size": settings.train_batch, "steps_per_epoch": len(loader), "num_classes": ds.num_classes,
              "input_shape": list(ds.input_shape), "cache_dtype": "float16", "amp": str(settings.amp_dtype)}
    notes = [f"{settings.student} student, {settings.teacher} teacher (random weights: cost does not depend on "
             f"training), {len(ds)} rows x {list(ds.input_shape)}, {len(loader)} steps per epoch"]
    return Result(NAME, "Student epoch cost", params, raw, {k: "s" for k in raw}, figures, notes)


def _epoch_fn(student: nn.Module, loader: DataLoader, loss: engine.LossFn, settings: Settings) -> Callable[[int], None]:
    """One training epoch of `student` with `loss`; every variant gets the same batch order in the same round."""
    device = settings.torch_device
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    scaler = engine.make_scaler(settings.amp_dtype, device)

    def epoch(round_index: int) -> None:
        loader.sampler.set_epoch(round_index)
        engine.train_one_epoch(student, loader, loss, optimizer, device=device, epoch=max(round_index, 0),
                               scaler=scaler, amp_dtype=settings.amp_dtype)
        if isinstance(loss, LogitKD):
            loss.pop_stats()  # what the student stage logs each epoch: one host sync

    return epoch
