"""Model zoo: shapes, gradients, specs, exact parameter counts and feature hooks."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from kdtrack.config import ModelConfig
from kdtrack.errors import ModelError
from kdtrack.models import (
    MODEL_NAMES,
    ModelSpec,
    build_model,
    capture_features,
    feature_shapes,
    spec_from_config,
)

CONV_NAMES = tuple(n for n in MODEL_NAMES if n != "mlp")
IMAGE_SHAPES = ((1, 8, 8), (8, 8), (3, 32, 32))
CASES = [("mlp", s) for s in ((64,), (40,), (1, 8, 8))] + [(n, s) for n in CONV_NAMES for s in IMAGE_SHAPES]
NUM_CLASSES = 7  # not 10, so a hard-coded class count would show


def _build(name: str, shape: tuple[int, ...], num_classes: int = NUM_CLASSES, **cfg: object) -> nn.Module:
    return build_model(spec_from_config(ModelConfig(name=name, **cfg), num_classes, shape))


def test_model_names_are_the_published_list() -> None:
    assert MODEL_NAMES == ("mlp", "cnn", "resnet8", "resnet14", "resnet20", "resnet32", "resnet44",
                           "resnet56", "resnet110", "resnet8x4", "resnet32x4")


@pytest.mark.parametrize(("name", "shape"), CASES)
def test_forward_backward_gives_logits_and_finite_grads(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = _build(name, shape, dropout=0.1) if name in ("mlp", "cnn") else _build(name, shape)
    logits = model(torch.randn(2, *shape))
    assert logits.shape == (2, NUM_CLASSES)
    logits.logsumexp(dim=1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"


@pytest.mark.parametrize("name", ["cnn", "resnet8", "resnet8x4"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 3, 5), (1, 40, 100), (2, 7)])
def test_conv_nets_take_any_map_size(name: str, shape: tuple[int, ...]) -> None:
    model = _build(name, shape)
    assert model(torch.randn(2, *shape)).shape == (2, NUM_CLASSES)


def test_hw_input_is_one_channel() -> None:
    torch.manual_seed(3)
    flat = _build("resnet8", (8, 8)).eval()
    torch.manual_seed(3)
    chan = _build("resnet8", (1, 8, 8)).eval()
    x = torch.randn(4, 8, 8)
    assert flat.stem[0].in_channels == 1
    assert torch.equal(flat(x), chan(x.unsqueeze(1)))


@pytest.mark.parametrize("name", CONV_NAMES)
def test_conv_nets_take_signals_with_1d_convolutions(name: str) -> None:
    """(L,) means one channel and 1d convolutions; (C, L) needs conv=1d, as (H, W) stays a one-channel image."""
    for shape, conv, channels in (((40,), "auto", 1), ((3, 40), "1d", 3)):
        model = build_model(spec_from_config(ModelConfig(name=name, conv=conv), 5, shape)).eval()
        convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d))]
        assert convs and all(isinstance(m, torch.nn.Conv1d) for m in convs)
        assert convs[0].in_channels == channels
        assert model(torch.randn(4, *shape)).shape == (4, 5)
    image = build_model(spec_from_config(ModelConfig(name=name), 5, (8, 8)))
    assert all(not isinstance(m, torch.nn.Conv1d) for m in image.modules())
    with pytest.raises(ModelError, match=r"2d convolutions needs a 2D feature map .* got 1D input shape \(40,\)"):
        spec_from_config(ModelConfig(name=name, conv="2d"), 10, (40,))
    with pytest.raises(ModelError, match=r"1d convolutions takes \(C, L\) or \(L,\) input, got 3D"):
        spec_from_config(ModelConfig(name=name, conv="1d"), 10, (1, 8, 8))


def test_1d_convolutions_see_the_signal_as_a_2d_net_sees_a_one_row_image() -> None:
    """A 1d cnn equals the 2d cnn on the (1, 1, L) image whose 3x3 kernels keep only their middle row: the same
    layers, one axis fewer (expected values from the 2d net, an independent code path)."""
    torch.manual_seed(0)
    flat = build_model(ModelSpec("cnn", 4, (2, 12), {"conv": "1d", "channels": 3})).eval()
    image = build_model(ModelSpec("cnn", 4, (2, 1, 12), {"channels": 3})).eval()
    state = {}
    for key, value in flat.state_dict().items():
        target = image.state_dict()[key]
        if value.dim() == 3:  # conv kernel (out, in, k) -> (out, in, 3, k) with zero top and bottom rows
            state[key] = torch.zeros_like(target)
            state[key][:, :, target.shape[2] // 2, :] = value
        else:
            state[key] = value
    image.load_state_dict(state)
    x = torch.randn(5, 2, 12)
    assert torch.allclose(flat(x), image(x.unsqueeze(2)), atol=1e-5)


def test_4d_input_shape_is_refused() -> None:
    with pytest.raises(ModelError, match="4D"):
        ModelSpec("cnn", 10, (1, 1, 8, 8))


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(ModelError) as info:
        spec_from_config(ModelConfig(name="resnet18"), 10, (3, 32, 32))
    assert "resnet18" in str(info.value)
    for name in MODEL_NAMES:
        assert name in info.value.fix


_BAD_SHAPE = "input shape must be a non-empty tuple of positive ints"


@pytest.mark.parametrize(
    ("num_classes", "shape", "message"),
    [(1, (64,), "num_classes must be an int >= 2, got 1"), (0, (64,), "num_classes must be an int >= 2, got 0"),
     (True, (64,), "num_classes must be an int >= 2, got True"), (10, (), _BAD_SHAPE), (10, (0, 8), _BAD_SHAPE),
     (10, (8, -1), _BAD_SHAPE), (10, (8.0, 8), _BAD_SHAPE)],
)
def test_bad_classes_or_shape_is_refused(num_classes: int, shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(ModelError, match=message):
        ModelSpec("mlp", num_classes, shape)


def test_spec_from_config_keeps_only_options_the_model_uses() -> None:
    cfg = dict(hidden=(32, 16), channels=8, dropout=0.25)
    assert spec_from_config(ModelConfig(name="mlp", **cfg), 10, (64,)).kwargs == {"hidden": (32, 16), "dropout": 0.25}
    assert spec_from_config(ModelConfig(name="cnn", **cfg), 10, (1, 8, 8)).kwargs == {"channels": 8, "dropout": 0.25,
                                                                                      "conv": "auto"}
    assert spec_from_config(ModelConfig(name="resnet20", **cfg), 10, (1, 8, 8)).kwargs == {"conv": "auto"}


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [("resnet20", {"dropout": 0.1}, r"resnet20 does not take option 'dropout' \(it takes conv\)"),
     ("mlp", {"channels": 4}, r"mlp does not take option 'channels' \(it takes hidden, dropout\)"),
     ("cnn", {"dropout": 1.0}, r"dropout must be a probability in \[0, 1\), got 1.0"),
     ("mlp", {"hidden": (0,)}, r"mlp hidden widths must be positive ints, got \(0,\)"),
     ("cnn", {"channels": 2.5}, "cnn channels must be a positive int, got 2.5")],
)
def test_bad_options_are_refused(name: str, kwargs: dict, message: str) -> None:
    shape = (64,) if name == "mlp" else (1, 8, 8)
    with pytest.raises(ModelError, match=message):
        ModelSpec(name, 10, shape, kwargs)


def test_missing_options_are_filled_from_config_defaults() -> None:
    defaults = ModelConfig()
    assert ModelSpec("mlp", 10, (64,)).kwargs == {"hidden": defaults.hidden, "dropout": defaults.dropout}


def _plain(node: object) -> bool:
    if isinstance(node, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in node.items())
    if isinstance(node, list):
        return all(_plain(v) for v in node)
    return type(node) in (str, int, float, bool)


@pytest.mark.parametrize(
    "spec",
    [ModelSpec("mlp", 5, (1, 8, 8), {"hidden": (32, 16), "dropout": 0.1}),
     ModelSpec("cnn", 10, (8, 8), {"channels": 4, "dropout": 0.0}),
     ModelSpec("resnet8x4", 3, (3, 16, 16), {})],
    ids=lambda s: s.name,
)
def test_spec_round_trip_rebuilds_an_identical_model(spec: ModelSpec) -> None:
    buffer = io.BytesIO()
    torch.save({"spec": spec.to_dict()}, buffer)
    buffer.seek(0)
    stored = torch.load(buffer, weights_only=True)["spec"]
    assert _plain(stored)
    again = ModelSpec.from_dict(stored)
    assert again == spec
    torch.manual_seed(0)
    original = build_model(spec).eval()
    torch.manual_seed(1)  # different init, so equal outputs can only come from the loaded weights
    rebuilt = build_model(again).eval()
    rebuilt.load_state_dict(original.state_dict())
    x = torch.randn(3, *spec.input_shape)
    assert torch.equal(original(x), rebuilt(x))


def test_from_dict_refuses_missing_keys() -> None:
    d = ModelSpec("resnet8", 10, (1, 8, 8)).to_dict()
    del d["kwargs"]
    with pytest.raises(ModelError, match="kwargs"):
        ModelSpec.from_dict(d)


def test_build_model_refuses_a_plain_dict() -> None:
    with pytest.raises(ModelError, match="from_dict"):
        build_model(ModelSpec("resnet8", 10, (1, 8, 8)).to_dict())  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet20"])
def test_same_seed_gives_identical_parameters(name: str) -> None:
    shape = (64,) if name == "mlp" else (1, 8, 8)
    states = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        states.append(_build(name, shape).state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


# Hand formulas for the CIFAR ResNets: bias-free convs, BN = 2 params per channel, option-B shortcuts.
def _conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k


def _block(cin: int, cout: int) -> int:
    body = _conv(cin, cout, 3) + 2 * cout + _conv(cout, cout, 3) + 2 * cout
    return body + (_conv(cin, cout, 1) + 2 * cout if cin != cout else 0)


def _resnet(depth: int, stem: int, widths: tuple[int, int, int], classes: int, in_ch: int = 3) -> int:
    n = (depth - 2) // 6
    total, cin = _conv(in_ch, stem, 3) + 2 * stem, stem
    for w in widths:
        total += _block(cin, w) + (n - 1) * _block(w, w)
        cin = w
    return total + widths[-1] * classes + classes


def test_hand_formula_matches_published_sizes() -> None:
    assert _resnet(20, 16, (16, 32, 64), 10) == 272_474  # "0.27M" in He et al. 2016
    assert _resnet(8, 32, (64, 128, 256), 100) == 1_233_540  # resnet8x4, 1.23M in CRD
    assert _resnet(32, 32, (64, 128, 256), 100) == 7_433_860  # resnet32x4, 7.43M in CRD


@pytest.mark.parametrize(
    ("name", "classes", "expected"),
    [("resnet8", 10, _resnet(8, 16, (16, 32, 64), 10)),
     ("resnet20", 10, _resnet(20, 16, (16, 32, 64), 10)),
     ("resnet32", 10, _resnet(32, 16, (16, 32, 64), 10)),
     ("resnet56", 100, _resnet(56, 16, (16, 32, 64), 100)),
     ("resnet110", 100, _resnet(110, 16, (16, 32, 64), 100)),
     ("resnet8x4", 100, _resnet(8, 32, (64, 128, 256), 100)),
     ("resnet32x4", 100, _resnet(32, 32, (64, 128, 256), 100))],
)
def test_resnet_parameter_counts(name: str, classes: int, expected: int) -> None:
    model = _build(name, (3, 32, 32), num_classes=classes)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_mlp_and_cnn_parameter_counts() -> None:
    mlp = _build("mlp", (1, 8, 8), num_classes=10, hidden=(32, 16))
    assert sum(p.numel() for p in mlp.parameters()) == (64 * 32 + 32) + (32 * 16 + 16) + (16 * 10 + 10)
    cnn = _build("cnn", (3, 32, 32), num_classes=10, channels=8)
    convs = _conv(3, 8, 3) + 16 + _conv(8, 16, 3) + 32 + _conv(16, 32, 3) + 64
    assert sum(p.numel() for p in cnn.parameters()) == convs + 32 * 10 + 10


# Expected per-sample feature shapes at input (1, 8, 8): stage strides 1, 2, 2 (resnet), 2, 2, 2 (cnn).
def _expected_shapes(name: str) -> dict[str, tuple[int, ...]]:
    if name == "mlp":
        return {"blocks.0": (32,), "blocks.1": (16,)}
    if name == "cnn":
        return {"block1": (8, 4, 4), "block2": (16, 2, 2), "block3": (32, 1, 1), "pool": (32,)}
    w = (64, 128, 256) if name.endswith("x4") else (16, 32, 64)
    return {"layer1": (w[0], 8, 8), "layer2": (w[1], 4, 4), "layer3": (w[2], 2, 2), "pool": (w[2],)}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_capture_features_sees_every_feature_layer(name: str) -> None:
    model = _build(name, (1, 8, 8), hidden=(32, 16), channels=8).eval()
    x = torch.randn(2, 1, 8, 8)
    expected = _expected_shapes(name)
    assert model.feature_layers == tuple(expected)
    with capture_features(model, model.feature_layers) as feats:
        logits = model(x)
    assert {k: tuple(v.shape) for k, v in feats.items()} == {k: (2, *v) for k, v in expected.items()}
    # The last feature layer is the penultimate embedding: the classifier alone maps it to the logits.
    assert torch.allclose(model.fc(feats[model.feature_layers[-1]]), logits)
    feats.clear()
    model(x)
    assert feats == {}
    assert all(not m._forward_hooks for m in model.modules())


def test_capture_features_keeps_the_graph_and_cleans_up_on_error() -> None:
    model = _build("resnet8", (1, 8, 8))
    with pytest.raises(RuntimeError, match="boom"), capture_features(model) as feats:
        model(torch.randn(2, 1, 8, 8))
        assert feats["layer2"].requires_grad
        raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in model.modules())


def test_capture_features_refuses_unknown_layer() -> None:
    model = _build("cnn", (1, 8, 8))
    with pytest.raises(ModelError, match="block1"), capture_features(model, ["layer9"]):
        pass


def test_mlp_without_hidden_layers_exposes_its_input() -> None:
    model = _build("mlp", (40,), hidden=())
    assert model.feature_layers == ("flatten",)
    assert feature_shapes(model, (40,)) == {"flatten": (40,)}


def test_feature_shapes_restores_training_mode() -> None:
    model = _build("resnet8x4", (3, 9, 9))
    assert feature_shapes(model, (3, 9, 9)) == {"layer1": (64, 9, 9), "layer2": (128, 5, 5),
                                                "layer3": (256, 3, 3), "pool": (256,)}
    assert model.training


@pytest.mark.parametrize(("name", "shape", "bad", "message"), [
    ("cnn", (1, 8, 8), (2, 8, 8), r"SmallCNN expects a batch of rank 4, got shape \(2, 8, 8\)"),
    ("mlp", (64,), (2, 40), r"mlp expects input \(B, 64\), got \(2, 40\)"),
])
def test_wrong_input_rank_or_size_is_refused(name: str, shape: tuple[int, ...], bad: tuple[int, ...],
                                             message: str) -> None:
    with pytest.raises(ModelError, match=message):
        _build(name, shape)(torch.randn(*bad))


@pytest.mark.slow  # trains a teacher for four epochs
def test_a_1d_conv_teacher_trains_on_40_step_series_from_a_manifest(store: str, tmp_path) -> None:
    """Each class is a sine of its own frequency with a random phase, saved as (40,) .npy files: a 1d cnn (conv
    auto) learns it; the run's checkpoint holds the (40,) spec with its 1d convolutions."""
    import json

    import numpy as np

    from kdtrack import checkpoint, config, tracking
    from kdtrack.stages import train_teacher

    rng = np.random.default_rng(0)
    samples = []
    for i in range(240):
        label, split = i % 3, ("train", "train", "val", "test")[i % 4]
        series = np.sin(np.arange(40) * (label + 1) * 0.4 + rng.uniform(0, 2 * np.pi)) + rng.normal(0, 0.1, 40)
        np.save(tmp_path / f"s{i}.npy", series.astype(np.float32))
        samples.append({"file": f"s{i}.npy", "label": label, "split": split})
    (tmp_path / "manifest.json").write_text(json.dumps({"num_classes": 3, "samples": samples}))
    cfg = config.load(None, ["data.source=manifest", f"data.manifest={tmp_path / 'manifest.json'}",
                             "model.name=cnn", "model.channels=8", "optim.epochs=4", "optim.lr=0.05",
                             "train.progress=off", "experiment=one-d"])
    run = tracking.get_run(train_teacher.run(cfg))
    spec = checkpoint.load(tracking.artifact_path(run.info.run_id, "checkpoints/best.pt"))["spec"]
    assert spec["input_shape"] == [40] and spec["kwargs"]["conv"] == "auto"
    assert run.data.metrics["test/acc"] > 0.8  # three frequencies: chance is 1/3
