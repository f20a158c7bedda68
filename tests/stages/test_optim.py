"""The optimiser factory: fused kernels only where asked or on CUDA, and the same updates as the default ones."""

import pytest
import torch
from torch import nn

from kdreid.stages.optim import OptimConfig, build_optimizer


def _model(seed=0):
    torch.manual_seed(seed)
    # No conv bias before the BatchNorm: its gradient is ~0, where Adam's update sign is rounding noise.
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 2, 3))


def _train(model, optimizer, steps=3):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(5, 3, 8, 4, generator=g)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_cpu_parameters_get_the_default_implementation():
    for name in ("adam", "amsgrad", "adamw", "sgd"):
        optimizer = build_optimizer(_model().parameters(), OptimConfig(optimizer=name))
        assert not optimizer.defaults.get("fused"), name


@pytest.mark.parametrize("name", ["adam", "amsgrad", "adamw", "sgd"])
def test_fused_step_matches_the_default_step(name):
    # The fused kernels exist on the CPU too (torch >= 2.4): the same options (nesterov, amsgrad, weight decay)
    # that CUDA runs get fused must be accepted and give the same parameters.
    config = OptimConfig(optimizer=name, lr=0.01, weight_decay=5e-4)
    plain, fused = _model(), _model()
    plain_optimizer = build_optimizer(plain.parameters(), config, fused=False)
    fused_optimizer = build_optimizer(fused.parameters(), config, fused=True)
    assert fused_optimizer.defaults["fused"] is True
    _train(plain, plain_optimizer)
    _train(fused, fused_optimizer)
    for a, b in zip(plain.parameters(), fused.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)  # lr 0.01: a wrong rule moves ~1e-2
    assert any((a - b).abs().max() > 0 for a, b in zip(_model().parameters(), fused.parameters()))


def test_param_groups_are_accepted():
    model = _model()
    groups = [{"params": model[0].parameters(), "lr_scale": 0.1}, {"params": model[3].parameters()}]
    optimizer = build_optimizer(groups, OptimConfig(optimizer="sgd"))
    assert len(optimizer.param_groups) == 2
