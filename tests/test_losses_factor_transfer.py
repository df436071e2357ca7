"""Factor transfer: paraphraser/translator layouts, paraphraser pre-training against a plain Adam loop, the FT term
by hand, and the layer helpers it shares with the other feature methods (shapes, pooling, upcasting)."""
from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from torch import nn

from kdtrack.errors import ConfigError, ModelError, TrainingError
from kdtrack.losses import FactorTransfer, Paraphraser, Translator, train_paraphraser
from kdtrack.losses.layers import layer_shape, match_spatial, stage_shapes, upcast

CPU = torch.device("cpu")
INPUT = (2, 6, 6)


class TinyNet(nn.Module):
    """conv1 (c1, 6, 6) -> conv2 (c2, 3, 3) -> pool (c2,) -> fc (4,) on (2, 6, 6) inputs; fc is not a feature layer."""

    feature_layers = ("conv1", "conv2", "pool")

    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.conv2(self.conv1(x))))


def layout(seq: nn.Sequential) -> list[tuple]:
    """Each layer as a plain tuple: conv (in, out, kernel, stride, padding, has bias), bn (channels), leaky (slope)."""
    rows = []
    for m in seq:
        if type(m) is nn.Conv2d:
            rows.append(("conv", m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.bias is not None))
        elif type(m) is nn.BatchNorm2d:
            rows.append(("bn", m.num_features))
        elif type(m) is nn.LeakyReLU:
            rows.append(("leaky", m.negative_slope))
        else:
            rows.append((type(m).__name__,))
    return rows


def conv_bn_leaky(cin: int, cout: int) -> list[tuple]:
    """3x3 conv, stride 1, padding 1 (size-preserving), no bias (BatchNorm follows), then LeakyReLU(0.1)."""
    return [("conv", cin, cout, (3, 3), (1, 1), (1, 1), False), ("bn", cout), ("leaky", 0.1)]


def test_paraphraser_and_translator_layouts_keep_spatial_size() -> None:
    para = Paraphraser(6, 0.5)
    assert para.factor_channels == 3
    assert layout(para.encoder) == conv_bn_leaky(6, 6) + conv_bn_leaky(6, 3)
    # Linear last layer with a bias: the reconstruction can take any sign and offset.
    assert layout(para.decoder) == conv_bn_leaky(3, 6) + [("conv", 6, 6, (3, 3), (1, 1), (1, 1), True)]
    x = torch.randn(2, 6, 5, 7)
    assert para.encode(x).shape == (2, 3, 5, 7) and para(x).shape == (2, 6, 5, 7)
    translator = Translator(5, 3)
    assert layout(translator.net) == conv_bn_leaky(5, 5) + conv_bn_leaky(5, 3)
    assert translator(torch.randn(2, 5, 5, 7)).shape == (2, 3, 5, 7)


@pytest.mark.parametrize(("channels", "rate", "factors"), [(1, 0.5, 1), (3, 0.1, 1), (6, 0.5, 3), (5, 4, 20)])
def test_paraphraser_factor_channels_round_rate_times_channels_at_least_one(channels: int, rate: float,
                                                                           factors: int) -> None:
    assert Paraphraser(channels, rate).factor_channels == factors


@pytest.mark.parametrize(("channels", "rate"), [(0, 0.5), (4, 0), (4, -0.5), (4, 4.5), (4, 5)])
def test_paraphraser_refuses_no_channels_or_rate_outside_zero_to_four(channels: int, rate: float) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"0 < rate <= 4, got {channels}, {rate}")):
        Paraphraser(channels, rate)


class Stem(nn.Module):
    """A teacher without feature_layers: conv -> BatchNorm -> ReLU -> mean; the hooked layer is `bn`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)).relu().mean(dim=(1, 2, 3))


def stem_teacher() -> Stem:
    torch.manual_seed(0)
    teacher = Stem()
    teacher.bn.running_mean.fill_(0.3)  # eval and train mode give different maps
    teacher.bn.running_var.fill_(2.0)
    return teacher


def plain_adam_training(para: nn.Module, teacher: Stem, batches: list[torch.Tensor], epochs: int,
                        lr: float) -> list[float]:
    """Reference: Adam on MSE(para(t), t) with t the eval-mode teacher's bn map; per-epoch sample-weighted mean."""
    teacher.eval()
    para.train()
    optimizer = torch.optim.Adam(para.parameters(), lr=lr)
    history = []
    for _ in range(epochs):
        total, seen = 0.0, 0
        for x in batches:
            with torch.no_grad():
                target = teacher.bn(teacher.conv(x))
            loss = ((para(target) - target) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(x)
            seen += len(x)
        history.append(total / seen)
    return history


@pytest.mark.parametrize(("sizes", "epochs", "frozen"), [((3, 2), 2, False), ((1,), 1, True)])
def test_train_paraphraser_matches_plain_adam_loop(sizes: tuple[int, ...], epochs: int, frozen: bool) -> None:
    """Same steps, losses and weights as the reference loop on a layer outside any feature_layers list; the
    paraphraser ends in eval mode with requires_grad as it was found, the teacher back in train mode."""
    teacher = stem_teacher()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(n, 1, 4, 4, generator=gen) for n in sizes]
    para = Paraphraser(2, 0.5).requires_grad_(not frozen)
    reference = copy.deepcopy(para).requires_grad_(True)
    initial = copy.deepcopy(para.state_dict())
    want = plain_adam_training(reference, copy.deepcopy(teacher), batches, epochs, lr=0.05)
    got = train_paraphraser(para, teacher, [(x, torch.zeros(len(x))) for x in batches], layer="bn",
                            epochs=epochs, lr=0.05, device=CPU)
    assert got == pytest.approx(want, rel=1e-5)
    trained, expected = para.state_dict(), reference.state_dict()
    assert all(torch.allclose(trained[k].float(), v.float(), atol=1e-6) for k, v in expected.items())
    assert not torch.equal(trained["decoder.3.weight"], initial["decoder.3.weight"])  # it did train
    assert not para.training and teacher.training
    assert [p.requires_grad for p in para.parameters()] == [not frozen] * len(list(para.parameters()))


@pytest.mark.parametrize(("epochs", "lr", "message"), [
    (0, 1e-3, "epochs >= 1, got 0"), (True, 1e-3, "epochs >= 1, got True"), (2.0, 1e-3, "epochs >= 1, got 2.0"),
    (1, 0.0, "finite lr > 0, got 0.0"), (1, -1e-3, "finite lr > 0, got -0.001"),
    (1, math.inf, "finite lr > 0, got inf"), (1, math.nan, "finite lr > 0, got nan"),
])
def test_train_paraphraser_refuses_bad_epochs_and_lr(epochs: object, lr: float, message: str) -> None:
    batches = [(torch.randn(2, 1, 4, 4),)]
    with pytest.raises(ConfigError, match=re.escape(message)):
        train_paraphraser(Paraphraser(2, 0.5), stem_teacher(), batches, layer="bn", epochs=epochs, lr=lr,
                          device=CPU)


def test_train_paraphraser_fails_on_empty_loader_or_non_finite_loss() -> None:
    teacher = stem_teacher()
    with pytest.raises(TrainingError, match=re.escape("loss is 0.0 at epoch 0 (0 samples)")):
        train_paraphraser(Paraphraser(2, 0.5), teacher, [], layer="bn", epochs=1, lr=1e-3, device=CPU)
    nan_batch = [(torch.full((2, 1, 4, 4), math.nan),)]
    with pytest.raises(TrainingError, match=re.escape("loss is nan at epoch 0 (2 samples)")):
        train_paraphraser(Paraphraser(2, 0.5), teacher, nan_batch, layer="bn", epochs=1, lr=1e-3, device=CPU)
    assert teacher.training


def test_train_paraphraser_runs_every_step_on_the_given_device() -> None:
    """On the meta device (a stand-in for any non-CPU one: its values cannot be read) the paraphraser and the
    CPU batches are moved there, and the run goes as far as reading the epoch's summed loss on that device."""
    meta = torch.device("meta")
    teacher, para = stem_teacher().to(meta), Paraphraser(2, 0.5)  # the paraphraser and the batches on the CPU
    with pytest.raises(RuntimeError, match=re.escape("item() cannot be called on meta tensors")):
        train_paraphraser(para, teacher, [(torch.randn(3, 1, 4, 4),)], layer="bn", epochs=1, lr=1e-3, device=meta)
    assert all(p.device == meta for p in para.parameters()) and not para.training and teacher.training


def by_hand(ft: FactorTransfer, student_map: torch.Tensor, teacher_map: torch.Tensor, weight: float) -> float:
    """weight · sqrt(N) · mean |u - v| over the factors' per-sample unit vectors, N the per-sample factor size."""
    with torch.no_grad():
        s = ft.translator(student_map).flatten(1)
        t = ft.paraphraser.encode(teacher_map).flatten(1)
    u, v = s / s.norm(dim=1, keepdim=True), t / t.norm(dim=1, keepdim=True)
    return weight * math.sqrt(t.shape[1]) * (u - v).abs().mean().item()


@pytest.mark.parametrize("batch", [1, 3])
def test_factor_transfer_defaults_and_term_by_hand(batch: int) -> None:
    """Default layers are each model's last conv stage, rate 0.5 and weight 1."""
    torch.manual_seed(0)
    ft = FactorTransfer.from_models(TinyNet(3, 5), TinyNet(4, 6), INPUT).eval()
    assert (ft.student_layers, ft.teacher_layers) == (("conv2",), ("conv2",))
    assert (ft.paraphraser.in_channels, ft.paraphraser.rate, ft.paraphraser.factor_channels) == (6, 0.5, 3)
    assert layout(ft.translator.net) == conv_bn_leaky(5, 5) + conv_bn_leaky(5, 3)
    assert not any(p.requires_grad for p in ft.paraphraser.parameters())
    s, t = torch.randn(batch, 5, 3, 3), torch.randn(batch, 6, 3, 3)
    got = ft({"conv2": s}, {"conv2": t}).item()
    assert got > 0.1 and got == pytest.approx(by_hand(ft, s, t, 1.0), rel=1e-5)


def test_factor_transfer_weight_and_given_paraphraser() -> None:
    torch.manual_seed(0)
    para = Paraphraser(4, 0.25)
    ft = FactorTransfer.from_models(TinyNet(3, 5), TinyNet(4, 4), INPUT, paraphraser=para, student_layer="conv1",
                                    teacher_layer="conv2", weight=0.5).eval()
    assert ft.paraphraser is para and (ft.student_layers, ft.teacher_layers) == (("conv1",), ("conv2",))
    assert layout(ft.translator.net) == conv_bn_leaky(3, 3) + conv_bn_leaky(3, 1)
    s, t = torch.randn(2, 3, 3, 3), torch.randn(2, 4, 3, 3)
    assert ft({"conv1": s}, {"conv2": t}).item() == pytest.approx(by_hand(ft, s, t, 0.5), rel=1e-5)


def test_factor_transfer_refuses_flat_layers_and_paraphraser_of_other_width() -> None:
    student, teacher = TinyNet(3, 5), TinyNet(4, 4)  # teacher conv2 is (4, 3, 3): channels differ from H
    with pytest.raises(ConfigError, match=re.escape(
            "factor transfer needs a (C, H, W) feature map but student layer 'pool' gives (5,)")):
        FactorTransfer.from_models(student, teacher, INPUT, student_layer="pool")
    with pytest.raises(ConfigError, match=re.escape(
            "factor transfer needs a (C, H, W) feature map but teacher layer 'fc' gives (4,)")):
        FactorTransfer.from_models(student, teacher, INPUT, teacher_layer="fc")
    with pytest.raises(ConfigError, match=re.escape("paraphraser takes 3 channels but teacher layer 'conv2' has 4")):
        FactorTransfer.from_models(student, teacher, INPUT, paraphraser=Paraphraser(3, 0.5))


def test_layer_shape_of_any_module_and_stage_shapes_need_feature_layers() -> None:
    net = TinyNet(3, 5)
    assert layer_shape(net, INPUT, "fc") == (4,)  # not one of the feature_layers
    assert layer_shape(net, INPUT, "conv2") == (5, 3, 3)
    with pytest.raises(ModelError, match="'nope'"):
        layer_shape(net, INPUT, "nope")
    assert stage_shapes(net, INPUT) == {"conv1": (3, 6, 6), "conv2": (5, 3, 3), "pool": (5,)}
    with pytest.raises(ConfigError, match="Stem lists no feature_layers"):
        stage_shapes(Stem(), (1, 4, 4))


def block_mean(x: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.reshape(b, c, h // kh, kh, w // kw, kw).mean(dim=(3, 5))


def test_match_spatial_pools_each_axis_down_to_the_smaller_map() -> None:
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 1, 2, 6, generator=gen), torch.randn(2, 3, 2, 3, generator=gen)
    pa, pb = match_spatial(a, b)
    assert torch.allclose(pa, block_mean(a, 1, 2)) and torch.equal(pb, b)
    a, b = torch.randn(2, 1, 4, 3, generator=gen), torch.randn(2, 1, 2, 6, generator=gen)  # each larger on one axis
    pa, pb = match_spatial(a, b)
    assert torch.allclose(pa, block_mean(a, 2, 1)) and torch.allclose(pb, block_mean(b, 1, 2))


def test_match_spatial_leaves_equal_maps_and_vectors_untouched() -> None:
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    pa, pb = match_spatial(a, b)
    assert pa is a and pb is b
    u, v = torch.randn(2, 3), torch.randn(2, 5)  # (B, D) embeddings of different widths
    pu, pv = match_spatial(u, v)
    assert pu is u and pv is v


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_upcast_gives_at_least_float32(dtype: torch.dtype) -> None:
    t = torch.tensor([1.5, -2.25], dtype=dtype)
    got = upcast(t)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.tolist() == [1.5, -2.25]
