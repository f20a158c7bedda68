from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from kdreid.config import dump_yaml, from_dict, load_yaml, override, to_dict
from kdreid.errors import ConfigError


@dataclass
class Optim:
    name: Literal["sgd", "adam"] = "adam"
    lr: float = 3.5e-4
    milestones: list[int] = field(default_factory=lambda: [40, 70])


@dataclass
class Run:
    sources: tuple[str, ...] = ("market1501",)
    height: int = 256
    pretrained: Optional[str] = None
    flip: bool = False
    optim: Optim = field(default_factory=Optim)


def test_yaml_round_trip(tmp_path):
    config = Run(sources=("msmt17", "cuhk03"), pretrained="w.pth", optim=Optim("sgd", 0.1, [10]))
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(config))
    assert load_yaml(Run, path) == config


def test_missing_keys_keep_defaults_and_ints_become_floats():
    config = from_dict(Run, {"optim": {"lr": 1}})
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    assert config.height == 256 and config.sources == ("market1501",)


def test_exponent_numbers_that_yaml_reads_as_strings_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim: {lr: 1e-3}\n")  # PyYAML (YAML 1.1) gives the string '1e-3'
    assert load_yaml(Run, path).optim.lr == 0.001
    for not_a_number in ("1e-3x", "1e400", "nan", "\u0661\u0662"):  # nor an overflow to inf, nor Arabic-Indic digits
        with pytest.raises(ConfigError, match="config.optim.lr: expected a number"):
            from_dict(Run, {"optim": {"lr": not_a_number}})


def test_a_misspelt_evaluation_metric_is_refused_when_the_config_is_read():
    from kdreid.stages.source import SourceConfig

    with pytest.raises(ConfigError, match="config.eval.metric: 'cosin' is not one of 'euclidean', 'cosine'"):
        from_dict(SourceConfig, {"eval": {"metric": "cosin"}})


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"heigth": 3}, "unknown key(s) heigth"),
        ({"height": "tall"}, "config.height: expected an integer"),
        ({"flip": 1}, "expected true or false"),
        ({"height": True}, "config.height: expected an integer, got True"),  # YAML's `yes`: not the number 1
        ({"optim": {"lr": False}}, "config.optim.lr: expected a number, got False"),
        ({"pretrained": 3}, "config.pretrained: expected a string, got 3"),
        ({"sources": ["a", 5]}, "config.sources[1]: expected a string, got 5"),
        ({"optim": {"name": "rmsprop"}}, "config.optim.name: 'rmsprop' is not one of"),
        ({"optim": {"milestones": [1, "x"]}}, "config.optim.milestones[1]"),
    ],
)
def test_bad_values_name_the_key(data, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        from_dict(Run, data)
    assert fragment in str(info.value)


def test_a_pair_takes_exactly_two_values():
    from kdreid.stages.source import SourceConfig

    assert from_dict(SourceConfig, {"train": {"optim": {"betas": [0.5, 0.9]}}}).train.optim.betas == (0.5, 0.9)
    for betas in ([0.9], [0.9, 0.99, 0.999]):  # else Adam gets a wrong number of betas, after the data are read
        with pytest.raises(ConfigError, match=f"config.train.optim.betas: expected 2 values, got {len(betas)}"):
            from_dict(SourceConfig, {"train": {"optim": {"betas": betas}}})


def test_override_dotted_and_skips_none():
    config = override(Run(), {"optim.lr": 0.01, "height": None, "sources": ("a", "b")})
    assert config.optim.lr == 0.01 and config.height == 256 and config.sources == ("a", "b")
    with pytest.raises(ConfigError, match="unknown config key 'optim.momentum'"):
        override(Run(), {"optim.momentum": 0.9})


def test_to_dict_is_plain():
    assert to_dict(Run())["optim"] == {"name": "adam", "lr": 3.5e-4, "milestones": [40, 70]}


def test_load_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(Run, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("height: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(Run, bad)
