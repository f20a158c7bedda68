"""CUHK03 (Li et al., CVPR 2014): labeled or detected boxes, the classic 20-split protocol or the new 767/700
protocol of Zhong et al. (CVPR 2017, "CUHK03-NP"), from the files as they ship:

    ROOT/cuhk03/
        cuhk03_release/cuhk-03.mat                       the raw release (MATLAB v7.3 = HDF5; read with h5py)
        cuhk03_new_protocol_config_detected.mat          the new protocol's split (train_idx, query_idx,
        cuhk03_new_protocol_config_labeled.mat           gallery_idx, labels, filelist; MATLAB v5)
      written on first use, once:
        images_detected/  images_labeled/                `PAIR_PID_VIEW_IDX.png`, e.g. 1_001_1_01.png
        kdreid_classic_splits.json                       the 20 classic test sets [[pair, pid], ...]

Zhong et al.'s CUHK03-NP release in the Market-1501 layout (`ROOT/cuhk03/cuhk03-np/{detected,labeled}/
bounding_box_train/...` or `ROOT/cuhk03-np/...`, `.png`) is read as well, for the new protocol.

The image names are those torchreid writes, so images it already extracted are used as they are; the raw
`.mat` is then not needed. camid is the view (1 or 2) within a camera pair, as in torchreid (only equality
matters: a person is seen by one pair only). Identities: the new protocol's `labels` (1..1467); the classic
protocol numbers a person `pair * 1000 + pid` (e.g. 2_017 -> 2017). Classic: 100 test identities per split,
query = gallery = all their images, the other ~1,367 identities train.

Published (new protocol): detected train 767 ids / 7,365 images, query 700 / 1,400, gallery 700 / 5,332;
labeled 767 / 7,368, 700 / 1,400, 700 / 5,328.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from kdreid.data.datasets.base import (
    ImageRecord,
    ReidDataset,
    layout_hint,
    make_dataset,
    read_market_style_folder,
    register_dataset,
    require_split_folder,
)
from kdreid.errors import DatasetError
from kdreid.rundir import write_json

RAW_MAT = "cuhk03_release/cuhk-03.mat"
CLASSIC_SPLITS = "kdreid_classic_splits.json"
EXTRACTED_MARKER = ".kdreid-extracted"  # written after the last image, so a killed extraction is redone
IMAGE_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_(\d+)\.png$")  # pair, pid, view, image index (all 1-based)
IMAGES_PER_VIEW = 5  # the raw release has 10 image cells per person: 5 from each camera of the pair


def new_protocol_mat(kind: str) -> str:
    return f"cuhk03_new_protocol_config_{kind}.mat"


@register_dataset("cuhk03")
def read_cuhk03(root: Path, labeled: bool = False, classic_split: bool = False, split_id: int = 0) -> ReidDataset:
    data_dir = root / "cuhk03"
    if not data_dir.is_dir() and root.name == "cuhk03":
        data_dir = root
    kind = "labeled" if labeled else "detected"
    np_candidates = [data_dir / "cuhk03-np" / kind, root / "cuhk03-np" / kind]
    if root.name == "cuhk03-np":  # --root pointed at the release itself, or at its labeled/detected folder
        np_candidates.append(root / kind)
    if root.name == kind and root.parent.name == "cuhk03-np":
        np_candidates.append(root)
    np_dir = next((d for d in np_candidates if (d / "bounding_box_train").is_dir()), None)
    if np_dir is not None and not classic_split and not (data_dir / new_protocol_mat(kind)).is_file():
        return read_cuhk03_np(np_dir, split_id)
    new_protocol_missing = np_dir is None and not classic_split and not (data_dir / new_protocol_mat(kind)).is_file()
    if not data_dir.is_dir() or new_protocol_missing:
        # only the other kind of boxes of a CUHK03-NP release is there (ROOT/cuhk03-np/ or ROOT/cuhk03/cuhk03-np/)
        other_kind = "detected" if labeled else "labeled"
        releases = [d for d in (root, root.parent) if d.name == "cuhk03-np"]
        releases += [root / "cuhk03-np", data_dir / "cuhk03-np"]
        release = next((d for d in releases if (d / other_kind / "bounding_box_train").is_dir()), None)
        if release is not None:
            raise DatasetError(
                f"{release}: this CUHK03-NP release has {other_kind} boxes, not {kind}; "
                + ("add --cuhk03-labeled" if other_kind == "labeled" else "drop --cuhk03-labeled")
            )
    if not data_dir.is_dir():
        raise DatasetError(
            f"no cuhk03 data under {root}: expected {data_dir}/ holding {RAW_MAT} and "
            f"{new_protocol_mat('detected')}, or the CUHK03-NP release {root}/cuhk03-np/{kind}/bounding_box_train/"
            f"{layout_hint(root, 'cuhk03')}; --root is the parent folder of the datasets"
        )
    if not classic_split:  # the cheap checks first, before any image extraction
        if split_id != 0:
            raise DatasetError(
                f"--split-id {split_id}: the new protocol has one split (0); add --cuhk03-classic-split for 20"
            )
        require_new_protocol_mat(data_dir / new_protocol_mat(kind))
    image_dir = ensure_images(data_dir, kind)
    problems: list[str] = []
    if classic_split:
        testsets = classic_testsets(data_dir)
        if not 0 <= split_id < len(testsets):
            raise DatasetError(
                f"--split-id {split_id} is out of range: the classic protocol has splits 0..{len(testsets) - 1}"
            )
        train, test = classic_split_records(image_dir, testsets[split_id], problems)
        query, gallery = test, test
    else:
        train, query, gallery = new_protocol_records(data_dir / new_protocol_mat(kind), image_dir)
    return make_dataset("cuhk03", data_dir, train, query, gallery, problems)


# ---------------------------------------------------------------------------------------------- new protocol
def read_cuhk03_np(np_dir: Path, split_id: int) -> ReidDataset:
    """Zhong et al.'s own release of the new protocol in the Market-1501 layout (`cuhk03-np/<kind>/
    bounding_box_train/0001_c1_1.png`...), read with the Market rules; camid is then the c field (1 or 2)."""
    if split_id != 0:
        raise DatasetError(f"--split-id {split_id}: the new protocol has one split (0)")
    problems: list[str] = []
    fix = f"re-extract cuhk03-np into {np_dir.parent}/"
    splits = {
        split: read_market_style_folder(require_split_folder(np_dir / folder, fix), problems, (".png", ".jpg"))
        for split, folder in (("train", "bounding_box_train"), ("query", "query"), ("gallery", "bounding_box_test"))
    }
    return make_dataset("cuhk03", np_dir, splits["train"], splits["query"], splits["gallery"], problems)


def require_new_protocol_mat(mat_path: Path) -> None:
    if not mat_path.is_file():
        raise DatasetError(
            f"{mat_path} is missing; put the CUHK03-NP split files (Zhong et al., CVPR 2017) "
            f"{new_protocol_mat('detected')} and {new_protocol_mat('labeled')} in {mat_path.parent}/"
        )


def new_protocol_records(mat_path: Path, image_dir: Path) -> tuple[list[ImageRecord], ...]:
    """Train/query/gallery records from a `cuhk03_new_protocol_config_*.mat` (indices into `filelist`, 1-based)."""
    require_new_protocol_mat(mat_path)
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError  # an empty or truncated file

    try:
        config = loadmat(str(mat_path))
        file_names = [_matlab_string(cell) for cell in config["filelist"].ravel()]
        labels = config["labels"].ravel().astype(int)
        index_sets = [config[key].ravel().astype(int) - 1 for key in ("train_idx", "query_idx", "gallery_idx")]
        # camid = the view, third field of PAIR_PID_VIEW_IDX.png
        return tuple(
            [ImageRecord(str(image_dir / file_names[i]), int(labels[i]), int(file_names[i].split("_")[2]))
             for i in indices]
            for indices in index_sets
        )
    except (KeyError, IndexError, ValueError, OSError, NotImplementedError, MatReadError) as error:
        raise DatasetError(f"{mat_path} is not a CUHK03 new-protocol split file ({error}); download it again") from None


def _matlab_string(cell) -> str:
    """A MATLAB cell entry read by scipy (a 1-element str array, possibly nested) as a Python str."""
    while isinstance(cell, np.ndarray):
        cell = cell.ravel()[0]
    return str(cell)


# ---------------------------------------------------------------------------------------------- classic protocol
def classic_split_records(
    image_dir: Path, testset: list[tuple[int, int]], problems: list[str]
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Train and test records of one classic split: the (pair, pid) persons in `testset` are the test set."""
    test_people = {(int(pair), int(pid)) for pair, pid in testset}
    train, test = [], []
    for path in sorted(image_dir.glob("*.png")):
        match = IMAGE_NAME.match(path.name)
        if match is None:
            problems.append(f"{path}: file name does not match PAIR_PID_VIEW_IDX.png; remove it")
            continue
        pair, pid, view, _ = map(int, match.groups())
        record = ImageRecord(str(path), pair * 1000 + pid, view)
        (test if (pair, pid) in test_people else train).append(record)
    return train, test


def classic_testsets(data_dir: Path) -> list[list[list[int]]]:
    """The 20 classic test sets, `[[pair, pid], ...]` each (1-based), read once from the raw `.mat` and cached."""
    cache = data_dir / CLASSIC_SPLITS
    if cache.is_file():
        return json.loads(cache.read_text())
    with _open_raw_mat(data_dir) as mat:
        testsets = [np.asarray(mat[ref][()]).T.astype(int).tolist() for ref in mat["testsets"][()].ravel()]
    try:
        write_json(cache, testsets)
    except OSError:  # a read-only dataset folder: the raw file is read again next time
        pass
    return testsets


# ---------------------------------------------------------------------------------------------- raw images
def ensure_images(data_dir: Path, kind: str) -> Path:
    """`images_<kind>/`, extracting it from the raw `.mat` the first time (or reusing torchreid's extraction)."""
    image_dir = data_dir / f"images_{kind}"
    if (image_dir / EXTRACTED_MARKER).is_file():
        return image_dir
    raw = data_dir / RAW_MAT
    extracted_elsewhere = image_dir.is_dir() and any(image_dir.glob("*.png"))  # e.g. by torchreid
    if extracted_elsewhere and not os.access(image_dir, os.W_OK):
        return image_dir  # a read-only dataset folder: its images are used as they are
    if raw.is_file():
        try:
            extract_images(data_dir, kind)
        except OSError as error:
            raise DatasetError(
                f"cannot extract the CUHK03 {kind} images into {image_dir}/ ({error.strerror or error}); extract "
                "them once in a writable copy of the dataset folder (kdreid data check -d cuhk03 --root COPY) "
                "and use that copy"
            ) from None
        return image_dir
    if extracted_elsewhere:
        return image_dir  # no raw file to redo the extraction from
    raise DatasetError(
        f"CUHK03 {kind} images not found: expected {image_dir}/ or the raw {raw} to extract them from "
        "(the CUHK03 release zip holds cuhk03_release/cuhk-03.mat)"
    )


def extract_images(data_dir: Path, kind: str) -> int:
    """Write every `kind` image of the raw release as `images_<kind>/PAIR_PID_VIEW_IDX.png`; returns the count.

    The v7.3 file stores MATLAB arrays transposed: `mat[kind]` holds one cell per camera pair, each a
    (10, persons) array of references to (3, W, H) uint8 images; empty cells are the 2-element placeholders
    MATLAB writes for [] (some people have no image in one camera)."""
    from PIL import Image

    image_dir = data_dir / f"images_{kind}"
    image_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    with _open_raw_mat(data_dir) as mat:
        for pair_index, pair_ref in enumerate(mat[kind][()].ravel()):
            cells = np.asarray(mat[pair_ref][()]).T  # (persons, 10) references
            for person_index in range(cells.shape[0]):
                for image_index, image_ref in enumerate(cells[person_index]):
                    pixels = np.asarray(mat[image_ref][()])
                    if pixels.ndim != 3 or pixels.size == 0:
                        continue
                    view = 1 if image_index < IMAGES_PER_VIEW else 2
                    name = f"{pair_index + 1}_{person_index + 1:03d}_{view}_{image_index + 1:02d}.png"
                    target = image_dir / name
                    if not target.is_file():
                        # temp name + rename: a killed run never leaves a half-written PNG under the real name
                        partial = target.with_suffix(".png.partial")
                        Image.fromarray(pixels.T.astype(np.uint8)).save(partial, format="PNG")
                        partial.replace(target)
                    written += 1
    (image_dir / EXTRACTED_MARKER).write_text(f"{written}\n")
    return written


def _open_raw_mat(data_dir: Path):
    raw = data_dir / RAW_MAT
    if not raw.is_file():
        raise DatasetError(
            f"{raw} is missing; the classic CUHK03 splits and the first extraction of the images need the raw "
            "release file (cuhk03_release/cuhk-03.mat from the CUHK03 zip)"
        )
    try:
        import h5py
    except ImportError:
        raise DatasetError(f"reading {raw} (MATLAB v7.3) needs h5py: pip install h5py") from None
    try:
        return h5py.File(raw, "r")
    except OSError as error:
        raise DatasetError(
            f"{raw} cannot be read as MATLAB v7.3/HDF5 ({error}); download the CUHK03 release again"
        ) from None
