"""kdreid model checkpoints: one file that rebuilds its model with no other argument.

Layout (a dict of plain values and tensors, so `torch.load(weights_only=True)` reads it and a stranger's file
cannot run code):

    format: "kdreid-checkpoint", format_version: 1
    arch: registered name             build_args: the keyword arguments of build_model (+ DSBN domains)
    state_dict: {name: tensor}        config: the resolved config (nested plain dicts)
    datasets: [names]                 metrics: {...}            extra: {...}
    kdreid_version, torch_version, created (UTC, ISO 8601)
"""

from __future__ import annotations

import dataclasses
import io
import numbers
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

import kdreid
from kdreid.errors import CheckpointError, ModelError
from kdreid.models.weights import CHECKPOINT_FORMAT, read_file
from kdreid.rundir import atomic_write_bytes

FORMAT_VERSION = 1


def _plain(value: Any, where: str) -> Any:
    """Metadata as plain types (what weights_only can read back); anything else is a programming error."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)  # str subclasses (torch.__version__, enums) would need their class to load
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name), f"{where}.{f.name}") for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return _plain(value.tolist(), where)
    raise TypeError(f"checkpoint metadata {where} is a {type(value).__name__}; store plain values only")


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    *,
    config: Any = None,
    datasets: list[str] | None = None,
    metrics: Mapping | None = None,
    extra: Mapping | None = None,
) -> Path:
    """Write `model` (built by build_model) and its metadata to `path` atomically; returns the path."""
    arch = getattr(model, "arch", None)
    build_args = getattr(model, "build_args", None)
    if not arch or build_args is None:
        raise TypeError("save_checkpoint takes a model made by kdreid.models.build_model (it has no .arch)")
    build_args = dict(build_args, num_domains=int(getattr(model, "num_domains", 0) or 0))
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "build_args": _plain(build_args, "build_args"),
        "default_domain": int(getattr(model, "default_domain", 0)),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": _plain(config, "config"),
        "datasets": _plain(list(datasets or []), "datasets"),
        "metrics": _plain(dict(metrics or {}), "metrics"),
        "extra": _plain(dict(extra or {}), "extra"),
        "kdreid_version": str(kdreid.__version__),
        "torch_version": str(torch.__version__),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint's dict (tensors on the CPU), after checking it is a kdreid checkpoint."""
    obj = read_file(path)
    if not isinstance(obj, Mapping) or obj.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: not a kdreid checkpoint (it records no architecture); load a plain state dict with "
            "build_model(ARCH, NUM_CLASSES, pretrained=PATH)"
        )
    version = obj.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: its format_version {version!r} is not a number; the file is damaged or was "
                              "edited")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {obj['format_version']} is newer than this kdreid reads ({FORMAT_VERSION});"
            " upgrade kdreid"
        )
    # What load_checkpoint needs; a KeyError or TypeError later would be a traceback, not this one line.
    for key, kind in (("arch", str), ("build_args", Mapping), ("state_dict", Mapping)):
        if not isinstance(obj.get(key), kind):
            found = "no" if key not in obj else f"a {type(obj[key]).__name__} as its"
            raise CheckpointError(f"{path}: a kdreid checkpoint with {found} {key!r}; the file is damaged or was "
                                  "edited, use the model.pt its run wrote")
    return dict(obj)


def load_checkpoint(path: str | Path, *, arch: str | None = None) -> nn.Module:
    """Rebuild the model saved in `path`: eval mode, on the CPU, metadata in `model.kdreid_meta`.

    arch: when given, the checkpoint must hold this architecture (e.g. a student expected to be osnet_x0_25).
    """
    from kdreid.models.dsbn import convert_dsbn
    from kdreid.models.registry import build_model

    checkpoint = read_checkpoint(path)
    saved_arch = checkpoint["arch"]
    if arch is not None and saved_arch != arch:
        raise CheckpointError(f"{path}: holds a {saved_arch} model, not the {arch} that was asked for; name "
                              f"{saved_arch} as the architecture, or leave it out (the checkpoint records it)")
    build_args = dict(checkpoint["build_args"])
    num_domains = int(build_args.pop("num_domains", 0) or 0)
    try:
        model = build_model(saved_arch, **build_args)
    except ModelError as error:
        raise CheckpointError(f"{path}: cannot rebuild its model: {error}") from None
    except TypeError as error:  # an argument this kdreid's build_model does not take (a newer kdreid wrote it)
        raise CheckpointError(f"{path}: cannot rebuild its model ({error}); the file was edited or written by "
                              f"another kdreid (it records {checkpoint.get('kdreid_version')}, this is "
                              f"{kdreid.__version__})") from None
    if num_domains:
        convert_dsbn(model, num_domains)
    model.default_domain = int(checkpoint.get("default_domain", 0))
    try:
        result = model.load_state_dict(checkpoint["state_dict"], strict=False)
    except RuntimeError as error:  # a tensor of the wrong shape
        first = str(error).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{path}: its state dict does not fit {saved_arch} ({first})") from None
    problems = list(result.missing_keys) + list(result.unexpected_keys)
    if problems:
        raise CheckpointError(
            f"{path}: its state dict does not fit {saved_arch} ({len(result.missing_keys)} missing, "
            f"{len(result.unexpected_keys)} unexpected, e.g. {problems[0]}); the file is damaged or was edited"
        )
    model.eval()
    model.kdreid_meta = {k: v for k, v in checkpoint.items() if k != "state_dict"}
    return model
