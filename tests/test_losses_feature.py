"""Feature distillation: RKD against slow loop references, FitNet/AT/FT by hand, FeatureKD on tiny ResNets."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdtrack.errors import ConfigError
from kdtrack.losses import (FEATURE_METHODS, RKD, AttentionTransfer, FactorTransfer, FeatureKD, FitNet, Paraphraser,
                            at_loss, attention_map, build_feature_method, factor_transfer_loss, fitnet_loss,
                            rkd_angle_loss, rkd_distance_loss, train_paraphraser)
from kdtrack.models import ModelSpec, build_model

INPUT = (3, 8, 8)


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


def hand_attention(feat: torch.Tensor, p: float) -> torch.Tensor:
    """(B, C, H, W) -> (B, H·W): channel mean of |f|^p, each row divided by its Euclidean length."""
    am = (feat.abs() ** p).mean(dim=1).flatten(1)
    return am / am.norm(dim=1, keepdim=True)


def test_attention_map_normalises_each_sample_and_resizes_half_pixel_bilinear() -> None:
    feat = torch.tensor([[[[1.0, 2.0]]], [[[3.0, 0.0]]]])  # (2, 1, 1, 2): |f|² rows (1, 4) and (9, 0)
    # 2 -> 4 columns, half-pixel centres: output column c samples input x = (c + 0.5) / 2 - 0.5, clamped at 0.
    lerp = torch.tensor([[1.0, 0.75, 0.25, 0.0], [0.0, 0.25, 0.75, 1.0]])  # weights of input columns 0, 1
    rows = torch.tensor([[1.0, 4.0], [9.0, 0.0]]) @ lerp
    want = rows / rows.norm(dim=1, keepdim=True)
    assert torch.allclose(attention_map(feat, size=(1, 4)), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("p", [1.0, 4.0])
def test_attention_terms_use_the_given_p_and_beta(p: float) -> None:
    gen = torch.Generator().manual_seed(4)
    fs, ft = torch.randn(3, 2, 3, 3, generator=gen), torch.randn(3, 5, 3, 3, generator=gen)
    want = ((hand_attention(fs, p) - hand_attention(ft, p)) ** 2).mean().item()
    assert want > 1e-4
    assert at_loss(fs, ft, p).item() == pytest.approx(want, rel=1e-5)
    assert AttentionTransfer(["s"], ["t"], 10.0, p)({"s": fs}, {"t": ft}).item() == pytest.approx(5 * want, rel=1e-5)
    method = AttentionTransfer.from_models(resnet("resnet8"), resnet("resnet8x4"), INPUT, student_layers=["layer3"],
                                           teacher_layers=["layer3"], beta=10.0, p=p)
    assert method({"layer3": fs}, {"layer3": ft}).item() == pytest.approx(5 * want, rel=1e-5)


def test_attention_transfer_defaults_to_beta_1000_and_squared_maps() -> None:
    gen = torch.Generator().manual_seed(5)
    fs, ft = torch.randn(2, 2, 2, 2, generator=gen), torch.randn(2, 3, 2, 2, generator=gen)
    want = 500 * ((hand_attention(fs, 2.0) - hand_attention(ft, 2.0)) ** 2).mean().item()
    method = AttentionTransfer.from_models(resnet("resnet8"), resnet("resnet8x4"), INPUT)
    feats = {name: f for name, f in zip(method.student_layers, (fs, fs, fs))}
    hints = {name: f for name, f in zip(method.teacher_layers, (ft, ft, ft))}
    assert method(feats, hints).item() == pytest.approx(want, rel=1e-5)


def test_attention_transfer_needs_one_student_layer_per_teacher_layer() -> None:
    for student_layers, teacher_layers in (([], []), (["a"], ["a", "b"])):
        with pytest.raises(ConfigError, match="pairs layers one to one"):
            AttentionTransfer(student_layers, teacher_layers)
    assert AttentionTransfer(["a"], ["b"]).student_layers == ("a",)


def plain_convnet() -> nn.Module:
    """A conv net with no `feature_layers`: its layers can only be named explicitly."""
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))


def test_attention_transfer_layer_defaults_fill_only_the_side_not_named() -> None:
    student, teacher = resnet("resnet8"), resnet("resnet8x4")
    stages = ("layer1", "layer2", "layer3")
    only_student = AttentionTransfer.from_models(student, teacher, INPUT, student_layers=["layer3"] * 3)
    assert only_student.teacher_layers == stages
    only_teacher = AttentionTransfer.from_models(student, teacher, INPUT, teacher_layers=["layer3"] * 3)
    assert only_teacher.student_layers == stages
    named = AttentionTransfer.from_models(plain_convnet(), plain_convnet(), INPUT, student_layers=["0"],
                                          teacher_layers=["0"])
    assert (named.student_layers, named.teacher_layers) == (("0",), ("0",))


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_attention_transfer_names_the_layer_without_a_map(role: str) -> None:
    layers = {"student_layers": ["layer3"], "teacher_layers": ["layer3"], f"{role}_layers": ["pool"]}
    with pytest.raises(ConfigError, match=rf"^attention transfer needs a \(C, H, W\) feature map but {role} "
                                          r"layer 'pool' gives \(\d+,\)"):
        AttentionTransfer.from_models(resnet("resnet8"), resnet("resnet8x4"), INPUT, **layers)


def mlp(*hidden: int) -> nn.Module:
    return build_model(ModelSpec("mlp", 4, INPUT, {"hidden": list(hidden)}))


def test_fitnet_defaults_to_the_middle_layer_of_vector_models() -> None:
    method = FitNet.from_models(mlp(6, 5, 4, 3), mlp(9, 7), INPUT)  # no conv stage: middle of all feature layers
    assert (method.student_layers, method.teacher_layers) == (("blocks.2",), ("blocks.1",))
    assert method.regressor.weight.shape == (7, 4)


def test_1d_conv_nets_distil_on_their_embedding_and_refuse_map_methods() -> None:
    """A 1d cnn's stages are (C, L) maps: fitnet falls back to the pooled (D,) embedding; attention transfer and
    factor transfer, which compare 2d maps, say so."""
    signal = (2, 24)
    student = build_model(ModelSpec("cnn", 5, signal, {"channels": 2, "conv": "1d"}))
    teacher = build_model(ModelSpec("cnn", 5, signal, {"channels": 3, "conv": "1d"}))
    method = FitNet.from_models(student, teacher, signal)
    assert (method.student_layers, method.teacher_layers) == (("pool",), ("pool",))
    assert method.regressor.weight.shape == (12, 8)  # teacher 4*3 channels from student 4*2
    with pytest.raises(ConfigError, match=r"attention transfer needs \(C, H, W\) conv stages"):
        AttentionTransfer.from_models(student, teacher, signal)
    with pytest.raises(ConfigError, match=r"factor transfer needs a \(C, H, W\) conv stage but SmallCNN has none"):
        FactorTransfer.from_models(student, teacher, signal)


@pytest.mark.parametrize("options, weight", [({}, 1.0), ({"weight": 3.0}, 3.0)])
def test_fitnet_from_models_weights_the_hint_loss(options: dict, weight: float) -> None:
    gen = torch.Generator().manual_seed(6)
    method = FitNet.from_models(mlp(6, 5, 4, 3), mlp(9, 7), INPUT, **options)
    guided, hint = torch.randn(3, 4, generator=gen), torch.randn(3, 7, generator=gen)
    w, b = method.regressor.weight.detach(), method.regressor.bias.detach()
    want = weight * ((guided @ w.T + b - hint) ** 2).mean().item()
    assert method({"blocks.2": guided}, {"blocks.1": hint}).item() == pytest.approx(want, rel=1e-5)


def test_feature_method_connectors_follow_the_student_device() -> None:
    student, teacher = resnet("resnet8").to("meta"), resnet("resnet8x4").to("meta")  # meta: any non-CPU device
    method = build_feature_method("fitnet", student, teacher, INPUT)
    assert method.regressor.weight.device.type == "meta"


def test_unknown_feature_method_is_named_in_the_error() -> None:
    with pytest.raises(ConfigError, match=r"^unknown feature method 'crd' — use one of: fitnet, rkd, ft, at$"):
        build_feature_method("crd", resnet("resnet8"), resnet("resnet8"), INPUT)


class MeanGap(nn.Module):
    """A feature method for testing FeatureKD alone: squared gap between the mean student and teacher feature."""

    name = "gap"
    student_layers = ("0",)
    teacher_layers = ("1",)

    def forward(self, student_feats: dict[str, torch.Tensor], teacher_feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return (student_feats["0"].mean() - teacher_feats["1"].mean()) ** 2


def smoothed_ce(logits: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Mean over rows with y >= 0 of -(1 - eps)·log p_y - eps/C · sum_c log p_c."""
    logp = logits.log_softmax(dim=1)[y >= 0]
    nll = -logp.gather(1, y[y >= 0, None])[:, 0]
    return ((1 - eps) * nll - eps * logp.mean(dim=1)).mean()


@pytest.mark.parametrize("alpha, smoothing", [(0.25, None), (0.75, 0.2)])
def test_feature_kd_mixes_ce_and_the_feature_term_by_alpha(alpha: float, smoothing: float | None) -> None:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))  # no feature_layers: hooks by name only
    teacher = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    options = {} if smoothing is None else {"label_smoothing": smoothing}
    loss_fn = FeatureKD(MeanGap(), teacher, alpha, **options)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    x, y = torch.randn(5, 4), torch.tensor([0, 2, -1, 1, 2])
    logits, terms = loss_fn(student, (x, y), epoch=0)
    with torch.no_grad():
        ce = smoothed_ce(student(x), y, smoothing or 0.0).item()
        gap = (student[0](x).mean() - teacher[1](teacher[0](x)).mean()).item() ** 2
    assert torch.equal(logits, student(x))
    assert terms["ce"].item() == pytest.approx((1 - alpha) * ce, rel=1e-6)
    assert terms["gap"].item() == pytest.approx(alpha * gap, rel=1e-6)
    # the figure every student logs: plain CE on the labelled rows, unweighted and unsmoothed, averaged over steps
    loss_fn(student, (x[:2], y[:2]), epoch=0)
    with torch.no_grad():
        plain = [smoothed_ce(student(x), y, 0.0).item(), smoothed_ce(student(x[:2]), y[:2], 0.0).item()]
    assert loss_fn.pop_stats() == {"ce_labelled": pytest.approx(sum(plain) / 2, rel=1e-6)}
    assert loss_fn.pop_stats() == {}


def test_feature_kd_alpha_is_a_number_in_the_closed_unit_interval() -> None:
    for alpha in (True, "0.5", -0.1, 1.5):
        with pytest.raises(ConfigError, match=r"feature KD alpha must be in \[0, 1\]"):
            FeatureKD(MeanGap(), nn.Linear(2, 2), alpha)
    for alpha in (0, 0.0, 1.0):
        assert FeatureKD(MeanGap(), nn.Linear(2, 2), alpha).alpha == float(alpha)


@pytest.mark.parametrize("options, w_dist, w_angle", [({}, 1.0, 2.0), ({"w_dist": 0.5, "w_angle": 3.0}, 0.5, 3.0)])
def test_rkd_method_weights_the_distance_and_angle_terms(options: dict, w_dist: float, w_angle: float) -> None:
    gen = torch.Generator().manual_seed(7)
    s, t = torch.randn(5, 4, generator=gen, dtype=torch.float64), torch.randn(5, 6, generator=gen, dtype=torch.float64)
    want = w_dist * slow_distance_loss(s.tolist(), t.tolist()) + w_angle * slow_angle_loss(s.tolist(), t.tolist())
    method = RKD.from_models(resnet("resnet8"), resnet("resnet8x4"), INPUT, **options)
    assert method({"pool": s}, {"pool": t}).item() == pytest.approx(want, rel=1e-10)


def test_rkd_terms_on_small_batches_and_narrow_embeddings() -> None:
    gen = torch.Generator().manual_seed(8)
    # Too few rows for a pair (distance) or a triplet (angle): exactly 0 with a zero gradient.
    for term, rows in ((rkd_distance_loss, 1), (rkd_angle_loss, 2)):
        leaf = torch.randn(rows, 3, generator=gen).requires_grad_()
        loss = term(leaf, torch.randn(rows, 2, generator=gen))
        loss.backward()
        assert loss.item() == 0.0 and leaf.grad.abs().max().item() == 0.0
    # Three rows are enough for angles, and 1-D or 2-D embeddings are enough for either term.
    cases = ((rkd_angle_loss, slow_angle_loss, 3, 4), (rkd_angle_loss, slow_angle_loss, 4, 2),
             (rkd_distance_loss, slow_distance_loss, 4, 1))
    for term, slow, rows, width in cases:
        s = torch.randn(rows, width, generator=gen, dtype=torch.float64)
        t = torch.randn(rows, 3, generator=gen, dtype=torch.float64)
        want = slow(s.tolist(), t.tolist())
        assert want > 1e-3
        assert term(s, t).item() == pytest.approx(want, rel=1e-10), (term.__name__, rows, width)


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_rkd_tolerance_for_equal_embeddings_is_relative_to_the_batch(scale: float) -> None:
    s, t, drop = _with_duplicates(torch.float64)
    want_d, want_a = kept_distance_loss(s.tolist(), t.tolist(), drop), kept_angle_loss(s.tolist(), t.tolist(), drop)
    assert rkd_distance_loss(s * scale, t * scale).item() == pytest.approx(want_d, rel=1e-9)
    assert rkd_angle_loss(s * scale, t * scale).item() == pytest.approx(want_a, rel=1e-9)


def test_rkd_finds_equal_embeddings_in_large_batches_far_from_the_origin() -> None:
    """Distances come from explicit differences, so equal rows are 0 apart even where |e|² dwarfs the gaps."""
    gen = torch.Generator().manual_seed(9)
    s = torch.randn(32, 4, generator=gen) + 300.0  # float32, more rows than cdist's own exact-path limit
    s[31] = s[0]
    t = torch.randn(32, 3, generator=gen)
    rows_s, rows_t, drop = s.double().tolist(), t.double().tolist(), {frozenset((0, 31))}
    assert rkd_distance_loss(s, t).item() == pytest.approx(kept_distance_loss(rows_s, rows_t, drop), rel=1e-4)
    assert rkd_angle_loss(s, t).item() == pytest.approx(kept_angle_loss(rows_s, rows_t, drop), rel=1e-4)


def test_rkd_terms_stay_on_the_embeddings_device_and_dtype() -> None:
    s, t = torch.randn(6, 4, device="meta"), torch.randn(6, 3, device="meta")  # meta: any non-CPU device
    assert rkd_distance_loss(s, t).device.type == rkd_angle_loss(s, t).device.type == "meta"
    gen = torch.Generator().manual_seed(10)
    s = torch.randn(26, 4, generator=gen, dtype=torch.float64)
    t = torch.randn(26, 3, generator=gen, dtype=torch.float64)
    want_d, want_a = slow_distance_loss(s.tolist(), t.tolist()), slow_angle_loss(s.tolist(), t.tolist())
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # counts of 650 pairs and 15600 triplets are not bfloat16 numbers
    try:
        got_d, got_a = rkd_distance_loss(s, t).item(), rkd_angle_loss(s, t).item()
    finally:
        torch.set_default_dtype(default)
    assert got_d == pytest.approx(want_d, rel=1e-10) and got_a == pytest.approx(want_a, rel=1e-10)


@pytest.mark.parametrize("gap, dropped", [(0.012, True), (0.02, False)])
def test_rkd_leaves_out_pairs_closer_than_a_thousandth_of_the_mean_distance(gap: float, dropped: bool) -> None:
    """Rows 0, 10, 20, 30 and a fifth `gap` from row 0: the mean distance over i != j is 16 - 0.2·gap, so the
    cut-off is just under 0.016 and the pair (0, 4) is left out at gap 0.012 and kept at gap 0.02."""
    s = [[0.0], [10.0], [20.0], [30.0], [gap]]
    t = torch.randn(5, 3, generator=torch.Generator().manual_seed(11), dtype=torch.float64).tolist()
    drop = {frozenset((0, 4))} if dropped else set()
    s_t, t_t = torch.tensor(s, dtype=torch.float64), torch.tensor(t, dtype=torch.float64)
    assert rkd_distance_loss(s_t, t_t).item() == pytest.approx(kept_distance_loss(s, t, drop), rel=1e-9)
    assert rkd_angle_loss(s_t, t_t).item() == pytest.approx(kept_angle_loss(s, t, drop), rel=1e-9)


@pytest.mark.parametrize("rows", [2, 3])
def test_rkd_distance_normaliser_is_floored_for_collapsed_embeddings(rows: int) -> None:
    """A mean distance below 1e-12 counts as 1e-12: a collapsed student is compared as it is, not blown up."""
    gen = torch.Generator().manual_seed(12)
    s = torch.randn(rows, 4, generator=gen, dtype=torch.float64) * 1e-14
    t = torch.randn(rows, 3, generator=gen, dtype=torch.float64)
    pairs = [(i, j) for i in range(rows) for j in range(rows) if i != j]
    ds = [dist(s.tolist()[i], s.tolist()[j]) for i, j in pairs]
    dt = [dist(t.tolist()[i], t.tolist()[j]) for i, j in pairs]
    assert sum(ds) / len(pairs) < 1e-12
    want = sum(huber(a / 1e-12, b / (sum(dt) / len(pairs))) for a, b in zip(ds, dt)) / len(pairs)
    assert want > 0.1
    assert rkd_distance_loss(s, t).item() == pytest.approx(want, rel=1e-9)
