"""Domain-specific BatchNorm: one set of statistics and affine weights per domain, shared convolutions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdreid.errors import ModelError
from kdreid.models import DSBatchNorm, build_model, convert_dsbn, select_domain


def batchnorms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_every_batchnorm_is_converted_with_copied_weights():
    torch.manual_seed(0)
    model = build_model("resnet_tiny", 5)
    with torch.no_grad():
        model.bn1.weight.mul_(2.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain_count = len(batchnorms(model))
    convert_dsbn(model, 3)
    converted = [m for m in model.modules() if isinstance(m, DSBatchNorm)]
    assert len(converted) == plain_count  # the BNNeck included
    assert all(isinstance(b, DSBatchNorm) for b in [model.bn1, model.bnneck, model.layer1[0].bn2])
    for d in range(3):
        assert torch.equal(model.bn1.bns[d].weight, before["bn1.weight"])
    assert not model.bnneck.bns[2].bias.requires_grad  # BNNeck's frozen shift stays frozen
    with pytest.raises(ModelError, match="already"):
        convert_dsbn(model, 2)


def test_each_domain_keeps_its_own_running_statistics():
    torch.manual_seed(0)
    model = convert_dsbn(build_model("osnet_tiny", 3), 2).train()
    dark = torch.rand(8, 3, 32, 16) * 0.2
    bright = 0.8 + torch.rand(8, 3, 32, 16) * 0.2
    with torch.no_grad():
        model(dark, domain=0)
        stats_0 = model.conv1.bn.bns[0].running_mean.clone()
        untouched_1 = model.conv1.bn.bns[1].running_mean.clone()
        assert torch.equal(untouched_1, torch.zeros_like(untouched_1))  # domain 1 saw nothing yet
        model(bright, domain=1)
    assert torch.equal(model.conv1.bn.bns[0].running_mean, stats_0)  # domain 0 unchanged by domain-1 data
    assert model.conv1.bn.bns[1].num_batches_tracked == 1 and model.conv1.bn.bns[0].num_batches_tracked == 1
    # dark vs bright images: the stem means differ by domain (mean of conv over ImageNet-normalised input)
    assert not torch.allclose(model.conv1.bn.bns[0].running_mean, model.conv1.bn.bns[1].running_mean)

    # eval: the domain picks the statistics, so the same images give different features
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(dark, domain=0), model(dark, domain=1))
        assert torch.equal(model(dark), model(dark, domain=0))  # default_domain = 0
    with pytest.raises(ModelError, match="domain 2 out of range"):
        model(dark, domain=2)


def test_gradients_flow_to_the_active_domain_only():
    model = convert_dsbn(build_model("resnet_tiny", 3), 2)
    model(torch.rand(4, 3, 32, 16), domain=1).logits.sum().backward()
    assert model.bn1.bns[1].weight.grad is not None and model.bn1.bns[0].weight.grad is None
    assert model.conv1.weight.grad is not None  # shared convolution


def test_select_domain_gives_a_plain_model():
    torch.manual_seed(0)
    model = convert_dsbn(build_model("mobilenetv2_tiny", 3), 2)
    with torch.no_grad():
        model(torch.rand(8, 3, 32, 16), domain=1)
    model.eval()
    images = torch.rand(2, 3, 32, 16)
    with torch.no_grad():
        expected = model(images, domain=1)
    select_domain(model, 1)
    assert not any(isinstance(m, DSBatchNorm) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(images), expected)
    assert set(model.state_dict()) == set(build_model("mobilenetv2_tiny", 3).state_dict())


def test_a_dsbn_checkpoint_loads_into_a_plain_model_with_its_own_default_domain(tmp_path):
    from kdreid.models import save_checkpoint

    torch.manual_seed(0)
    model = convert_dsbn(build_model("resnet_tiny", 5), 3).train()
    images = torch.rand(4, 3, 32, 16)
    for domain in range(3):
        model(images * (domain + 1) * 0.3, domain=domain)  # different statistics per domain
    model.default_domain = 1
    model.eval()
    save_checkpoint(tmp_path / "dsbn.pt", model)
    plain = build_model("resnet_tiny", 5, pretrained=str(tmp_path / "dsbn.pt")).eval()
    assert torch.allclose(plain(images), model(images), atol=1e-5)  # domain 1, as the checkpoint evaluates


def test_a_dsbn_teacher_distils_with_the_margins_of_its_default_domain():
    from kdreid.losses.distill import bn_margins
    from kdreid.stages.distill import Teacher

    model = convert_dsbn(build_model("resnet_tiny", 5), 2)
    model.default_domain = 1
    for bn in model.stage_batchnorms():
        bn.bns[1].weight.data.uniform_(0.5, 1.5)
    teacher = Teacher(model, "eval")
    for margin, bn in zip(teacher.margins, model.stage_batchnorms()):
        assert torch.equal(margin, bn_margins(bn.bns[1].weight, bn.bns[1].bias))


def test_select_domain_gives_a_model_that_saves_and_loads_as_a_plain_one(tmp_path):
    # Found by a review: select_domain left `num_domains` set, so the checkpoint of the plain model recorded
    # domains and load_checkpoint rebuilt DSBN that its state dict does not fit.
    from kdreid.models import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = convert_dsbn(build_model("resnet_tiny", 3), 2)
    with torch.no_grad():
        model(torch.rand(8, 3, 32, 16), domain=1)
    select_domain(model, 1).eval()
    assert not model.num_domains
    loaded = load_checkpoint(save_checkpoint(tmp_path / "plain.pt", model))
    assert not getattr(loaded, "num_domains", 0)
    images = torch.rand(2, 3, 32, 16)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_a_model_needs_at_least_one_domain():
    with pytest.raises(ModelError, match="convert_dsbn needs num_domains >= 1, got 0"):
        convert_dsbn(build_model("resnet_tiny", 3), 0)
