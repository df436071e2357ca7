"""Feature distillation: RKD against slow loop references, FitNet/AT/FT by hand, FeatureKD on tiny ResNets."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdtrack.errors import ConfigError
from kdtrack.losses import (FEATURE_METHODS, AttentionTransfer, FactorTransfer, FeatureKD, FitNet, Paraphraser,
                            at_loss, attention_map, build_feature_method, factor_transfer_loss, fitnet_loss,
                            rkd_angle_loss, rkd_distance_loss, train_paraphraser)
from kdtrack.models import ModelSpec, build_model

INPUT = (3, 8, 8)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convs: extra intra-op threads only add spin-waits, badly so on a shared, busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def huber(a: float, b: float) -> float:
    d = abs(a - b)
    return 0.5 * d * d if d < 1.0 else d - 0.5


def dist(u: list[float], v: list[float]) -> float:
    return math.sqrt(sum((a - b) ** 2 for a, b in zip(u, v)))


def slow_distance_loss(s: list[list[float]], t: list[list[float]]) -> float:
    pairs = [(i, j) for i in range(len(s)) for j in range(len(s)) if i != j]
    mean_s = sum(dist(s[i], s[j]) for i, j in pairs) / len(pairs)
    mean_t = sum(dist(t[i], t[j]) for i, j in pairs) / len(pairs)
    return sum(huber(dist(s[i], s[j]) / mean_s, dist(t[i], t[j]) / mean_t) for i, j in pairs) / len(pairs)


def cos_at(e: list[list[float]], i: int, j: int, k: int) -> float:
    a = [x - y for x, y in zip(e[i], e[j])]
    b = [x - y for x, y in zip(e[k], e[j])]
    return sum(x * y for x, y in zip(a, b)) / (math.hypot(*a) * math.hypot(*b))


def slow_angle_loss(s: list[list[float]], t: list[list[float]]) -> float:
    triplets = list(itertools.permutations(range(len(s)), 3))
    return sum(huber(cos_at(s, i, j, k), cos_at(t, i, j, k)) for i, j, k in triplets) / len(triplets)


def kept_distance_loss(s: list[list[float]], t: list[list[float]], drop: set[frozenset[int]]) -> float:
    """The distance term over the pairs not in `drop`, each side divided by its mean over those pairs."""
    pairs = [(i, j) for i in range(len(s)) for j in range(len(s)) if i != j and frozenset((i, j)) not in drop]
    mean_s = sum(dist(s[i], s[j]) for i, j in pairs) / len(pairs)
    mean_t = sum(dist(t[i], t[j]) for i, j in pairs) / len(pairs)
    return sum(huber(dist(s[i], s[j]) / mean_s, dist(t[i], t[j]) / mean_t) for i, j in pairs) / len(pairs)


def kept_angle_loss(s: list[list[float]], t: list[list[float]], drop: set[frozenset[int]]) -> float:
    """The angle term over the triplets none of whose three edges is in `drop`."""
    triplets = [(i, j, k) for i, j, k in itertools.permutations(range(len(s)), 3)
                if not {frozenset((i, j)), frozenset((j, k)), frozenset((i, k))} & drop]
    return sum(huber(cos_at(s, i, j, k), cos_at(t, i, j, k)) for i, j, k in triplets) / len(triplets)


def resnet(name: str) -> nn.Module:
    return build_model(ModelSpec(name, 4, INPUT))


def test_rkd_terms_match_slow_loops() -> None:
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    t = torch.randn(6, 7, generator=gen, dtype=torch.float64) * 3  # widths may differ
    want_d, want_a = slow_distance_loss(s.tolist(), t.tolist()), slow_angle_loss(s.tolist(), t.tolist())
    assert want_d > 1e-3 and want_a > 1e-3
    assert rkd_distance_loss(s, t).item() == pytest.approx(want_d, rel=1e-10)
    assert rkd_angle_loss(s, t).item() == pytest.approx(want_a, rel=1e-10)
    # (B, C, 1, 1) maps are flattened like (B, C) embeddings.
    assert rkd_distance_loss(s[:, :, None, None], t).item() == pytest.approx(want_d, rel=1e-10)


def test_rkd_is_finite_with_duplicate_embeddings_and_scale_free() -> None:
    s = torch.randn(5, 4, dtype=torch.float64)
    s = torch.cat([s, s[:1]]).requires_grad_()  # rows 0 and 5 coincide
    t = torch.randn(6, 3, dtype=torch.float64)
    (rkd_distance_loss(s, t) + rkd_angle_loss(s, t)).backward()
    assert torch.isfinite(s.grad).all()
    base = torch.randn(6, 4, dtype=torch.float64)
    assert rkd_distance_loss(base * 7.0, base).item() == pytest.approx(0.0, abs=1e-12)
    assert rkd_angle_loss(base * 7.0 + 1.0, base).item() == pytest.approx(0.0, abs=1e-12)


def _with_duplicates(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, set[frozenset[int]]]:
    """8 student and teacher rows: student rows 6 = 0 exactly and 7 = 2 + 1e-9, teacher rows 5 = 4 exactly.
    Returns them and the degenerate pairs (in either model), which the loss must leave out."""
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    s[6] = s[0]
    s[7] = s[2] + 1e-9 * torch.randn(5, generator=gen, dtype=torch.float64)
    t = torch.randn(8, 4, generator=gen, dtype=torch.float64) * 2
    t[5] = t[4]
    return s.to(dtype), t.to(dtype), {frozenset((0, 6)), frozenset((2, 7)), frozenset((4, 5))}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rkd_gradients_stay_bounded_with_duplicate_embeddings(dtype: torch.dtype) -> None:
    s, t, _ = _with_duplicates(dtype)
    for term in (rkd_distance_loss, rkd_angle_loss):
        leaf = s.clone().requires_grad_()
        term(leaf, t).backward()
        norm = leaf.grad.norm().item()
        assert math.isfinite(norm) and norm < 1e3, (term.__name__, norm)


def test_rkd_leaves_out_degenerate_pairs_and_triplets() -> None:
    s, t, drop = _with_duplicates(torch.float64)
    rows_s, rows_t = s.tolist(), t.tolist()
    want_d, want_a = kept_distance_loss(rows_s, rows_t, drop), kept_angle_loss(rows_s, rows_t, drop)
    assert want_d > 1e-3 and want_a > 1e-3
    assert rkd_distance_loss(s, t).item() == pytest.approx(want_d, rel=1e-9)
    assert rkd_angle_loss(s, t).item() == pytest.approx(want_a, rel=1e-9)
    # All rows equal in the teacher: no pair or triplet is left, so both terms are 0 with a zero gradient.
    leaf = s.clone().requires_grad_()
    (rkd_distance_loss(leaf, t[:1].expand(8, -1)) + rkd_angle_loss(leaf, t[:1].expand(8, -1))).backward()
    assert leaf.grad.abs().max().item() == 0.0


def test_fitnet_regressor_shapes() -> None:
    conv = FitNet("a", "b", (8, 4, 4), (16, 4, 4))
    assert isinstance(conv.regressor, nn.Conv2d) and conv.regressor.weight.shape == (16, 8, 1, 1)
    linear = FitNet("a", "b", (8,), (12,))
    assert isinstance(linear.regressor, nn.Linear) and linear.regressor.weight.shape == (12, 8)
    with pytest.raises(ConfigError, match="two"):
        FitNet("a", "b", (8, 4, 4), (12,))


def test_fitnet_loss_by_hand_with_pooling() -> None:
    gen = torch.Generator().manual_seed(1)
    method = FitNet("s", "t", (2, 4, 4), (3, 2, 2))
    fs, ft = torch.randn(2, 2, 4, 4, generator=gen), torch.randn(2, 3, 2, 2, generator=gen)
    w, b = method.regressor.weight[:, :, 0, 0].detach(), method.regressor.bias.detach()
    regressed = torch.einsum("oc,bchw->bohw", w, fs) + b[None, :, None, None]  # (2, 3, 4, 4)
    pooled = regressed.reshape(2, 3, 2, 2, 2, 2).mean(dim=(3, 5))  # 2x2 blocks -> (2, 3, 2, 2)
    want = ((pooled - ft) ** 2).mean().item()
    assert method({"s": fs}, {"t": ft}).item() == pytest.approx(want, rel=1e-5)
    assert fitnet_loss(ft.clone(), ft).item() == 0.0


def test_attention_map_and_loss_by_hand() -> None:
    feat = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # (1, 2, 1, 2): |f|² channel means 5 and 2
    assert attention_map(feat)[0].tolist() == pytest.approx([5 / math.sqrt(29), 2 / math.sqrt(29)])
    other = torch.tensor([[[[1.0, 1.0]]]])  # uniform map (1/√2, 1/√2)
    a = (5 / math.sqrt(29), 2 / math.sqrt(29))
    want = ((a[0] - 1 / math.sqrt(2)) ** 2 + (a[1] - 1 / math.sqrt(2)) ** 2) / 2
    assert at_loss(feat, other).item() == pytest.approx(want, rel=1e-6)
    method = AttentionTransfer(["s1", "s2"], ["t1", "t2"])
    got = method({"s1": feat, "s2": other}, {"t1": other, "t2": other})
    assert got.item() == pytest.approx(1000 / 2 * (want + 0.0) / 2, rel=1e-6)


def test_attention_resizes_student_map_to_teacher() -> None:
    student = torch.full((2, 3, 2, 2), 2.0)  # a uniform map stays uniform when upsampled
    teacher = torch.ones(2, 5, 4, 4)
    assert at_loss(student, teacher).item() == pytest.approx(0.0, abs=1e-7)
    assert at_loss(student, torch.rand(2, 5, 4, 4)).item() > 1e-4


def test_factor_transfer_loss_values() -> None:
    f = torch.randn(3, 4, 2, 2)
    assert factor_transfer_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert factor_transfer_loss(5.0 * f, f).item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    u, v = torch.tensor([[[[1.0, 0.0]]]]), torch.tensor([[[[0.0, 3.0]]]])  # unit (1, 0) vs (0, 1)
    assert factor_transfer_loss(u, v).item() == pytest.approx(1.0)


def test_paraphraser_reconstruction_improves_with_frozen_teacher() -> None:
    torch.manual_seed(0)
    teacher = build_model(ModelSpec("cnn", 4, (1, 8, 8), {"channels": 4}))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x = torch.randn(64, 1, 8, 8)
    loader = DataLoader(TensorDataset(x, torch.zeros(64, dtype=torch.long)), batch_size=16)
    para = Paraphraser(16, rate=0.5)
    history = train_paraphraser(para, teacher, loader, layer="block3", epochs=6, lr=1e-2,
                                device=torch.device("cpu"))
    assert len(history) == 6 and all(math.isfinite(v) for v in history)
    assert history[-1] < 0.7 * history[0]
    assert not para.training and teacher.training  # teacher mode restored
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # BN stats untouched too


def feature_kd_step(name: str, **options: object) -> tuple[nn.Module, nn.Module, nn.Module, dict]:
    torch.manual_seed(0)
    student, teacher = resnet("resnet8"), resnet("resnet8x4")
    method = build_feature_method(name, student, teacher, INPUT, **options)
    loss_fn = FeatureKD(method, teacher, alpha=0.5)
    batch = (torch.randn(6, *INPUT), torch.tensor([0, 1, 2, 3, -1, 1]), torch.arange(6), torch.zeros(6))
    logits, terms = loss_fn(student, batch, epoch=0)
    assert logits.shape == (6, 4) and set(terms) == {"ce", name}
    assert all(math.isfinite(v.item()) for v in terms.values())
    sum(terms.values()).backward()
    return student, teacher, method, terms


@pytest.mark.parametrize("name", sorted(FEATURE_METHODS))
def test_feature_kd_trains_student_and_connectors_not_teacher(name: str) -> None:
    student, teacher, method, terms = feature_kd_step(name)
    assert terms[name].item() > 0
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters() if p.requires_grad)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in method.parameters() if not p.requires_grad)


def test_default_layers_and_connector_sizes() -> None:
    student, teacher = resnet("resnet8"), resnet("resnet8x4")
    fit = build_feature_method("fitnet", student, teacher, INPUT)
    assert (fit.student_layers, fit.teacher_layers) == (("layer2",), ("layer2",))
    assert fit.regressor.weight.shape == (128, 32, 1, 1)
    rkd = build_feature_method("rkd", student, teacher, INPUT)
    assert (rkd.student_layers, rkd.teacher_layers) == (("pool",), ("pool",))
    at = build_feature_method("at", student, teacher, INPUT)
    assert at.student_layers == at.teacher_layers == ("layer1", "layer2", "layer3")
    ft = build_feature_method("ft", student, teacher, INPUT, rate=0.25)
    assert ft.teacher_layers == ("layer3",) and ft.paraphraser.factor_channels == 64
    ft.train()
    assert ft.translator.training and not ft.paraphraser.training


def test_feature_method_choices_are_checked() -> None:
    student, teacher = resnet("resnet8"), resnet("resnet8")
    with pytest.raises(ConfigError, match="fitnet"):
        build_feature_method("crd", student, teacher, INPUT)
    with pytest.raises(ConfigError, match="w_angle"):
        build_feature_method("rkd", student, teacher, INPUT, w_anlge=1.0)
    mlp = build_model(ModelSpec("mlp", 4, INPUT))
    with pytest.raises(ConfigError, match="conv"):
        build_feature_method("at", mlp, teacher, INPUT)
    with pytest.raises(ConfigError, match="alpha"):
        FeatureKD(build_feature_method("rkd", student, teacher, INPUT), teacher, alpha=2.0)
    assert isinstance(build_feature_method("ft", student, teacher, INPUT), FactorTransfer)
