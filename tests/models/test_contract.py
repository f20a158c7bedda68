"""The forward contract, shapes and attributes of every registered model, and the head options."""

from __future__ import annotations

import pytest
import torch

from kdreid.errors import ModelError
from kdreid.models import Out, build_model, count_macs, count_parameters, list_models

# Expected (stage_channels, embedding width) of every registered model; a new model must be added here.
EXPECTED = {
    "resnet18": ((64, 128, 256, 512), 512),
    "resnet34": ((64, 128, 256, 512), 512),
    "resnet50": ((256, 512, 1024, 2048), 2048),
    "resnet101": ((256, 512, 1024, 2048), 2048),
    "resnet_tiny": ((8, 16, 32, 64), 64),
    "osnet_x1_0": ((256, 384, 512, 512), 512),
    "osnet_x0_75": ((192, 288, 384, 384), 512),
    "osnet_x0_5": ((128, 192, 256, 256), 512),
    "osnet_x0_25": ((64, 96, 128, 128), 512),
    "osnet_tiny": ((64, 64, 64, 64), 32),
    "mobilenetv2_x1_0": ((24, 32, 96, 1280), 1280),
    "mobilenetv2_x1_4": ((32, 48, 136, 1792), 1792),
    "mobilenetv2_tiny": ((8, 8, 24, 64), 64),
}


def test_registry_lists_every_model_once():
    assert sorted(list_models(include_tiny=True)) == sorted(EXPECTED)
    assert "resnet_tiny" not in list_models() and "osnet_x0_25" in list_models()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shapes_of_every_model(name):
    """At 64×32: maps at strides 4, 8, 16, 16 (last_stride=1), embedding before BNNeck, logits, eval output."""
    torch.manual_seed(0)
    model = build_model(name, 7)
    channels, dim = EXPECTED[name]
    assert model.arch == name and model.stage_channels == channels
    assert model.embedding_dim == dim and model.num_classes == 7
    images = torch.rand(2, 3, 64, 32)
    out = model(images)
    assert isinstance(out, Out)
    sizes = [(16, 8), (8, 4), (4, 2), (4, 2)]
    assert [tuple(m.shape) for m in out.feature_maps] == [(2, c, *hw) for c, hw in zip(channels, sizes)]
    assert out.embedding.shape == (2, dim) and out.logits.shape == (2, 7)
    model.eval()
    with torch.no_grad():
        features = model(images)
        everything = model(images, return_all=True)
    assert features.shape == (2, dim)
    assert [bn.num_features for bn in model.stage_batchnorms()] == list(channels)
    # eval output = BNNeck(embedding) with the running statistics
    assert torch.allclose(features, model.bnneck(everything.embedding), atol=1e-6)
    assert torch.allclose(everything.neck, features)  # Out.neck is the retrieval feature


def test_last_stride_two_halves_the_last_map():
    model = build_model("resnet_tiny", 3, last_stride=2)
    out = model(torch.rand(2, 3, 64, 32))
    assert out.feature_maps[3].shape[-2:] == (2, 1)
    with pytest.raises(ModelError, match="leave --last-stride"):
        build_model("osnet_tiny", 3, last_stride=2)


def test_input_contract_normalises_inside():
    """Feeding [0, 1] images equals running the trunk on ImageNet-normalised ones."""
    model = build_model("resnet_tiny", 3, bnneck=False).eval()
    images = torch.rand(2, 3, 32, 16)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        _, final = model.forward_stages((images - mean) / std)
        assert torch.allclose(model(images), final.mean(dim=(2, 3)), atol=1e-6)
    assert "pixel_mean" not in model.state_dict()  # constants, not weights
    with pytest.raises(ModelError, match="float RGB images in \\[0, 1\\], got torch.uint8"):
        model((images * 255).to(torch.uint8))


def test_bnneck_false_returns_the_embedding_and_bias_is_frozen():
    plain = build_model("osnet_tiny", 3, bnneck=False).eval()
    with torch.no_grad():
        images = torch.rand(2, 3, 32, 16)
        assert torch.equal(plain(images), plain(images, return_all=True).embedding)
    assert plain.bnneck is None
    neck = build_model("osnet_tiny", 3)
    assert not neck.bnneck.bias.requires_grad and neck.bnneck.weight.requires_grad


def test_embedding_dim_adds_a_linear():
    model = build_model("resnet_tiny", 5, embedding_dim=16)
    out = model(torch.rand(2, 3, 32, 16))
    assert model.embedding_dim == 16 and out.embedding.shape == (2, 16) and out.logits.shape == (2, 5)
    assert model.feature_dim == 64


def test_multi_head_logits_are_a_list():
    model = build_model("osnet_tiny", [5, 7, 9])
    assert model.num_heads == 3 and model.num_classes == [5, 7, 9]
    out = model(torch.rand(2, 3, 32, 16))
    assert [tuple(l.shape) for l in out.logits] == [(2, 5), (2, 7), (2, 9)]
    same = build_model("osnet_tiny", 4, num_heads=2)
    assert [l.shape[1] for l in same(torch.rand(2, 3, 32, 16)).logits] == [4, 4]
    with pytest.raises(ModelError, match="heads"):
        build_model("osnet_tiny", [4, 5], num_heads=3)


def test_no_classifier():
    model = build_model("resnet_tiny", 0)
    assert model(torch.rand(2, 3, 32, 16)).logits is None


def test_gradients_reach_the_first_layer():
    model = build_model("mobilenetv2_tiny", 3)
    out = model(torch.rand(4, 3, 32, 16))
    (out.logits.sum() + out.embedding.sum() + sum(m.sum() for m in out.feature_maps)).backward()
    assert model.features[0][0].weight.grad.abs().sum() > 0


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ModelError) as error:
        build_model("resnet5O", 3)
    message = str(error.value)
    assert "resnet5O" in message and "resnet50" in message and "osnet_x0_25" in message
    assert "\n" not in message


def test_counts():
    model = build_model("resnet_tiny", 0, bnneck=False)
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    # stem conv alone: 8 output channels × 7·7·3 × (H/2 · W/2)
    stem = 8 * 7 * 7 * 3 * (32 * 16)
    assert count_macs(model, 64, 32) > stem
    assert count_macs(model, 128, 64) == pytest.approx(4 * count_macs(model, 64, 32), rel=0.01)


def test_stage_batchnorms_produce_the_stage_maps():
    model = build_model("resnet_tiny", 3).eval()
    captured = {}
    bn = model.stage_batchnorms()[0]
    bn.register_forward_hook(lambda m, i, o: captured.__setitem__("bn", o))
    model.layer1[-1].register_forward_pre_hook(lambda m, i: captured.__setitem__("input", i[0]))
    with torch.no_grad():
        maps = model(torch.rand(2, 3, 32, 16), return_all=True).feature_maps
    assert torch.allclose(maps[0], captured["bn"] + captured["input"])  # residual branch + identity

    osnet = build_model("osnet_tiny", 3).eval()
    osnet.stage_batchnorms()[3].register_forward_hook(lambda m, i, o: captured.__setitem__("bn", o))
    with torch.no_grad():
        maps = osnet(torch.rand(2, 3, 32, 16), return_all=True).feature_maps
    assert torch.equal(maps[3], captured["bn"])


def test_the_classifier_reads_the_feature_after_bnneck():
    """BNNeck (Luo et al.): the triplet sees the pooled embedding, the classifier its batch-normalised copy
    (found by a review: a classifier on the pre-BNNeck embedding passed every test)."""
    torch.manual_seed(0)
    for num_classes in (5, [4, 6]):
        model = build_model("resnet_tiny", num_classes).train()
        with torch.no_grad():
            model.bnneck.weight.uniform_(0.5, 2.0)
        out = model(torch.rand(6, 3, 32, 16))
        e = out.embedding
        # train mode: the batch's own statistics (biased variance), the BNNeck's affine weight, its zero shift
        expected_neck = (e - e.mean(0)) / torch.sqrt(e.var(0, unbiased=False) + model.bnneck.eps) * model.bnneck.weight
        assert torch.allclose(out.neck, expected_neck, atol=1e-5)
        assert not torch.allclose(out.neck, e, atol=1e-3)
        heads = [model.classifier] if model.classifiers is None else list(model.classifiers)
        logits = [out.logits] if model.classifiers is None else out.logits
        for head, got in zip(heads, logits):
            assert torch.allclose(got, expected_neck @ head.weight.T, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet_tiny", "mobilenetv2_tiny"])
def test_a_last_stride_other_than_one_or_two_is_refused(name):
    with pytest.raises(ModelError, match="last_stride must be 1 or 2, got 3"):
        build_model(name, 3, last_stride=3)


def _last_units(model):
    """Per stage: (the module whose input is the stage's residual identity, how to get that identity from its
    input, or None for a stage map with no residual)."""
    if hasattr(model, "layer1"):  # ResNet
        blocks = [stage[-1] for stage in (model.layer1, model.layer2, model.layer3, model.layer4)]
        return [(b, (lambda b: lambda x: x if b.downsample is None else b.downsample(x))(b)) for b in blocks]
    if hasattr(model, "conv5"):  # OSNet: the last OSBlock of conv2..conv4 (conv2/3 end with a transition), conv5
        blocks = [model.conv2[-2], model.conv3[-2], model.conv4[-1]]
        units = [(b, (lambda b: lambda x: x if b.downsample is None else b.downsample(x))(b)) for b in blocks]
        return units + [(model.conv5, None)]
    blocks = [model.features[i] for i in (3, 6, 13)]  # MobileNetV2: residual blocks, linear outputs
    return [(b, lambda x: x) for b in blocks] + [(model.features[-1], None)]


@pytest.mark.parametrize("name", ["resnet_tiny", "osnet_tiny", "mobilenetv2_tiny"])
def test_every_stage_map_is_taken_before_its_activation(name):
    """Each of the 4 maps is (the last residual block's BN output + its identity) or the last BN's output,
    before any ReLU / ReLU6: the pre-activation map feature distillation compares (found by a review: OSNet's
    maps 1-3 and MobileNetV2's map 4 taken after their activation passed every test)."""
    torch.manual_seed(0)
    model = build_model(name, 3).eval()
    captured = {}
    handles = []
    for j, (bn, (unit, identity)) in enumerate(zip(model.stage_batchnorms(), _last_units(model))):
        handles.append(bn.register_forward_hook(lambda m, i, o, j=j: captured.__setitem__(("bn", j), o)))
        handles.append(unit.register_forward_pre_hook(lambda m, i, j=j: captured.__setitem__(("in", j), i[0])))
    with torch.no_grad():
        maps = model(torch.rand(2, 3, 64, 32), return_all=True).feature_maps
        for j, (unit, identity) in enumerate(_last_units(model)):
            expected = captured["bn", j] + (0 if identity is None else identity(captured["in", j]))
            assert torch.allclose(maps[j], expected, atol=1e-5), f"stage {j + 1}"
            assert (maps[j] < 0).any(), f"stage {j + 1}"
    for handle in handles:
        handle.remove()


def test_mobilenetv2_pools_the_relu6_of_its_last_map():
    model = build_model("mobilenetv2_tiny", 3, bnneck=False).eval()
    with torch.no_grad():
        bn = model.features[-1][1]
        bn.bias.copy_(torch.linspace(-8, 10, bn.num_features))  # channels below 0, within and above 6
        out = model(torch.rand(2, 3, 64, 32), return_all=True)
    assert out.feature_maps[3].max() > 6 and (out.feature_maps[3] < 0).any()
    assert torch.allclose(out.embedding, out.feature_maps[3].clamp(0, 6).mean(dim=(2, 3)), atol=1e-5)


@pytest.mark.parametrize("name", ["resnet_tiny", "osnet_tiny", "mobilenetv2_tiny"])
def test_count_macs_agrees_with_torch_flop_counter(name):
    """Half of the FLOPs torch counts for one eval forward (depthwise convolutions and the Linear layers
    included)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(name, 5, embedding_dim=16).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, 64, 32))
    assert count_macs(model, 64, 32) * 2 == counter.get_total_flops()


def test_check_input_size_keeps_the_mode_and_names_only_size_errors():
    from kdreid.models import check_input_size

    model = build_model("resnet_tiny", 3)
    check_input_size(model, 64, 32)
    assert model.training  # a training stage calls it right before it trains
    model.eval()
    check_input_size(model, 64, 32)
    assert not model.training
    with pytest.raises(ModelError, match="osnet_tiny cannot take 8x4 images .*choose a larger --height/--width"):
        check_input_size(build_model("osnet_tiny", 3), 8, 4)  # its 2x2 average pooling gets a 2x1 map

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model.forward = out_of_memory
    with pytest.raises(RuntimeError, match="out of memory"):  # not blamed on the input size
        check_input_size(model, 64, 32)


@pytest.mark.parametrize("name", ["resnet_tiny", "osnet_tiny", "mobilenetv2_tiny"])
def test_a_freshly_built_model_tells_images_apart(name):
    """The trunk's initialisation (BN weights 1, biases 0) passes a signal: features differ across images."""
    torch.manual_seed(0)
    model = build_model(name, 3).eval()
    with torch.no_grad():
        features = model(torch.rand(4, 3, 64, 32))
    spread = features.std(0).mean()
    assert spread > 0 and spread > 1e-2 * features.abs().mean()
