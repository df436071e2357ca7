"""The training loop: devices, AMP, determinism, one epoch, evaluation, and `fit` with an epoch callback.

Nothing here knows about experiments, tracking or files; those are callbacks supplied by the caller.
Batches are `(x, y, row, domain, ...)` with `y == -1` for unlabelled rows.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdtrack import distributed
from kdtrack.errors import ConfigError, TrainingError
from kdtrack.optim import build_optimizer, build_scheduler
from kdtrack.progress import Progress

__all__ = [
    "SupervisedLoss", "amp_dtype", "build_optimizer", "build_scheduler", "evaluate", "fit", "make_scaler",
    "masked_cross_entropy", "resolve_device", "seed_everything", "train_one_epoch",
]

# A loss returns the student logits and named scalar terms; the engine minimises their sum.
LossFn = Callable[[nn.Module, Sequence[Any], int], tuple[torch.Tensor, dict[str, torch.Tensor]]]
EpochCallback = Callable[[int, dict[str, float]], None]

CHECK_EVERY = 50  # steps between host syncs that look for a non-finite loss


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; an unavailable device is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}", "use one of: auto, cpu, cuda, cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but CUDA is not available here",
                              "set device=auto or device=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist",
                f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}",
            )
    elif device.type != "cpu":
        raise ConfigError(f"device type {device.type!r} is not supported", "use one of: auto, cpu, cuda, cuda:N")
    return device


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices); make cuDNN pick deterministic kernels."""
    _seed_rngs(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for `train.amp`: auto (fp16 on CUDA, off on CPU) | off | fp16 (CUDA) | bf16."""
    if mode == "off":
        return None
    if mode == "auto":
        return torch.float16 if device.type == "cuda" else None
    if mode == "fp16":
        if device.type != "cuda":
            raise ConfigError(f"train.amp=fp16 needs a CUDA device, not {device}", "use train.amp=bf16 or off on CPU")
        return torch.float16
    if mode == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"this GPU ({device}) does not support bfloat16", "use train.amp=fp16 or auto")
        return torch.bfloat16
    raise ConfigError(f"unknown train.amp {mode!r}", "use one of: auto, off, fp16, bf16")


def make_scaler(dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 on CUDA (whose gradients can underflow); None otherwise, bf16 included."""
    if dtype == torch.float16 and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


def masked_cross_entropy(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0,
                         mix: Any | None = None) -> torch.Tensor:
    """Mean CE over rows with `y >= 0`; exactly 0 (still differentiable) when no row is labelled. No host sync.

    With `mix` (an augment.Mix: the batch's inputs were mixed), row i's loss is λ_i·CE(y_i) + (1-λ_i)·CE(y_j) with
    j its partner, over the rows whose own and partner's labels are both known."""
    def ce(labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none", label_smoothing=label_smoothing)

    if mix is None:
        labelled = y >= 0
        per_row = ce(y)
    else:
        partner = y[mix.partner]
        labelled = (y >= 0) & (partner >= 0)
        lam = mix.lam.float()
        per_row = lam * ce(y) + (1 - lam) * ce(partner)
    return (per_row * labelled).sum() / labelled.sum().clamp(min=1)


def batch_mix(batch: Sequence[Any]) -> Any | None:
    """The augment.Mix an augmenting loss appended to a training batch (x, y, row, domain, mix); None otherwise."""
    return batch[4] if len(batch) > 4 else None


class LabelledCE:
    """The mean plain CE (no smoothing) on labelled rows over the steps since the last `pop`: `train/ce_labelled`,
    the one figure every student and teacher logs, so a KD student and its no-KD baseline compare on it."""

    def __init__(self) -> None:
        self._sum: torch.Tensor | None = None  # on the loss's device: no host sync per step
        self._steps = 0

    def add(self, logits: torch.Tensor, y: torch.Tensor, ce: torch.Tensor | None = None,
            mix: Any | None = None) -> None:
        """Count one step; `ce` is that plain CE when the caller has it already (`mix`: mixed as the inputs were)."""
        plain = (masked_cross_entropy(logits, y, mix=mix) if ce is None else ce).detach()
        self._sum = plain if self._sum is None else self._sum + plain
        self._steps += 1

    def pop(self) -> dict[str, float]:
        """`{"ce_labelled": mean}` (one host sync), then reset; {} if no step ran."""
        if self._sum is None:
            return {}
        mean = float(self._sum) / self._steps
        self._sum, self._steps = None, 0
        return {"ce_labelled": mean}


class SupervisedLoss:
    """Plain supervised training: `(model, batch, epoch) -> (logits, {"ce": loss})`, unlabelled rows skipped;
    `pop_stats` gives `ce_labelled` (LabelledCE)."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label smoothing must be in [0, 1), got {label_smoothing}",
                              "e.g. train.label_smoothing=0.1")
        self.label_smoothing = label_smoothing
        self.stats = LabelledCE()

    def __call__(
        self, model: nn.Module, batch: Sequence[Any], epoch: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(batch[0])  # (B, C)
        mix = batch_mix(batch)
        loss = masked_cross_entropy(logits, batch[1], self.label_smoothing, mix)
        self.stats.add(logits, batch[1], loss if self.label_smoothing == 0 else None, mix)
        return logits, {"ce": loss}

    def pop_stats(self) -> dict[str, float]:
        return self.stats.pop()


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[Sequence[Any]],
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    epoch: int,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    progress: bool | None = False,
) -> dict[str, float]:
    """One pass over `loader`: `loss`, `loss_<term>`, `acc` (labelled rows), `seconds`, `data_seconds`.

    A non-finite loss raises TrainingError naming the epoch and step (both counted from 0). Under DDP the
    loss and accuracy are over every rank's batches; the times are this rank's.
    """
    model.train()
    meter = _Meter(device)
    start = time.perf_counter()
    data_seconds, step = 0.0, 0
    with Progress(_length(loader), f"epoch {epoch}", unit="batch", enabled=progress) as bar:
        wait = time.perf_counter()
        for batch in loader:
            data_seconds += time.perf_counter() - wait
            batch = _to_device(batch, device)
            logits, terms = _optimizer_step(model, batch, loss_fn, optimizer, epoch, device, scaler, amp_dtype)
            meter.add(step, logits, terms, batch[1])
            step += 1
            if step % CHECK_EVERY == 0:
                meter.check(epoch)
                bar.set_postfix(loss=meter.mean_loss())  # the check above has already synced
            bar.update()
            wait = time.perf_counter()
    if step == 0:
        raise TrainingError(f"the training loader yielded no batches in epoch {epoch}",
                            "check the train split is not empty and batch_size / drop_last settings")
    meter.check(epoch)
    meter.sum_over_ranks()
    summary = meter.summary()
    summary.update(seconds=time.perf_counter() - start, data_seconds=data_seconds)
    return summary


def evaluate(
    model: nn.Module,
    loader: Iterable[Sequence[Any]],
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """CE `loss` and `acc` over labelled rows and their count `n`; nan loss/acc when there are none."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    labelled = torch.zeros((), dtype=torch.long, device=device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        for batch in loader:
            x = batch[0].to(device, non_blocking=True)
            y = batch[1].to(device, non_blocking=True)
            logits = model(x)  # (B, C)
            mask = y >= 0
            per_row = F.cross_entropy(logits.float(), y.clamp(min=0), reduction="none")
            loss_sum += (per_row * mask).sum()
            correct += ((logits.argmax(dim=1) == y) & mask).sum()
            labelled += mask.sum()
    model.train(was_training)
    n = int(labelled)
    if n == 0:
        return {"loss": math.nan, "acc": math.nan, "n": 0}
    return {"loss": loss_sum.item() / n, "acc": correct.item() / n, "n": n}


def fit(
    model: nn.Module,
    train_loader: Iterable[Sequence[Any]],
    optimizer: torch.optim.Optimizer,
    *,
    loss_fn: LossFn,
    epochs: int,
    device: torch.device,
    scheduler: Any | None = None,
    val_loader: Iterable[Sequence[Any]] | None = None,
    start_epoch: int = 0,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    seed: int = 0,
    on_epoch_end: EpochCallback | None = None,
    progress: bool | None = False,
    eval_model: nn.Module | None = None,
) -> list[dict[str, float]]:
    """Run epochs `start_epoch .. epochs-1`, calling `on_epoch_end(epoch, metrics)` after each; return all metrics.

    RNGs are reseeded with `seed + epoch` each epoch, so a resumed run replays dropout and shuffling exactly.
    `eval_model` is what `val_loader` evaluates (default `model`; the inner module of a DDP wrapper).
    """
    history = []
    for epoch in range(start_epoch, epochs):
        start = time.perf_counter()
        _seed_rngs(seed + epoch)
        _set_epoch(train_loader, epoch)
        lr = float(optimizer.param_groups[0]["lr"])  # the rate this epoch trains with (first param group)
        train = train_one_epoch(model, train_loader, loss_fn, optimizer, device=device, epoch=epoch,
                                scaler=scaler, amp_dtype=amp_dtype, progress=progress)
        metrics = {"train/loss": train["loss"], "train/acc": train["acc"]}
        metrics.update({f"train/{k}": v for k, v in train.items() if k.startswith("loss_")})
        if val_loader is not None:
            val = evaluate(model if eval_model is None else eval_model, val_loader, device=device, amp_dtype=amp_dtype)
            metrics.update({"val/loss": val["loss"], "val/acc": val["acc"]})
        if scheduler is not None:
            scheduler.step()
        metrics.update(lr=lr, epoch_seconds=time.perf_counter() - start, data_seconds=train["data_seconds"])
        history.append(metrics)
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)
    return history


class _Meter:
    """Per-epoch sums kept on the device so a step costs no host sync; `check` and `summary` sync."""

    def __init__(self, device: torch.device) -> None:
        self.names: list[str] = []
        self.sums = torch.zeros((), device=device)  # (1 + T,) once the terms are known: total, then each term
        self.bad_values = self.sums
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)  # first step with a non-finite loss
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.labelled = torch.zeros((), dtype=torch.long, device=device)
        self.steps = 0

    def add(self, step: int, logits: torch.Tensor, terms: dict[str, torch.Tensor], y: torch.Tensor) -> None:
        if not self.names:
            self.names = list(terms)
        elif list(terms) != self.names:
            raise TrainingError(f"loss terms changed from {self.names} to {list(terms)} at step {step}",
                                "return the same named terms from the loss function at every step")
        parts = [t.detach().float().reshape(()) for t in terms.values()]
        values = torch.stack([torch.stack(parts).sum(), *parts])  # (1 + T,)
        newly_bad = ~torch.isfinite(values).all() & (self.bad_step < 0)
        self.bad_step = torch.where(newly_bad, step, self.bad_step)
        self.bad_values = torch.where(newly_bad, values, self.bad_values)
        self.sums = self.sums + values
        mask = y >= 0
        self.correct += ((logits.detach().argmax(dim=1) == y) & mask).sum()
        self.labelled += mask.sum()
        self.steps += 1

    def check(self, epoch: int) -> None:
        bad_step = int(self.bad_step)
        if bad_step < 0:
            return
        values = self.bad_values.tolist()
        detail = ", ".join(f"{name}={v:.4g}" for name, v in zip(["loss", *self.names], values))
        raise TrainingError(f"non-finite loss at epoch {epoch}, step {bad_step} ({detail})",
                            "lower the learning rate (optim.lr for a teacher, student.optim.lr for a student), "
                            "check the inputs for nan/inf, or set train.amp=off")

    def sum_over_ranks(self) -> None:
        """Add up every rank's sums and counts (one collective); nothing happens outside a process group."""
        if not distributed.active():
            return
        packed = torch.cat([self.sums.reshape(-1).double(),
                            torch.stack([self.correct, self.labelled]).double(),
                            torch.tensor([float(self.steps)], dtype=torch.float64, device=self.sums.device)])
        packed = distributed.all_reduce_sum(packed)
        terms = self.sums.numel()
        self.sums = packed[:terms].to(self.sums.dtype).reshape(self.sums.shape)
        self.correct, self.labelled = packed[terms:terms + 2].long()
        self.steps = int(packed[-1])

    def mean_loss(self) -> float:
        return float(self.sums[0]) / max(self.steps, 1)

    def summary(self) -> dict[str, float]:
        means = (self.sums / self.steps).tolist()
        out = {"loss": means[0], **{f"loss_{name}": v for name, v in zip(self.names, means[1:])}}
        labelled = int(self.labelled)
        out["acc"] = int(self.correct) / labelled if labelled else math.nan
        return out


def _optimizer_step(
    model: nn.Module, batch: Sequence[Any], loss_fn: LossFn, optimizer: torch.optim.Optimizer, epoch: int,
    device: torch.device, scaler: torch.amp.GradScaler | None, dtype: torch.dtype | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        logits, terms = loss_fn(model, batch, epoch)
    if not terms:
        raise TrainingError("the loss function returned no loss terms", "return (logits, {'name': loss_tensor, ...})")
    total = torch.stack([t.float().reshape(()) for t in terms.values()]).sum()
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.step(optimizer)  # skips the update when fp16 gradients overflowed
        scaler.update()
    else:
        total.backward()
        optimizer.step()
    return logits, terms


def _to_device(batch: Sequence[Any], device: torch.device) -> tuple[Any, ...]:
    # non_blocking overlaps the copy with compute when the loader pins memory.
    return tuple(t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t for t in batch)


def _length(loader: Iterable[Any]) -> int:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:  # iterable-style datasets have no length: the bar shows count and rate only
        return 0


def _set_epoch(loader: Any, epoch: int) -> None:
    for sampler in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)


def _seed_rngs(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too
