from pathlib import Path

import pytest

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
    assert len(flat) == len(set(flat))
    path = tmp_path / "resolved.yaml"
    path.write_text(config.to_yaml(cfg))
    assert config.load(path) == cfg


def test_experiment_files_load():
    for path in (Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml"):
        assert isinstance(config.load(path), Config), path


def test_nested_section_keeps_its_own_defaults():
    cfg = config.load(None, ["student.model.name=cnn"])
    assert cfg.student.model.name == "cnn"
    assert cfg.student.model.hidden == Config().student.model.hidden != Config().model.hidden
