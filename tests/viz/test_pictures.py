"""D-MMD histograms, training curves and the pipeline bar chart: what they read, and that they draw it."""

import warnings

import numpy as np
import pytest
from PIL import Image

from kdreid.errors import KdreidError
from kdreid.viz import dmmd_histograms, load_distances, pipeline_bars, training_curves
from kdreid.viz.bars import pipeline_rows
from kdreid.viz.common import count_non_finite
from kdreid.viz.curves import curve_series
from kdreid.viz.histograms import KEYS, summarize


def _distances(rng, scale=1.0):
    return {key: rng.gamma(2.0, scale * (1.0 if "within" in key else 2.0), size=50 + 10 * i)
            for i, key in enumerate(KEYS)}


def _save(path, arrays):
    np.savez_compressed(path, **arrays)
    return path


def test_histograms_read_what_adapt_saves_and_draw_one_row_per_moment(rng, tmp_path):
    before = _save(tmp_path / "distances_before.npz", _distances(rng))
    after = _save(tmp_path / "distances_after.npz", _distances(rng, 0.5))
    loaded = load_distances(before)
    assert summarize(loaded)["source_within"]["count"] == 50
    assert summarize(loaded)["target_between"]["mean"] == pytest.approx(np.load(before)["target_between"].mean())
    both = Image.open(dmmd_histograms(before, after, tmp_path / "both.png")).size
    only_before = Image.open(dmmd_histograms(before, None, tmp_path / "before.png")).size
    assert both[0] == only_before[0] and both[1] > 1.8 * only_before[1]


def test_histogram_files_that_do_not_fit_are_one_line(rng, tmp_path):
    arrays = _distances(rng)
    del arrays["target_within"]
    with pytest.raises(KdreidError, match="lacks target_within; it is not an adapt stage's distance file"):
        load_distances(_save(tmp_path / "partial.npz", arrays))
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(KdreidError, match="junk.npz is not a readable .npz"):
        load_distances(tmp_path / "junk.npz")
    with pytest.raises(KdreidError, match="missing.npz does not exist"):
        load_distances(tmp_path / "missing.npz")
    # a copy cut short: the zip's start without its directory (a BadZipFile traceback before)
    whole = _save(tmp_path / "whole.npz", _distances(rng)).read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[:100])
    with pytest.raises(KdreidError, match=r"cut.npz is not a readable .npz \(not an .npz archive\)"):
        load_distances(tmp_path / "cut.npz")
    np.save(tmp_path / "single.npy", np.zeros(3))  # one array, named as an archive
    (tmp_path / "single.npy").rename(tmp_path / "single.npz")
    with pytest.raises(KdreidError, match="single.npz is not a readable .npz"):
        load_distances(tmp_path / "single.npz")


def test_kd_distance_files_that_do_not_fit_are_one_line(rng, tmp_path):
    from kdreid.viz import kd_distance_picture, load_kd_distances

    pairs = {"targets": np.array(["synth_duke"]), "t0_teacher": rng.uniform(0, 1, 10),
             "t0_student": rng.uniform(0, 1, 10), "t0_same": rng.uniform(0, 1, 10) < 0.3}
    good = _save(tmp_path / "kd.npz", pairs)
    assert list(load_kd_distances(good)) == ["synth_duke"]
    assert Image.open(kd_distance_picture(good, good, tmp_path / "kd.png")).size[1] > 400
    # a diverged student's NaN distances are left out of its panel; one target written as a 0-d array reads
    diverged = _save(tmp_path / "nan.npz", {**pairs, "targets": np.array("synth_duke"),
                                             "t0_student": np.full(10, np.nan)})
    assert list(load_kd_distances(diverged)) == ["synth_duke"]
    assert kd_distance_picture(good, diverged, tmp_path / "nan.png").is_file()
    for name, broken in (("short", {**pairs, "t0_same": pairs["t0_same"][:5]}),
                         ("words", {**pairs, "t0_teacher": np.array(["a"] * 10)}),
                         ("scalar", {**pairs, "t0_student": np.array(0.5)})):
        with pytest.raises(KdreidError, match="lacks or mismatches t0_teacher, t0_student, t0_same"):
            load_kd_distances(_save(tmp_path / f"{name}.npz", broken))
    (tmp_path / "cut.npz").write_bytes(good.read_bytes()[:100])
    with pytest.raises(KdreidError, match=r"cut.npz is not a readable .npz \(not an .npz archive.*run the distill"):
        load_kd_distances(tmp_path / "cut.npz")


def test_histograms_survive_an_empty_set(rng, tmp_path):
    arrays = _distances(rng)
    arrays["target_within"] = np.zeros(0)  # a target batch without any pair of one identity
    assert dmmd_histograms(arrays, arrays, tmp_path / "h.png").is_file()


def test_histograms_leave_out_non_finite_distances_without_warnings(rng, tmp_path, monkeypatch):
    """A diverged model's distances are NaN: numpy and matplotlib printed six RuntimeWarnings and drew nothing."""
    from kdreid.viz import histograms

    diverged = _distances(rng)
    diverged["target_within"] = np.full(20, np.nan)  # a whole panel: no finite distance
    diverged["target_between"] = np.full(20, np.nan)
    diverged["source_between"][:3] = [np.nan, np.inf, -np.inf]
    labels = []
    real_save = histograms.save_png
    monkeypatch.setattr(histograms, "save_png", lambda figure, path: labels.extend(
        label for axes in figure.axes for label in axes.get_legend_handles_labels()[1]) or real_save(figure, path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dmmd_histograms(_distances(rng), diverged, tmp_path / "h.png").is_file()
    assert sum("non-finite left out" in label for label in labels) == 1
    assert any(label.startswith("between-class (n=57,") and label.endswith("3 non-finite left out)")
               for label in labels)
    assert count_non_finite(diverged) == (43, sum(len(a) for a in diverged.values()))


METRICS = {
    "final": {"synth_duke": {"mAP": 30.0}},
    "epochs": [
        {"epoch": 1, "lr": 1e-4, "losses": {"loss": 5.0, "ce": 3.0}, "seconds": 1.0},
        {"epoch": 2, "lr": 1e-4, "losses": {"loss": 4.0, "ce": 2.5, "mmd_within": 0.2},
         "metrics": {"synth_duke": {"mAP": 20.0, "rank1": 30.0}, "source-val": {"mAP": 50.0}}},
        {"epoch": 3, "lr": 1e-5, "losses": {"loss": 3.0, "ce": 2.0, "mmd_within": 0.1},
         "metrics": {"synth_duke": {"mAP": 30.0, "rank1": 40.0}}},
    ],
}


def test_curves_take_losses_of_every_epoch_and_map_where_evaluated(tmp_path):
    losses, maps = curve_series(METRICS)
    assert losses == {"loss": [(1, 5.0), (2, 4.0), (3, 3.0)], "ce": [(1, 3.0), (2, 2.5), (3, 2.0)],
                      "mmd_within": [(2, 0.2), (3, 0.1)]}
    assert maps == {"synth_duke": [(2, 20.0), (3, 30.0)], "source-val": [(2, 50.0)]}
    assert training_curves(METRICS, tmp_path / "c.png", title="adapt").is_file()


def test_curves_draw_each_series_at_its_epochs(tmp_path, drawn_figures):
    """Read back from the drawn lines: a loss that rises and an mAP that falls are drawn as they were measured (a
    review's mutation sorting the values passed on METRICS, whose values are already in order)."""
    from kdreid.viz import curves

    figures = drawn_figures(curves)
    metrics = {"epochs": [
        {"epoch": 1, "losses": {"loss": 2.0}, "metrics": {"synth_duke": {"mAP": 30.0}}},
        {"epoch": 2, "losses": {"loss": 4.0}},
        {"epoch": 3, "losses": {"loss": 3.0}, "metrics": {"synth_duke": {"mAP": 10.0}, "source-val": {"mAP": 5.0}}},
        {"epoch": 4, "losses": {"loss": 1.0}, "metrics": {"synth_duke": {"mAP": 20.0}, "source-val": {"mAP": 7.0}}},
    ]}
    training_curves(metrics, tmp_path / "c.png")
    [figure] = figures
    drawn = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for axes in figure.axes
             for line in axes.get_lines()}
    assert drawn == {"loss": ([1, 2, 3, 4], [2.0, 4.0, 3.0, 1.0]), "synth_duke": ([1, 3, 4], [30.0, 10.0, 20.0]),
                     "source-val": ([3, 4], [5.0, 7.0])}


def test_curves_tick_only_epochs_that_exist(tmp_path, monkeypatch):
    """One evaluation (epoch 2): the mAP panel's locator used to fall back to ticks 1.900 ... 2.100."""
    from kdreid.viz import curves

    ticks = []
    real_save = curves.save_png
    monkeypatch.setattr(curves, "save_png", lambda figure, path: ticks.extend(
        [list(axes.get_xticks()) for axes in figure.axes]) or real_save(figure, path))
    one_evaluation = {"epochs": [{"epoch": 1, "losses": {"loss": 3.0}},
                                 {"epoch": 2, "losses": {"loss": 2.0}, "metrics": {"synth_duke": {"mAP": 5.0}}}]}
    training_curves(one_evaluation, tmp_path / "c.png")
    assert ticks == [[1, 2], [2]]


@pytest.mark.parametrize("epochs, found", [
    ([1, 2], r"'epochs' entry 1 is not a training stage's record \(TypeError: "),
    ([{"epoch": "one", "losses": {}}], r"entry 1 .* \(ValueError: invalid literal for int\(\)"),
    ([{"epoch": 1, "losses": {"loss": 2.0}}, {"epoch": 2, "losses": {"loss": "x"}}],
     r"entry 2 .* \(ValueError: could not convert string to float: 'x'\)"),
    ([{"epoch": 1, "losses": [1]}], r"entry 1 .* \(AttributeError: "),
    ([{"losses": {"loss": 1.0}}], r"entry 1 .* \(KeyError: 'epoch'\)"),
    ([{"epoch": 1, "metrics": {"synth_duke": {"mAP": [1]}}}], r"entry 1 .* \(TypeError: "),
], ids=["ints", "epoch-text", "loss-text", "losses-list", "no-epoch", "map-list"])
def test_curves_of_a_damaged_file_are_one_line(epochs, found, tmp_path):
    with pytest.raises(KdreidError, match=found):
        training_curves({"epochs": epochs}, tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_curves_refuse_metrics_without_epochs(tmp_path):
    with pytest.raises(KdreidError, match="no 'epochs' list"):
        training_curves({"final": {}}, tmp_path / "c.png")
    with pytest.raises(KdreidError, match="nothing to plot"):
        training_curves({"epochs": []}, tmp_path / "c.png")


PIPELINE = {
    "source_only": {"a": {"mAP": 10.0, "rank1": 20.0}, "b": {"mAP": 12.0, "rank1": 22.0}},
    "source_only_student": {"a": {"mAP": 8.0, "rank1": 15.0}, "b": {"mAP": 9.0, "rank1": 16.0}},
    "teachers": {"a": {"mAP": 30.0, "rank1": 50.0}, "b": {"mAP": 25.0, "rank1": 45.0}},
    "blend": {"a": {"mAP": 20.0, "rank1": 35.0}, "b": {"mAP": 18.0, "rank1": 30.0}},
    "student": {"a": {"mAP": 28.0, "rank1": 48.0}},  # a student evaluated on one target only
    "teachers_on_all_targets": {"a": {"a": {"mAP": 30.0}, "b": {"mAP": 5.0}}},
    "grouping": "tracklet",
}


def test_bars_take_the_pipelines_rows_per_target(tmp_path):
    targets, rows = pipeline_rows(PIPELINE, "rank1")
    assert targets == ["a", "b"]
    assert list(rows) == ["source_only", "source_only_student", "teachers", "blend", "student"]
    assert rows["teachers"] == {"a": 50.0, "b": 45.0} and rows["student"] == {"a": 48.0}
    assert pipeline_bars(PIPELINE, tmp_path / "bars.png").is_file()


def test_bars_refuse_a_stages_metrics(tmp_path):
    with pytest.raises(KdreidError, match="not a pipeline run's metrics"):
        pipeline_bars(METRICS, tmp_path / "bars.png")
    damaged = {**PIPELINE, "student": {"a": {"mAP": "high", "rank1": 48.0}}}
    with pytest.raises(KdreidError, match=r"its 'student' row holds a mAP that is not a number \(could not convert"):
        pipeline_rows(damaged, "mAP")


def test_histogram_panels_show_their_own_domain_and_moment(rng, tmp_path, drawn_figures):
    from kdreid.viz import histograms

    figures = drawn_figures(histograms)
    before, after = _distances(rng), _distances(rng, 0.5)
    after = {key: values[: 5 + 3 * i] for i, (key, values) in enumerate(after.items())}  # other counts than before
    dmmd_histograms(_save(tmp_path / "b.npz", before), _save(tmp_path / "a.npz", after), tmp_path / "h.png")
    [figure] = figures
    panels = {axes.get_title(): axes.get_legend_handles_labels()[1] for axes in figure.axes}
    for moment, distances in (("before adaptation", before), ("after adaptation", after)):
        for domain in ("source", "target"):
            expected = [f"{kind}-class (n={len(distances[f'{domain}_{kind}'])}, "
                        f"mean {np.mean(distances[f'{domain}_{kind}']):.3g})" for kind in ("within", "between")]
            assert panels[f"{domain}, {moment}"] == expected


def test_kd_panels_show_each_targets_pairs_where_they_belong(rng, tmp_path, drawn_figures):
    """Per panel: the pairs of one identity as points at (teacher, student), those of two identities in the density,
    and the agreement of that target and moment in the title (all of it read back from the drawn figure)."""
    from matplotlib.collections import PathCollection, QuadMesh

    from kdreid.viz import kd, kd_distance_picture

    def pairs(count, shift):
        teacher = rng.uniform(0, 1, count)
        return {"teacher": teacher, "student": np.clip(teacher + rng.normal(shift, 0.1, count), 0, 2),
                "same": rng.uniform(0, 1, count) < 0.3}

    moments = {"before": {"a": pairs(40, 0.3), "b": pairs(25, 0.5)},
               "after": {"a": pairs(30, 0.0), "b": pairs(35, 0.1)}}
    files = {}
    for moment, per_target in moments.items():
        arrays = {"targets": np.array(list(per_target))}
        for index, values in enumerate(per_target.values()):
            arrays.update({f"t{index}_{kind}": values[kind] for kind in ("teacher", "student", "same")})
        files[moment] = _save(tmp_path / f"kd_{moment}.npz", arrays)
    figures = drawn_figures(kd)
    kd_distance_picture(files["before"], files["after"], tmp_path / "kd.png")
    [figure] = figures
    panels = []
    for axes in figure.axes:
        if not axes.get_title():
            continue  # a colour bar, if any
        target, moment = axes.get_title().split("\n")[0].split(", ")
        panels.append((target, moment.split()[0]))
        values = moments[moment.split()[0]][target]
        same = values["same"]
        [points] = [c for c in axes.collections if isinstance(c, PathCollection)]
        np.testing.assert_allclose(points.get_offsets(), np.column_stack([values["teacher"][same],
                                                                         values["student"][same]]))
        [density] = [c for c in axes.collections if isinstance(c, QuadMesh)]
        assert int(np.ma.sum(density.get_array())) == int((~same).sum())
        r = np.corrcoef(values["teacher"], values["student"])[0, 1]
        difference = np.mean(np.abs(values["teacher"] - values["student"]))
        assert axes.get_title().endswith(f"Pearson r {r:.3f}, mean |student − teacher| {difference:.3f}")
    assert sorted(panels) == [("a", "after"), ("a", "before"), ("b", "after"), ("b", "before")]


def test_kd_title_of_one_target_fits_the_picture(rng, tmp_path, drawn_figures):
    """Found by a pictures review: with one target (one 4.2-inch column) the report's title, "Stage distill: the
    student's distances against its teachers'", was cut off at both ends of the PNG."""
    from kdreid.viz import kd, kd_distance_picture

    teacher = rng.uniform(0, 1, 45)
    pairs = {"a": {"teacher": teacher, "student": teacher * 0.5, "same": rng.uniform(0, 1, 45) < 0.3}}
    figures = drawn_figures(kd)
    path = kd_distance_picture(pairs, pairs, tmp_path / "kd.png",
                               title="Stage distill: the student's distances against its teachers'")
    [figure] = figures
    box = figure._suptitle.get_window_extent(figure.canvas.get_renderer())
    width = Image.open(path).size[0]
    assert 0 <= box.x0 and box.x1 <= width
    # The PNG is the widened figure. Not `== round(...)`: the width in inches times the dpi may land just under a
    # whole pixel (468.99999999999994), which matplotlib 3.11 rounds but 3.10 and older (the newest on Python 3.10)
    # truncate to one pixel fewer.
    assert abs(width - figure.bbox.width) < 1


def test_bars_draw_each_rows_values_and_their_mean_per_target(tmp_path, drawn_figures):
    from matplotlib.container import BarContainer

    from kdreid.viz import bars

    full = {**PIPELINE, "student": {"a": {"mAP": 28.0, "rank1": 48.0}, "b": {"mAP": 23.0, "rank1": 40.0}}}
    del full["source_only_student"]  # a row absent (a pipeline with one architecture): the others keep their names
    figures = drawn_figures(bars)
    pipeline_bars(full, tmp_path / "bars.png", metric="rank1", labels={"student": "osnet_x0_25 student"})
    [axes] = figures[0].axes
    assert [tick.get_text() for tick in axes.get_xticklabels()] == ["a", "b", "mean"]
    drawn = {container.get_label(): [round(bar.get_height(), 6) for bar in container]
             for container in axes.containers if isinstance(container, BarContainer)}
    expected = {label: [full[key]["a"]["rank1"], full[key]["b"]["rank1"],
                        (full[key]["a"]["rank1"] + full[key]["b"]["rank1"]) / 2]
                for key, label in bars.ROWS if key in full and key != "student"}
    expected["osnet_x0_25 student"] = [48.0, 40.0, 44.0]
    assert drawn == expected
