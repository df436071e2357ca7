"""Engine: losses, the NaN guard, fit's callback and schedule, evaluation, AMP/device choices, progress bar."""
from __future__ import annotations

import io
import math
import time
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from kdtrack import engine
from kdtrack.config import OptimConfig
from kdtrack.engine import SupervisedLoss, evaluate, fit, masked_cross_entropy, train_one_epoch
from kdtrack.errors import ConfigError, TrainingError
from kdtrack.optim import build_optimizer, build_scheduler
from kdtrack.progress import Progress

CPU = torch.device("cpu")


def ce(logits: list[float], label: int) -> float:
    """Cross-entropy by hand: logsumexp minus the true logit."""
    return math.log(sum(math.exp(v) for v in logits)) - logits[label]


def loader_of(x: torch.Tensor, y: torch.Tensor, batch_size: int = 4, sampler: Sampler | None = None) -> DataLoader:
    n = len(y)
    data = TensorDataset(x, y, torch.arange(n), torch.zeros(n, dtype=torch.long))
    return DataLoader(data, batch_size=batch_size, sampler=sampler)


class RecordingSampler(Sampler[int]):
    """Sequential order; remembers every set_epoch call."""

    def __init__(self, n: int) -> None:
        self.n, self.epochs = n, []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __iter__(self):
        return iter(range(self.n))

    def __len__(self) -> int:
        return self.n


def blobs(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=gen)
    x = torch.randn(n, 2, generator=gen) * 0.5 + (y[:, None] * 2 - 1) * 2.0  # centres at (-2,-2) and (2,2)
    return x, y


def test_supervised_loss_skips_unlabelled_rows() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [5.0, 5.0, 5.0], [0.5, 1.5, 0.0], [9.0, -9.0, 0.0]])
    y = torch.tensor([0, -1, 1, -1])
    _, terms = SupervisedLoss()(nn.Identity(), (logits, y, None, None), epoch=0)
    expected = (ce([2.0, 0.0, -1.0], 0) + ce([0.5, 1.5, 0.0], 1)) / 2
    assert terms["ce"].item() == pytest.approx(expected, rel=1e-6)
    scrambled = logits.clone()
    scrambled[[1, 3]] = torch.tensor([[-3.0, 7.0, 1.0], [0.0, 0.0, 4.0]])
    assert masked_cross_entropy(scrambled, y).item() == pytest.approx(expected, rel=1e-6)


def test_all_unlabelled_batch_gives_zero_with_a_gradient() -> None:
    logits = torch.randn(3, 4, requires_grad=True)
    loss = masked_cross_entropy(logits, torch.full((3,), -1))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(3, 4))


def test_label_smoothing_matches_hand_computation() -> None:
    logits, eps = [2.0, 0.0, -1.0], 0.3
    x, y = torch.tensor([logits]), torch.tensor([0])
    plain = SupervisedLoss()(nn.Identity(), (x, y), 0)[1]["ce"].item()
    smooth = SupervisedLoss(label_smoothing=eps)(nn.Identity(), (x, y), 0)[1]["ce"].item()
    # Smoothed target (1-eps) one-hot + eps/K uniform: loss moves by eps * (mean_k CE_k - CE_y).
    mean_all = sum(ce(logits, k) for k in range(3)) / 3
    assert smooth - plain == pytest.approx(eps * (mean_all - ce(logits, 0)), rel=1e-5)
    with pytest.raises(ConfigError):
        SupervisedLoss(label_smoothing=1.0)


class NanAt(nn.Module):
    """A linear model whose output turns NaN on the forward call numbered `bad_call` (from 0)."""

    def __init__(self, bad_call: int) -> None:
        super().__init__()
        self.linear, self.bad_call, self.calls = nn.Linear(2, 2), bad_call, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        if self.calls == self.bad_call:
            out = out * float("nan")
        self.calls += 1
        return out


@pytest.mark.parametrize("n_batches, stopped_after", [(6, 6), (60, engine.CHECK_EVERY)])
def test_nan_loss_names_epoch_and_first_bad_step(n_batches: int, stopped_after: int) -> None:
    model = NanAt(bad_call=3)
    x, y = blobs(n_batches * 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TrainingError, match=r"epoch 5, step 3\b"):
        train_one_epoch(model, loader_of(x, y, batch_size=2), SupervisedLoss(), optimizer, device=CPU, epoch=5)
    assert model.calls == stopped_after  # the periodic check stops a long epoch early


def test_fit_reports_every_metric_and_follows_the_cosine_schedule() -> None:
    x, y = blobs(40)
    y[:3] = -1
    sampler = RecordingSampler(len(y))
    model = nn.Linear(2, 2)
    cfg = OptimConfig(name="sgd", lr=0.1, epochs=4, schedule="cosine")
    optimizer = build_optimizer(model.parameters(), cfg)
    seen = []
    history = fit(model, loader_of(x, y, 8, sampler), optimizer, loss_fn=SupervisedLoss(), epochs=4, device=CPU,
                  scheduler=build_scheduler(optimizer, cfg), val_loader=loader_of(x, y, 16),
                  on_epoch_end=lambda epoch, metrics: seen.append((epoch, metrics)))
    assert [epoch for epoch, _ in seen] == [0, 1, 2, 3] and sampler.epochs == [0, 1, 2, 3]
    assert history == [metrics for _, metrics in seen]
    keys = {"train/loss", "train/acc", "train/loss_ce", "val/loss", "val/acc", "lr", "epoch_seconds", "data_seconds"}
    assert all(metrics.keys() == keys for metrics in history)
    assert [m["lr"] for m in history] == pytest.approx([0.1 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)])
    assert all(m["train/loss"] == pytest.approx(m["train/loss_ce"]) for m in history)


def test_fit_resumes_at_start_epoch_without_validation() -> None:
    x, y = blobs(16)
    sampler, seen = RecordingSampler(16), []
    model = nn.Linear(2, 2)
    fit(model, loader_of(x, y, 8, sampler), torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=SupervisedLoss(),
        epochs=4, device=CPU, start_epoch=2, on_epoch_end=lambda e, m: seen.append((e, m)))
    assert [e for e, _ in seen] == [2, 3] and sampler.epochs == [2, 3]
    assert "val/acc" not in seen[0][1]


def test_terms_are_summed_and_data_wait_is_timed() -> None:
    x, y = blobs(12)

    def two_terms(model, batch, epoch):
        logits = model(batch[0])
        base = masked_cross_entropy(logits, batch[1])
        return logits, {"ce": base, "half": 0.5 * base}

    def slow_loader():
        for batch in loader_of(x, y, 4):
            time.sleep(0.02)
            yield batch

    model = nn.Linear(2, 2)
    out = train_one_epoch(model, slow_loader(), two_terms, torch.optim.SGD(model.parameters(), lr=0.0),
                          device=CPU, epoch=0)
    assert out["loss"] == pytest.approx(out["loss_ce"] + out["loss_half"]) and out["loss_half"] > 0
    assert out["loss_half"] == pytest.approx(0.5 * out["loss_ce"])
    assert 0.06 <= out["data_seconds"] <= out["seconds"]


def test_evaluate_accuracy_equals_hand_count() -> None:
    logits = torch.tensor([[3.0, 1.0], [0.0, 2.0], [1.0, 0.0], [0.0, 5.0], [2.0, 1.0], [4.0, 0.0]])
    y = torch.tensor([0, 1, 1, -1, 1, -1])  # predictions 0,1,0,(1),0,(0): 2 of 4 labelled correct
    model = nn.Identity().train()
    out = evaluate(model, loader_of(logits, y, batch_size=4), device=CPU)
    assert out["acc"] == 0.5 and out["n"] == 4
    expected = (ce([3.0, 1.0], 0) + ce([0.0, 2.0], 1) + ce([1.0, 0.0], 1) + ce([2.0, 1.0], 1)) / 4
    assert out["loss"] == pytest.approx(expected, rel=1e-6)
    assert model.training  # evaluate restores the mode it found

    unlabelled = evaluate(model, loader_of(logits, torch.full((6,), -1)), device=CPU)
    empty = evaluate(model, loader_of(logits[:0], y[:0]), device=CPU)
    for result in (unlabelled, empty):
        assert math.isnan(result["acc"]) and math.isnan(result["loss"]) and result["n"] == 0


def test_learns_a_separable_problem() -> None:
    engine.seed_everything(0)
    x, y = blobs(256)
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))
    cfg = OptimConfig(name="sgd", lr=0.1, epochs=5)
    optimizer = build_optimizer(model.parameters(), cfg)
    history = fit(model, loader_of(x, y, 32), optimizer, loss_fn=SupervisedLoss(), epochs=5, device=CPU,
                  scheduler=build_scheduler(optimizer, cfg), val_loader=loader_of(*blobs(200, seed=1), 64))
    assert history[-1]["val/acc"] >= 0.97
    assert history[-1]["train/loss"] < history[0]["train/loss"]


def test_bf16_autocast_runs_on_cpu() -> None:
    seen = []

    def loss_fn(model, batch, epoch):
        logits, terms = SupervisedLoss()(model, batch, epoch)
        seen.append(logits.dtype)
        return logits, terms

    x, y = blobs(32)
    torch.manual_seed(0)
    model, reference = nn.Linear(2, 2), nn.Linear(2, 2)
    reference.load_state_dict(model.state_dict())
    dtype = engine.amp_dtype("bf16", CPU)
    out = train_one_epoch(model, loader_of(x, y, 8), loss_fn, torch.optim.SGD(model.parameters(), lr=0.1),
                          device=CPU, epoch=0, amp_dtype=dtype, scaler=torch.amp.GradScaler("cpu"))
    plain = train_one_epoch(reference, loader_of(x, y, 8), SupervisedLoss(),
                            torch.optim.SGD(reference.parameters(), lr=0.1), device=CPU, epoch=0)
    assert set(seen) == {torch.bfloat16} and model.weight.dtype == torch.float32
    # bf16 keeps about 3 significant digits: the same epoch in float32 agrees to that
    assert out["loss"] == pytest.approx(plain["loss"], rel=2e-2)
    # evaluation autocasts too: close to the float32 figure, but not equal to it
    half = evaluate(model, loader_of(x, y), device=CPU, amp_dtype=dtype)["loss"]
    full = evaluate(model, loader_of(x, y), device=CPU)["loss"]
    assert half == pytest.approx(full, rel=2e-2) and half != full


def test_amp_and_scaler_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")
    assert engine.amp_dtype("auto", CPU) is None and engine.amp_dtype("off", cuda) is None
    assert engine.amp_dtype("auto", cuda) is torch.float16 and engine.amp_dtype("fp16", cuda) is torch.float16
    assert engine.amp_dtype("bf16", CPU) is torch.bfloat16
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        engine.amp_dtype("fp16", CPU)
    with pytest.raises(ConfigError, match="auto, off, fp16, bf16"):
        engine.amp_dtype("fp8", CPU)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(ConfigError, match="bfloat16"):
        engine.amp_dtype("bf16", cuda)
    assert engine.make_scaler(torch.bfloat16, cuda) is None and engine.make_scaler(torch.float16, CPU) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no CUDA here: the scaler warns that it is disabled
        assert isinstance(engine.make_scaler(torch.float16, cuda), torch.amp.GradScaler)


def test_resolve_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert engine.resolve_device("auto") == CPU and engine.resolve_device("cpu") == CPU
    with pytest.raises(ConfigError, match="CUDA is not available.*device=cpu"):
        engine.resolve_device("cuda")
    with pytest.raises(ConfigError, match="unknown device"):
        engine.resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert engine.resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ConfigError, match="only 1 CUDA device"):
        engine.resolve_device("cuda:3")


def test_builders_reject_unknown_names() -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="sgd, adamw"):
        build_optimizer(model.parameters(), OptimConfig(name="lion"))
    optimizer = build_optimizer(model.parameters(), OptimConfig(name="sgd", lr=1.0))
    assert optimizer.param_groups[0]["nesterov"] and optimizer.param_groups[0]["momentum"] == 0.9
    with pytest.raises(ConfigError, match="cosine, step, none"):
        build_scheduler(optimizer, OptimConfig(schedule="linear"))
    assert build_scheduler(optimizer, OptimConfig(schedule="none")) is None
    step = build_scheduler(optimizer, OptimConfig(schedule="step", step_size=2, gamma=0.1))
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        step.step()
    assert lrs == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01])


def test_seed_everything_replays_and_pins_cudnn() -> None:
    engine.seed_everything(5)
    first = torch.rand(3)
    engine.seed_everything(5)
    assert torch.equal(torch.rand(3), first)
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark


def test_progress_draws_when_enabled() -> None:
    stream = io.StringIO()
    with Progress(1000, "cache", unit="rows", enabled=True, stream=stream, min_interval=0.0) as bar:
        bar.update(450)
        assert stream.getvalue().startswith("\rcache  45%|████▌     | 450/1000 [")
        bar.set_postfix(loss=0.123456)
        bar.update(1)
        assert "loss=0.1235" in stream.getvalue()
    assert stream.getvalue().endswith("\n") and stream.getvalue().count("\n") == 1

    bar = Progress(1000, "cache", unit="rows", enabled=True, stream=io.StringIO())
    bar.n, bar._start = 450, 0.0
    assert bar.render(now=10.0) == "cache  45%|████▌     | 450/1000 [45.0 rows/s, ETA 0:12]"


def test_progress_throttles_and_stays_silent_when_disabled() -> None:
    stream = io.StringIO()
    with Progress(1000, "x", enabled=True, stream=stream, min_interval=3600.0) as bar:
        for _ in range(1000):
            bar.update()
    assert stream.getvalue().count("\r") == 2  # first update and reaching the total; close adds only "\n"

    for enabled in (False, None):  # None: a StringIO is not a terminal
        quiet = io.StringIO()
        with Progress(10, "x", enabled=enabled, stream=quiet) as bar:
            bar.update(10)
        assert quiet.getvalue() == "" and bar.n == 10
