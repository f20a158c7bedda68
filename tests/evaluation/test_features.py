"""Feature extraction: every input form gives the same embedding, flip averaging, loading, evaluate_model."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdreid.data.datasets.base import ImageRecord
from kdreid.errors import CheckpointError, EvaluationError
from kdreid.evaluation import distance, ranking
from kdreid.evaluation.features import (
    FeatureExtractor,
    Features,
    evaluate_features,
    evaluate_model,
    extract_features,
    load_model,
    model_input_size,
)
from kdreid.models import build_model, save_checkpoint

HEIGHT, WIDTH = 32, 16


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("resnet_tiny", num_classes=4).eval()


def write_images(folder, count, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays, paths = [], []
    for i in range(count):
        array = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
        path = folder / f"{i:04d}.png"  # lossless: the decoded file equals the array
        Image.fromarray(array).save(path)
        arrays.append(array)
        paths.append(str(path))
    return arrays, paths


def test_paths_arrays_and_tensors_give_the_same_features(model, tmp_path):
    arrays, paths = write_images(tmp_path, 5)
    extractor = FeatureExtractor(model, height=HEIGHT, width=WIDTH, batch_size=2, device="cpu")
    from_paths = extractor(paths)
    stacked = np.stack(arrays)
    uint8 = torch.from_numpy(stacked).permute(0, 3, 1, 2)
    with torch.no_grad():
        direct = model(uint8.float() / 255)
    assert from_paths.shape == (5, direct.shape[1]) and from_paths.dtype == torch.float32
    torch.testing.assert_close(from_paths, direct, atol=1e-5, rtol=1e-5)
    for other in (extractor(arrays), extractor(stacked), extractor(uint8), extractor(uint8.float() / 255)):
        torch.testing.assert_close(other, from_paths, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(extractor(arrays[0]), from_paths[:1], atol=1e-6, rtol=1e-6)  # one image
    torch.testing.assert_close(extractor(uint8[0]), from_paths[:1], atol=1e-6, rtol=1e-6)


def test_uint8_tensors_of_another_size_are_resized_as_files_are(model, tmp_path):
    # A tracker's crops as a decoded uint8 tensor (torchvision.io.decode_image's layout) must embed as the same
    # crops read from files (`kdreid extract`'s gallery): resized by PIL from uint8, not interpolated in float.
    rng = np.random.default_rng(3)
    arrays = [rng.integers(0, 256, (64, 40, 3), dtype=np.uint8) for _ in range(3)]
    paths = []
    for i, array in enumerate(arrays):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(array).save(paths[-1])
    extractor = FeatureExtractor(model, height=HEIGHT, width=WIDTH, device="cpu")
    from_paths = extractor(paths)
    uint8 = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    torch.testing.assert_close(extractor(uint8), from_paths, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(extractor(uint8[1]), from_paths[1:2], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(extractor(uint8.float() / 255), from_paths, atol=0.05, rtol=0.05)  # float: close


def test_float_tensors_outside_0_1_are_refused(model):
    # Models normalise inside: a float tensor is RGB in [0, 1]. torchvision's read_image(...).float() (0..255) or a
    # torchreid-style ImageNet-normalised batch would be embedded as garbage without a word.
    extractor = FeatureExtractor(model, height=HEIGHT, width=WIDTH, device="cpu")
    images = torch.rand(2, 3, HEIGHT, WIDTH)
    extractor(images)  # in range: fine
    extractor(images * 1.1 - 0.05)  # a bicubic resize's overshoot: fine too
    with pytest.raises(EvaluationError, match=r"\[0, 1\].*255"):
        extractor(images * 255)
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with pytest.raises(EvaluationError, match="normalis"):
        extractor((images - mean) / std)
    # The slack is 0.25 either side: images scaled to [-1, 1] (another toolkit's convention) or 1.5 too bright
    # are refused too, each with its hint.
    with pytest.raises(EvaluationError, match=r"-1\.\.1; pass the images before ImageNet normalisation"):
        extractor(torch.tensor([-1.0, 1.0]).repeat(2, 3, HEIGHT, WIDTH // 2))
    with pytest.raises(EvaluationError, match=r"0\.\.1\.5; divide 0\.\.255 values by 255"):
        extractor(torch.tensor([0.0, 1.5]).repeat(2, 3, HEIGHT, WIDTH // 2))


def test_an_empty_batch_of_crops_gives_no_features(model):
    # A tracker's frame without detections: an empty tensor, uint8 or float, of any size, is no features.
    extractor = FeatureExtractor(model, height=HEIGHT, width=WIDTH, device="cpu")
    for empty in (torch.zeros(0, 3, HEIGHT, WIDTH), torch.zeros(0, 3, 20, 10, dtype=torch.uint8),
                  torch.zeros(0, 3, 20, 10)):
        assert len(extractor(empty)) == 0


def test_flip_averages_the_image_and_its_mirror(model):
    images = torch.rand(3, 3, HEIGHT, WIDTH)
    flipped = FeatureExtractor(model, height=HEIGHT, width=WIDTH, flip=True, device="cpu")(images)
    with torch.no_grad():
        expected = (model(images) + model(images.flip(3))) / 2
    torch.testing.assert_close(flipped, expected, atol=1e-5, rtol=1e-5)
    plain = FeatureExtractor(model, height=HEIGHT, width=WIDTH, device="cpu")(images)
    assert not torch.allclose(plain, flipped)


def test_other_sizes_are_resized_and_normalize_gives_unit_rows(model):
    big = np.random.default_rng(1).integers(0, 256, (64, 40, 3), dtype=np.uint8)
    extractor = FeatureExtractor(model, height=HEIGHT, width=WIDTH, normalize=True, device="cpu")
    features = extractor([big, big])
    torch.testing.assert_close(features.norm(dim=1), torch.ones(2))
    with pytest.raises(EvaluationError, match="H x W x 3 uint8"):
        extractor([big.astype(np.float32)])
    with pytest.raises(EvaluationError, match=r"\(N, 3, H, W\)"):
        extractor(torch.rand(2, 1, HEIGHT, WIDTH))


def test_extract_features_keeps_order_and_labels(model, tmp_path):
    _, paths = write_images(tmp_path, 7, seed=2)
    records = [ImageRecord(p, pid=i % 3, camid=i % 2) for i, p in enumerate(paths)]
    features = extract_features(model, records, height=HEIGHT, width=WIDTH, batch_size=3, device="cpu")
    assert features.paths == paths
    np.testing.assert_array_equal(features.pids, [i % 3 for i in range(7)])
    np.testing.assert_array_equal(features.camids, [i % 2 for i in range(7)])
    expected = FeatureExtractor(model, height=HEIGHT, width=WIDTH, device="cpu")(paths)
    torch.testing.assert_close(features.features, expected, atol=1e-6, rtol=1e-6)
    # Plain paths work too (labels unknown: -1), and distances take the Features object itself.
    from_paths = extract_features(model, paths, height=HEIGHT, width=WIDTH, device="cpu")
    assert set(from_paths.pids) == {-1} and from_paths.paths == paths
    torch.testing.assert_close(distance.compute_distance_matrix(from_paths, features),
                               distance.compute_distance_matrix(expected, expected))


def test_checkpoints_and_plain_state_dicts_load(model, tmp_path):
    checkpoint = save_checkpoint(tmp_path / "model.pt", model, extra={"input_size": [48, 24]})
    loaded = load_model(checkpoint)
    assert model_input_size(loaded) == (48, 24)
    assert model_input_size(model) == (256, 128)
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    images = torch.rand(2, 3, HEIGHT, WIDTH)
    with torch.no_grad():
        expected = model(images)
        torch.testing.assert_close(load_model(tmp_path / "plain.pth", arch="resnet_tiny")(images), expected)
        torch.testing.assert_close(loaded(images), expected)
    with pytest.raises(CheckpointError, match="plain state dict .* -a ARCH"):
        load_model(tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing.pt")


class TinyDataset:
    def __init__(self, query, gallery):
        self.name, self.query, self.gallery = "tiny", query, gallery


def test_evaluate_model_equals_the_pieces(model, tmp_path):
    _, paths = write_images(tmp_path, 12, seed=3)
    query = [ImageRecord(p, pid=i % 3, camid=0) for i, p in enumerate(paths[:4])]
    gallery = [ImageRecord(p, pid=i % 3, camid=1) for i, p in enumerate(paths[4:])]
    for metric, rerank in (("euclidean", False), ("cosine", False), ("euclidean", True)):
        result = evaluate_model(model, TinyDataset(query, gallery), metric=metric, rerank=rerank, height=HEIGHT,
                                width=WIDTH, device="cpu", batch_size=5)
        extractor = FeatureExtractor(model, height=HEIGHT, width=WIDTH, device="cpu")
        qf, gf = extractor(paths[:4]), extractor(paths[4:])
        if rerank:
            from kdreid.evaluation.rerank import re_ranking

            distmat = re_ranking(*(distance.compute_distance_matrix(a, b) for a, b in ((qf, gf), (qf, qf), (gf, gf))))
        else:
            distmat = distance.compute_distance_matrix(qf, gf, metric=metric)
        expected = ranking.evaluate(distmat, [r.pid for r in query], [r.pid for r in gallery], [0] * 4, [1] * 8)
        np.testing.assert_allclose(result.cmc, expected.cmc, atol=1e-6)
        assert result.mAP == pytest.approx(expected.mAP, abs=1e-6)


def test_empty_splits_are_errors(model):
    record = ImageRecord("unused.jpg", 1, 1)
    with pytest.raises(EvaluationError, match="empty query set"):
        evaluate_model(model, TinyDataset([], [record]), device="cpu")
    query = Features(torch.zeros(1, 4), np.ones(1, int), np.ones(1, int), ["q.jpg"])
    with pytest.raises(EvaluationError, match="empty gallery"):
        evaluate_features(query, extract_features(model, [], device="cpu"))


def test_an_image_that_does_not_decode_stops_the_extraction_in_one_process(model, tmp_path):
    # One process (no torchrun): the error is raised where the image is met, not kept for the processes to share
    # (which would return the features of the images before it, one batch short of the paths).
    from kdreid.errors import DatasetError

    _, paths = write_images(tmp_path, 5)
    Path(paths[3]).write_bytes(Path(paths[3]).read_bytes()[:40])  # truncated
    with pytest.raises(DatasetError, match=f"image {re.escape(paths[3])} cannot be decoded") as error:
        extract_features(model, paths, height=HEIGHT, width=WIDTH, batch_size=2, device="cpu", workers=1)
    assert not getattr(error.value, "on_every_process", False)  # this process alone: leaving waits for no other
