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


def test_each_page_draws_its_own_images_maps_and_captions(tiny_domain, tiny_model, tmp_path, monkeypatch):  # noqa: F811
    """Nine images: the second page holds the ninth chosen image, its caption and its maps (computed here for that
    image alone); every map under an image is of that image."""
    import kdreid.viz.actmap as actmap
    from kdreid.data.cache import read_image
    from kdreid.viz.ranking import THUMBNAIL_SIZE, choose_queries

    model = load_model(tiny_model)
    query = build_dataset("synth_duke", str(tiny_domain)).query
    drawn = []
    monkeypatch.setattr(actmap, "draw_activation_maps", lambda images, maps, path, captions=(), title="": drawn.append(
        (images, maps, list(captions))) or path)
    visualize_activation_maps([("a", model), ("b", model)], query, tmp_path / "out", prefix="t", num_images=9,
                              device="cpu")
    chosen = [query[i] for i in choose_queries(len(query), 9)]
    assert [len(images) for images, _, _ in drawn] == [8, 1]
    for page, start in ((0, 0), (1, 8)):
        images, maps, captions = drawn[page]
        records = chosen[start:start + len(images)]
        assert captions == [f"id {r.pid} cam {r.camid}" for r in records]
        assert np.array_equal(images, np.stack([read_image(str(r.path), *THUMBNAIL_SIZE) for r in records]))
        batch = torch.from_numpy(np.stack([read_image(str(r.path), 64, 32) for r in records]))
        expected = activation_maps(model, batch.permute(0, 3, 1, 2).float().div(255), THUMBNAIL_SIZE).numpy()
        assert [label for label, _ in maps] == ["a", "b"]
        for _, row in maps:
            np.testing.assert_allclose(row, expected, atol=1e-5)


def test_rows_after_the_first_say_their_agreement_with_the_first(tmp_path, drawn_figures):
    """Three models: the texts under rows 2 and 3 are each map's correlation with row 1's map of the same image."""
    import kdreid.viz.actmap as actmap

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 16, 8, 3), dtype=np.uint8)
    first, second, third = rng.random((3, 16, 8)), rng.random((3, 16, 8)), rng.random((3, 16, 8))
    second[1] = 2 * first[1] + 1  # r = 1 exactly for image 1
    figures = drawn_figures(actmap)
    draw_activation_maps(images, [("t", first), ("s1", second), ("s2", third)], tmp_path / "m.png",
                         captions=["x", "y", "z"])
    texts = [text.get_text() for axes in figures[0].axes for text in axes.texts]
    expected = [f"r {map_agreement(m, f):.2f}" for other in (second, third) for m, f in zip(other, first)]
    assert [t for t in texts if t.startswith("r ")] == expected and expected[1] == "r 1.00"
    assert [t for t in texts if t in ("x", "y", "z")] == ["x", "y", "z"]
    # and each drawn map is that row's map of the column's image
    drawn = [axes.images[0].get_array() for axes in figures[0].axes]
    for row, maps in enumerate((None, first, second, third)):
        for column in range(3):
            expected = images[column] if maps is None else overlay(images[column], maps[column])
            assert np.array_equal(drawn[3 * row + column], expected), (row, column)
