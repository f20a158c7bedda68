"""Domain-specific batch normalisation (Chang et al., "Domain-Specific Batch Normalization for Unsupervised
Domain Adaptation", CVPR 2019): every BatchNorm keeps one set of affine weights and running statistics per
domain, the convolutions are shared.

    model = convert_dsbn(build_model("resnet50", 751), num_domains=2)   # copies each BN to every domain
    out_source = model(x_source, domain=0)
    out_target = model(x_target, domain=1)

The domain is a forward argument, so it goes through DistributedDataParallel unchanged (DDP needs
`find_unused_parameters=True` when a step does not visit every domain). Without `domain`, a forward uses
`model.default_domain` (0). `select_domain(model, d)` turns the model back into plain BatchNorm with domain
d's weights (for export, or to use an adapted target branch as an ordinary model).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from kdreid.errors import ModelError


class DSBatchNorm(nn.Module):
    """One BatchNorm (1d or 2d) per domain; `active` picks the one a forward uses."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, num_domains: int):
        super().__init__()
        self.bns = nn.ModuleList(copy.deepcopy(bn) for _ in range(num_domains))
        self.active = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bns[self.active](x)


def convert_dsbn(model: nn.Module, num_domains: int) -> nn.Module:
    """Replace every BatchNorm1d/2d of `model` (in place) by a DSBatchNorm whose domains start as copies."""
    if num_domains < 1:
        raise ModelError(f"convert_dsbn needs num_domains >= 1, got {num_domains}")
    if getattr(model, "num_domains", 0):
        raise ModelError(f"the model already has domain-specific BN ({model.num_domains} domains)")

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
                setattr(parent, name, DSBatchNorm(child, num_domains))
            elif not isinstance(child, DSBatchNorm):
                swap(child)

    # The BNNeck is converted too: each domain gets its own normalisation of the retrieval feature.
    swap(model)
    model.num_domains = num_domains
    return model


def set_domain(model: nn.Module, domain: int) -> None:
    """Make every DSBatchNorm of `model` use `domain`."""
    num_domains = getattr(model, "num_domains", 0)
    if not num_domains:
        return  # plain BatchNorm: one domain only
    if not 0 <= int(domain) < num_domains:
        raise ModelError(f"domain {domain} out of range: the model has {num_domains} domains (0..{num_domains - 1})")
    for module in model.modules():
        if isinstance(module, DSBatchNorm):
            module.active = int(domain)


def select_domain(model: nn.Module, domain: int) -> nn.Module:
    """Replace each DSBatchNorm (in place) by its plain BatchNorm of `domain`; the model is single-domain again."""
    set_domain(model, domain)

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, DSBatchNorm):
                setattr(parent, name, child.bns[domain])
            else:
                swap(child)

    swap(model)
    model.num_domains = 0
    return model
