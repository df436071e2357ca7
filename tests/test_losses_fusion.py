"""Multi-teacher fusion of (B, C) logits against hand-picked teachers and plain formulas."""
from __future__ import annotations

import math

import pytest
import torch

from kdtrack.errors import BadInput, ConfigError
from kdtrack.losses import fuse_teachers


def test_fuse_mean_and_weighted_in_logit_space() -> None:
    a, b = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 2.0, -1.0]])
    assert fuse_teachers([a, b]).tolist() == [[2.0, 2.0, 1.0]]
    got = fuse_teachers(torch.stack([a, b]), "weighted", weights=[3.0, 1.0])
    assert got[0].tolist() == pytest.approx([1.5, 2.0, 2.0])


def test_fuse_most_confident_picks_per_sample_and_lowest_index_on_ties() -> None:
    t1 = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 0.0], [2.0, 0.0, 0.0]], dtype=torch.float64)
    t2 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 2.0, 0.0]], dtype=torch.float64)
    got = fuse_teachers([t1, t2], "most_confident")
    assert got.tolist() == [t1[0].tolist(), t2[1].tolist(), t1[2].tolist()]


def test_fuse_refuses_bad_weights_and_methods() -> None:
    t = [torch.zeros(2, 3), torch.zeros(2, 3)]
    with pytest.raises(BadInput, match="3 weights for 2 teachers"):
        fuse_teachers(t, "weighted", weights=[1.0, 1.0, 1.0])
    with pytest.raises(BadInput, match=">= 0"):
        fuse_teachers(t, "weighted", weights=[1.0, -1.0])
    with pytest.raises(BadInput, match="needs weights"):
        fuse_teachers(t, "weighted")
    with pytest.raises(ConfigError, match="most_confident"):
        fuse_teachers(t, "max")
    with pytest.raises(BadInput, match="shape"):
        fuse_teachers([torch.zeros(2, 3), torch.zeros(2, 4)])


@pytest.mark.parametrize("weights, want", [
    ([1.0, 0.0], [1.0, 2.0, 3.0]),  # a zero weight drops that teacher
    ([0.25, 0.25], [2.0, 2.0, 1.0]),  # weights summing below 1 are normalised, not refused
    ([0.5, 1.5], [2.5, 2.0, 0.0]),
])
def test_fuse_weighted_accepts_zero_and_fractional_weights(weights: list[float], want: list[float]) -> None:
    a, b = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 2.0, -1.0]])
    assert fuse_teachers([a, b], "weighted", weights=weights)[0].tolist() == pytest.approx(want)


@pytest.mark.parametrize("weights", [[2.0, -1.0], [0.0, 0.0], [math.inf, 1.0], [math.nan, 1.0]])
def test_fuse_refuses_negative_all_zero_and_non_finite_weights(weights: list[float]) -> None:
    with pytest.raises(BadInput) as raised:
        fuse_teachers([torch.zeros(2, 3), torch.zeros(2, 3)], "weighted", weights=weights)
    assert str(raised.value) == (f"teacher weights must be finite, >= 0 and not all 0, got {weights} — "
                                 "e.g. --set kd.fusion_weights=[2,1] (normalised to sum 1)")


def test_fuse_weighted_normalises_in_float64_and_keeps_the_teachers_dtype() -> None:
    a = torch.tensor([[0.1, 7.0, 1e3]], dtype=torch.float64)
    b = torch.tensor([[0.7, 2.0, 3e3]], dtype=torch.float64)
    got = fuse_teachers([a, b], "weighted", weights=[1, 2])  # int weights: 1/3 and 2/3, exact to float64
    assert got.dtype == torch.float64
    assert got[0].tolist() == pytest.approx([(x + 2 * y) / 3 for x, y in zip(a[0].tolist(), b[0].tolist())],
                                            rel=1e-14)
    assert fuse_teachers([a.float(), b.float()], "weighted", weights=[1, 2]).dtype == torch.float32


def test_fuse_weighted_stays_on_the_teachers_device() -> None:
    teachers = torch.zeros(2, 3, 4, device="meta")  # a device other than the CPU the weights are built on
    assert fuse_teachers(teachers, "weighted", weights=[1.0, 3.0]).device == teachers.device


@pytest.mark.parametrize("teachers, shape", [
    ([], (0,)), (torch.zeros(2, 3), (2, 3)), (torch.zeros(2, 0, 3), (2, 0, 3)),  # none; one (B, C) unstacked; B = 0
])
def test_fuse_refuses_no_teachers_and_non_kbc_stacks(teachers, shape: tuple[int, ...]) -> None:
    with pytest.raises(BadInput) as raised:
        fuse_teachers(teachers)
    assert str(raised.value) == (f"teacher logits must stack to a non-empty (K, B, C) tensor, got {shape} — "
                                 "pass a list of (B, C) logits, one per teacher")


def test_fuse_unknown_method_message_lists_the_methods() -> None:
    with pytest.raises(ConfigError) as raised:
        fuse_teachers([torch.zeros(2, 3)], "max")
    assert str(raised.value) == "unknown fusion method 'max' — use one of: mean, weighted, most_confident"


def test_most_confident_ranks_teachers_at_temperature_1_by_default() -> None:
    # Row 0: teacher 1's top probability is e/(e+2) = 0.58 at T = 1 but e^0.5/(e^0.5+2) = 0.45 at T = 2, while
    # teacher 2's stays 1/2 (its third class is ruled out), so the pick flips. Row 1: teacher 2 at both.
    # Two rows of three classes, so a row index mixed up with a class index cannot pass.
    t1 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    t2 = torch.tensor([[0.0, 0.0, -50.0], [0.0, 3.0, 0.0]], dtype=torch.float64)
    assert fuse_teachers([t1, t2], "most_confident").tolist() == [t1[0].tolist(), t2[1].tolist()]
    assert fuse_teachers([t1, t2], "most_confident", temperature=2.0).tolist() == t2.tolist()
    assert fuse_teachers([t1, t2], "most_confident", temperature=0.5).tolist() == [t1[0].tolist(), t2[1].tolist()]


def test_most_confident_ranks_half_precision_teachers_in_float32() -> None:
    # Top probabilities 0.993307 and 0.993333 differ in float32 but round to the same float16 value.
    t1 = torch.tensor([[5.0, 0.0]], dtype=torch.float16)
    t2 = torch.tensor([[5.00390625, 0.0]], dtype=torch.float16)
    got = fuse_teachers([t1, t2], "most_confident")
    assert got.dtype == torch.float16 and got.tolist() == t2.tolist()
