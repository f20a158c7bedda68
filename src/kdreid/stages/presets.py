"""Named presets: partial configs per stage, applied over the defaults and under --config and CLI flags.

Order of precedence, lowest first: the dataclass defaults (general re-ID settings, torchreid's where it has
them), the preset, the --config YAML file, then each CLI flag that was given.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, TypeVar

from kdreid.config import from_dict, override, read_yaml, to_dict
from kdreid.errors import ConfigError

T = TypeVar("T")

# `paper`: the original scripts' settings where they are sound: Adam 3e-4 with betas (0.9, 0.99) and weight decay
# 5e-4, batch 32 = 8×4, 256×128, D-MMD from epoch 25, KD with SGD 0.01. Unlike the original, random erasing runs
# (its scripts asked for an augmentation their builder did not know), and source training is 60 epochs with a
# warm-up and two decays instead of 100 with one at 50.
# `quick`: small enough for 2 CPU cores in minutes, on the synthetic domains at 64×32.
PRESETS: dict[str, dict[str, dict]] = {
    "paper": {
        "source": {"train": {"epochs": 60, "height": 256, "width": 128, "batch_size": 32, "num_instances": 4,
                             "optim": {"optimizer": "adam", "lr": 3e-4, "betas": [0.9, 0.99], "scheduler": "multistep",
                                       "milestones": [20, 40], "warmup_epochs": 10}}},
        # D-MMD after 25 source-only epochs, as the KD-ReID code ran it (DESIGN §5).
        "adapt": {"dmmd_start": 25,
                  "train": {"epochs": 80, "height": 256, "width": 128, "batch_size": 32, "num_instances": 4,
                            "optim": {"optimizer": "adam", "lr": 3e-4, "betas": [0.9, 0.99], "scheduler": "multistep",
                                      "milestones": [50], "warmup_epochs": 0}}},
        # KD: the original's SGD 0.01 and 50 epochs, decayed at 20 and 40 (its step of 5 assumed the schedule
        # its engine ran, which stepped T times per epoch); evaluation every 5 epochs.
        "distill": {"train": {"epochs": 50, "height": 256, "width": 128, "batch_size": 32, "num_instances": 4,
                              "eval_freq": 5,
                              "optim": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": False,
                                        "scheduler": "multistep", "milestones": [20, 40], "warmup_epochs": 0}}},
    },
    "quick": {
        # Sized for `make demo`: the seven stages of `kdreid pipeline` on the small synthetic domains it writes
        # (scale 0.03, 64x32) in about 10 minutes on 2 CPU cores. ResNet-18 teachers: ResNet-50 is too slow there.
        "pipeline": {"teacher_arch": "resnet18"},
        "source": {"train": {"epochs": 6, "height": 64, "width": 32, "batch_size": 32, "num_instances": 4,
                             "optim": {"optimizer": "adam", "lr": 1e-3, "scheduler": "cosine",
                                       "warmup_epochs": 1}}},
        # D-MMD on normalised embeddings: on raw ones a short schedule spends itself rescaling the embedding
        # (docs/algorithms.md, "What the synthetic study shows so far").
        "adapt": {"dmmd_start": 1, "dmmd_normalize": True,
                  "train": {"epochs": 2, "height": 64, "width": 32, "batch_size": 32, "num_instances": 4,
                            "optim": {"optimizer": "adam", "lr": 3e-4, "scheduler": "cosine",
                                      "warmup_epochs": 0}}},
        # The student starts from its source-trained weights and matches the teachers' retrieval features (after
        # BNNeck): their pooled embeddings are packed so tightly in angle that the distances' structure is a tiny
        # part of the loss there (docs/algorithms.md, "The quick student").
        "distill": {"kd_feature": "neck",
                    "train": {"epochs": 7, "height": 64, "width": 32, "batch_size": 32, "num_instances": 4,
                              "eval_freq": 0,
                              "optim": {"optimizer": "adam", "lr": 3e-3, "scheduler": "cosine",
                                        "warmup_epochs": 0}}},
    },
}


def resolve_config(
    cls: type[T], stage: str, *, preset: str | None = None, config_file: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> T:
    config = cls()
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
        config = _merge(config, PRESETS[preset].get(stage, {}), where=f"preset {preset}")
    if config_file is not None:
        data = read_yaml(config_file) or {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{config_file}: expected a mapping of settings at the top level")
        config = _merge(config, _expand_home(data), where=str(config_file))
    return override(config, overrides or {})


# The settings that name files or folders (at any depth: `data: {root: ...}`, a pipeline's `source: {pretrained:
# ...}`): `~` there is the home folder, as in the path flags, not a folder named `~` in the current one.
PATH_SETTINGS = frozenset({"out", "root", "init", "teachers", "student_init", "pretrained"})


def _expand_home(data: Any, key: str = "") -> Any:
    if isinstance(data, Mapping):
        return {name: _expand_home(value, str(name)) for name, value in data.items()}
    if key not in PATH_SETTINGS:
        return data
    if isinstance(data, str):
        return os.path.expanduser(data)
    if isinstance(data, list):
        return [os.path.expanduser(item) if isinstance(item, str) else item for item in data]
    return data


def _merge(config: T, partial: Mapping, where: str) -> T:
    def deep(base: dict, update: Mapping) -> dict:
        merged = dict(base)
        for key, value in update.items():
            if value is None and isinstance(base.get(key), dict):
                # An empty section (`train:` whose lines are all commented out) changes nothing; as None it
                # would rebuild the section from the defaults, silently undoing the preset's settings there.
                continue
            if isinstance(value, Mapping) and isinstance(base.get(key), dict):
                merged[key] = deep(base[key], value)
            else:
                merged[key] = value
        return merged

    return from_dict(type(config), deep(to_dict(config), partial), where=where)
