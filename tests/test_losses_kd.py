"""Logit KD against hand-computed values and independent plain-Python formulas."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from kdtrack.errors import BadInput, ConfigError
from kdtrack.losses import (KDLossConfig, LogitKD, compute_confidence_weights, compute_kd_weight,
                            compute_student_loss, kd_loss, regression_loss)

LN2, LN3 = math.log(2.0), math.log(3.0)
# Row 0: teacher p = (3/5, 1/5, 1/5), student uniform. Row 1: teacher uniform, student p = (1/2, 1/4, 1/4).
STUDENT = [[0.0, 0.0, 0.0], [LN2, 0.0, 0.0]]
TEACHER = [[LN3, 0.0, 0.0], [0.0, 0.0, 0.0]]
KL_ROWS = [0.6 * math.log(1.8) + 0.4 * math.log(0.6), math.log(32 / 27) / 3]
SOFT_CE_ROWS = [LN3, 5 * LN2 / 3]


def softmax_py(row: list[float], t: float = 1.0) -> list[float]:
    top = max(row)
    e = [math.exp((v - top) / t) for v in row]
    return [v / sum(e) for v in e]


def kl_py(s: list[float], t: list[float], temp: float) -> float:
    """T² · KL(p_t || p_s) by plain Python."""
    ps, pt = softmax_py(s, temp), softmax_py(t, temp)
    return temp**2 * sum(a * math.log(a / b) for a, b in zip(pt, ps) if a > 0)


def ce_py(row: list[float], label: int) -> float:
    return math.log(sum(math.exp(v) for v in row)) - row[label]


@pytest.mark.parametrize("loss_type", ["kldiv", "soft_ce"])
@pytest.mark.parametrize("reduction", ["none", "batchmean", "sum", "mean"])
def test_kd_loss_hand_values(loss_type: str, reduction: str) -> None:
    rows = KL_ROWS if loss_type == "kldiv" else SOFT_CE_ROWS
    want = {"none": rows, "batchmean": sum(rows) / 2, "sum": sum(rows), "mean": sum(rows) / 6}[reduction]
    s, t = torch.tensor(STUDENT, dtype=torch.float64), torch.tensor(TEACHER, dtype=torch.float64)
    got = kd_loss(s, t, 1.0, loss_type, reduction)
    assert got.tolist() == pytest.approx(want, rel=1e-12)
    got32 = kd_loss(s.float(), t.float(), 1.0, loss_type, reduction)
    assert got32.dtype == torch.float32 and got32.tolist() == pytest.approx(want, rel=1e-5)


def test_kd_loss_is_zero_for_identical_logits() -> None:
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(0)) * 3
    assert kd_loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(logits, logits.clone(), reduction="none").abs().max().item() < 1e-5


def test_kd_loss_scales_softened_kl_by_t_squared() -> None:
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 6, generator=gen) * 2, torch.randn(4, 6, generator=gen) * 2
    want = sum(kl_py(a, b, 4.0) for a, b in zip(s.tolist(), t.tolist())) / 4
    assert kd_loss(s, t, temperature=4.0).item() == pytest.approx(want, rel=1e-5)  # want carries the T² = 16


def test_teacher_gets_no_gradient() -> None:
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    kd_loss(s, t).backward()
    assert t.grad is None and s.grad is not None


def test_kd_loss_finite_and_correct_at_huge_logits() -> None:
    s = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 5e3]])
    t = torch.tensor([[-1e4, 1e4, 0.0], [1e4, 9999.0, -1e4]])
    got = kd_loss(s, t, temperature=4.0, reduction="none")
    assert torch.isfinite(got).all()
    # Row 0 by hand: p_t is one-hot on class 1, log p_s[1] = -2500 - 2500 = -5000, times T² = 16.
    assert got[0].item() == pytest.approx(80000.0, rel=1e-6)
    s64, t64 = s.double() / 4, t.double() / 4
    log_ps = s64 - torch.logsumexp(s64, dim=1, keepdim=True)
    log_pt = t64 - torch.logsumexp(t64, dim=1, keepdim=True)
    ref = 16 * (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)
    assert got.double().tolist() == pytest.approx(ref.tolist(), rel=1e-5)


def test_teacher_zero_probability_classes_add_nothing() -> None:
    s = torch.tensor([[1.0, 2.0, 3.0]])
    t = torch.tensor([[0.0, 0.0, -math.inf]])  # the teacher rules class 2 out
    ps = softmax_py([1.0, 2.0, 3.0])
    want = 0.5 * math.log(0.5 / ps[0]) + 0.5 * math.log(0.5 / ps[1])
    got = kd_loss(s.requires_grad_(), t, temperature=1.0)
    assert got.item() == pytest.approx(want, rel=1e-6)
    got.backward()
    # d/ds KL(p_t || p_s) = p_s - p_t, finite in every class, the ruled-out one included
    assert s.grad[0].tolist() == pytest.approx([ps[0] - 0.5, ps[1] - 0.5, ps[2]], rel=1e-6)


def test_kd_gradient_matches_closed_form() -> None:
    gen = torch.Generator().manual_seed(2)
    s = (torch.randn(5, 4, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    t = torch.randn(5, 4, generator=gen, dtype=torch.float64) * 2
    temp = 3.0
    kd_loss(s, t, temperature=temp).backward()
    want = temp * (torch.softmax(s.detach() / temp, 1) - torch.softmax(t / temp, 1)) / 5
    assert torch.allclose(s.grad, want, atol=1e-12)


def test_kd_loss_refuses_bad_arguments() -> None:
    s = torch.zeros(2, 3)
    with pytest.raises(ConfigError, match="kldiv, soft_ce"):
        kd_loss(s, s, loss_type="kl")
    with pytest.raises(ConfigError, match="batchmean"):
        kd_loss(s, s, reduction="avg")
    with pytest.raises(ConfigError, match="temperature"):
        kd_loss(s, s, temperature=0.0)
    with pytest.raises(BadInput, match="same"):
        kd_loss(s, torch.zeros(2, 4))


@pytest.mark.parametrize("epoch, want", [(0, 0.0), (4, 0.0), (5, 0.0), (10, 0.35), (15, 0.7), (40, 0.7)])
def test_kd_weight_schedule(epoch: int, want: float) -> None:
    assert compute_kd_weight(epoch, 5, 10, 0.7) == pytest.approx(want)


def test_kd_weight_without_ramp_jumps_at_warmup() -> None:
    assert [compute_kd_weight(e, 3, 0, 0.5) for e in (2, 3, 4)] == [0.0, 0.5, 0.5]


# Teacher confidences (max softmax prob): 3/5, 1/3 and 8/10.
CONF_TEACHER = torch.tensor([[LN3, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, math.log(8.0), 0.0]])


@pytest.mark.parametrize("weighting, threshold, weights, coverage", [
    ("none", 0.0, [1.0, 1.0, 1.0], 1.0),
    ("pmax", 0.0, [0.6, 1 / 3, 0.8], 1.0),
    ("threshold", 0.5, [1.0, 0.0, 1.0], 2 / 3),
    ("threshold", 0.9, [0.0, 0.0, 0.0], 0.0),
])
def test_confidence_weights(weighting: str, threshold: float, weights: list[float], coverage: float) -> None:
    got, stats = compute_confidence_weights(CONF_TEACHER, weighting, threshold)
    assert got.tolist() == pytest.approx(weights, rel=1e-6)
    assert stats["coverage"] == pytest.approx(coverage)
    assert stats["avg_confidence"] == pytest.approx((0.6 + 1 / 3 + 0.8) / 3, rel=1e-6)
    assert stats["min_confidence"] == pytest.approx(1 / 3, rel=1e-6)
    assert stats["max_confidence"] == pytest.approx(0.8, rel=1e-6)
    assert all(type(v) is float for v in stats.values())


def test_student_loss_is_weighted_sum_of_hand_ce_and_kd() -> None:
    cfg = KDLossConfig(temperature=2.0, kd_alpha=0.7)
    s = [[1.0, 0.5, -1.0], [0.0, 2.0, 0.3], [0.2, 0.1, 0.0]]
    t = [[2.0, 0.0, 0.0], [0.0, 1.0, 1.0], [3.0, -1.0, 0.0]]
    y = [0, 1, -1]
    loss, stats = compute_student_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), cfg, current_epoch=0)
    ce = (ce_py(s[0], 0) + ce_py(s[1], 1)) / 2  # the unlabelled row has no CE
    kd = sum(kl_py(a, b, 2.0) for a, b in zip(s, t)) / 3  # ... but does get KD
    assert stats["ce_loss"] == pytest.approx(ce, rel=1e-5)
    assert stats["kd_loss"] == pytest.approx(kd, rel=1e-5)
    assert loss.item() == pytest.approx(0.3 * ce + 0.7 * kd, rel=1e-5)
    assert stats["total_loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert (stats["kd_weight"], stats["ce_weight"], stats["coverage"]) == pytest.approx((0.7, 0.3, 1.0))
    confidence = sum(max(softmax_py(row)) for row in t) / 3  # the teacher's top probability at T = 1, every row
    assert stats["avg_confidence"] == pytest.approx(confidence, rel=1e-5)


def test_kd_loss_defaults_to_temperature_4_and_batchmean() -> None:
    s, t = [[1.0, 0.5, -1.0], [0.0, 2.0, 0.3]], [[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
    want = sum(kl_py(a, b, 4.0) for a, b in zip(s, t)) / 2  # T² · KL at T = 4, mean over rows
    assert kd_loss(torch.tensor(s), torch.tensor(t)).item() == pytest.approx(want, rel=1e-5)


def test_a_one_epoch_ramp_starts_at_zero() -> None:
    assert [compute_kd_weight(e, 2, 1, 0.8) for e in range(5)] == [0.0, 0.0, 0.0, 0.8, 0.8]


def test_unlabelled_rows_get_pure_kd_gradient() -> None:
    cfg, temp = KDLossConfig(temperature=2.0, kd_alpha=0.6), 2.0
    s = torch.tensor([[1.0, 0.5, -1.0], [0.0, 2.0, 0.3]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    loss, _ = compute_student_loss(s, t, torch.tensor([0, -1]), cfg, current_epoch=0)
    loss.backward()
    pure_kd = 0.6 * temp * (torch.softmax(s.detach() / temp, 1) - torch.softmax(t / temp, 1)) / 2
    assert torch.allclose(s.grad[1], pure_kd[1], atol=1e-12)
    assert not torch.allclose(s.grad[0], pure_kd[0], atol=1e-3)  # row 0 also gets CE


def test_domain_mask_limits_kd_and_divides_by_batch() -> None:
    cfg = KDLossConfig(temperature=1.0, kd_alpha=1.0)
    s = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 2.0]], requires_grad=True)
    t = torch.tensor([[0.0, 0.0, 1.0], [3.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    mask = torch.tensor([True, False, True])
    loss, stats = compute_student_loss(s, t, torch.full((3,), -1), cfg, 0, domain_mask=mask)
    loss.backward()
    assert s.grad[1].abs().max().item() == 0.0
    assert s.grad[0].abs().max().item() > 0 and s.grad[2].abs().max().item() > 0
    rows = s.detach().tolist(), t.tolist()
    want = (kl_py(rows[0][0], rows[1][0], 1.0) + kl_py(rows[0][2], rows[1][2], 1.0)) / 3
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert stats["coverage"] == pytest.approx(2 / 3)


def test_batch_without_labels_has_zero_ce_not_nan() -> None:
    gen = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    loss, stats = compute_student_loss(s, t, torch.full((4,), -1), KDLossConfig(), current_epoch=0)
    assert stats["ce_loss"] == 0.0
    kd = sum(kl_py(a, b, 4.0) for a, b in zip(s.tolist(), t.tolist())) / 4  # the defaults: T = 4, alpha = 0.7
    assert loss.item() == pytest.approx(0.7 * kd, rel=1e-5)


def test_warmup_gives_plain_ce() -> None:
    cfg = KDLossConfig(kd_alpha=0.9, warmup_epochs=2)
    s = [[1.0, -1.0], [0.3, 0.4]]
    loss, stats = compute_student_loss(torch.tensor(s), torch.randn(2, 2), torch.tensor([1, 0]), cfg, 1)
    assert loss.item() == pytest.approx((ce_py(s[0], 1) + ce_py(s[1], 0)) / 2, rel=1e-6)
    assert stats["kd_weight"] == 0.0 and stats["ce_weight"] == 1.0


@pytest.mark.parametrize("kind, want", [("mse", 1.25), ("l1", 0.75)])
def test_regression_distillation(kind: str, want: float) -> None:
    s = torch.tensor([[[1.0, 2.0]], [[3.0, 5.0]]])  # (B, 1, 2) signals
    t = torch.tensor([[[0.0, 2.0]], [[3.0, 3.0]]])
    loss, stats = compute_student_loss(s, t, None, KDLossConfig(regression=kind, warmup_epochs=3), 0)
    assert loss.item() == pytest.approx(want)
    assert (stats["ce_weight"], stats["kd_weight"]) == (0.0, 1.0) and "avg_confidence" not in stats


@pytest.mark.parametrize("bad, message", [
    ({"kd_alpha": 1.5}, r"kd_alpha must be in \[0.0, 1.0\], got 1.5"),
    ({"warmup_epochs": -1}, "warmup_epochs must be an int >= 0, got -1"),
    ({"kd_weighting": "entropy"}, "unknown kd.weighting 'entropy'"),
    ({"regression": "huber"}, "unknown regression 'huber'"),
    ({"temperature": -1.0}, "temperature must be a finite number > 0, got -1.0"),
    ({"confidence_threshold": 2.0}, r"confidence threshold must be a probability in \[0, 1\], got 2.0"),
])
def test_config_is_validated(bad: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        KDLossConfig(**bad)


def test_logit_kd_wires_teacher_lookup_domain_and_stats() -> None:
    torch.manual_seed(0)
    model, table = nn.Linear(4, 3), torch.randn(10, 3) * 2
    cfg = KDLossConfig(temperature=2.0, kd_alpha=0.5, kd_weighting="pmax")
    loss_fn = LogitKD(lambda batch: table[batch[2]], cfg, domain_index=1)
    batches = [(torch.randn(4, 4), torch.tensor([0, -1, 2, 1]), torch.tensor(rows), torch.tensor([1, 0, 1, 1]))
               for rows in ([3, 1, 7, 0], [2, 9, 5, 4])]
    unweighted, confidences = [], []
    for batch in batches:
        logits, terms = loss_fn(model, batch, epoch=0)
        assert set(terms) == {"ce", "kd"}
        # by hand: CE over the labelled rows; KD on domain-1 rows only, each weighted by its teacher's max
        # probability at T = 1, summed over the batch of 4
        s, t, y = logits.tolist(), table[batch[2]].tolist(), batch[1].tolist()
        ce = sum(ce_py(s[i], y[i]) for i in range(4) if y[i] >= 0) / 3
        pmax = [max(softmax_py(row)) for row in t]
        kd = sum(pmax[i] * kl_py(s[i], t[i], 2.0) for i in range(4) if batch[3][i] == 1) / 4
        assert terms["ce"].item() == pytest.approx(0.5 * ce, rel=1e-5)
        assert terms["kd"].item() == pytest.approx(0.5 * kd, rel=1e-5)
        unweighted.append(ce)
        confidences.append(sum(pmax) / 4)
    means = loss_fn.pop_stats()
    # the logged set: one name per figure (the weighted terms are the engine's loss_ce and loss_kd)
    assert set(means) == {"ce_labelled", "kd_weight", "coverage", "avg_confidence"}
    assert means["ce_labelled"] == pytest.approx(sum(unweighted) / 2, rel=1e-5)
    assert means["avg_confidence"] == pytest.approx(sum(confidences) / 2, rel=1e-5)
    assert means["kd_weight"] == pytest.approx(0.5)
    assert means["coverage"] == pytest.approx(0.75)  # 3 of each batch's 4 rows are domain 1
    assert loss_fn.pop_stats() == {}


@pytest.mark.parametrize("call, message", [
    (lambda: KDLossConfig(loss_type="kl"), "unknown loss_type 'kl' — use one of: kldiv, soft_ce"),
    (lambda: KDLossConfig(kd_alpha=1.5), "kd_alpha must be in [0.0, 1.0], got 1.5 — e.g. --set kd.alpha=0.5"),
    (lambda: KDLossConfig(label_smoothing=1.0),
     "label_smoothing must be in [0.0, 0.999], got 1.0 — e.g. --set train.label_smoothing=0.1"),
    (lambda: KDLossConfig(warmup_epochs=-1),
     "warmup_epochs must be an int >= 0, got -1 — e.g. --set kd.warmup_epochs=5"),
    (lambda: KDLossConfig(kd_ramp_epochs=-1),
     "kd_ramp_epochs must be an int >= 0, got -1 — e.g. --set kd.ramp_epochs=5"),
    (lambda: compute_confidence_weights(CONF_TEACHER, "entropy"),
     "unknown kd.weighting 'entropy' — use one of: none, pmax, threshold"),
    (lambda: regression_loss(torch.zeros(2, 1), torch.zeros(2, 1), "huber"),
     "unknown regression 'huber' — use one of: mse, l1"),
])
def test_config_errors_name_the_key_and_an_example(call, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        call()
    assert str(raised.value) == message


@pytest.mark.parametrize("call", [
    lambda: KDLossConfig(kd_alpha=True),
    lambda: KDLossConfig(label_smoothing=False),
    lambda: KDLossConfig(warmup_epochs=True),
    lambda: KDLossConfig(kd_ramp_epochs=1.5),
    lambda: KDLossConfig(confidence_threshold=True),
    lambda: kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=True),
])
def test_bools_and_non_int_epochs_are_refused(call) -> None:
    with pytest.raises(ConfigError):
        call()


def test_config_accepts_its_range_ends() -> None:
    cfg = KDLossConfig(kd_alpha=1.0, label_smoothing=0.999, confidence_threshold=1.0, warmup_epochs=0,
                       kd_ramp_epochs=0)
    assert (cfg.kd_alpha, cfg.label_smoothing, cfg.confidence_threshold) == (1.0, 0.999, 1.0)


def test_threshold_weighting_keeps_rows_at_exactly_the_threshold() -> None:
    teacher = torch.tensor([[0.0, 0.0], [200.0, 0.0], [1.0, 0.0]])  # confidences 1/2, 1 and e/(e+1) = 0.73
    for threshold, want in [(0.5, [1.0, 1.0, 1.0]), (1.0, [0.0, 1.0, 0.0]), (0.6, [0.0, 1.0, 1.0])]:
        got, stats = compute_confidence_weights(teacher, "threshold", threshold)
        assert got.dtype == torch.float32 and got.tolist() == want
        assert stats["coverage"] == pytest.approx(sum(want) / 3)
    default, _ = compute_confidence_weights(teacher, "threshold")  # threshold 0: every row
    assert default.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("shape", [(3,), (0, 3), (2, 2, 2)])
def test_confidence_weights_refuse_non_bc_logits(shape: tuple[int, ...]) -> None:
    with pytest.raises(BadInput) as raised:
        compute_confidence_weights(torch.zeros(shape), "none")
    assert str(raised.value) == (f"teacher logits must be a non-empty (B, C) tensor, got {shape} — "
                                 "pass one row of class logits per sample")
    assert compute_confidence_weights(torch.zeros(1, 3), "none")[0].tolist() == [1.0]  # one row is enough


@pytest.mark.parametrize("call, want", [
    (lambda: kd_loss(torch.zeros(2, 3), torch.zeros(2, 4)), "(B, C) logits, got (2, 3) and (2, 4)"),
    (lambda: kd_loss(torch.zeros(0, 3), torch.zeros(0, 3)), "(B, C) logits, got (0, 3) and (0, 3)"),
    (lambda: kd_loss(torch.zeros(2, 3, 1), torch.zeros(2, 3, 1)), "(B, C) logits, got (2, 3, 1) and (2, 3, 1)"),
    (lambda: regression_loss(torch.zeros(2, 1), torch.zeros(2, 2), "mse"), "(B, ...) outputs, got (2, 1) and (2, 2)"),
    (lambda: regression_loss(torch.zeros(0, 2), torch.zeros(0, 2), "l1"), "(B, ...) outputs, got (0, 2) and (0, 2)"),
])
def test_shape_mismatch_and_empty_batch_messages(call, want: str) -> None:
    with pytest.raises(BadInput) as raised:
        call()
    assert str(raised.value) == (f"student and teacher need the same non-empty {want} — "
                                 "check the teacher has the student's classes and batch rows")


def test_half_precision_inputs_are_computed_in_float32() -> None:
    s, t = torch.tensor(STUDENT, dtype=torch.float16), torch.tensor(TEACHER, dtype=torch.float16)
    got = kd_loss(s, t, 1.0, "kldiv", "none")
    # the float16 logits themselves are the inputs: log 2 and log 3 rounded to float16
    want = [kl_py(a, b, 1.0) for a, b in zip(s.tolist(), t.tolist())]
    assert got.dtype == torch.float32 and got.tolist() == pytest.approx(want, rel=1e-6)
    mse = regression_loss(torch.tensor([[1.0, 2.0]], dtype=torch.float16), torch.tensor([[0.0, 2.0]]).half(), "mse")
    assert mse.dtype == torch.float32 and mse.tolist() == [0.5]


@pytest.mark.parametrize("targets, got", [(None, "None"), (torch.tensor([0, 1, 0]), "(3,)")])
def test_classification_needs_one_target_per_row(targets, got: str) -> None:
    with pytest.raises(BadInput) as raised:
        compute_student_loss(torch.zeros(2, 3), torch.zeros(2, 3), targets, KDLossConfig(), 0)
    assert str(raised.value) == (f"targets must be a (2,) tensor of class ids (-1 for unlabelled), got {got} — "
                                 "pass the batch's labels y")


def test_label_smoothing_applies_to_the_ce_term() -> None:
    s, y, eps = [[1.0, -1.0, 0.5], [0.0, 2.0, 0.0]], [1, 2], 0.1
    loss, stats = compute_student_loss(torch.tensor(s), torch.randn(2, 3), torch.tensor(y),
                                       KDLossConfig(kd_alpha=0.0, label_smoothing=eps), 0)
    # target (1 - eps) on the label plus eps / C on every class
    want = sum((1 - eps) * ce_py(row, label) + eps * sum(ce_py(row, c) for c in range(3)) / 3
               for row, label in zip(s, y)) / 2
    assert stats["ce_loss"] == pytest.approx(want, rel=1e-6) and loss.item() == pytest.approx(want, rel=1e-6)


def test_student_loss_threshold_weighting_drops_unsure_rows() -> None:
    s, t = [[1.0, 0.5, -1.0], [0.0, 2.0, 0.3]], [[LN3, 0.0, 0.0], [0.0, 0.0, 0.0]]  # confidences 3/5 and 1/3
    cfg = KDLossConfig(temperature=1.0, kd_alpha=1.0, kd_weighting="threshold", confidence_threshold=0.5)
    loss, stats = compute_student_loss(torch.tensor(s), torch.tensor(t), torch.tensor([-1, -1]), cfg, 0)
    assert loss.item() == pytest.approx(kl_py(s[0], t[0], 1.0) / 2, rel=1e-5)  # row 1 gets no KD; still / B
    assert stats["coverage"] == 0.5


def test_a_float_domain_mask_acts_as_the_bool_mask_in_the_logits_dtype() -> None:
    s, t = torch.tensor([[1.0, 0.5, -1.0], [0.0, 2.0, 0.3]]), torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    cfg, y = KDLossConfig(temperature=1.0, kd_alpha=1.0), torch.tensor([-1, -1])
    loss, _ = compute_student_loss(s, t, y, cfg, 0, domain_mask=torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(kl_py(s[1].tolist(), t[1].tolist(), 1.0) / 2, rel=1e-6)


def test_loss_path_raises_no_warnings() -> None:
    s, t, y = torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor([0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. softmax's implicit-dim deprecation, once per training step
        kd_loss(s, t)
        compute_confidence_weights(t, "pmax")
        compute_student_loss(s, t, y, KDLossConfig(kd_weighting="threshold", confidence_threshold=0.5), 0)


def test_logit_kd_without_domain_gives_every_row_kd() -> None:
    s, t = [[1.0, 0.5, -1.0], [0.0, 2.0, 0.3]], [[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
    loss_fn = LogitKD(lambda batch: torch.tensor(t), KDLossConfig(temperature=1.0, kd_alpha=1.0))
    _, terms = loss_fn(nn.Identity(), (torch.tensor(s), torch.tensor([-1, -1])), epoch=0)
    assert terms["kd"].item() == pytest.approx(sum(kl_py(a, b, 1.0) for a, b in zip(s, t)) / 2, rel=1e-6)
    assert loss_fn.pop_stats()["coverage"] == 1.0


def test_logit_kd_regression_stats_restart_after_each_pop() -> None:
    loss_fn = LogitKD(lambda batch: batch[2], KDLossConfig(regression="mse"))  # batch: (x, y, teacher outputs)

    def step(student: list[list[float]], teacher: list[list[float]]) -> None:
        loss_fn(nn.Identity(), (torch.tensor(student), torch.zeros(1), torch.tensor(teacher)), epoch=0)

    step([[1.0, 2.0]], [[0.0, 2.0]])
    step([[3.0, 3.0]], [[0.0, 3.0]])
    assert loss_fn.pop_stats() == {"kd_weight": 1.0, "coverage": 1.0}  # no labels, no confidence: no CE figure
    assert loss_fn.pop_stats() == {}
    # classes: the unweighted CE on labelled rows, averaged over the steps since the last pop
    classes = LogitKD(lambda batch: batch[2], KDLossConfig(kd_alpha=0.5))
    for logits, label in (([0.0, 0.0], 0), ([0.0, math.log(3.0)], 1)):  # CE ln 2, then -ln(3/4)
        classes(nn.Identity(), (torch.tensor([logits]), torch.tensor([label]), torch.zeros(1, 2)), epoch=0)
    assert classes.pop_stats()["ce_labelled"] == pytest.approx((math.log(2) + math.log(4 / 3)) / 2, rel=1e-6)
    classes(nn.Identity(), (torch.zeros(1, 2), torch.tensor([0]), torch.zeros(1, 2)), epoch=0)
    assert classes.pop_stats()["ce_labelled"] == pytest.approx(math.log(2), rel=1e-6)  # this one step only


def test_logit_kd_moves_teacher_and_domain_onto_the_model_device() -> None:
    model = nn.Linear(4, 3, device="meta")  # a device other than the CPU the table and domains live on
    table, domains = torch.randn(5, 3), torch.tensor([1, 0])
    loss_fn = LogitKD(lambda batch: table[batch[2]], KDLossConfig(), domain_index=1)
    batch = (torch.zeros(2, 4, device="meta"), torch.zeros(2, dtype=torch.long, device="meta"), torch.tensor([4, 0]),
             domains)
    _, terms = loss_fn(model, batch, epoch=0)
    assert terms["kd"].device.type == "meta" and terms["ce"].device.type == "meta"


@pytest.mark.parametrize(("kwargs", "text"), [
    ({"loss_type": "l2"}, "unknown loss_type 'l2' — use one of: kldiv, soft_ce"),
    ({"reduction": "avg"}, "unknown reduction 'avg' — use one of: batchmean, mean, sum, none"),
])
def test_kd_loss_called_directly_names_the_bad_option(kwargs: dict, text: str):
    logits = torch.zeros(2, 3)
    with pytest.raises(ConfigError) as caught:
        kd_loss(logits, logits, 4.0, **kwargs)
    assert str(caught.value) == text
