"""Activation maps (`--visactmap`, the report's "where the models look"): the attention they show, against a
computation from the backbone's own module output, and the pages they are drawn on."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kdreid.cli import main
from kdreid.data.datasets.base import build_dataset
from kdreid.evaluation.features import load_model
from kdreid.models import build_model
from kdreid.viz.actmap import (
    HEAT_WEIGHT,
    IMAGES_PER_PAGE,
    activation_maps,
    draw_activation_maps,
    map_agreement,
    overlay,
    visualize_activation_maps,
)
from tests.viz.fixtures import tiny_domain, tiny_model  # noqa: F401  (fixtures)


def _reference_maps(model, module, images, size, after_relu):
    """Attention from the module whose output is the final map, caught with a forward hook on the whole forward:
    sum over channels of the squared (activated) output, bilinear to `size`, min-max per image."""
    caught = []
    handle = module.register_forward_hook(lambda _m, _i, output: caught.append(output))
    with torch.no_grad():
        model.eval()(images)
    handle.remove()
    final = F.relu(caught[0]) if after_relu else caught[0]
    attention = F.interpolate(final.pow(2).sum(1, keepdim=True), size=size, mode="bilinear", align_corners=False)
    attention = attention[:, 0].numpy()
    low, high = attention.min(axis=(1, 2), keepdims=True), attention.max(axis=(1, 2), keepdims=True)
    return (attention - low) / (high - low)


@pytest.mark.parametrize("arch, module, after_relu", [
    ("resnet_tiny", "layer4", True),  # layer4's blocks return the sum before the final ReLU (kdreid's stage map)
    ("osnet_tiny", "conv5", True),  # conv5 = 1x1 conv + BN; OSNet applies its ReLU after
])
def test_maps_are_the_attention_of_the_map_the_embedding_pools(arch, module, after_relu):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=5)
    images = torch.rand(3, 3, 64, 32)
    maps = activation_maps(model, images, size=(128, 64))
    assert maps.shape == (3, 128, 64) and maps.dtype == torch.float32
    expected = _reference_maps(model, getattr(model, module), images, (128, 64), after_relu)
    np.testing.assert_allclose(maps.numpy(), expected, atol=1e-5)
    assert np.allclose(maps.amin(dim=(1, 2)), 0) and np.allclose(maps.amax(dim=(1, 2)), 1)
    # Eval mode: a second call gives the same maps (no BatchNorm statistics moved by the first).
    assert torch.equal(activation_maps(model.train(), images, size=(128, 64)), maps)


def test_a_map_with_nothing_standing_out_is_zero_and_an_exported_file_is_refused():
    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def trunk(self, x):
            return [], torch.full((len(x), 4, 4, 2), 0.3)

    maps = activation_maps(Flat(), torch.rand(2, 3, 16, 8))
    assert maps.shape == (2, 16, 8) and not maps.any()
    with pytest.raises(Exception, match="pass its checkpoint"):
        activation_maps(torch.nn.Linear(2, 2), torch.rand(1, 3, 16, 8))


def test_agreement_is_pearson_and_overlay_blends_the_colour_map():
    rng = np.random.default_rng(0)
    a, b = rng.random((8, 4)), rng.random((8, 4))
    assert map_agreement(a, b) == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1])
    assert map_agreement(a, 2 * a + 1) == pytest.approx(1.0)
    assert map_agreement(a, np.zeros_like(a)) != map_agreement(a, np.zeros_like(a))  # NaN: flat map
    image = np.full((4, 2, 3), 200, np.uint8)
    cold, hot = overlay(image, np.zeros((4, 2))), overlay(image, np.ones((4, 2)))
    # jet: dark blue at 0 (0, 0, 0.5), dark red at 1 (0.5, 0, 0)
    assert tuple(cold[0, 0]) == tuple(round(200 * (1 - HEAT_WEIGHT) + v * HEAT_WEIGHT) for v in (0, 0, 127.5))
    assert tuple(hot[0, 0]) == tuple(round(200 * (1 - HEAT_WEIGHT) + v * HEAT_WEIGHT) for v in (127.5, 0, 0))


def test_pages_hold_eight_images_and_replace_older_pages(tiny_domain, tiny_model, tmp_path):
    model = load_model(tiny_model)
    query = build_dataset("synth_duke", str(tiny_domain)).query
    out = tmp_path / "actmap"
    pages = visualize_activation_maps([("a", model), ("b", model)], query, out, prefix="t", num_images=9,
                                      device="cpu", title="two models")
    assert [p.name for p in pages] == ["t_01.png", "t_02.png"]
    widths = [Image.open(p).size[0] for p in pages]
    assert widths[0] > 4 * widths[1]  # 8 columns, then 1
    pages = visualize_activation_maps([("a", model)], query, out, prefix="t", num_images=2, device="cpu")
    assert sorted(p.name for p in out.iterdir()) == ["t_01.png"]
    assert visualize_activation_maps([("a", model)], [], out, prefix="t", device="cpu") == []
    assert not any(out.iterdir())


def test_draw_refuses_nothing_to_draw(tmp_path):
    with pytest.raises(Exception, match="no image or no model"):
        draw_activation_maps(np.zeros((0, 8, 4, 3), np.uint8), [("a", np.zeros((0, 8, 4)))], tmp_path / "x.png")


def test_evaluate_visactmap_draws_and_keeps_the_numbers(tiny_domain, tiny_model, tmp_path, capsys):
    common = ["evaluate", "--model", str(tiny_model), "-t", "synth_duke", "--root", str(tiny_domain),
              "--device", "cpu", "--json"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*common, "--out", str(tmp_path / "pictures"), "--visactmap", "3"]) == 0
    assert json.loads(capsys.readouterr().out) == plain
    assert sorted(p.name for p in (tmp_path / "pictures" / "actmap").iterdir()) == ["synth_duke_01.png"]


def test_visactmap_without_out_or_of_an_exported_file_is_one_line(tiny_model, tmp_path, capsys):
    code = main(["evaluate", "--model", str(tiny_model), "-t", "synth_duke", "--root", str(tmp_path),
                 "--visactmap"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--visactmap writes pictures" in err and "--out" in err
    exported = tmp_path / "model.onnx"
    exported.write_bytes(b"\x08\x07 not read: refused before any work")
    code = main(["evaluate", "--model", str(exported), "-t", "synth_duke", "--root", str(tmp_path), "--out",
                 str(tmp_path / "out"), "--visactmap"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "pass its checkpoint" in err
    assert not (tmp_path / "out").exists()


def test_evaluate_draws_the_maps_at_the_size_it_scores_at(tiny_domain, tiny_model, tmp_path, monkeypatch):
    import kdreid.viz.actmap as actmap

    seen = []
    real = actmap.activation_maps
    monkeypatch.setattr(actmap, "activation_maps", lambda model, images, size=None: seen.append(
        tuple(images.shape[2:])) or real(model, images, size))
    assert main(["evaluate", "--model", str(tiny_model), "-t", "synth_duke", "--root", str(tiny_domain), "--device",
                 "cpu", "--out", str(tmp_path / "e"), "--visactmap", "2", "--height", "96", "--width", "48"]) == 0
    assert seen == [(96, 48)]
