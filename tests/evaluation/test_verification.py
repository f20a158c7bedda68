"""Verification statistics (positive/negative pair histograms, ROC, TPR at FPR) against an exact computation over
every pair, and `kdreid evaluate --verification` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import kdreid.evaluation.verification as verification_module
from kdreid.errors import EvaluationError
from kdreid.evaluation.verification import BINS, FPR_LEVELS, verification_statistics
from kdreid.viz.verification import verification_picture
from tests.evaluation.test_evaluate_cli import run, setup  # noqa: F401 (a fixture)


def _pairs(seed=0, num_q=120, num_g=700, num_ids=40):
    """A distance matrix where true matches are nearer on average, with ties, distractors and same-camera pairs."""
    rng = np.random.default_rng(seed)
    q_pids, g_pids = rng.integers(1, num_ids, num_q), rng.integers(0, num_ids, num_g)  # gallery pid 0: distractors
    q_camids, g_camids = rng.integers(1, 4, num_q), rng.integers(1, 4, num_g)
    same = q_pids[:, None] == g_pids[None, :]
    distmat = rng.normal(1.0, 0.25, (num_q, num_g)) - 0.4 * same
    distmat[:, :50] = np.round(distmat[:, :50], 1)  # ties
    return distmat.astype(np.float32), q_pids, g_pids, q_camids, g_camids


def _exact(distmat, q_pids, g_pids, q_camids, g_camids):
    """The positive and the negative distances, listed pair by pair."""
    same = q_pids[:, None] == g_pids[None, :]
    same_camera = q_camids[:, None] == g_camids[None, :]
    return distmat[same & ~same_camera].astype(np.float64), distmat[~same].astype(np.float64)


def test_pairs_are_the_protocols_matches_and_non_matches():
    # query pid 1 cam 1 against: pid 1 cam 1 (left out, as the ranking leaves it), pid 1 cam 2 (positive),
    # pid 2 cam 1 and distractor pid 0 (negatives)
    result = verification_statistics(np.array([[0.1, 0.2, 0.7, 0.9]]), [1], [1, 1, 2, 0], [1], [1, 2, 1, 3])
    assert (result.num_positive, result.num_negative) == (1, 2)
    false_rate, true_rate, thresholds = result.roc()
    assert false_rate[0] == true_rate[0] == 0 and false_rate[-1] == true_rate[-1] == 1
    assert thresholds[0] == pytest.approx(0.1) and thresholds[-1] == pytest.approx(0.9)


@pytest.mark.parametrize("seed", [0, 1])
def test_tpr_at_fpr_and_auc_equal_an_exact_count_over_every_pair(seed, monkeypatch):
    distmat, *labels = _pairs(seed)
    positives, negatives = _exact(distmat, *labels)
    monkeypatch.setattr(verification_module, "_CHUNK_ELEMENTS", 7 * distmat.shape[1])  # several chunks
    result = verification_statistics(distmat, *labels)
    assert (result.num_positive, result.num_negative) == (len(positives), len(negatives))
    width = (distmat.max() - distmat.min()) / BINS
    for fpr in (*FPR_LEVELS, 0.3):
        tpr, threshold = result.at_fpr(fpr)
        # What the threshold gives, counted pair by pair: the same TPR, and never more false positives than asked.
        assert tpr == pytest.approx(np.mean(positives < threshold), abs=1e-12)
        assert np.mean(negatives < threshold) <= fpr
        # And it is the best threshold to within one bin: a threshold one bin higher would exceed the FPR.
        assert np.mean(negatives < threshold + 1.0001 * width) > fpr or threshold >= distmat.max()
    # AUC: the probability that a negative pair is farther than a positive one, ties counted half.
    order = np.sort(negatives)
    below = np.searchsorted(order, positives, side="left")
    ties = np.searchsorted(order, positives, side="right") - below
    exact_auc = np.mean((len(negatives) - below - ties + 0.5 * ties) / len(negatives))
    assert result.auc() == pytest.approx(exact_auc, abs=2e-3)
    # a chunk size does not change the counts
    monkeypatch.setattr(verification_module, "_CHUNK_ELEMENTS", 1 << 22)
    whole = verification_statistics(distmat, *labels)
    assert np.array_equal(whole.positives, result.positives) and np.array_equal(whole.negatives, result.negatives)


def test_a_rate_reached_exactly_is_allowed_and_ties_count_half():
    # 10 negatives, one of them in the first bin: FPR 0.1 is reached exactly at the second edge, and "at most 0.1"
    # includes it (threshold 1.0: one of the two positives, the one at 0.0, is closer)
    distmat = np.array([[0.0, 0.0, 1.0, *[2.0] * 9]])
    result = verification_statistics(distmat, [1], [1, 2, 1, *range(3, 12)], [1], [2] * 12, bins=2)
    assert (result.num_positive, result.num_negative) == (2, 10)
    assert result.at_fpr(0.1) == (pytest.approx(0.5), pytest.approx(1.0))
    # every distance equal: one bin, every positive tied with every negative: AUC exactly 0.5 (ties half)
    tied = verification_statistics(np.full((2, 6), 0.7), [1, 2], [1, 1, 2, 3, 3, 0], [1, 1], [2, 2, 2, 1, 1, 1])
    assert tied.auc() == pytest.approx(0.5)


def test_summary_is_percent_and_keeps_the_threshold_whole():
    distmat, *labels = _pairs(2)
    result = verification_statistics(distmat, *labels)
    summary = result.summary()
    assert (summary["positive_pairs"], summary["negative_pairs"]) == (result.num_positive, result.num_negative)
    # whole: the table prints it to 4 digits as the picture does, and a rounded copy could round again the other way
    assert summary["auc"] == result.auc()
    for level, fpr in zip(summary["at_fpr"], FPR_LEVELS):
        tpr, threshold = result.at_fpr(fpr)
        assert level["fpr"] == fpr and level["tpr"] == pytest.approx(100 * tpr, abs=1e-6)
        assert level["threshold"] == threshold  # not rounded: rounded up it could let more negatives through
    assert any(level["tpr"] > 1 for level in summary["at_fpr"])  # percent, not a fraction


def test_empty_populations_and_bad_input():
    no_positive = verification_statistics(np.array([[0.5, 0.7]]), [1], [2, 3], [1], [1, 2])
    assert np.isnan(no_positive.at_fpr(0.01)[0]) and no_positive.summary()["at_fpr"][0]["tpr"] is None
    with pytest.raises(Exception, match="NaN or inf"):
        verification_statistics(np.array([[np.nan, 1.0]]), [1], [1, 2], [1], [2, 1])
    with pytest.raises(EvaluationError, match="pass one pid and one camid per query row and per gallery column"):
        verification_statistics(np.array([[0.5, 1.0]]), [1], [1], [1], [2, 1])  # one gallery pid for two columns


def test_picture_is_written(tmp_path):
    distmat, *labels = _pairs(0)
    path = verification_picture(verification_statistics(distmat, *labels), tmp_path / "v.png", title="t")
    with Image.open(path) as image:
        assert image.size[0] > 600


def test_picture_shows_positives_as_positives_and_the_roc(tmp_path, drawn_figures):
    """Read back from the drawn figure: each population's histogram is its own counts as a density over the drawn
    bins, the thresholds are the result's, and the ROC is (FPR, TPR)."""
    import kdreid.viz.verification as picture

    distmat, *labels = _pairs(1)
    result = verification_statistics(distmat, *labels)
    figures = drawn_figures(picture)
    verification_picture(result, tmp_path / "v.png")
    histogram_axes, roc_axes = figures[0].axes[:2]
    group = BINS // picture.DRAWN_BINS
    edges = result.edges[::group]
    stairs = {patch.get_label().split(" pairs")[0]: patch for patch in histogram_axes.patches}
    for name, counts in (("positive", result.positives), ("negative", result.negatives)):
        values, drawn_edges, _ = stairs[name].get_data()
        np.testing.assert_allclose(drawn_edges, edges)
        expected = counts.reshape(-1, group).sum(1) / (counts.sum() * np.diff(edges))
        np.testing.assert_allclose(values, expected, rtol=1e-9)
        assert stairs[name].get_label() == f"{name} pairs (n={counts.sum():,})"
    thresholds = [line.get_xdata()[0] for line in histogram_axes.lines]
    assert thresholds == pytest.approx([result.at_fpr(fpr)[1] for fpr in FPR_LEVELS])
    false_rate, true_rate, _ = result.roc()
    curve = roc_axes.lines[0]
    np.testing.assert_allclose(curve.get_xdata(), false_rate[false_rate > 0])
    np.testing.assert_allclose(curve.get_ydata(), true_rate[false_rate > 0])


def test_evaluate_verification_writes_figures_picture_and_metrics(setup, tmp_path, capsys):  # noqa: F811
    root, checkpoint, _ = setup
    out = tmp_path / "eval"
    base = ["evaluate", "--model", str(checkpoint), "-t", "market1501", "--root", str(root), "--device", "cpu"]
    code, printed, err = run([*base, "--verification", "--out", str(out), "--json"], capsys)
    assert code == 0, err
    summary = json.loads(printed)["verification"]["market1501"]
    # 6 query ids x (2 gallery images from camera 2) positives; the camera-1 image of one's own id left out
    assert (summary["positive_pairs"], summary["negative_pairs"]) == (12, 6 * (5 * 3 + 3))
    assert [level["fpr"] for level in summary["at_fpr"]] == list(FPR_LEVELS) and 0 <= summary["auc"] <= 1
    assert json.loads((out / "metrics.json").read_text())["verification"]["market1501"] == summary
    assert (out / "verification" / "market1501.png").is_file()
    # the table form: the ranking table, then one verification row per target
    code, table, _ = run(base + ["--verification"], capsys)
    assert code == 0 and table.splitlines()[2].startswith("verification") and "TPR@FPR=1e-3" in table
    # an evaluation that fails leaves the earlier figures and their picture together
    import kdreid.evaluation.features as features

    def fails(*args, **kwargs):
        raise EvaluationError("stopped")

    real = features.evaluate_features
    features.evaluate_features = fails
    try:
        assert run([*base, "--metric", "cosine", "--out", str(out)], capsys)[0] == 2
    finally:
        features.evaluate_features = real
    assert (out / "verification" / "market1501.png").is_file()
    assert json.loads((out / "metrics.json").read_text())["verification"]["market1501"] == summary
    # evaluated again with other settings and without --verification: the old figures and picture do not stay
    code, _, err = run([*base, "--metric", "cosine", "--out", str(out)], capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert "verification" not in metrics and not (out / "verification" / "market1501.png").exists()
    (out / "metrics.json").write_text(json.dumps({"final": {}, "verification": None}))  # not an evaluation's
    code, _, err = run([*base, "--verification", "--out", str(out)], capsys)
    assert code == 2 and "is not an evaluation's metrics.json" in err


def test_printed_thresholds_are_rounded_down():
    from kdreid.evaluation.verification import threshold_text

    assert [threshold_text(value) for value in (16.1555, 0.0012349, 0.99999, 2.0)] == ["16.15", "0.001234", "0.9999",
                                                                                       "2"]
