"""The part every kdreid model shares: input normalisation, the re-ID head and the forward contract.

A backbone subclasses `ReidModel`, creates its trunk modules as direct attributes (so its state-dict keys are
the ones torchvision / torchreid checkpoints use) and implements `forward_stages`. The head is built here:

    pooled   = GAP(final map)               (OSNet: then its 512-d `fc`, part of the architecture)
    embedding = embed(pooled)               only when embedding_dim > 0: a Linear to that width
    neck     = bnneck(embedding)            BNNeck (Luo et al., "Bag of tricks", CVPRW 2019), when enabled
    logits   = classifier(neck)             one Linear per head, no bias

Training mode returns `Out(feature_maps, embedding, logits, neck)`: triplet / distillation losses use
`embedding` (before BNNeck; distillation can use `neck` instead), cross-entropy uses `logits`. Eval mode returns
`neck`, the retrieval feature, unless `return_all=True`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from kdreid.errors import ModelError

# ImageNet statistics: every backbone was (or may be) initialised from ImageNet weights trained on images
# normalised with these, so the model applies them itself and callers feed plain [0, 1] RGB.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Out(NamedTuple):
    """What a model returns in training mode (and in eval mode with `return_all=True`).

    feature_maps: list of 4 tensors (N, C_j, H_j, W_j), the pre-activation output of each stage
                  (C_j = model.stage_channels[j]).
    embedding:    (N, model.embedding_dim), pooled feature before BNNeck.
    logits:       (N, num_classes) tensor; a list of per-head tensors when num_heads > 1; None when the
                  model has no classifier (num_classes == 0).
    neck:         (N, model.embedding_dim), the retrieval feature (after BNNeck; the embedding without one).
    """

    feature_maps: list[torch.Tensor]
    embedding: torch.Tensor
    logits: torch.Tensor | list[torch.Tensor] | None
    neck: torch.Tensor


def head_key(key: str) -> bool:
    """Whether a state-dict key belongs to the re-ID head rather than to the backbone."""
    return key.split(".", 1)[0] in ("embed", "bnneck", "classifier", "classifiers")


class ReidModel(nn.Module):
    """Base class: subclasses build their trunk in `__init__`, then call `self._build_head(...)`.

    Attributes the rest of kdreid relies on: `arch` (registered name), `stage_channels` (widths of the 4
    feature maps), `feature_dim` (width of the pooled trunk feature), `embedding_dim` (width of the
    embedding and of the eval-mode output), `num_classes` (int, or list per head), `num_heads`, `bnneck`
    (module or None), `last_stride`.
    """

    arch: str = ""
    stage_channels: tuple[int, int, int, int]

    def __init__(self) -> None:
        super().__init__()
        # Not persistent: they are constants, and keeping them out of the state dict lets plain torchvision /
        # torchreid state dicts load without "missing key" noise.
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.default_domain = 0  # used by DSBN models when forward gets no `domain`

    # -------------------------------------------------------------------------------- for subclasses
    def forward_stages(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Normalised images (N, 3, H, W) -> (4 pre-activation stage maps, the final activated map)."""
        raise NotImplementedError

    def stage_batchnorms(self) -> list[nn.Module]:
        """The BatchNorm that produces (the residual branch of) each stage map: its weight and bias give the
        distribution of the pre-activation values, from which Heo et al. derive the margin of their
        feature-distillation loss."""
        raise NotImplementedError

    def pool(self, final_map: torch.Tensor) -> torch.Tensor:
        """Final map (N, C, h, w) -> pooled feature (N, feature_dim). OSNet adds its `fc` here."""
        return final_map.mean(dim=(2, 3))

    def _build_head(
        self,
        feature_dim: int,
        num_classes: int | list[int],
        *,
        embedding_dim: int = 0,
        bnneck: bool = True,
        num_heads: int = 1,
    ) -> None:
        if isinstance(num_classes, (list, tuple)):
            classes = [int(n) for n in num_classes]
            if num_heads == 1:
                num_heads = len(classes)
            if len(classes) != num_heads:
                raise ValueError(f"num_classes lists {len(classes)} heads but num_heads={num_heads}")
        else:
            classes = [int(num_classes)] * num_heads
        if num_heads < 1 or any(n < 0 for n in classes):
            raise ValueError(f"need num_heads >= 1 and num_classes >= 0, got {num_heads} and {num_classes}")

        self.feature_dim = feature_dim
        self.embedding_dim = embedding_dim if embedding_dim > 0 else feature_dim
        self.num_heads = num_heads
        self.num_classes = classes[0] if num_heads == 1 else classes

        self.embed = None
        if embedding_dim > 0:
            self.embed = nn.Linear(feature_dim, embedding_dim)
            nn.init.kaiming_normal_(self.embed.weight, mode="fan_out")
            nn.init.zeros_(self.embed.bias)

        self.bnneck = None
        if bnneck:
            self.bnneck = nn.BatchNorm1d(self.embedding_dim)
            # BNNeck keeps its shift at zero (Luo et al.): the classifier sees a centred feature.
            self.bnneck.bias.requires_grad_(False)

        def classifier(n: int) -> nn.Linear:
            layer = nn.Linear(self.embedding_dim, n, bias=False)
            nn.init.normal_(layer.weight, std=0.001)
            return layer

        self.classifier = None
        self.classifiers = None
        if num_heads == 1:
            if classes[0] > 0:
                self.classifier = classifier(classes[0])
        else:
            if any(n == 0 for n in classes):
                raise ValueError(f"every head needs classes, got {classes}")
            self.classifiers = nn.ModuleList(classifier(n) for n in classes)

    # -------------------------------------------------------------------------------- the contract
    def trunk(self, x: torch.Tensor, *, domain: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x: (N, 3, H, W) RGB in [0, 1] -> (the 4 pre-activation stage maps, the final activated map that the
        embedding pools): the part of `forward` before the head, for what looks at the maps themselves
        (activation maps). `domain` as in `forward`."""
        if domain is not None or getattr(self, "num_domains", 0):
            from kdreid.models.dsbn import set_domain

            set_domain(self, self.default_domain if domain is None else domain)
        if not x.is_floating_point():
            raise ModelError(f"models take float RGB images in [0, 1], got {x.dtype}: convert with x.float() / 255")
        return self.forward_stages((x - self.pixel_mean) / self.pixel_std)

    def forward(self, x: torch.Tensor, *, domain: int | None = None, return_all: bool = False):
        """x: (N, 3, H, W) RGB in [0, 1]. Train mode (or return_all) -> Out; eval mode -> (N, embedding_dim).

        `domain` picks the BatchNorm branch of a model converted with `convert_dsbn` (default
        `model.default_domain`); plain models ignore it.
        """
        feature_maps, final_map = self.trunk(x, domain=domain)
        embedding = self.pool(final_map)  # (N, feature_dim)
        if self.embed is not None:
            embedding = self.embed(embedding)  # (N, embedding_dim)
        neck = self.bnneck(embedding) if self.bnneck is not None else embedding
        if not self.training and not return_all:
            return neck
        if self.classifiers is not None:
            logits = [head(neck) for head in self.classifiers]
        elif self.classifier is not None:
            logits = self.classifier(neck)
        else:
            logits = None
        return Out(feature_maps, embedding, logits, neck)

