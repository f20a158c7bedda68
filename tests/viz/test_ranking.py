"""Ranked-results pictures (`--visrank`): the ranking they show, the frames' colours, and the evaluate flags."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from kdreid.cli import main
from kdreid.evaluation.distance import compute_distance_matrix
from kdreid.evaluation.features import Features
from kdreid.viz.common import CORRECT_RGB, QUERY_RGB, WRONG_RGB
from kdreid.viz.ranking import (
    RankedQuery,
    choose_queries,
    draw_ranked_results,
    query_distances,
    rank_queries,
    visualize_ranked_results,
)


def test_rank_queries_is_the_protocols_ranking(rng):
    num_query, num_gallery, topk = 6, 40, 7
    distances = np.round(rng.random((num_query, num_gallery)), 1)  # rounded: many ties
    q_pids, g_pids = rng.integers(0, 4, num_query), rng.integers(0, 4, num_gallery)
    q_camids, g_camids = rng.integers(0, 3, num_query), rng.integers(0, 3, num_gallery)
    chosen = [0, 2, 5]
    ranked = rank_queries(distances[chosen], q_pids, g_pids, q_camids, g_camids, chosen, topk)
    for item, q in zip(ranked, chosen):
        # Direct formula: drop same identity + same camera, sort by (distance, match after non-match, gallery index).
        kept = [g for g in range(num_gallery) if not (g_pids[g] == q_pids[q] and g_camids[g] == q_camids[q])]
        expected = sorted(kept, key=lambda g: (distances[q, g], g_pids[g] == q_pids[q], g))[:topk]
        assert item.query_index == q
        assert item.gallery_indices == expected
        assert item.distances == pytest.approx([distances[q, g] for g in expected])
        assert item.correct == [bool(g_pids[g] == q_pids[q]) for g in expected]


def test_ties_are_drawn_as_the_metric_counts_them():
    """All distances equal, gallery[0] the only match: evaluate gives rank-1 0 and mAP 0.25 (the match ranks
    after its tied non-matches), so the picture must not show it as a green #1."""
    from kdreid.evaluation.ranking import evaluate

    distances = np.zeros((1, 4), np.float32)
    q_pids, g_pids, q_camids, g_camids = np.array([1]), np.array([1, 2, 3, 4]), np.array([0]), np.ones(4, int)
    result = evaluate(distances, q_pids, g_pids, q_camids, g_camids, max_rank=4)
    assert result.rank(1) == 0 and result.mAP == pytest.approx(0.25)
    [item] = rank_queries(distances, q_pids, g_pids, q_camids, g_camids, [0], topk=4)
    assert item.gallery_indices == [1, 2, 3, 0] and item.correct == [False, False, False, True]


def test_rank_queries_refuses_mismatched_distances(rng):
    from kdreid.errors import EvaluationError

    with pytest.raises(EvaluationError, match=r"distances are \(2, 5\) but there are 3 chosen queries"):
        rank_queries(np.zeros((2, 5)), np.zeros(3), np.zeros(5), np.zeros(3), np.zeros(5), [0, 1, 2])


def test_choose_queries_spreads_over_the_list():
    assert choose_queries(100, 5) == [0, 25, 50, 74, 99]
    assert choose_queries(3, 10) == [0, 1, 2]
    assert choose_queries(0, 4) == [] and choose_queries(10, 0) == []
    assert choose_queries(1, 1) == [0]


def _pixels(path) -> set[tuple[int, int, int]]:
    return {tuple(p) for p in np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)}


def _grey_images(folder, count):
    paths = []
    for i in range(count):
        path = folder / f"{i}.png"
        Image.fromarray(np.full((32, 16, 3), 100 + 10 * i, np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_frames_are_green_for_matches_and_red_for_others(tmp_path):
    paths = _grey_images(tmp_path, 4)
    pids, camids = np.array([1, 1, 2, 3]), np.array([0, 1, 1, 1])
    mixed = [RankedQuery(0, [1, 2], [0.1, 0.2], [True, False])]
    all_correct = [RankedQuery(0, [1], [0.1], [True])]
    all_wrong = [RankedQuery(0, [2, 3], [0.1, 0.2], [False, False])]
    colours = {}
    for name, ranked in (("mixed", mixed), ("correct", all_correct), ("wrong", all_wrong)):
        out = draw_ranked_results(ranked, paths, paths, pids, camids, pids, camids, tmp_path / f"{name}.png")
        colours[name] = _pixels(out)
    assert {CORRECT_RGB, WRONG_RGB, QUERY_RGB} <= colours["mixed"]
    assert CORRECT_RGB in colours["correct"] and WRONG_RGB not in colours["correct"]
    assert WRONG_RGB in colours["wrong"] and CORRECT_RGB not in colours["wrong"]


def test_a_narrow_picture_holds_its_whole_title(tmp_path, drawn_figures):
    """Found by a pictures review: a top-1 ranking (`--visrank-topk 1`) and one activation-map image drew the
    evaluation's title ("market1501: model.pt, euclidean, alpha query expansion ..., re-ranked (1/1)") wider than
    the figure, cut off at both ends."""
    from kdreid.viz import actmap, ranking
    from kdreid.viz.actmap import draw_activation_maps

    paths = _grey_images(tmp_path, 2)
    pids, camids = np.array([1, 1]), np.array([0, 1])
    title = "market1501: model.pt, euclidean, alpha query expansion (k 5, alpha 3), re-ranked (1/1)"
    figures = drawn_figures(ranking)
    draw_ranked_results([RankedQuery(0, [1], [0.1], [True])], paths, paths, pids, camids, pids, camids,
                        tmp_path / "r.png", title=title)
    actmap_figures = drawn_figures(actmap)
    draw_activation_maps(np.zeros((1, 128, 64, 3), np.uint8), [("model.pt", np.zeros((1, 128, 64)))],
                         tmp_path / "a.png", title=title)
    for figure, path in ((figures[0], tmp_path / "r.png"), (actmap_figures[0], tmp_path / "a.png")):
        box = figure._suptitle.get_window_extent(figure.canvas.get_renderer())
        assert 0 <= box.x0 and box.x1 <= figure.bbox.width, path.name
        assert Image.open(path).size[0] == round(figure.bbox.width)
    # widened only: as tall as with a short title
    draw_ranked_results([RankedQuery(0, [1], [0.1], [True])], paths, paths, pids, camids, pids, camids,
                        tmp_path / "short.png", title="market1501")
    assert Image.open(tmp_path / "short.png").size[1] == Image.open(tmp_path / "r.png").size[1]
    assert Image.open(tmp_path / "short.png").size[0] < Image.open(tmp_path / "r.png").size[0]


def test_pages_hold_eight_queries_each(tmp_path):
    paths = _grey_images(tmp_path, 4)
    features = torch.eye(4)
    query = Features(features[:1].repeat(9, 1), np.arange(9) % 3, np.zeros(9, int), [paths[0]] * 9)
    gallery = Features(features, np.arange(4), np.ones(4, int), paths)
    pages = visualize_ranked_results(query, gallery, tmp_path / "out", prefix="t", num_queries=9, topk=1)
    assert [p.name for p in pages] == ["t_01.png", "t_02.png"]
    heights = [Image.open(p).size[1] for p in pages]
    assert heights[0] > 6 * heights[1]  # 8 rows, then 1


def test_a_second_call_with_fewer_pages_leaves_none_of_the_first(tmp_path):
    paths = _grey_images(tmp_path, 4)
    features = torch.eye(4)
    query = Features(features[:1].repeat(9, 1), np.arange(9) % 3, np.zeros(9, int), [paths[0]] * 9)
    gallery = Features(features, np.arange(4), np.ones(4, int), paths)
    out = tmp_path / "out"
    assert len(visualize_ranked_results(query, gallery, out, prefix="t", num_queries=9, topk=1)) == 2
    other_target = visualize_ranked_results(query, gallery, out, prefix="t_x", num_queries=1, topk=1)
    unrelated = out / "t_notes.png"
    unrelated.write_bytes(b"not a page")
    pages = visualize_ranked_results(query, gallery, out, prefix="t", num_queries=2, topk=1)
    assert sorted(p.name for p in out.iterdir()) == sorted([pages[0].name, other_target[0].name, unrelated.name])
    assert [p.name for p in pages] == ["t_01.png"]


def test_query_distances_are_the_evaluation_rows(rng):
    query, gallery = torch.from_numpy(rng.random((9, 5))).float(), torch.from_numpy(rng.random((20, 5))).float()
    for metric in ("euclidean", "cosine"):
        full = compute_distance_matrix(query, gallery, metric=metric)
        assert torch.allclose(query_distances(query, gallery, [1, 4, 8], metric=metric), full[[1, 4, 8]])


def test_evaluate_visrank_draws_and_keeps_the_numbers(tiny_domain, tiny_model, tmp_path, capsys):
    common = ["evaluate", "--model", str(tiny_model), "-t", "synth_duke", "--root", str(tiny_domain),
              "--device", "cpu", "--json"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*common, "--out", str(tmp_path / "pictures"), "--visrank", "3", "--visrank-topk", "4"]) == 0
    with_pictures = json.loads(capsys.readouterr().out)
    assert with_pictures == plain  # the pictures' extraction path gives the evaluation's numbers
    page = tmp_path / "pictures" / "visrank" / "synth_duke_01.png"
    assert sorted(p.name for p in page.parent.iterdir()) == [page.name]
    assert {CORRECT_RGB, WRONG_RGB} & _pixels(page)


def test_visrank_without_out_is_one_line(tiny_model, tmp_path, capsys):
    code = main(["evaluate", "--model", str(tiny_model), "-t", "synth_duke", "--root", str(tmp_path), "--visrank"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "pass --out FOLDER" in err


def test_a_failed_evaluation_leaves_the_folder_pictures_as_they_were(tiny_domain, tiny_model, tmp_path, capsys):
    """Found by a bad-input review: a target that failed after another's pictures were drawn left those pictures
    (over an earlier evaluation's) beside the earlier metrics.json. They are drawn aside and moved in with it."""
    import shutil

    from kdreid.rundir import LOCK_FILE

    root, out = tmp_path / "data", tmp_path / "eval"
    for name in ("synth_duke", "synth_market"):
        shutil.copytree(tiny_domain / "synth_duke", root / name)
    common = ["evaluate", "--model", str(tiny_model), "--root", str(root), "--device", "cpu", "--out", str(out),
              "--verification", "--visactmap", "1"]
    assert main([*common, "-t", "synth_duke", "--visrank", "1"]) == 0
    def files() -> dict:  # but the lock file, which names the latest command that held the folder
        return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
                and p.name != LOCK_FILE}

    before = files()
    assert {str(p) for p in before} >= {"metrics.json", "visrank/synth_duke_01.png", "actmap/synth_duke_01.png",
                                        "verification/synth_duke.png"}
    broken = sorted((root / "synth_market" / "bounding_box_test").glob("*.jpg"))[-1]
    broken.write_bytes(broken.read_bytes()[:100])
    capsys.readouterr()
    assert main([*common, "-t", "synth_duke", "synth_market", "--visrank", "3", "--visrank-topk", "2"]) == 2
    assert files() == before
    # A folder the failed call would have made is not left behind, empty.
    assert main(["evaluate", "--model", str(tiny_model), "--root", str(root), "--device", "cpu", "--out",
                 str(tmp_path / "new"), "-t", "synth_duke", "synth_market", "--visrank", "1"]) == 2
    assert not (tmp_path / "new").exists()
    # A file where a picture folder goes is named before any work.
    shutil.rmtree(out / "actmap")
    (out / "actmap").write_text("not a folder")
    capsys.readouterr()
    assert main([*common, "-t", "synth_duke"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a file where kdreid keeps its actmap pictures" in err


def test_evaluating_a_target_again_without_pictures_removes_its_earlier_ones(tiny_domain, tiny_model, tmp_path,
                                                                            capsys):
    """Found by a pictures review: `--verification` pictures went when a target was evaluated again without the
    flag, but `--visrank` and `--visactmap` pages stayed, and the report showed another model's ranking beside the
    new numbers. Only that target's pages go; another target's stay with its numbers."""
    import shutil

    from kdreid.rundir import LOCK_FILE

    root, out = tmp_path / "data", tmp_path / "eval"
    for name in ("synth_duke", "synth_market"):
        shutil.copytree(tiny_domain / "synth_duke", root / name)
    common = ["evaluate", "--model", str(tiny_model), "--root", str(root), "--device", "cpu", "--out", str(out)]
    assert main([*common, "-t", "synth_duke", "synth_market", "--visrank", "1", "--visactmap", "1"]) == 0
    drawn = {f"{folder}/{target}_01.png" for folder in ("visrank", "actmap") for target in ("synth_duke",
                                                                                          "synth_market")}
    assert {p.relative_to(out).as_posix() for p in out.rglob("*.png")} == drawn
    assert main([*common, "-t", "synth_duke"]) == 0  # another evaluation of synth_duke, no picture asked for
    assert {p.relative_to(out).as_posix() for p in out.rglob("*.png")} == {"visrank/synth_market_01.png",
                                                                          "actmap/synth_market_01.png"}


def test_each_row_shows_its_own_query_and_the_labels_of_what_it_shows(tmp_path, drawn_figures):
    """Rows for queries 2 and 0 (not 0 and 1): each row's first image is that query's, and the texts under the
    images name the query's and each gallery image's identity and camera, with the distance."""
    import kdreid.viz.ranking as ranking

    (tmp_path / "q").mkdir()
    (tmp_path / "g").mkdir()
    query_paths, gallery_paths = _grey_images(tmp_path / "q", 3), _grey_images(tmp_path / "g", 4)
    query_colours = [(200, 30, 30), (30, 30, 200), (200, 200, 30)]  # never made by grey text on white
    for path, colour in zip(query_paths, query_colours):
        Image.fromarray(np.full((32, 16, 3), colour, np.uint8)).save(path)
    q_pids, q_camids = np.array([7, 8, 9]), np.array([1, 2, 3])
    g_pids, g_camids = np.array([9, 7, 5, 8]), np.array([4, 5, 6, 7])
    ranked = [RankedQuery(2, [0, 2], [0.125, 0.5], [True, False]), RankedQuery(0, [3, 1], [0.25, 0.75], [False, True])]
    figures = drawn_figures(ranking)
    out = draw_ranked_results(ranked, query_paths, gallery_paths, q_pids, q_camids, g_pids, g_camids,
                              tmp_path / "r.png")
    pixels = _pixels(out)
    assert {query_colours[2], query_colours[0]} <= pixels and query_colours[1] not in pixels  # queries 2 and 0
    texts = [text.get_text() for axes in figures[0].axes for text in axes.texts]
    assert texts == ["id 9 cam 3", "0.125\nid 9 cam 4", "0.500\nid 5 cam 6",
                     "id 7 cam 1", "0.250\nid 8 cam 7", "0.750\nid 7 cam 5"]


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_visrank_with_rerank_shows_the_re_ranked_order(rng, tmp_path, monkeypatch, metric):
    """--rerank --visrank: the pictures rank by the re-ranked distances of the evaluation (computed over every
    query, with the chosen metric), cut at topk."""
    import kdreid.viz.ranking as ranking
    from kdreid.evaluation.rerank import re_ranking_features

    centres = rng.normal(size=(6, 8))
    q_ids, g_ids = np.arange(24) % 6, np.arange(60) % 6
    scales = rng.uniform(0.3, 3.0, (84, 1))  # norms that differ: cosine and Euclidean rank differently
    features = torch.from_numpy((np.concatenate([centres[q_ids], centres[g_ids]]) + 1.2 * rng.normal(size=(84, 8)))
                                * scales).float()
    paths = _grey_images(tmp_path, 1) * 84
    query = Features(features[:24], q_ids, np.zeros(24, int), paths[:24])
    gallery = Features(features[24:], g_ids, np.ones(60, int), paths[24:])
    drawn = []
    monkeypatch.setattr(ranking, "draw_ranked_results", lambda ranked, *args, **kwargs: drawn.extend(ranked) or
                        tmp_path / "unused.png")
    visualize_ranked_results(query, gallery, tmp_path / "out", num_queries=5, topk=6, metric=metric, rerank=True)
    chosen = choose_queries(24, 5)
    full = re_ranking_features(features[:24], features[24:], metric=metric)
    expected = rank_queries(full[chosen], q_ids, g_ids, np.zeros(24, int), np.ones(60, int), chosen, topk=6)
    assert [item.gallery_indices for item in drawn] == [item.gallery_indices for item in expected]
    assert all(len(item.gallery_indices) == 6 for item in drawn)
    plain = rank_queries(compute_distance_matrix(features[chosen], features[24:], metric=metric), q_ids, g_ids,
                         np.zeros(24, int), np.ones(60, int), chosen, topk=6)
    assert [item.gallery_indices for item in plain] != [item.gallery_indices for item in expected]  # it matters
