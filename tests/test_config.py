import ast
import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from kdtrack import config
from kdtrack.config import Config
from kdtrack.errors import ConfigError


def test_defaults_come_from_code():
    cfg = config.load()
    assert cfg == Config()
    assert cfg.optim.lr == 0.05 and cfg.model.name == "resnet8"


def test_yaml_then_overrides_win(tmp_path: Path):
    path = tmp_path / "exp.yaml"
    path.write_text("optim:\n  lr: 0.2\n  epochs: 7\nmodel:\n  name: mlp\n")
    cfg = config.load(path, ["optim.lr=0.01", "model.hidden=[32, 16]", "data.input_shape=[3,32,32]"])
    assert cfg.optim.lr == 0.01  # override beats the file
    assert cfg.optim.epochs == 7  # file beats the default
    assert cfg.model.name == "mlp"
    assert cfg.model.hidden == (32, 16) and cfg.data.input_shape == (3, 32, 32)
    assert cfg.optim.momentum == Config().optim.momentum


def test_int_widens_to_float_and_off_stays_a_string():
    cfg = config.load(None, ["optim.lr=1", "train.amp=off", "optim.nesterov=false"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.train.amp == "off"
    assert cfg.optim.nesterov is False


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.epochs=abc", "optim.epochs must be int, got str"),
        ("optim.epochs=1.5", "optim.epochs must be int, got float"),
        ("optim.nesterov=3", "optim.nesterov must be bool"),
        ("optim.lr=true", "optim.lr must be float, got bool"),
        ("model.hidden=[a]", "model.hidden must be int"),
        ("data=3", "data is a section"),
        ("optim.schedule=linear", "choose one of: cosine, step, none"),
        ("nokeyvalue", "not of the form key=value"),
    ],
)
def test_type_errors_name_the_key(override: str, message: str):
    with pytest.raises(ConfigError, match=message):
        config.load(None, [override])


def test_unknown_key_names_it_and_the_valid_ones(tmp_path: Path):
    with pytest.raises(ConfigError) as err:
        config.load(None, ["optim.lrr=0.1"])
    assert "unknown config key optim.lrr" in str(err.value)
    assert "lr, momentum" in err.value.fix
    path = tmp_path / "exp.yaml"
    path.write_text("modle:\n  name: mlp\n")
    with pytest.raises(ConfigError, match="unknown config key modle.*valid keys at the top level: experiment, seed"):
        config.load(path)


def test_bad_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        config.load(listing)


def test_flatten_and_yaml_round_trip(tmp_path: Path):
    cfg = config.load(None, ["optim.lr=0.3", "model.hidden=[8,4]"])
    flat = config.flatten(cfg)
    assert flat["optim.lr"] == 0.3 and flat["model.hidden"] == [8, 4] and flat["experiment"] == "kdtrack"
    # one entry per leaf field, named by its full path: a nested section's leaves never overwrite the top ones
    assert set(flat) == _leaf_names(Config)
    assert flat["student.model.hidden"] == [64] and flat["student.optim.lr"] == 0.05
    path = tmp_path / "resolved.yaml"
    path.write_text(config.to_yaml(cfg))
    assert config.load(path) == cfg


def _leaf_names(cls: type, prefix: str = "") -> set[str]:
    """Dotted names of every non-section field of the dataclass `cls`, walked here without kdtrack."""
    names = set()
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        names |= _leaf_names(hint, f"{prefix}{f.name}.") if dataclasses.is_dataclass(hint) else {prefix + f.name}
    return names


def _yaml_leaves(node: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        out.update(_yaml_leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def test_experiment_files_load():
    paths = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml"))
    assert len(paths) >= 2  # an empty glob would pass vacuously
    defaults = config.flatten(Config())
    for path in paths:
        written = _yaml_leaves(yaml.safe_load(path.read_text()))
        loaded = config.flatten(config.load(path))
        # every value the file sets arrives (a list as a list), every other key keeps its default
        assert {key: loaded[key] for key in written} == written, path
        assert {k: v for k, v in loaded.items() if k not in written} == {
            k: v for k, v in defaults.items() if k not in written}, path


def test_nested_section_keeps_its_own_defaults():
    cfg = config.load(None, ["student.model.name=cnn"])
    assert cfg.student.model.name == "cnn"
    assert cfg.student.model.hidden == Config().student.model.hidden != Config().model.hidden


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("experiment=", "experiment is empty"),
        ("experiment='  '", "experiment is empty"),
        ("optim.momentum=-0.1", "optim.momentum=-0.1 must be >= 0"),
        ("optim.weight_decay=-1e-4", "optim.weight_decay=-0.0001 must be >= 0"),
        ("student.optim.momentum=-1", "student.optim.momentum=-1.0 must be >= 0"),
        ("student.optim.weight_decay=-2", "student.optim.weight_decay=-2.0 must be >= 0"),
        ("optim.momentum=.nan", "optim.momentum=nan is not a finite number"),
        ("seed=18446744073709551616", "seed=18446744073709551616 is outside 0..18446744073709551615"),
        ("seed=-1", "seed=-1 is outside 0..18446744073709551615"),
        ("data.seed=-1", "data.seed=-1 is outside 0..18446744073709551615"),
        ("cache.verify_rows=0", "cache.verify_rows=0 must be >= 1"),
        ("kd.temperature=0", "kd.temperature=0.0 must be > 0"),
        ("kd.alpha=-0.1", "kd.alpha=-0.1 is outside 0..1"),
        ("kd.fusion_weights=[1,-1]", r"kd.fusion_weights=\[1.0, -1.0\] holds -1.0, which must be >= 0"),
        ("data.eval_batch_size=0", "data.eval_batch_size=0 must be >= 1 — e.g. --set data.eval_batch_size=512"),
        ("student.model.hidden=[8,0]", r"student.model.hidden=\[8, 0\] holds 0, which must be >= 1"),
    ],
)
def test_values_out_of_bounds_are_refused_at_load(override: str, message: str):
    with pytest.raises(ConfigError, match=message):
        config.load(None, [override])


def test_bounds_are_inclusive():
    cfg = config.load(None, ["seed=18446744073709551615", "optim.momentum=0", "optim.weight_decay=0",
                             "cache.verify_rows=1", "kd.alpha=1", "kd.alpha=0", "data.seed=0"])
    assert cfg.seed == 2**64 - 1 and cfg.optim.momentum == 0.0 and cfg.cache.verify_rows == 1
    assert cfg.kd.alpha == 0.0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is not a text file"),
        (bytes(range(256)), "is not a text file"),
        (b"1: 2\nfoo: 3\n", "has the key 1 at the top level, which is not a config key name"),
        (b"optim:\n  lr: 0.1\n  null: 2\n", "has the key None in section optim"),
        (b"? [a, b]\n: 3\n", r"has a list or mapping as a key \(line 1\)"),
    ],
)
def test_unreadable_files_are_one_config_error(tmp_path: Path, content: bytes, message: str):
    path = tmp_path / "exp.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        config.load(path)


# --- hints name real keys --------------------------------------------------------------------------------------

_REPO = Path(__file__).resolve().parents[1]
_SECTIONS = "|".join(sorted({key.split(".")[0] for key in config.flatten(Config()) if "." in key}))
# `--set KEY=` and dotted `section.key` names; a key may be followed by `=` or end the name (`kd.alpha,`).
_KEY_PATTERNS = (re.compile(r"--set\s+([A-Za-z_][\w.]*)="),
                 re.compile(rf"(?<![\w./-])((?:{_SECTIONS})\.[a-z_]\w*(?:\.[a-z_]\w*)?)(?![\w/(])"))


def _hint_texts() -> list[tuple[str, int, str]]:
    """(file, line, text) of each error raised and each click help text in kdtrack/ and plot_experiments.py; an
    f-string's literal parts are joined, so `f"e.g. --set {key}=3"` gives no key to check."""
    found = []
    for path in [*sorted((_REPO / "kdtrack").rglob("*.py")), _REPO / "plot_experiments.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                parts = node.exc
            elif isinstance(node, ast.keyword) and node.arg == "help":
                parts = node.value
            else:
                continue
            text = " ".join(n.value for n in ast.walk(parts) if isinstance(n, ast.Constant) and isinstance(n.value, str))
            found.append((str(path.relative_to(_REPO)), node.lineno, text))
    return found


def test_hint_scan_finds_wrong_keys():
    text = "e.g. --set kd_alpha=0.5, or set data.batch_sise=64 and student.optim.lr (see losses/kd.py)"
    assert [key for pattern in _KEY_PATTERNS for key in pattern.findall(text)] == [
        "kd_alpha", "data.batch_sise", "student.optim.lr"]


def test_hints_name_real_config_keys():
    keys = set(config.flatten(Config()))
    named = [(where, line, key) for where, line, text in _hint_texts() for pattern in _KEY_PATTERNS
             for key in pattern.findall(text)]
    assert len(named) > 30  # the scan sees the hints (a broken pattern would pass vacuously)
    # model.* and optim.* hints are f-strings under a teacher/student prefix now (checked by the tests below)
    assert {"optim.lr", "student.optim.lr", "data.batch_size", "kd.fusion_weights"} <= {key for *_, key in named}
    wrong = [f"{where}:{line}: {key}" for where, line, key in named if key not in keys]
    assert not wrong, wrong


# --- hints raised at run time name the right key (f-strings and run-time prefixes the scan above cannot see) -----

def _named_keys(message: str) -> set[str]:
    """The config keys `message` names; every one must be real."""
    named = {key for pattern in _KEY_PATTERNS for key in pattern.findall(message)}
    fake = named - set(config.flatten(Config()))
    assert not fake, f"{sorted(fake)} are not config keys: {message}"
    return named


def _raised(call) -> str:
    from kdtrack.errors import KdtrackError

    with pytest.raises(KdtrackError) as err:
        call()
    return str(err.value)


def _logits() -> "torch.Tensor":
    import torch

    return torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])


def _kd_cases():
    import torch
    from torch import nn

    from kdtrack.cache import writer
    from kdtrack.data import make_loader
    from kdtrack.data.sources import stratified_splits
    from kdtrack.losses.factor_transfer import train_paraphraser
    from kdtrack.losses.feature import FeatureKD
    from kdtrack.losses.fusion import fuse_teachers
    from kdtrack.losses.kd import KDLossConfig, compute_confidence_weights, kd_loss

    cpu = torch.device("cpu")
    return {
        "kd_loss-temperature": (lambda: kd_loss(_logits(), _logits(), temperature=0), {"kd.temperature"}),
        "config-temperature": (lambda: KDLossConfig(temperature=-1.0), {"kd.temperature"}),
        "config-alpha": (lambda: KDLossConfig(kd_alpha=1.5), {"kd.alpha"}),
        "config-label-smoothing": (lambda: KDLossConfig(label_smoothing=1.0), {"train.label_smoothing"}),
        "config-warmup": (lambda: KDLossConfig(warmup_epochs=-1), {"kd.warmup_epochs"}),
        "config-ramp": (lambda: KDLossConfig(kd_ramp_epochs=-1), {"kd.ramp_epochs"}),
        "config-threshold": (lambda: KDLossConfig(confidence_threshold=2.0), {"kd.confidence_threshold"}),
        "weights-threshold": (lambda: compute_confidence_weights(_logits(), "threshold", 1.5),
                              {"kd.confidence_threshold"}),
        "config-weighting": (lambda: KDLossConfig(kd_weighting="entropy"), {"kd.weighting"}),
        "weights-weighting": (lambda: compute_confidence_weights(_logits(), "entropy"), {"kd.weighting"}),
        "feature-alpha": (lambda: FeatureKD(nn.Identity(), nn.Identity(), alpha=2.0), {"kd.alpha"}),
        "fusion-weights": (lambda: fuse_teachers(torch.zeros(2, 3, 4), "weighted", weights=[0.0, 0.0]),
                           {"kd.fusion_weights"}),
        "paraphraser-epochs": (lambda: train_paraphraser(nn.Identity(), nn.Identity(), [], layer="x", epochs=0,
                                                         lr=1e-3, device=cpu), {"kd.paraphraser_epochs"}),
        "cache-batch-size": (lambda: writer.build("unused.zarr", nn.Identity(), None, attrs={}, device=cpu,
                                                  batch_size=0), {"cache.batch_size"}),
        "cache-dtype": (lambda: writer.build("unused.zarr", nn.Identity(), None, attrs={}, device=cpu,
                                             batch_size=8, dtype="float64"), {"cache.dtype"}),
        "loader-batch-size": (lambda: make_loader(None, 0, shuffle=False, seed=0),
                              {"data.batch_size", "data.eval_batch_size", "cache.batch_size"}),
        "split-fractions": (lambda: stratified_splits(torch.zeros(10, dtype=torch.long).numpy(), 0.6, 0.5, 0),
                            {"data.val_fraction", "data.test_fraction"}),
    }


@pytest.mark.parametrize("case", list(_kd_cases()))
def test_loss_cache_and_data_hints_name_their_key(case: str):
    call, keys = _kd_cases()[case]
    assert _named_keys(_raised(call)) == keys


def test_non_finite_loss_hint_names_both_learning_rates():
    import torch
    from torch import nn

    from kdtrack import engine

    model = nn.Linear(3, 2)
    batch = (torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.arange(2), torch.zeros(2, dtype=torch.long))
    nan_loss = lambda m, b, epoch: (m(b[0]), {"ce": m(b[0]).sum() * float("nan")})  # noqa: E731
    message = _raised(lambda: engine.fit(model, [batch], torch.optim.SGD(model.parameters(), lr=0.1),
                                         loss_fn=nan_loss, epochs=1, device=torch.device("cpu"), progress=False))
    assert {"optim.lr", "student.optim.lr"} <= _named_keys(message)


_OPTIM_CASES = {  # OptimConfig fields -> keys (under the prefix) the hint must name
    "lr": ({"lr": 0.0}, {"lr"}),
    "nesterov": ({"momentum": 0.0}, {"momentum", "nesterov"}),
    "name": ({"name": "lion"}, {"name"}),
    "epochs": ({"epochs": 0}, {"epochs"}),
    "step-size": ({"schedule": "step", "step_size": 0}, {"step_size"}),
    "schedule": ({"schedule": "linear"}, {"schedule"}),
}


@pytest.mark.parametrize("prefix", ["optim", "student.optim"])
@pytest.mark.parametrize("case", list(_OPTIM_CASES))
def test_optimizer_hints_name_the_teacher_or_student_key(case: str, prefix: str):
    import torch

    from kdtrack.config import OptimConfig
    from kdtrack.optim import build_optimizer, build_scheduler

    fields, keys = _OPTIM_CASES[case]
    cfg = OptimConfig(**fields)
    param = torch.nn.Parameter(torch.zeros(1))
    kw = {} if prefix == "optim" else {"prefix": prefix}
    if case in ("lr", "nesterov", "name"):
        message = _raised(lambda: build_optimizer([param], cfg, **kw))
    else:
        message = _raised(lambda: build_scheduler(torch.optim.SGD([param], lr=0.1), cfg, **kw))
    assert _named_keys(message) == {f"{prefix}.{key}" for key in keys}


_MODEL_CASES = {  # ModelConfig fields, input shape -> key (under the prefix) the hint must name
    "flat-input": ({"name": "cnn", "conv": "2d"}, (64,), "conv"),
    "4d-input": ({"name": "resnet8"}, (1, 1, 8, 8), "name"),
    "unknown-name": ({"name": "resnet18"}, (1, 8, 8), "name"),
    "hidden": ({"name": "mlp", "hidden": (8, 0)}, (64,), "hidden"),
    "channels": ({"name": "cnn", "channels": 0}, (1, 8, 8), "channels"),
    "dropout": ({"name": "mlp", "dropout": 1.5}, (64,), "dropout"),
}


@pytest.mark.parametrize("prefix", ["model", "student.model"])
@pytest.mark.parametrize("case", list(_MODEL_CASES))
def test_model_hints_name_the_teacher_or_student_key(case: str, prefix: str):
    from kdtrack.config import ModelConfig
    from kdtrack.models import spec_from_config

    fields, shape, key = _MODEL_CASES[case]
    kw = {} if prefix == "model" else {"prefix": prefix}
    message = _raised(lambda: spec_from_config(ModelConfig(**fields), 10, shape, **kw))
    assert _named_keys(message) == {f"{prefix}.{key}"}


@pytest.mark.parametrize(
    ("command", "sets", "keys"),
    [
        ("train-student", ["method=none", "student.optim.momentum=0"],
         {"student.optim.momentum", "student.optim.nesterov"}),
        ("train-teacher", ["optim.momentum=0"], {"optim.momentum", "optim.nesterov"}),
        ("train-student", ["method=none", "student.model.name=mlp", "student.model.dropout=1.5"],
         {"student.model.dropout"}),
        ("train-teacher", ["model.name=mlp", "model.dropout=1.5"], {"model.dropout"}),
        ("train-student", ["method=none", "data.source=synthetic", "data.input_shape=[64]", "student.model.name=cnn",
                           "student.model.conv=2d"], {"student.model.conv"}),
        ("train-teacher", ["data.source=synthetic", "data.input_shape=[64]", "model.name=cnn", "model.conv=2d"],
         {"model.conv"}),
    ],
    ids=["student-nesterov", "teacher-nesterov", "student-dropout", "teacher-dropout",
         "student-flat-input", "teacher-flat-input"],
)
def test_cli_hints_name_the_key_that_was_set(store: str, command: str, sets: list[str], keys: set[str]):
    """Values the config's own bounds let through but the optimizer or model builder refuses, from the CLI."""
    from conftest import cli, set_args

    code, _out, err = cli(command, *set_args(*sets, "experiment=hint-keys", "train.progress=off"))
    assert code == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert _named_keys(err) == keys, err
