"""Augmentation ops: validated specs, each op by what it does, and every draw a function of (seed, tag, row)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from kdtrack import augment
from kdtrack.errors import ConfigError

ROWS = torch.arange(100, 164)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)  # the test data; the augmentations draw from (seed, tag, row) alone


def _images(n: int = 64, shape: tuple[int, ...] = (2, 6, 7)) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(0))


def _run(specs: list[str], x: torch.Tensor, rows: torch.Tensor = ROWS, tag: int = 0, seed: int = 5):
    return augment.Augmenter(augment.parse(specs), seed)(x, rows, tag)


@pytest.mark.parametrize(("specs", "message"), [
    (["rotate"], "data.augment: unknown augmentation 'rotate'"),
    (["crop"], "data.augment: crop needs padding"),
    (["crop(pad=4)"], r"data.augment: crop does not take 'pad=4' \(it takes padding\)"),
    (["crop(padding=0)"], "data.augment: crop padding must be > 0, got 0"),
    (["crop(padding=2.5)"], "data.augment: crop padding must be an integer, got '2.5'"),
    (["shift(max=3, mode=wrap)"], "data.augment: shift mode must be circular or pad, got wrap"),
    (["freq_mixstyle(alpha=0.3, p=2)"], r"data.augment: freq_mixstyle p must be in \[0, 1\], got 2"),
    (["flip(p=0.5)"], "data.augment: flip does not take 'p=0.5' \\(it takes no parameters\\)"),
    (["flip", "flip"], "data.augment lists flip twice"),
    (["mixup(alpha=0.2)", "flip"], r"data.augment lists a batch op \(mixup\) before a per-sample op"),
])
def test_bad_specs_are_one_line_errors(specs: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        augment.parse(specs)


def test_specs_parse_with_defaults_filled_in() -> None:
    ops = augment.parse(["crop(padding=4)", " flip ", "shift(max=3)", "noise(std=0.5)", "freq_mixstyle(alpha=0.3)"])
    assert [str(op) for op in ops] == ["crop(padding=4)", "flip", "shift(max=3, mode=circular)", "noise(std=0.5)",
                                       "freq_mixstyle(alpha=0.3, p=0.5)"]
    assert ops[0].params == {"padding": 4} and isinstance(ops[0].params["padding"], int)


def test_uniform_draws_are_uniform_and_keyed_by_every_part() -> None:
    u = augment.uniform(1, 2, torch.arange(200_000), 3)[:, 0].numpy()
    counts, _ = np.histogram(u, bins=20, range=(0, 1))
    assert u.min() >= 0 and u.max() < 1
    assert np.abs(counts - 10_000).max() < 500  # about 5 standard deviations of a bin count
    base = augment.hashed(1, 2, torch.arange(50), 3, count=2)
    for changed in (augment.hashed(2, 2, torch.arange(50), 3, 2), augment.hashed(1, 3, torch.arange(50), 3, 2),
                    augment.hashed(1, 2, torch.arange(50) + 2**32, 3, 2), augment.hashed(1, 2, torch.arange(50), 4, 2),
                    augment.hashed(1 + 2**40, 2, torch.arange(50), 3, 2)):
        assert (changed != base).float().mean() > 0.95
    assert not torch.equal(base[:, 0], base[:, 1])
    n = augment.normal(0, 0, torch.arange(2000), 0, 100).numpy()
    assert abs(n.mean()) < 0.01 and abs(n.std() - 1) < 0.01


ALL_SAMPLE_OPS = ["crop(padding=2)", "flip", "shift(max=3)", "shift(max=2, mode=pad)", "gain(db=6)", "noise(std=0.3)",
                  "time_mask(max=3)", "freq_mask(max=2)"]


@pytest.mark.parametrize("spec", ALL_SAMPLE_OPS)
def test_a_sample_is_augmented_the_same_alone_or_in_any_batch(spec: str) -> None:
    """What a sample gets depends on (seed, tag, row) only: the property view-consistent caches rest on."""
    x = _images()
    whole, _ = _run([spec], x)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    shuffled, _ = _run([spec], x[order], ROWS[order])
    assert torch.equal(shuffled, whole[order])
    alone, _ = _run([spec], x[7:8], ROWS[7:8])
    assert torch.equal(alone, whole[7:8])
    again, _ = _run([spec], x)
    assert torch.equal(again, whole)
    next_epoch, _ = _run([spec], x, tag=1)
    other_seed, _ = _run([spec], x, seed=6)
    assert not torch.equal(next_epoch, whole) and not torch.equal(other_seed, whole)


def test_crop_is_a_window_of_the_zero_padded_image() -> None:
    x = _images()
    out, _ = _run(["crop(padding=2)"], x)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    offsets = set()
    for i in range(64):
        found = [(dy, dx) for dy, dx in itertools.product(range(5), range(5))
                 if torch.equal(out[i], padded[i, :, dy:dy + 6, dx:dx + 7])]
        assert found, i
        offsets.add(found[0])
    assert len(offsets) > 15  # 25 offsets possible: the draws spread over them


def test_flip_mirrors_about_half_of_the_samples() -> None:
    x = _images(400, (1, 3, 4))
    out, _ = augment.Augmenter(augment.parse(["flip"]), 0)(x, torch.arange(400), 0)
    flipped = torch.tensor([torch.equal(o, s.flip(-1)) for o, s in zip(out, x)])
    kept = torch.tensor([torch.equal(o, s) for o, s in zip(out, x)])
    assert (flipped | kept).all() and 150 < flipped.sum() < 250


@pytest.mark.parametrize("mode", ["circular", "pad"])
def test_shift_moves_the_signal_along_its_last_axis(mode: str) -> None:
    x = torch.randn(64, 2, 12)
    out, _ = _run([f"shift(max=3, mode={mode})"], x)
    seen = set()
    for i in range(64):
        for k in range(-3, 4):
            expected = torch.roll(x[i], k, dims=-1)
            if mode == "pad":  # the steps that wrapped around are zeros instead
                expected = expected.clone()
                expected[..., :k] = 0 if k > 0 else expected[..., :k]
                if k < 0:
                    expected[..., k:] = 0
            if torch.equal(out[i], expected):
                seen.add(k)
                break
        else:
            raise AssertionError(f"sample {i} is not a shift of at most 3")
    assert seen == set(range(-3, 4))


def test_gain_scales_each_sample_within_the_decibel_range() -> None:
    x = torch.rand(64, 20) + 0.5
    out, _ = _run(["gain(db=6)"], x)
    ratio = out / x
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-5)
    db = 20 * torch.log10(ratio[:, 0])
    assert db.min() >= -6 - 1e-4 and db.max() <= 6 + 1e-4 and db.max() - db.min() > 8


def test_noise_adds_gaussian_noise_of_the_given_std() -> None:
    x = torch.zeros(64, 50, 10)
    out, _ = _run(["noise(std=0.3)"], x)
    assert abs(float(out.std()) - 0.3) < 0.01 and abs(float(out.mean())) < 0.01


@pytest.mark.parametrize(("spec", "axis"), [("time_mask(max=3)", -1), ("freq_mask(max=2)", -2)])
def test_masks_zero_one_band_no_wider_than_max(spec: str, axis: int) -> None:
    x = torch.rand(64, 2, 6, 7) + 1  # no zeros of its own
    out, _ = _run([spec], x)
    widths = set()
    for i in range(64):
        zero = (out[i] == 0).movedim(axis, 0).reshape(out.shape[axis], -1)
        rows = zero.all(dim=1)
        assert (zero.any(dim=1) == rows).all()  # a band covers whole lines of the other axes
        steps = torch.nonzero(rows).flatten().tolist()
        assert steps == list(range(steps[0], steps[0] + len(steps))) if steps else True
        assert torch.equal(out[i][out[i] != 0], x[i][out[i] != 0])
        widths.add(len(steps))
    assert widths == set(range(0, (3 if axis == -1 else 2) + 1))


def test_mixup_mixes_inputs_and_targets_with_one_lambda_and_partner() -> None:
    x = _images()
    out, mix = _run(["flip", "mixup(alpha=0.4)"], x)
    flipped, _ = _run(["flip"], x)
    assert sorted(mix.partner.tolist()) == list(range(64))
    assert ((mix.lam >= 0) & (mix.lam <= 1)).all() and mix.lam.std() > 0.1
    lam = mix.lam.view(-1, 1, 1, 1)
    assert torch.allclose(out, lam * flipped + (1 - lam) * flipped[mix.partner], atol=1e-6)
    probs = torch.softmax(torch.randn(64, 5), dim=1)
    mixed = augment.mix_targets(probs, mix)
    assert torch.allclose(mixed, mix.lam[:, None] * probs + (1 - mix.lam[:, None]) * probs[mix.partner])
    assert torch.allclose(mixed.sum(dim=1), torch.ones(64))
    assert augment.mix_targets(probs, None) is probs
    again, mix_again = _run(["flip", "mixup(alpha=0.4)"], x)
    assert torch.equal(again, out) and torch.equal(mix_again.partner, mix.partner)


def test_freq_mixstyle_gives_each_sample_mixed_frequency_statistics() -> None:
    x = torch.randn(32, 2, 5, 9) * torch.rand(32, 1, 5, 1) * 3 + torch.randn(32, 1, 5, 1)
    out, mix = _run(["freq_mixstyle(alpha=0.3, p=1)"], x, ROWS[:32])
    assert mix is None  # the targets are not mixed: each sample keeps its content
    mean, std = x.mean(dim=(1, 3)), x.var(dim=(1, 3)).add(1e-6).sqrt()  # (B, F)
    got_mean, got_std = out.mean(dim=(1, 3)), out.var(dim=(1, 3)).sqrt()
    # each sample's statistics lie between its own and one partner's, with one λ for all frequencies
    solutions = []
    for i in range(32):
        if torch.allclose(got_mean[i], mean[i], atol=1e-4) and torch.allclose(got_std[i], std[i], atol=1e-3):
            solutions.append(i)  # its own partner (or λ = 1): its statistics unchanged
            continue
        for j in range(32):
            lam = ((got_mean[i] - mean[j]) / (mean[i] - mean[j])).median()
            if torch.allclose(got_mean[i], lam * mean[i] + (1 - lam) * mean[j], atol=1e-4) and \
                    torch.allclose(got_std[i], lam * std[i] + (1 - lam) * std[j], atol=1e-3):
                solutions.append(j)
                break
        else:
            raise AssertionError(f"sample {i} has no partner")
    assert sorted(solutions) == list(range(32))
    never, _ = _run(["freq_mixstyle(alpha=0.3, p=0)"], x, ROWS[:32])
    assert torch.equal(never, x)


def test_ops_refuse_data_of_the_wrong_rank() -> None:
    with pytest.raises(ConfigError, match=r"augmentation crop needs samples with at least 2 axes, got shape \(40,\)"):
        _run(["crop(padding=2)"], torch.randn(4, 40), ROWS[:4])
    with pytest.raises(ConfigError, match="augmentation freq_mixstyle needs samples with at least 3 axes"):
        _run(["freq_mixstyle(alpha=0.3)"], torch.randn(4, 5, 9), ROWS[:4])


# ---------------------------------------------------------------- mixed targets in the losses

def test_mixed_cross_entropy_mixes_the_two_labels_on_rows_whose_labels_are_both_known() -> None:
    from kdtrack.engine import masked_cross_entropy

    logits = torch.randn(4, 3)
    y = torch.tensor([0, 2, -1, 1])
    mix = augment.Mix(partner=torch.tensor([1, 0, 3, 2]), lam=torch.tensor([0.25, 0.5, 0.9, 1.0]))
    logp = logits.log_softmax(dim=1)
    by_hand = [0.25 * -logp[0, 0] + 0.75 * -logp[0, 2], 0.5 * -logp[1, 2] + 0.5 * -logp[1, 0]]  # rows 2, 3: a -1
    assert torch.allclose(masked_cross_entropy(logits, y, mix=mix), torch.stack(by_hand).mean())
    assert torch.allclose(masked_cross_entropy(logits, y), -(logp[0, 0] + logp[1, 2] + logp[3, 1]) / 3)


def test_cached_kd_targets_are_mixed_as_the_inputs_and_live_ones_are_not() -> None:
    from kdtrack.losses.kd import KDLossConfig, LogitKD

    torch.manual_seed(1)
    student, teacher = torch.nn.Linear(4, 3), torch.randn(6, 3)
    x, y, rows = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, -1, 1]), torch.arange(6)
    mix = augment.Mix(partner=torch.tensor([3, 2, 1, 0, 5, 4]), lam=torch.tensor([0.3, 0.6, 0.6, 0.3, 0.5, 0.5]))
    config = KDLossConfig(temperature=2.0, kd_alpha=1.0)
    batch = (x, y, rows, torch.zeros(6, dtype=torch.long), mix)
    _, cached = LogitKD(lambda b: teacher[b[2]], config, mixes_targets=True)(student, batch, epoch=0)
    _, live = LogitKD(lambda b: teacher[b[2]], config)(student, batch, epoch=0)
    with torch.no_grad():
        log_q = torch.log_softmax(student(x) / 2, dim=1)
        p = torch.softmax(teacher / 2, dim=1)
        lam = mix.lam[:, None]
        mixed = lam * p + (1 - lam) * p[mix.partner]
        kl = lambda target: (target * (target.log() - log_q)).sum(dim=1).mean() * 4  # noqa: E731 (T² = 4)
    assert cached["kd"].item() == pytest.approx(kl(mixed).item(), rel=1e-5)
    assert live["kd"].item() == pytest.approx(kl(p).item(), rel=1e-5)


def test_the_kd_students_ce_term_is_mixed_as_the_inputs() -> None:
    """Under KD with mixup, the CE term is λ·CE(y_i) + (1-λ)·CE(y_partner) over rows whose two labels are known,
    weighted by 1 - kd_alpha."""
    from kdtrack.losses.kd import KDLossConfig, LogitKD

    torch.manual_seed(2)
    student, teacher = torch.nn.Linear(4, 3), torch.randn(4, 3)
    x, y, rows = torch.randn(4, 4), torch.tensor([0, 2, -1, 1]), torch.arange(4)
    mix = augment.Mix(partner=torch.tensor([1, 0, 3, 2]), lam=torch.tensor([0.25, 0.5, 0.9, 1.0]))
    batch = (x, y, rows, torch.zeros(4, dtype=torch.long), mix)
    _, terms = LogitKD(lambda b: teacher[b[2]], KDLossConfig(kd_alpha=0.4))(student, batch, epoch=0)
    with torch.no_grad():
        logp = student(x).log_softmax(dim=1)
    by_hand = (0.25 * -logp[0, 0] + 0.75 * -logp[0, 2] + 0.5 * -logp[1, 2] + 0.5 * -logp[1, 0]) / 2  # 2, 3: a -1
    assert terms["ce"].item() == pytest.approx(0.6 * by_hand.item(), rel=1e-6)


def test_augmented_loss_augments_training_batches_by_epoch_and_row() -> None:
    seen = []

    def loss(model, batch, epoch):
        seen.append(batch)
        return model(batch[0]), {"ce": batch[0].sum()}

    wrapped = augment.training_loss(loss, ["noise(std=1)", "mixup(alpha=1)"], seed=7)
    x, rows = torch.zeros(8, 3), torch.arange(8)
    wrapped(torch.nn.Identity(), (x, torch.zeros(8), rows, torch.zeros(8)), 2)
    expected, mix = augment.Augmenter(augment.parse(["noise(std=1)", "mixup(alpha=1)"]), 7)(x, rows, 2)
    assert torch.equal(seen[0][0], expected) and torch.equal(seen[0][4].partner, mix.partner)
    assert augment.training_loss(loss, [], seed=7) is loss


def test_mixed_signal_targets_mix_linearly_and_feature_students_mix_their_labels() -> None:
    from kdtrack.losses.feature import FeatureKD
    from kdtrack.losses.kd import KDLossConfig, mixed_teacher_outputs

    signals = torch.randn(4, 3, 2)
    mix = augment.Mix(partner=torch.tensor([2, 3, 0, 1]), lam=torch.tensor([0.2, 0.4, 0.6, 0.8]))
    by_hand = torch.stack([0.2 * signals[0] + 0.8 * signals[2], 0.4 * signals[1] + 0.6 * signals[3],
                           0.6 * signals[2] + 0.4 * signals[0], 0.8 * signals[3] + 0.2 * signals[1]])
    assert torch.allclose(mixed_teacher_outputs(signals, mix, KDLossConfig(regression="mse")), by_hand)

    class Zero(torch.nn.Module):
        name, student_layers, teacher_layers = "zero", ("0",), ("0",)

        def forward(self, student_feats, teacher_feats):
            return student_feats["0"].sum() * 0

    student = torch.nn.Sequential(torch.nn.Linear(3, 3))
    loss = FeatureKD(Zero(), torch.nn.Sequential(torch.nn.Linear(3, 3)), alpha=0.0)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    _, terms = loss(student, (x, y, torch.arange(4), torch.zeros(4), mix), 0)
    logp = student(x).log_softmax(dim=1).detach()
    mixed = -(mix.lam * logp[torch.arange(4), y] + (1 - mix.lam) * logp[torch.arange(4), y[mix.partner]]).mean()
    assert terms["ce"].item() == pytest.approx(mixed.item(), rel=1e-5)
    assert loss.pop_stats()["ce_labelled"] == pytest.approx(mixed.item(), rel=1e-5)
    smoothed = FeatureKD(Zero(), torch.nn.Sequential(torch.nn.Linear(3, 3)), alpha=0.0, label_smoothing=0.2)
    smoothed(student, (x, y, torch.arange(4), torch.zeros(4), mix), 0)
    assert smoothed.pop_stats()["ce_labelled"] == pytest.approx(mixed.item(), rel=1e-5)  # plain CE, mixed labels
