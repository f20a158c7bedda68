"""`kdreid extract` / `kdreid search`: features of a folder of images (any model file), exact top-k search against a
brute-force ranking, and the bad inputs (an undecodable image, another feature dimension, a file that is not a
features file)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdreid import deploy
from kdreid.cli import main
from kdreid.deploy import FeatureIndex, load_features, search_features
from kdreid.evaluation.distance import compute_distance_matrix
from kdreid.evaluation.features import FeatureExtractor
from kdreid.evaluation.rerank import re_ranking
from kdreid.models import build_model, load_checkpoint, save_checkpoint

SIZE = (64, 32)
MARKET_NAMES = ["0001_c1s1_000151_01.jpg", "0001_c2s1_000301_00.jpg", "0002_c1s2_000021_00.jpg",
                "0002_c3s1_000111_00.jpg", "0007_c12s3_000001_00.jpg"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny checkpoint trained (as it records) at 64x32, and a folder of JPEGs: Market-style names, one plain
    name in a sub-folder, and one file that is not an image."""
    root = tmp_path_factory.mktemp("deploy")
    torch.manual_seed(0)
    model = build_model("osnet_tiny", 4)
    with torch.no_grad():  # non-trivial BN statistics, so that images give distinct features
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    save_checkpoint(root / "tiny.pt", model, extra={"input_size": list(SIZE)})
    images = root / "images"
    (images / "more").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in MARKET_NAMES:
        Image.fromarray(rng.integers(0, 256, (96, 48, 3), dtype=np.uint8)).save(images / name)
    Image.fromarray(rng.integers(0, 256, (70, 30, 3), dtype=np.uint8)).save(images / "more" / "person.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    return root


def extract(workdir, out, *extra) -> int:
    return main(["extract", "--model", str(workdir / "tiny.pt"), "--images", str(workdir / "images"),
                 "--out", str(out), "--batch-size", "4", *extra])


def test_extract_writes_features_labels_and_lists_the_skipped_image(workdir, tmp_path, capsys):
    out = tmp_path / "gallery.npz"
    assert extract(workdir, out, "--flip") == 0
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "broken.jpg" in captured.err
    assert captured.out.startswith(f"wrote {out}: 6 images x 32-d features (5 with Market-style pid/camid), 1 skipped")

    saved = load_features(out)
    names = [p.rsplit("/", 1)[-1] for p in saved.paths]
    assert names == sorted(MARKET_NAMES) + ["person.png"]
    assert saved.pids.tolist() == [1, 1, 2, 2, 7, -1]
    assert saved.camids.tolist() == [1, 2, 1, 3, 12, -1]
    assert saved.flip is True
    # The same numbers as the evaluation's extractor on the same files.
    reference = FeatureExtractor(load_checkpoint(workdir / "tiny.pt"), flip=True, device="cpu")(saved.paths)
    assert reference.std() > 1e-3
    assert np.abs(saved.features - reference.numpy()).max() <= 1e-5


def test_extract_to_a_folder_is_one_line_before_the_extraction(workdir, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "features"
    folder.mkdir()
    monkeypatch.setattr(deploy, "extract_folder", lambda *a, **k: pytest.fail("extracted before checking --out"))
    assert extract(workdir, folder) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"kdreid: error: cannot write {folder}: it is a folder, not a file; give a file path such as "
        f"{folder / 'gallery.npz'}"]
    assert list(folder.iterdir()) == []


def test_extract_fails_only_when_nothing_decodes(tmp_path, workdir, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"nope")
    (folder / "b.png").write_bytes(b"")
    out = tmp_path / "f.npz"
    assert main(["extract", "--model", str(workdir / "tiny.pt"), "--images", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("kdreid: error: no image under") and "(2 skipped)" in err[-1]
    assert not out.exists()


@pytest.mark.parametrize("flip", [[], ["--flip"]])
def test_extract_with_exported_models_matches_the_checkpoint(workdir, tmp_path, flip):
    # With --flip too (found by a review: exported models flipped the wrong axis, or doubled the features, unseen).
    pytest.importorskip("onnxruntime")
    reference = tmp_path / "ref.npz"
    assert extract(workdir, reference, *flip) == 0
    expected = load_features(reference)
    for format, suffix in (("onnx", ".onnx"), ("torchscript", ".ts")):
        exported = tmp_path / f"tiny{suffix}"
        args = ["export", "--model", str(workdir / "tiny.pt"), "--format", format, "--out", str(exported)]
        assert main(args) == 0  # static batch of 1: extract feeds it one image at a time
        out = tmp_path / f"{format}.npz"
        assert main(["extract", "--model", str(exported), "--images", str(workdir / "images"), "--out", str(out),
                     "--batch-size", "4", *flip]) == 0
        got = load_features(out)
        assert got.paths == expected.paths
        assert np.abs(got.features - expected.features).max() <= 1e-4


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_index_search_is_exact_across_chunks(metric, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    gallery, query = torch.randn(1000, 16, generator=gen), torch.randn(7, 16, generator=gen)
    monkeypatch.setattr(deploy, "_SCORES_PER_CHUNK", 7 * 64)  # 64 gallery rows per chunk: 16 chunks to merge
    distances, indices = FeatureIndex(gallery, metric, use_faiss=False).search(query, k=25)
    full = compute_distance_matrix(query, gallery, metric=metric)  # (7, 1000) brute force
    want_distances, want_indices = full.sort(dim=1)
    assert torch.equal(indices, want_indices[:, :25])
    assert torch.allclose(distances, want_distances[:, :25], atol=1e-4)
    # A last chunk shorter than k (970 rows = 15 x 64 + 10), and a chunk budget under k rows (chunks of k then).
    for size, rows in ((970, 64), (1000, 8)):
        monkeypatch.setattr(deploy, "_SCORES_PER_CHUNK", 7 * rows)
        distances, indices = FeatureIndex(gallery[:size], metric).search(query, k=25)
        want_distances, want_indices = full[:, :size].sort(dim=1)
        assert torch.equal(indices, want_indices[:, :25])
        assert torch.allclose(distances, want_distances[:, :25], atol=1e-4)
    # k larger than the gallery gives the whole gallery
    assert FeatureIndex(gallery[:5], metric).search(query, k=10)[1].shape == (7, 5)


def test_index_search_holds_two_chunks_of_candidates_at_most(monkeypatch):
    """The chunks' top-k are merged as they come: a query file as large as the gallery (Q x k x G / chunk
    candidates, growing with Q^2, were all held for one final merge: tens of GB at 200k x 200k) stays (Q, 2k)."""
    gen = torch.Generator().manual_seed(3)
    gallery, query = torch.randn(1000, 16, generator=gen), torch.randn(7, 16, generator=gen)
    monkeypatch.setattr(deploy, "_SCORES_PER_CHUNK", 7 * 30)  # 30 gallery rows per chunk: 34 chunks
    widest, cat = [0], torch.cat

    def spy(tensors, *args, **kwargs):
        out = cat(tensors, *args, **kwargs)
        widest[0] = max(widest[0], out.shape[-1])
        return out

    monkeypatch.setattr(torch, "cat", spy)
    distances, indices = FeatureIndex(gallery, "euclidean").search(query, k=10)
    monkeypatch.undo()
    assert widest[0] <= 20
    want = compute_distance_matrix(query, gallery).sort(dim=1)
    assert torch.equal(indices, want.indices[:, :10])
    assert torch.allclose(distances, want.values[:, :10], atol=1e-4)


def test_faiss_index_agrees_with_torch():
    pytest.importorskip("faiss", reason="faiss is optional; without it search uses the exact torch path")
    gen = torch.Generator().manual_seed(1)
    gallery, query = torch.randn(500, 8, generator=gen), torch.randn(3, 8, generator=gen)
    for metric in ("euclidean", "cosine"):
        plain = FeatureIndex(gallery, metric, use_faiss=False).search(query, 10)
        fast = FeatureIndex(gallery, metric, use_faiss=True).search(query, 10)
        assert torch.equal(plain[1], fast[1]) and torch.allclose(plain[0], fast[0], atol=1e-4)


def test_rerank_search_ranks_by_the_reranked_distances():
    gen = torch.Generator().manual_seed(2)
    centres = torch.randn(6, 8, generator=gen)
    gallery = centres.repeat_interleave(5, 0) + 0.3 * torch.randn(30, 8, generator=gen)
    query = centres[:3] + 0.3 * torch.randn(3, 8, generator=gen)
    distances, indices = search_features(query.numpy(), gallery.numpy(), k=5, rerank=True)
    q_g, q_q, g_g = (compute_distance_matrix(a, b) for a, b in ((query, gallery), (query, query), (gallery, gallery)))
    reranked = torch.as_tensor(re_ranking(q_g, q_q, g_g))
    want = reranked.sort(dim=1)
    assert torch.equal(indices, want.indices[:, :5])
    assert torch.allclose(distances, want.values[:, :5], atol=1e-4)


def test_rerank_refuses_a_gallery_over_its_bound(monkeypatch):
    monkeypatch.setattr(deploy, "RERANK_MAX_GALLERY", 4)  # O(G^2) gallery-gallery neighbours: bounded
    gallery, query = np.zeros((5, 3), np.float32), np.zeros((1, 3), np.float32)
    with pytest.raises(deploy.EvaluationError, match="5 gallery images is over 4: search without --rerank"):
        search_features(query, gallery, rerank=True)
    assert search_features(query, gallery[:4], k=2, rerank=True)[1].shape == (1, 2)


def test_rerank_refuses_a_search_without_the_memory_it_needs(monkeypatch):
    # Every query's distances to the whole gallery at once, before the top-k: one line before any work, naming both
    # sizes (it had no check: a large query file met the allocator or the OOM killer).
    import kdreid.evaluation.features as features

    monkeypatch.setattr(features, "free_memory", lambda device: 10**9)
    gallery, query = np.zeros((20, 3), np.float32), np.zeros((2, 3), np.float32)
    assert search_features(query, gallery, k=2, rerank=True)[1].shape == (2, 2)  # a few hundred MB at most
    monkeypatch.setattr(features, "free_memory", lambda device: 10**7)
    with pytest.raises(deploy.EvaluationError, match=r"^2 queries x 20 gallery images: search --rerank needs 0\.1 GB "
                                                     r"\(the query-gallery distance matrix alone 0\.0 GB\), but cpu "
                                                     r"has 0\.0 GB free; search without --rerank, or on a machine "
                                                     r"with more memory$"):
        search_features(query, gallery, k=2, rerank=True)


def test_search_command_ranks_query_images(workdir, tmp_path, capsys):
    gallery = tmp_path / "g.npz"
    assert extract(workdir, gallery) == 0
    capsys.readouterr()
    query = workdir / "images" / MARKET_NAMES[2]
    # No --model: the gallery file records which model made it.
    assert main(["search", "--gallery", str(gallery), "--query", str(query), "--topk", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"query {query}"
    rank, distance, path = lines[1].split()
    assert rank == "1" and float(distance) < 1e-3 and path.endswith(MARKET_NAMES[2])  # itself, first
    assert len(lines) == 4
    distances = [float(line.split()[1]) for line in lines[1:]]
    assert distances == sorted(distances)

    assert main(["search", "--gallery", str(gallery), "--query", str(gallery), "--topk", "2", "--json",
                 "--metric", "cosine"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 6 and all(row["results"][0]["path"] == row["query"] for row in rows)

    # --max-distance keeps the results closer than the cut-off: the image itself and what lies below the third
    cut = (distances[1] + distances[2]) / 2
    assert main(["search", "--gallery", str(gallery), "--query", str(query), "--topk", "3",
                 "--max-distance", str(cut)]) == 0
    assert capsys.readouterr().out.strip().splitlines() == lines[:3]
    assert main(["search", "--gallery", str(gallery), "--query", str(gallery), "--max-distance", "1e-9",
                 "--json"]) == 0
    assert all(result["distance"] < 1e-9 for row in json.loads(capsys.readouterr().out) for result in row["results"])
    assert main(["search", "--gallery", str(gallery), "--query", str(query), "--max-distance", "-1"]) == 2
    assert "--max-distance must be a positive distance" in capsys.readouterr().err


def test_search_command_ranks_by_the_metric_and_re_ranking_it_is_given(workdir, tmp_path, capsys):
    # --metric and --rerank must reach the ranking: against distances computed here from the features file.
    gallery = tmp_path / "g.npz"
    assert extract(workdir, gallery) == 0
    features = torch.from_numpy(load_features(gallery).features)
    paths = load_features(gallery).paths
    normed = torch.nn.functional.normalize(features, dim=1)
    euclidean = compute_distance_matrix(features, features)
    expected = {
        ("--metric", "cosine"): 1 - normed @ normed.T,
        ("--rerank",): torch.as_tensor(re_ranking(euclidean, euclidean, euclidean)).float(),
    }
    # Neither is a re-ordering of the euclidean ranking: the checks below can fail.
    for want in expected.values():
        assert not torch.equal(want.sort(dim=1).indices[:, 1:], euclidean.sort(dim=1).indices[:, 1:])
    capsys.readouterr()
    for flags, want in expected.items():
        assert main(["search", "--gallery", str(gallery), "--query", str(gallery), "--topk", "6", "--json",
                     *flags]) == 0
        rows = json.loads(capsys.readouterr().out)
        for row, distances in zip(rows, want, strict=True):  # each result at its distance, the nearest first
            # (re-ranking recomputes the distances in float32: ~1e-4 of rounding on these close features)
            got = [r["distance"] for r in row["results"]]
            assert got == pytest.approx(distances.sort().values.tolist(), abs=1e-3), flags
            assert got == pytest.approx([float(distances[paths.index(r["path"])]) for r in row["results"]], abs=1e-3)


def test_search_refuses_other_dimensions_and_other_files(workdir, tmp_path, capsys):
    gallery = tmp_path / "g.npz"
    assert extract(workdir, gallery) == 0
    other = tmp_path / "other.npz"
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "wide.pt", build_model("resnet_tiny", 3), extra={"input_size": list(SIZE)})
    assert main(["extract", "--model", str(tmp_path / "wide.pt"), "--images", str(workdir / "images"),
                 "--out", str(other)]) == 0
    capsys.readouterr()
    assert main(["search", "--gallery", str(gallery), "--query", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds 32-d features but the query's are" in err[0] and "same model" in err[0]

    # query images embedded by a model of another dimension
    assert main(["search", "--gallery", str(gallery), "--query", str(workdir / "images" / MARKET_NAMES[0]),
                 "--model", str(tmp_path / "wide.pt")]) == 2
    assert "same model" in capsys.readouterr().err

    not_features = tmp_path / "x.npz"
    np.savez(not_features, a=np.zeros(3))
    assert main(["search", "--gallery", str(not_features), "--query", str(gallery)]) == 2
    assert "not a kdreid features file" in capsys.readouterr().err
    garbage = tmp_path / "y.npz"
    garbage.write_bytes(b"garbage")
    assert main(["search", "--gallery", str(garbage), "--query", str(gallery)]) == 2
    assert "cannot be read as a features file (not an .npz archive)" in capsys.readouterr().err  # no pickle advice
    (tmp_path / "no_images").mkdir()
    assert main(["search", "--gallery", str(gallery), "--query", str(tmp_path / "no_images")]) == 2
    assert f"{tmp_path / 'no_images'} holds no image (.jpg" in capsys.readouterr().err


def test_faiss_flag_without_faiss_is_one_line(workdir, tmp_path, capsys, monkeypatch):
    gallery = tmp_path / "g.npz"
    assert extract(workdir, gallery) == 0
    capsys.readouterr()
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)  # `import faiss` now raises ImportError
    assert main(["search", "--gallery", str(gallery), "--query", str(gallery), "--faiss"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install faiss-cpu" in err[0]


def test_extract_and_search_take_the_input_size(workdir, tmp_path, capsys):
    """--height/--width embed at that size (a plain state dict has no recorded one); search embeds its query
    images at the size the gallery was extracted at, so an image finds itself at distance 0."""
    plain = tmp_path / "plain.pth"
    torch.save(load_checkpoint(workdir / "tiny.pt").state_dict(), plain)
    gallery = tmp_path / "g.npz"
    assert main(["extract", "--model", str(plain), "-a", "osnet_tiny", "--images", str(workdir / "images"),
                 "--out", str(gallery), "--height", "48", "--width", "24"]) == 0
    written = load_features(gallery)
    assert (written.height, written.width) == (48, 24)
    expected = FeatureExtractor(load_checkpoint(workdir / "tiny.pt"), height=48, width=24, device="cpu")(
        written.paths)
    assert np.abs(written.features - expected.numpy()).max() <= 1e-4

    capsys.readouterr()
    query = workdir / "images" / MARKET_NAMES[2]
    assert main(["search", "--gallery", str(gallery), "--query", str(query), "--topk", "1", "-a", "osnet_tiny"]) == 0
    _, distance, path = capsys.readouterr().out.strip().splitlines()[1].split()
    assert path.endswith(MARKET_NAMES[2]) and float(distance) < 1e-3
    assert main(["search", "--gallery", str(gallery), "--query", str(query), "--topk", "1", "-a", "osnet_tiny",
                 "--height", "64", "--width", "32"]) == 0
    _, distance, _ = capsys.readouterr().out.strip().splitlines()[1].split()
    assert float(distance) > 1e-3  # embedded at another size than the gallery: it no longer matches itself


def test_an_exported_file_takes_only_its_own_size(workdir, tmp_path, capsys):
    exported = tmp_path / "tiny.ts"
    assert main(["export", "--model", str(workdir / "tiny.pt"), "--format", "torchscript", "--out",
                 str(exported), "--height", "48", "--width", "24"]) == 0
    out = tmp_path / "ts.npz"
    assert main(["extract", "--model", str(exported), "--images", str(workdir / "images"), "--out", str(out)]) == 0
    assert (load_features(out).height, load_features(out).width) == (48, 24)
    capsys.readouterr()
    assert main(["extract", "--model", str(exported), "--images", str(workdir / "images"), "--out", str(out),
                 "--height", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "takes 48x24 images (its export size), not 64x24" in err[0]


def test_search_warns_when_query_and_gallery_are_embedded_otherwise(workdir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(workdir)  # relative --images: the file still records paths that open from anywhere
    gallery = tmp_path / "g.npz"
    assert main(["extract", "--model", "tiny.pt", "--images", "images", "--out", str(gallery),
                 "--batch-size", "4"]) == 0
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in load_features(gallery).paths)
    capsys.readouterr()
    query = workdir / "images" / MARKET_NAMES[2]
    assert main(["search", "--gallery", str(gallery), "--query", str(query), "--topk", "1"]) == 0
    assert "warning" not in capsys.readouterr().err  # embedded as the gallery was
    assert main(["search", "--gallery", str(gallery), "--query", str(query), "--topk", "1", "--flip",
                 "--height", "32", "--width", "16"]) == 0
    assert capsys.readouterr().err.strip().splitlines() == [
        "kdreid: warning: the query images are embedded with flip-averaging, the gallery without; at 32x16, the "
        "gallery at 64x32: distances mix two embeddings; embed both the same way (--model, --flip, "
        "--height/--width)"]
    other = tmp_path / "other.pt"  # another model of the same width: ranks, but the distances mean nothing
    torch.manual_seed(1)
    save_checkpoint(other, build_model("osnet_tiny", 0), extra={"input_size": list(SIZE)})
    assert main(["search", "--gallery", str(gallery), "--query", str(query), "--topk", "1", "--model",
                 str(other)]) == 0
    assert capsys.readouterr().err.strip().splitlines() == [
        f"kdreid: warning: the query images are embedded by {other}, the gallery by {workdir / 'tiny.pt'}: "
        "distances mix two embeddings (unless both files hold one model, e.g. a checkpoint and its export); embed "
        "both the same way (--model, --flip, --height/--width)"]
    # A flip-averaged gallery embeds its query images flip-averaged too, unasked (found by a review: embedding
    # them without flip passed; the warning above was the only sign): an image of the gallery finds itself.
    flipped = tmp_path / "flipped.npz"
    assert main(["extract", "--model", "tiny.pt", "--images", "images", "--out", str(flipped), "--batch-size", "4",
                 "--flip"]) == 0
    capsys.readouterr()
    distances = {}
    for flag in ([], ["--no-flip"]):
        assert main(["search", "--gallery", str(flipped), "--query", str(query), "--topk", "1", "--json",
                     *flag]) == 0
        captured = capsys.readouterr()
        assert ("warning" in captured.err) == bool(flag)
        distances[bool(flag)] = json.loads(captured.out)[0]["results"][0]["distance"]
    assert distances[False] < 1e-3 < distances[True]
    copy = tmp_path / "copy.pt"  # the same weights elsewhere: the same model, no warning
    copy.write_bytes((workdir / "tiny.pt").read_bytes())
    assert main(["search", "--gallery", str(gallery), "--query", str(query), "--topk", "1", "--model",
                 str(copy)]) == 0
    assert "warning" not in capsys.readouterr().err


def test_list_images_follows_linked_folders_and_skips_debris(tmp_path):
    from kdreid.deploy import list_images

    for folder in (tmp_path / "gallery" / "day1", tmp_path / "elsewhere"):
        folder.mkdir(parents=True)
    for path in (tmp_path / "gallery" / "day1" / "a.jpg", tmp_path / "elsewhere" / "b.PNG"):
        path.write_bytes(b"image")
    (tmp_path / "gallery" / "day2").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "gallery" / "._a.jpg").write_bytes(b"\x00")  # macOS twin
    (tmp_path / "gallery" / "__MACOSX").mkdir()
    (tmp_path / "gallery" / "__MACOSX" / "c.jpg").write_bytes(b"\x00")
    (tmp_path / "gallery" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")  # kept: reported as skipped
    assert [p.relative_to(tmp_path / "gallery").as_posix() for p in list_images(tmp_path / "gallery")] == [
        "day1/a.jpg", "day2/b.PNG", "gone.jpg"]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_out_naming_the_model_or_a_folder_is_refused_before_any_work(workdir, tmp_path, capsys):
    """Found by a bad-input review: `--out` equal to `--model` replaced the checkpoint with its own features
    (extract) or with a plain state dict (export); `--out DIR/` wrote a file named DIR."""
    model = tmp_path / "copy.pt"
    model.write_bytes((workdir / "tiny.pt").read_bytes())
    before = model.read_bytes()
    assert main(["extract", "--model", str(model), "--images", str(workdir / "images"), "--out", str(model)]) == 2
    assert "is the --model file" in _one_line(capsys)
    assert main(["export", "--model", str(model), "--format", "torchreid", "--out", str(model)]) == 2
    assert "is the --model file" in _one_line(capsys)
    assert model.read_bytes() == before
    for command in (["extract", "--model", str(model), "--images", str(workdir / "images")],
                    ["export", "--model", str(model), "--format", "torchscript"]):
        assert main([*command, "--out", f"{tmp_path / 'newdir'}/"]) == 2
        assert "the trailing / names a folder" in _one_line(capsys)
        assert not (tmp_path / "newdir").exists()


def test_input_sizes_a_model_cannot_take_are_one_line(workdir, tmp_path, capsys):
    model = str(workdir / "tiny.pt")
    for command in (["extract", "--model", model, "--images", str(workdir / "images"), "--out",
                     str(tmp_path / "f.npz")],
                    ["export", "--model", model, "--format", "onnx", "--out", str(tmp_path / "m.onnx")]):
        assert main([*command, "--height", "8", "--width", "4"]) == 2
        assert "cannot take 8x4 images" in _one_line(capsys)
        assert main([*command, "--height", "100000", "--width", "100000"]) == 2
        assert "--height 100000 is far above any re-ID input size" in _one_line(capsys)
    assert not any(tmp_path.iterdir())


def _onnx_of(module: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Another program's ONNX model, of another input/output contract than kdreid's."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
        torch.onnx.export(module.eval(), (example,), str(path), dynamo=False, input_names=["x"], output_names=["y"])
    return path


def test_a_model_of_another_contract_is_named_not_run_into_a_traceback(workdir, tmp_path, capsys):
    images = ["extract", "--images", str(workdir / "images"), "--out", str(tmp_path / "f.npz"), "--height", "64",
              "--width", "32"]
    grey = _onnx_of(torch.nn.Conv2d(1, 4, 3), torch.rand(1, 1, 64, 32), tmp_path / "grey.onnx")
    assert main([*images[:1], "--model", str(grey), *images[1:]]) == 2
    assert "kdreid feeds one float32 input of RGB images N x 3 x H x W" in _one_line(capsys)
    identity = _onnx_of(torch.nn.Identity(), torch.rand(1, 3, 64, 32), tmp_path / "identity.onnx")
    assert main([*images[:1], "--model", str(identity), *images[1:]]) == 2
    assert "returned an output of shape (6, 3, 64, 32) for 6 images, not features (N, D)" in _one_line(capsys)
    assert not (tmp_path / "f.npz").exists()


def test_a_model_that_gives_another_number_of_rows_than_images_is_refused():
    # One row for three images (a model that pools over the batch) would shift every later path's features.
    embedder = deploy.Embedder(lambda images: np.zeros((1, 4), np.float32), 8, 4, "pooled.onnx", "onnx")
    with pytest.raises(deploy.KdreidError, match=r"pooled.onnx returned an output of shape \(1, 4\) for 3 images"):
        embedder(np.zeros((3, 8, 4, 3), np.uint8))


def test_nan_features_are_refused_where_they_would_be_written_or_ranked(workdir, tmp_path, capsys):
    checkpoint = torch.load(workdir / "tiny.pt", weights_only=True)
    checkpoint["state_dict"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                                for k, v in checkpoint["state_dict"].items()}
    diverged = tmp_path / "nan.pt"
    torch.save(checkpoint, diverged)
    assert main(["extract", "--model", str(diverged), "--images", str(workdir / "images"), "--out",
                 str(tmp_path / "f.npz")]) == 2
    assert "gives NaN/inf features" in _one_line(capsys) and not (tmp_path / "f.npz").exists()
    assert main(["export", "--model", str(diverged), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "the model gives NaN/inf features on the check images" in _one_line(capsys)
    assert extract(workdir, tmp_path / "gallery.npz") == 0
    capsys.readouterr()
    with np.load(tmp_path / "gallery.npz") as data:
        arrays = dict(data)
    arrays["features"][0, 0] = np.inf
    np.savez(tmp_path / "inf.npz", **arrays)
    assert main(["search", "--gallery", str(tmp_path / "inf.npz"), "--query", str(tmp_path / "gallery.npz")]) == 2
    assert "holds NaN/inf features; extract it again" in _one_line(capsys)


def plain_resnet(path, **kwargs) -> torch.nn.Module:
    """A plain state dict (another toolkit's file: no kdreid metadata) of a resnet_tiny built with `kwargs`, saved
    at `path`; returns the model in eval mode."""
    torch.manual_seed(0)
    model = build_model("resnet_tiny", 0, **kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    torch.save({"state_dict": model.state_dict()}, path)
    return model.eval()


def test_a_plain_state_dict_is_embedded_with_its_last_stride_and_embedding_layer(workdir, tmp_path, capsys):
    # Found by a review: `-a ARCH` always rebuilt last stride 1, so a torchreid ResNet (last stride 2) gave other
    # features than torchreid's, silently; and a file with an embedding layer (SpCL's `feat`) was refused with a
    # fix ("build it with embedding_dim=D") that no flag could apply. Nor did extract say what the file loaded.
    model = plain_resnet(tmp_path / "stride2.pth", last_stride=2, embedding_dim=8)
    out = tmp_path / "plain.npz"
    args = ["extract", "--model", str(tmp_path / "stride2.pth"), "-a", "resnet_tiny", "--images",
            str(workdir / "images"), "--out", str(out), "--height", str(SIZE[0]), "--width", str(SIZE[1])]
    assert main([*args, "--last-stride", "2"]) == 0
    err = capsys.readouterr().err
    assert "kdreid: loaded " in err and f"from {tmp_path / 'stride2.pth'}" in err
    saved = load_features(out)
    reference = FeatureExtractor(model, height=SIZE[0], width=SIZE[1], device="cpu")(saved.paths).numpy()
    assert saved.features.shape[1] == 8 and np.abs(saved.features - reference).max() <= 1e-5
    assert (saved.arch, saved.last_stride) == ("resnet_tiny", 2)

    # The gallery's own state dict embeds the queries as it embedded the gallery: -a and --last-stride included.
    query = saved.paths[2]
    assert main(["search", "--gallery", str(out), "--query", query, "--topk", "1"]) == 0
    rank, distance, path = capsys.readouterr().out.strip().splitlines()[1].split()
    assert path == query and float(distance) < 1e-3 * np.linalg.norm(saved.features[2])  # itself, to fp32 rounding

    # Without --last-stride the default (1) is another model: other features.
    assert main([*args[:-4], "--height", str(SIZE[0]), "--width", str(SIZE[1])]) == 0
    assert np.abs(load_features(out).features - reference).max() > 1e-3

    # A kdreid checkpoint records its stride: another one is refused in one line.
    capsys.readouterr()
    assert main(["extract", "--model", str(workdir / "tiny.pt"), "--last-stride", "2", "--images",
                 str(workdir / "images"), "--out", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "last stride 1, not 2" in err[0] and not (tmp_path / "x.npz").exists()
