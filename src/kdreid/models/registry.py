"""One registry of architectures and one door in: `build_model(name, num_classes, ...)`.

A backbone file registers each factory with `@register_model(name, imagenet=(file names...))`; nothing else
needs editing to add a model. `list_models()` is what `kdreid models` prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from kdreid.errors import ModelError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    factory: Callable[..., nn.Module]
    imagenet: tuple[str, ...] = ()  # file names that may hold its ImageNet weights, preferred first
    imagenet_howto: str = ""  # how to fetch the first file on a connected machine
    torch_home_dirs: tuple[str, ...] = field(default=("hub/checkpoints",))  # where under $TORCH_HOME to look
    tiny: bool = False  # a small test variant, hidden from `kdreid models` unless asked


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, **spec_fields) -> Callable:
    def decorate(factory: Callable) -> Callable:
        if name in _REGISTRY:
            raise RuntimeError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelSpec(name=name, factory=factory, **spec_fields)
        return factory

    return decorate


def _load_backbones() -> None:
    # Importing the package imports every backbone file, which fills the registry.
    import kdreid.models  # noqa: F401


def list_models(include_tiny: bool = False) -> list[str]:
    """Registered architecture names (test-size variants only when asked)."""
    _load_backbones()
    return [name for name, spec in _REGISTRY.items() if include_tiny or not spec.tiny]


model_names = list_models


def get_spec(name: str) -> ModelSpec:
    _load_backbones()
    if name not in _REGISTRY:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _REGISTRY[name]


def build_model(
    name: str,
    num_classes: int | list[int],
    *,
    pretrained: str | Path | None = "none",
    last_stride: int = 1,
    embedding_dim: int = 0,
    bnneck: bool = True,
    num_heads: int = 1,
) -> nn.Module:
    """Build a registered re-ID model, in training mode on the CPU.

    num_classes: identities of the classifier (0: none); a list gives one head per entry.
    pretrained: "none", "imagenet" (from the local torch cache, never downloaded) or the path of a state dict
        or checkpoint (torchvision, torchreid, fast-reid, SpCL/OpenUnReID, kdreid).
    last_stride: stride of the last stage (1 doubles the final map's resolution, the usual re-ID choice).
    embedding_dim: >0 adds a Linear from the pooled feature to this width.
    bnneck: BatchNorm between the embedding and the classifier; eval mode returns its output.
    num_heads: classifiers, one per target domain.
    """
    spec = get_spec(name)
    if isinstance(num_classes, (list, tuple)):
        num_classes = [int(n) for n in num_classes]
    build_args = dict(
        num_classes=num_classes,
        last_stride=int(last_stride),
        embedding_dim=int(embedding_dim),
        bnneck=bool(bnneck),
        num_heads=int(num_heads),
    )
    try:
        model = spec.factory(**build_args)
    except ValueError as error:
        raise ModelError(f"cannot build {name}: {error}") from None
    model.arch = name
    model.build_args = build_args
    model.load_report = None  # what pretrained weights matched (a LoadReport), for the run's log
    if pretrained is None or str(pretrained).lower() in ("", "none"):
        return model

    from kdreid.models.weights import load_weights, resolve_imagenet

    if str(pretrained).lower() == "imagenet":
        model.load_report = load_weights(model, resolve_imagenet(spec), source="ImageNet")
    else:
        if not Path(pretrained).is_file():  # named as the setting it came from, with what it takes
            from kdreid.errors import why_not_a_file

            raise ModelError(f"pretrained weights {pretrained} {why_not_a_file(pretrained)}; --pretrained (or "
                             "`pretrained:` in --config) takes imagenet, none or the path of a state dict")
        model.load_report = load_weights(model, pretrained)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def _forward_one_image(model: nn.Module, height: int, width: int) -> None:
    """One eval-mode forward of one blank height × width image; the model's train/eval mode is kept."""
    was_training = model.training
    model.eval()
    try:
        parameter = next(model.parameters())
        model(torch.zeros(1, 3, height, width, device=parameter.device, dtype=parameter.dtype))
    finally:
        model.train(was_training)


def check_input_size(model: nn.Module, height: int, width: int, flag: str = "--height/--width") -> None:
    """ModelError (one line) when `model` cannot take height × width images — its downsampling leaves no pixel —
    found by one eval-mode forward of one image, before a stage writes anything or trains. Call it while the
    model is on the CPU: there a RuntimeError naming a size is about the input, not memory or a driver."""
    try:
        _forward_one_image(model, height, width)
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        if "size" not in reason.lower():  # e.g. out of memory: not the input's fault
            raise
        raise ModelError(f"{getattr(model, 'arch', type(model).__name__)} cannot take {height}x{width} images "
                         f"({reason}); choose a larger {flag} (re-ID models train at 256x128)") from None


def count_macs(model: nn.Module, height: int = 256, width: int = 128) -> int:
    """Multiply-accumulates of one eval-mode forward of one image (convolutions and linear layers)."""
    total = 0

    def conv_hook(module: nn.Conv2d, inputs, output):
        nonlocal total
        kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        total += output[0].numel() * kernel

    def linear_hook(module: nn.Linear, inputs, output):
        nonlocal total
        total += module.in_features * module.out_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    try:
        _forward_one_image(model, height, width)
    finally:
        for handle in handles:
            handle.remove()
    return total


def describe_models(
    names: list[str] | None = None, include_tiny: bool = False, height: int = 256, width: int = 128
) -> list[dict]:
    """One row per model (default: all registered): parameters (without a classifier), MACs of one image."""
    rows = []
    for name in names or list_models(include_tiny):
        spec = get_spec(name)
        # On the meta device nothing is allocated or computed: only shapes, which is all the counts need.
        with torch.device("meta"):
            model = build_model(name, 0)
        rows.append(
            dict(
                name=name,
                params=count_parameters(model),
                macs=count_macs(model, height, width),
                stage_channels=list(model.stage_channels),
                embedding_dim=model.embedding_dim,
                imagenet=spec.imagenet[0] if spec.imagenet else None,
            )
        )
    return rows
