"""Our backbones against the implementations whose checkpoints they must read: torchreid's OSNet (loaded from
the torchreid 0.2.5 sdist as a test-only reference) and torchvision's ResNet-50 and MobileNetV2."""

from __future__ import annotations

import pytest
import torch
import torchvision

from kdreid.errors import ModelError
from kdreid.models import build_model, load_weights
from kdreid.models.heads import IMAGENET_MEAN, IMAGENET_STD
from tests.reference import load_torchreid_module, randomise_batchnorm


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)



@pytest.fixture(scope="module")
def torchreid_osnet():
    return load_torchreid_module("torchreid/reid/models/osnet.py")


@pytest.mark.parametrize("name, prefix", [("osnet_x0_25", ""), ("osnet_x0_25", "module."), ("osnet_x1_0", "module."),
                                          ("osnet_x0_25", "module.module.")])  # DataParallel around DDP
def test_osnet_matches_torchreid(torchreid_osnet, name, prefix, tmp_path):
    torch.manual_seed(0)
    reference = getattr(torchreid_osnet, name)(num_classes=11, pretrained=False)
    randomise_batchnorm(reference)
    state = {prefix + k: v for k, v in reference.state_dict().items()}
    path = tmp_path / "torchreid_osnet.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)  # torchreid's checkpoint container

    ours = build_model(name, 5, bnneck=False)
    report = load_weights(ours, path)
    # 5 classes vs 11: every key but the classifier's is matched, the 512-d `fc` included.
    assert report.missing == ["classifier.weight"]
    assert sorted(report.discarded) == [prefix + "classifier.bias", prefix + "classifier.weight"]
    assert "fc.0.weight" in report.matched and "fc.1.running_var" in report.matched
    for key, value in reference.state_dict().items():
        if not key.startswith("classifier"):
            assert torch.equal(ours.state_dict()[key], value), key

    reference.eval()
    ours.eval()
    images = torch.rand(3, 3, 64, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(normalise(images))  # (3, 512), torchreid takes normalised input
        got = ours(images)  # ours normalises inside
    assert got.shape == expected.shape == (3, 512)
    assert expected.std() > 1e-3  # a real signal, not a constant
    assert (got - expected).abs().max().item() <= 1e-5

    # The comparison can fail: a changed first layer changes the embedding.
    with torch.no_grad():
        ours.conv1.conv.weight.mul_(1.1)
        assert (ours(images) - expected).abs().max().item() > 1e-3


def test_resnet50_matches_torchvision(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None)
    randomise_batchnorm(reference)
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(reference.state_dict(), path)

    ours = build_model("resnet50", 4, bnneck=False, last_stride=2, pretrained=path)
    assert set(reference.state_dict()) - set(ours.state_dict()) == {"fc.weight", "fc.bias"}
    reference.eval()
    ours.eval()
    images = torch.rand(2, 3, 64, 32, generator=torch.Generator().manual_seed(1))
    stage_outputs = []
    hooks = [getattr(reference, f"layer{j}").register_forward_hook(lambda m, i, o: stage_outputs.append(o))
             for j in range(1, 5)]
    with torch.no_grad():
        reference(normalise(images))
        out = ours(images, return_all=True)
    for hook in hooks:
        hook.remove()
    for j, (pre, expected) in enumerate(zip(out.feature_maps, stage_outputs)):
        assert pre.shape == expected.shape
        # Our maps are pre-activation: their ReLU is torchvision's stage output.
        assert (pre.relu() - expected).abs().max() <= 1e-5, f"stage {j + 1}"
        assert (pre < 0).any()  # really taken before the ReLU
    pooled = stage_outputs[-1].mean(dim=(2, 3))
    assert (out.embedding - pooled).abs().max() <= 1e-5

    # last_stride=1 keeps the same weights and doubles the final resolution.
    ours_s1 = build_model("resnet50", 4, pretrained=path).eval()
    with torch.no_grad():
        maps = ours_s1(images, return_all=True).feature_maps
    assert maps[3].shape[-2:] == (4, 2) and out.feature_maps[3].shape[-2:] == (2, 1)


def test_mobilenetv2_matches_torchvision(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v2(weights=None)
    randomise_batchnorm(reference)
    path = tmp_path / "mobilenet_v2-b0353104.pth"
    torch.save(reference.state_dict(), path)

    ours = build_model("mobilenetv2_x1_0", 4, bnneck=False, last_stride=2, pretrained=path)
    assert set(reference.state_dict()) - set(ours.state_dict()) == {"classifier.1.weight", "classifier.1.bias"}
    reference.eval()
    ours.eval()
    images = torch.rand(2, 3, 64, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = normalise(images)
        expected_maps = []
        for index, layer in enumerate(reference.features):
            x = layer(x)
            if index in (3, 6, 13):
                expected_maps.append(x)
        expected_embedding = x.mean(dim=(2, 3))
        out = ours(images, return_all=True)
    for pre, expected in zip(out.feature_maps[:3], expected_maps):
        assert (pre - expected).abs().max() <= 1e-5
    assert (out.feature_maps[3].clamp(0, 6) - x).abs().max() <= 1e-5
    assert (out.embedding - expected_embedding).abs().max() <= 1e-5


def test_resnet_matches_torchreid():
    """torchreid's re-ID ResNet (last stride 2 as its resnet18 builds it, no fc): its state dict loads and the
    eval-mode features agree."""
    module = load_torchreid_module("torchreid/reid/models/resnet.py")
    torch.manual_seed(0)
    reference = module.resnet18(num_classes=10, pretrained=False)
    randomise_batchnorm(reference)
    ours = build_model("resnet18", 10, bnneck=False, last_stride=2)
    result = ours.load_state_dict(reference.state_dict(), strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == ["classifier.bias"]
    reference.eval()
    ours.eval()
    images = torch.rand(2, 3, 64, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(images) - reference(normalise(images))).abs().max() <= 1e-5


def test_torchreid_fc_layers_are_refused_not_dropped(tmp_path):
    """torchreid's resnet50_fc512 (model zoo) embeds with Linear+BN+ReLU after the pooling; loaded as -a resnet50
    those `fc.*` layers were discarded and the 2048-d pooled feature evaluated instead (found by a review)."""
    module = load_torchreid_module("torchreid/reid/models/resnet.py")
    # resnet50_fc512's head on a ResNet-18
    reference = module.ResNet(10, "softmax", module.BasicBlock, [2, 2, 2, 2], last_stride=1, fc_dims=[32])
    path = tmp_path / "resnet18_fc32.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in reference.state_dict().items()}}, path)
    with pytest.raises(ModelError, match=r"fc: 512 -> 32, torchreid's fc_dims.* that resnet18 does not have"):
        build_model("resnet18", 0, pretrained=path)
    # torchvision's ImageNet classifier `fc` is still discarded as a head.
    plain = torchvision.models.resnet18(weights=None)
    torch.save(plain.state_dict(), tmp_path / "resnet18-f37072fd.pth")
    report = build_model("resnet18", 0, pretrained=tmp_path / "resnet18-f37072fd.pth").load_report
    assert sorted(report.discarded) == ["fc.bias", "fc.weight"]


def _shapes(state_dict, skip=()):
    return {k: tuple(v.shape) for k, v in state_dict.items() if not k.startswith(skip)}


@pytest.mark.parametrize("name", ["osnet_x1_0", "osnet_x0_75", "osnet_x0_5", "osnet_x0_25"])
def test_every_osnet_width_has_torchreids_layout(torchreid_osnet, name):
    """Each width's state dict has torchreid's keys and shapes (found by a review: the stem width c0 of x0_75
    and x0_5 could change with no test failing; their model-zoo files would then not load)."""
    reference = getattr(torchreid_osnet, name)(num_classes=3, pretrained=False)
    ours = build_model(name, 0, bnneck=False)
    assert _shapes(ours.state_dict()) == _shapes(reference.state_dict(), skip=("classifier",))


@pytest.mark.parametrize("name, reference", [
    ("resnet18", lambda: torchvision.models.resnet18(weights=None)),
    ("resnet34", lambda: torchvision.models.resnet34(weights=None)),
    ("resnet50", lambda: torchvision.models.resnet50(weights=None)),
    ("resnet101", lambda: torchvision.models.resnet101(weights=None)),
    ("mobilenetv2_x1_4", lambda: torchvision.models.mobilenet_v2(weights=None, width_mult=1.4)),
])
def test_every_torchvision_layout_matches_its_keys_and_shapes(name, reference):
    """Blocks per stage and widths as torchvision builds them (found by a review: ResNet-34's or ResNet-101's
    depth could change with no test failing)."""
    ours = build_model(name, 0, bnneck=False)
    assert _shapes(ours.state_dict()) == _shapes(reference().state_dict(), skip=("fc.", "classifier."))


@pytest.mark.parametrize("name", ["mobilenetv2_x1_0", "mobilenetv2_x1_4"])
def test_torchreids_mobilenetv2_layout_is_named_not_called_another_architecture(name, tmp_path):
    """torchreid's MobileNetV2 (conv1..conv9, another first block) does not load into ours, which has the same name:
    the error said "is it another architecture?" to a user who had named the right one (found by a review)."""
    module = load_torchreid_module("torchreid/reid/models/mobilenetv2.py")
    reference = getattr(module, name)(num_classes=3, loss="softmax", pretrained=False)
    torch.save({"state_dict": reference.state_dict()}, tmp_path / "torchreid.pth")
    with pytest.raises(ModelError, match=rf"a MobileNetV2 in torchreid's layout \(conv1..conv9\), which kdreid's "
                                         rf"{name} \(torchvision's layout and widths\) cannot read") as error:
        build_model(name, 0, pretrained=tmp_path / "torchreid.pth")
    assert "another architecture" not in str(error.value)
