"""CUHK03: the new 767/700 protocol from its split .mat, and the classic 20-split protocol from the raw
MATLAB v7.3 `cuhk-03.mat` (images extracted once and cached), checked exactly and against torchreid."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdreid.data.datasets import ImageRecord, build_dataset
from kdreid.data.datasets.cuhk03 import CLASSIC_SPLITS, EXTRACTED_MARKER
from kdreid.errors import DatasetError
from tests.data.layouts import (
    cuhk03_people,
    torchreid_reader,
    write_cuhk03_new_protocol_mat,
    write_cuhk03_raw_mat,
    write_images,
)

# Reading (and, in the tests, writing) the raw MATLAB v7.3 file needs h5py; the new protocol does not.
needs_h5py = pytest.mark.skipif(importlib.util.find_spec("h5py") is None, reason="h5py is not installed")

NEW_FILES = ["1_001_1_01.png", "1_001_2_06.png", "1_002_1_01.png", "1_002_2_07.png",
             "2_001_1_02.png", "2_001_2_06.png", "2_001_2_07.png"]
NEW_LABELS = [1, 1, 2, 2, 844, 844, 844]
TESTSETS = [[(1, 2), (2, 1)], [(1, 1), (2, 2)]]


def new_protocol_tree(root: Path, kind: str = "detected") -> Path:
    data_dir = root / "cuhk03"
    write_images(data_dir / f"images_{kind}", NEW_FILES, fmt="PNG")
    write_cuhk03_new_protocol_mat(data_dir / f"cuhk03_new_protocol_config_{kind}.mat", NEW_FILES, NEW_LABELS,
                                  train=[1, 2, 3, 4], query=[5], gallery=[6, 7])
    return data_dir


@pytest.mark.parametrize("kind", ["detected", "labeled"])
def test_new_protocol_records_from_the_split_mat(tmp_path, kind):
    data_dir = new_protocol_tree(tmp_path, kind)
    dataset = build_dataset("cuhk03", tmp_path, labeled=kind == "labeled")
    images = data_dir / f"images_{kind}"
    # labels 1, 2 -> 0, 1; camid = the view (third field); tracklets = (label, view)
    assert dataset.train == [ImageRecord(str(images / name), *values) for name, *values in [
        ("1_001_1_01.png", 0, 1, 0), ("1_001_2_06.png", 0, 2, 1), ("1_002_1_01.png", 1, 1, 2),
        ("1_002_2_07.png", 1, 2, 3)]]
    assert dataset.query == [ImageRecord(str(images / "2_001_1_02.png"), 844, 1)]
    assert dataset.gallery == [ImageRecord(str(images / "2_001_2_06.png"), 844, 2),
                               ImageRecord(str(images / "2_001_2_07.png"), 844, 2)]


def test_new_protocol_missing_pieces_are_one_line_errors(tmp_path):
    data_dir = tmp_path / "cuhk03"
    data_dir.mkdir()
    with pytest.raises(DatasetError, match=r"cuhk03_new_protocol_config_detected.mat is missing; put the CUHK03-NP"):
        build_dataset("cuhk03", tmp_path)
    write_cuhk03_new_protocol_mat(data_dir / "cuhk03_new_protocol_config_detected.mat", NEW_FILES, NEW_LABELS,
                                  train=[1, 2, 3, 4], query=[5], gallery=[6, 7])
    with pytest.raises(DatasetError, match=r"CUHK03 detected images not found: expected .*images_detected/ or the raw"):
        build_dataset("cuhk03", tmp_path)
    with pytest.raises(DatasetError, match=r"--split-id 3: the new protocol has one split"):
        build_dataset("cuhk03", tmp_path, split_id=3)
    write_images(data_dir / "images_detected", NEW_FILES, fmt="PNG")
    write_cuhk03_new_protocol_mat(data_dir / "cuhk03_new_protocol_config_detected.mat", NEW_FILES, NEW_LABELS,
                                  train=[1, 2, 3, 4], query=[5], gallery=[6, 99])  # an index past the file list
    with pytest.raises(DatasetError, match=r"is not a CUHK03 new-protocol split file .*download it again"):
        build_dataset("cuhk03", tmp_path)


def raw_tree(root: Path) -> tuple[Path, dict]:
    people = cuhk03_people()
    data_dir = root / "cuhk03"
    write_cuhk03_raw_mat(data_dir / "cuhk03_release" / "cuhk-03.mat", people, TESTSETS)
    return data_dir, people


def expected_image_names(people: dict) -> list[str]:
    return sorted(f"{pair}_{pid:03d}_{1 if index < 5 else 2}_{index + 1:02d}.png"
                  for (pair, pid), cells in people.items() for index, pixels in enumerate(cells) if pixels is not None)


@needs_h5py
@pytest.mark.parametrize("kind, offset", [("detected", 0), ("labeled", 100)])
def test_raw_mat_images_are_extracted_once_with_their_pixels(tmp_path, kind, offset):
    data_dir, people = raw_tree(tmp_path)
    build_dataset("cuhk03", tmp_path, labeled=kind == "labeled", classic_split=True)
    image_dir = data_dir / f"images_{kind}"
    assert sorted(p.name for p in image_dir.glob("*.png")) == expected_image_names(people)
    assert (image_dir / EXTRACTED_MARKER).is_file()
    pixels = np.asarray(Image.open(image_dir / "2_001_2_06.png"))
    assert np.array_equal(pixels, (people[(2, 1)][5].astype(int) + offset) % 256)  # (H, W, 3) as MATLAB holds it
    assert not (data_dir / f"images_{'labeled' if kind == 'detected' else 'detected'}").exists()


@needs_h5py
def test_classic_splits_records_and_cache(tmp_path):
    data_dir, _ = raw_tree(tmp_path)
    images = data_dir / "images_detected"
    dataset = build_dataset("cuhk03", tmp_path, classic_split=True)
    # test persons (1, 2) and (2, 1) -> raw ids 1002, 2001; train 1001, 1003, 2002 -> 0, 1, 2
    test = [ImageRecord(str(images / name), pid, view) for name, pid, view in [
        ("1_002_1_01.png", 1002, 1), ("1_002_1_02.png", 1002, 1), ("1_002_2_06.png", 1002, 2),
        ("2_001_1_01.png", 2001, 1), ("2_001_1_02.png", 2001, 1), ("2_001_2_06.png", 2001, 2)]]
    assert dataset.query == test and dataset.gallery == test
    assert dataset.train == [ImageRecord(str(images / name), *values) for name, *values in [
        ("1_001_1_01.png", 0, 1, 0), ("1_001_1_02.png", 0, 1, 0), ("1_001_2_06.png", 0, 2, 1),
        ("1_003_1_01.png", 1, 1, 2), ("1_003_1_02.png", 1, 1, 2), ("1_003_2_06.png", 1, 2, 3),
        ("2_002_1_01.png", 2, 1, 4), ("2_002_1_02.png", 2, 1, 4)]]
    assert json.loads((data_dir / CLASSIC_SPLITS).read_text()) == [[list(p) for p in t] for t in TESTSETS]
    second = build_dataset("cuhk03", tmp_path, classic_split=True, split_id=1)
    assert sorted({r.pid for r in second.query}) == [1001, 2002]
    with pytest.raises(DatasetError, match=r"--split-id 2 is out of range: the classic protocol has splits 0..1"):
        build_dataset("cuhk03", tmp_path, classic_split=True, split_id=2)
    # once extracted and cached, the raw file is no longer needed
    (data_dir / "cuhk03_release" / "cuhk-03.mat").unlink()
    assert build_dataset("cuhk03", tmp_path, classic_split=True).train == dataset.train


@needs_h5py
def test_not_a_v73_mat_file_is_a_clear_error(tmp_path):
    raw = tmp_path / "cuhk03" / "cuhk03_release" / "cuhk-03.mat"
    raw.parent.mkdir(parents=True)
    raw.write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    with pytest.raises(DatasetError, match=r"cuhk-03.mat cannot be read as MATLAB v7.3/HDF5 .*download the CUHK03"):
        build_dataset("cuhk03", tmp_path, classic_split=True)


@needs_h5py
def test_extraction_and_both_protocols_match_torchreid(tmp_path, monkeypatch):
    """torchreid's own preprocessing on the same raw and split files: same image names and pixels, and the
    same splits (up to its 0-based camids and its pid numbering)."""
    data_dir, _ = raw_tree(tmp_path)
    # the new-protocol split files name images that the raw file holds
    names = expected_image_names(cuhk03_people())
    labels = [int(n[0]) * 1000 + int(n[2:5]) for n in names]
    for kind in ("detected", "labeled"):
        write_cuhk03_new_protocol_mat(data_dir / f"cuhk03_new_protocol_config_{kind}.mat", names, labels,
                                      train=list(range(1, 10)), query=[10, 12], gallery=[11, 13, 14])
    reference_dir = tmp_path / "torchreid"
    reference = torchreid_reader(monkeypatch, "cuhk03.py").CUHK03.__new__(
        torchreid_reader(monkeypatch, "cuhk03.py").CUHK03)
    reference.raw_mat_path = str(data_dir / "cuhk03_release" / "cuhk-03.mat")
    for kind in ("detected", "labeled"):
        setattr(reference, f"imgs_{kind}_dir", str(reference_dir / f"images_{kind}"))
        setattr(reference, f"split_new_{kind[:3]}_mat_path", str(data_dir / f"cuhk03_new_protocol_config_{kind}.mat"))
        for protocol in ("classic", "new"):
            setattr(reference, f"split_{protocol}_{kind[:3]}_json_path", str(reference_dir / f"{protocol}_{kind}.json"))
    reference.preprocess_split()

    for kind in ("detected", "labeled"):
        ours_dir, theirs_dir = data_dir / f"images_{kind}", reference_dir / f"images_{kind}"
        for protocol, options in (("classic", {"classic_split": True}), ("new", {})):
            their_splits = json.loads((reference_dir / f"{protocol}_{kind}.json").read_text())
            for split_id, their_split in enumerate(their_splits):
                ours = build_dataset("cuhk03", tmp_path, labeled=kind == "labeled", split_id=split_id, **options)
                for split in ("train", "query", "gallery"):
                    theirs = [(Path(p).name, pid, camid + 1) for p, pid, camid in their_split[split]]
                    mine = [(Path(r.path).name, r.pid, r.camid) for r in ours.split(split)]
                    assert sorted((n, c) for n, _, c in theirs) == sorted((n, c) for n, _, c in mine)
                    pairs = {(t[1], m[1]) for t, m in zip(sorted(theirs), sorted(mine))}
                    assert len(pairs) == len({p for p, _ in pairs}) == len({q for _, q in pairs})  # same partition
        for path in sorted(ours_dir.glob("*.png")):
            assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(theirs_dir / path.name)))


@pytest.mark.parametrize("folder", ["cuhk03/cuhk03-np", "cuhk03-np"])
def test_cuhk03_np_release_in_market_layout(tmp_path, folder):
    np_dir = tmp_path / folder / "labeled"
    write_images(np_dir / "bounding_box_train", ["0001_c1_1.png", "0001_c2_2.png", "0005_c1_1.png"], fmt="PNG")
    write_images(np_dir / "query", ["0020_c1_1.png"], fmt="PNG")
    write_images(np_dir / "bounding_box_test", ["0020_c2_3.png", "0021_c2_1.png"], fmt="PNG")
    # detected is not there: said, also when the release lies under ROOT/cuhk03/ (which once asked for the
    # new-protocol .mat files instead)
    with pytest.raises(DatasetError, match=r"cuhk03-np: this CUHK03-NP release has labeled boxes, not detected; "
                                           r"add --cuhk03-labeled$"):
        build_dataset("cuhk03", tmp_path)
    dataset = build_dataset("cuhk03", tmp_path, labeled=True)
    assert dataset.root == str(np_dir)
    assert dataset.train == [ImageRecord(str(np_dir / "bounding_box_train" / name), *values) for name, *values in [
        ("0001_c1_1.png", 0, 1, 0), ("0001_c2_2.png", 0, 2, 1), ("0005_c1_1.png", 1, 1, 2)]]
    assert dataset.query == [ImageRecord(str(np_dir / "query" / "0020_c1_1.png"), 20, 1)]
    assert [(r.pid, r.camid) for r in dataset.gallery] == [(20, 2), (21, 2)]


def test_raw_mat_without_h5py_says_how_to_install_it(tmp_path, monkeypatch):
    raw = tmp_path / "cuhk03" / "cuhk03_release" / "cuhk-03.mat"
    raw.parent.mkdir(parents=True)
    raw.write_bytes(b"\x89HDF\r\n\x1a\n")
    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py now raises ImportError
    with pytest.raises(DatasetError, match=r"reading .*cuhk-03.mat \(MATLAB v7.3\) needs h5py: pip install h5py"):
        build_dataset("cuhk03", tmp_path, classic_split=True)


@pytest.mark.parametrize("root", ["cuhk03-np", "cuhk03-np/labeled"])
def test_root_at_the_cuhk03_np_release_itself(tmp_path, root):
    np_dir = tmp_path / "cuhk03-np" / "labeled"
    write_images(np_dir / "bounding_box_train", ["0001_c1_1.png", "0002_c2_1.png"], fmt="PNG")
    write_images(np_dir / "query", ["0020_c1_1.png"], fmt="PNG")
    write_images(np_dir / "bounding_box_test", ["0020_c2_3.png"], fmt="PNG")
    assert build_dataset("cuhk03", tmp_path / root, labeled=True).root == str(np_dir)
    with pytest.raises(DatasetError, match=r"this CUHK03-NP release has labeled boxes, not detected; add --cuhk03-l"):
        build_dataset("cuhk03", tmp_path / root)


def test_an_empty_folder_of_the_other_kind_is_not_called_a_release_of_it(tmp_path):
    """ROOT/cuhk03-np/labeled/ without its images (an extraction stopped early): not "add --cuhk03-labeled", which
    would fail again, but where the detected boxes were looked for."""
    (tmp_path / "cuhk03-np" / "labeled").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"^no cuhk03 data under .*cuhk03-np/detected/bounding_box_train/"):
        build_dataset("cuhk03", tmp_path)


def test_an_empty_new_protocol_split_file_is_a_clear_error(tmp_path):
    data_dir = new_protocol_tree(tmp_path)
    (data_dir / "cuhk03_new_protocol_config_detected.mat").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"is not a CUHK03 new-protocol split file .*download it again"):
        build_dataset("cuhk03", tmp_path)


@needs_h5py
def test_a_read_only_dataset_folder_is_read_as_it_is(tmp_path, monkeypatch):
    from kdreid.data.datasets import cuhk03

    data_dir, people = raw_tree(tmp_path)
    build_dataset("cuhk03", tmp_path, classic_split=True)  # extracted (as torchreid would have), split cached
    (data_dir / "images_detected" / EXTRACTED_MARKER).unlink()  # torchreid writes no marker
    (data_dir / CLASSIC_SPLITS).unlink()
    written = []
    monkeypatch.setattr(cuhk03.os, "access", lambda path, mode: False)  # a read-only mount (root ignores chmod)
    monkeypatch.setattr(cuhk03, "write_json", lambda path, data: (written.append(path), _read_only())[1])
    monkeypatch.setattr(cuhk03, "extract_images", lambda *args: written.append(args))
    dataset = build_dataset("cuhk03", tmp_path, classic_split=True)
    assert sorted(Path(r.path).name for r in dataset.train + dataset.query) == expected_image_names(people)
    assert written == [data_dir / CLASSIC_SPLITS]  # tried, failed, went on without the cache; nothing extracted


def _read_only():
    raise OSError(30, "Read-only file system")


@needs_h5py
def test_extracting_into_a_read_only_folder_is_a_clear_error(tmp_path, monkeypatch):
    from kdreid.data.datasets import cuhk03

    raw_tree(tmp_path)
    monkeypatch.setattr(cuhk03, "extract_images", lambda *args: _read_only())
    with pytest.raises(DatasetError, match=r"cannot extract the CUHK03 detected images into .*writable copy"):
        build_dataset("cuhk03", tmp_path, classic_split=True)


@needs_h5py
@pytest.mark.parametrize("command", ["train-source", "pipeline"])
def test_the_training_stages_read_the_classic_split_they_are_given(command, tmp_path, monkeypatch):
    # Researchers average the classic protocol over its 20 splits: each split must be trainable, not only split 0.
    from kdreid.cli import main
    from kdreid.stages import pipeline, source
    from kdreid.stages.data import load_datasets

    raw_tree(tmp_path)
    configs = []

    class Captured(Exception):
        """Stops the command once its config is resolved: nothing is trained."""

    def capture(config, resume=False):
        configs.append(config)
        raise Captured

    monkeypatch.setattr(source, "run", capture)
    monkeypatch.setattr(pipeline, "run", capture)
    argv = [command, "-s", "cuhk03", *(["-t", "market1501"] if command == "pipeline" else []), "--root", str(tmp_path),
            "--out", str(tmp_path / "run"), "--cuhk03-classic-split", "--split-id", "1"]
    with pytest.raises(Captured):
        main(argv)
    config = configs[0] if command == "train-source" else pipeline.stage_configs(configs[0])["source_resnet50"]
    [dataset] = load_datasets(["cuhk03"], str(tmp_path), {"cuhk03": config.data.reader_options("cuhk03")})
    assert sorted({r.pid for r in dataset.query}) == [1001, 2002]  # split 1's test persons
