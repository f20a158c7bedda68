"""The colour-histogram baseline: histograms and distances against direct formulas, chance against simulation,
and on the synthetic benchmark: above chance, below a ceiling with full style, higher without it."""

from __future__ import annotations

import colorsys
import json
import warnings

import numpy as np
import pytest

from kdreid.cli import main
from kdreid.data.synthetic import build_domain, generate
from kdreid.data.synthetic.generate import render_entries
from kdreid.evaluation.color_histogram import (
    STRIPES,
    expected_random_map,
    hellinger_distances,
    stripe_histograms,
)
from kdreid.evaluation.ranking import EvaluationWarning, evaluate_rank


def slow_histograms(rgb: np.ndarray) -> np.ndarray:
    """Pixel by pixel with colorsys (PIL's HSV scaled to 0..255, truncated), central 40 % of the columns."""
    height, width = rgb.shape[:2]
    first, last = round(width * 0.3), round(width * 0.7)
    out = np.zeros((STRIPES, 8, 4, 4))
    for y in range(height):
        for x in range(first, last):
            h, s, v = colorsys.rgb_to_hsv(*(rgb[y, x] / 255.0))
            h, s, v = (min(255, int(c * 255 + 0.5)) for c in (h, s, v))  # PIL rounds to 0..255
            out[y * STRIPES // height, h * 8 // 256, s * 4 // 256, v * 4 // 256] += 1
    out = out.reshape(STRIPES, -1)
    return (out / out.sum(axis=1, keepdims=True)).ravel()


def test_stripe_histograms_match_a_pixel_loop(rng):
    # a few flat colours (bins far from their edges, so rounding conventions cannot matter) in blocks
    palette = np.array([[200, 30, 30], [30, 160, 40], [40, 40, 190], [230, 230, 230], [20, 20, 20]], np.uint8)
    image = palette[rng.integers(0, len(palette), size=(12, 10))]
    assert np.allclose(stripe_histograms(image), slow_histograms(image))


def test_only_the_central_strip_counts():
    image = np.zeros((12, 10, 3), np.uint8)
    image[:, 3:7] = (200, 30, 30)
    changed = image.copy()
    changed[:, :3] = (30, 160, 40)  # outside the central 40 %
    changed[:, 7:] = (40, 40, 190)
    assert np.array_equal(stripe_histograms(image), stripe_histograms(changed))
    assert np.allclose(stripe_histograms(image).reshape(STRIPES, -1).sum(axis=1), 1.0)


def test_hellinger_distance_is_the_direct_formula(rng):
    histograms = [stripe_histograms(rng.integers(0, 256, size=(18, 10, 3), dtype=np.uint8)) for _ in range(5)]
    features = np.sqrt(np.stack(histograms) / STRIPES)
    distances = hellinger_distances(features[:2], features)
    for i in range(2):
        for j in range(5):
            p, q = histograms[i] / STRIPES, histograms[j] / STRIPES
            assert distances[i, j] == pytest.approx(np.sqrt(max(0.0, 1 - np.sum(np.sqrt(p * q)))), abs=1e-6)
    assert distances[0, 0] == pytest.approx(0.0, abs=1e-3) and distances[0, 1] > 0.1


def test_chance_equals_the_mean_ap_of_random_rankings(rng):
    q_pids = np.array([1, 2, 3, 4, 4])
    q_camids = np.array([1, 1, 2, 1, 2])
    g_pids = np.array([1, 1, 1, 2, 2, 3, 4, 4, 4, 5, 6, 0, 0, 7])
    g_camids = np.array([1, 2, 3, 2, 1, 1, 1, 2, 3, 1, 2, 1, 3, 2])
    simulated = np.mean([
        evaluate_rank(rng.random((5, len(g_pids))), q_pids, g_pids, q_camids, g_camids)[1] for _ in range(1000)
    ])
    expected = expected_random_map(q_pids, g_pids, q_camids, g_camids)
    assert expected == pytest.approx(simulated, abs=0.01)
    assert 0.1 < expected < 0.6


def baseline_in_memory(name: str, gap: float, scale: float) -> tuple[float, float]:
    """(mAP, chance) of the baseline on a domain's query/gallery, rendered in memory (no JPEG, no train split)."""
    domain = build_domain(name, scale=scale, seed=0, gap=gap, size=(64, 32))
    plan = domain.plan
    indices, images = render_entries(domain, (plan.split > 0) & (plan.pid >= 0))
    features = np.sqrt(np.stack([stripe_histograms(x) for x in images]) / STRIPES)
    query = plan.split[indices] == 1
    ids = (plan.pid[indices][query], plan.pid[indices][~query], plan.camid[indices][query], plan.camid[indices][~query])
    _, mean_ap = evaluate_rank(hellinger_distances(features[query], features[~query]), *ids)
    return mean_ap, expected_random_map(*ids)


def test_style_defeats_colour_matching_on_the_synthetic_benchmark():
    """Identity structure is real (> 5x chance), camera style keeps colour matching low (< 40 % mAP), and with
    the gap dial at 0 colour matching does much better."""
    full, chance = baseline_in_memory("synth_market", gap=1.0, scale=0.06)
    neutral, _ = baseline_in_memory("synth_market", gap=0.0, scale=0.06)
    assert 5 * chance < full < 0.4, (full, chance)
    assert neutral > full + 0.15, (neutral, full)


def test_baseline_command(tmp_path, capsys):
    generate(tmp_path, ["synth_cuhk"], scale=0.01, seed=0, size=(64, 32), workers=1)
    assert main(["data", "baseline", "--root", str(tmp_path), "-d", "synth_cuhk", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dataset"] == "synth_cuhk" and result["num_query"] == 14
    assert 0.0 <= result["mAP"] <= 100.0 and 0.0 < result["chance_mAP"] < 100.0
    assert main(["data", "baseline", "--root", str(tmp_path), "-d", "synth_cuhk"]) == 0
    assert "colour-histogram baseline mAP" in capsys.readouterr().out
    # every number of the report, against the ranking computed here from the images (features: sqrt of the stripe
    # distributions / STRIPES, unit norm)
    from kdreid.data.cache import read_image
    from kdreid.data.datasets import build_dataset
    from kdreid.evaluation.color_histogram import histogram_features

    dataset = build_dataset("synth_cuhk", tmp_path)
    features = {split: np.sqrt(np.stack([stripe_histograms(read_image(r.path)) for r in records]) / STRIPES).astype(
                np.float32)  # the product's precision: a near-tie in the ranking falls as the product's does
                for split, records in (("query", dataset.query), ("gallery", dataset.gallery))}
    np.testing.assert_allclose(histogram_features([r.path for r in dataset.query]), features["query"], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(features["query"], axis=1), 1.0, atol=1e-6)
    ids = [np.array([getattr(r, field) for r in records]) for field in ("pid", "camid")
           for records in (dataset.query, dataset.gallery)]  # q_pids, g_pids, q_camids, g_camids
    cmc, mean_ap = evaluate_rank(hellinger_distances(features["query"], features["gallery"]), *ids, max_rank=50)
    assert result["mAP"] == pytest.approx(100 * mean_ap, abs=1e-4)
    for rank in (1, 5, 10, 20):
        assert result[f"rank{rank}"] == pytest.approx(100 * cmc[rank - 1], abs=1e-4), rank
    assert result["chance_mAP"] == pytest.approx(100 * expected_random_map(*ids))
    assert result["num_gallery"] == len(dataset.gallery)


def test_baseline_command_reads_cuhk03_as_the_other_data_commands_do(tmp_path, capsys):
    # The classic 20-split protocol: its split chosen with --split-id, its CMC single-gallery-shot (torchreid's
    # use_metric_cuhk03), as `kdreid evaluate --cuhk03-classic-split` scores the models beside it.
    pytest.importorskip("h5py")
    from kdreid.data.datasets import build_dataset
    from kdreid.evaluation.color_histogram import histogram_features
    from tests.data.layouts import cuhk03_people, write_cuhk03_raw_mat

    write_cuhk03_raw_mat(tmp_path / "cuhk03" / "cuhk03_release" / "cuhk-03.mat", cuhk03_people(),
                         [[(1, 2), (2, 1)], [(1, 1), (2, 2)]])
    flags = ["data", "baseline", "--root", str(tmp_path), "-d", "cuhk03", "--json", "--cuhk03-classic-split"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the skipped queries are said as a line naming the dataset, not warned of
        assert main([*flags, "--split-id", "1"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert captured.err.startswith("kdreid: warning: cuhk03: 2 of 5 queries have no true match")
    dataset = build_dataset("cuhk03", tmp_path, classic_split=True, split_id=1)
    assert result["num_query"] == len(dataset.query) and {r.pid for r in dataset.query} == {1001, 2002}
    q_pids, g_pids = (np.array([r.pid for r in split]) for split in (dataset.query, dataset.gallery))
    q_camids, g_camids = (np.array([r.camid for r in split]) for split in (dataset.query, dataset.gallery))
    distances = hellinger_distances(histogram_features([r.path for r in dataset.query]),
                                    histogram_features([r.path for r in dataset.gallery]))
    with pytest.warns(EvaluationWarning, match="2 of 5 queries"):
        cmc, mean_ap = evaluate_rank(distances, q_pids, g_pids, q_camids, g_camids, use_metric_cuhk03=True)
    assert result["rank1"] == pytest.approx(100 * cmc[0]) and result["mAP"] == pytest.approx(100 * mean_ap)
    # the flag reaches the scoring: the CMC is single-gallery-shot (this tiny split scores the same either way)
    import kdreid.evaluation.color_histogram as color_histogram

    protocols = []
    real = color_histogram.color_histogram_baseline
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(color_histogram, "color_histogram_baseline", lambda data, use_metric_cuhk03=False: (
            protocols.append(use_metric_cuhk03) or real(data, use_metric_cuhk03=use_metric_cuhk03)))
        assert main([*flags, "--split-id", "1"]) == 0
    capsys.readouterr()
    assert protocols == [True]
    # The CUHK03 flags on another dataset are a one-line usage error, as for `kdreid data check`.
    generate(tmp_path, ["synth_cuhk"], scale=0.01, seed=0, size=(64, 32), workers=1)
    assert main(["data", "baseline", "--root", str(tmp_path), "-d", "synth_cuhk", "--cuhk03-labeled"]) == 2
    assert "apply only to -d cuhk03, not to -d synth_cuhk" in capsys.readouterr().err
