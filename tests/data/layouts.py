"""Tiny dataset trees in each layout the readers parse, for tests: a few 8×4 images each (real JPEG/PNG files,
so `data check` can decode them), named as the real datasets name theirs."""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SIZE = (4, 8)  # PIL (width, height)


def tiny_image_bytes(seed: int = 0, fmt: str = "JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(IMAGE_SIZE[1], IMAGE_SIZE[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def write_images(folder: Path, names: list[str], fmt: str = "JPEG") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(tiny_image_bytes(seed, fmt))
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------- Market / Duke
MARKET_NAMES = {
    "bounding_box_train": [
        "0002_c1s1_000451_03.jpg",
        "0002_c2s1_000301_01.jpg",
        "0007_c1s1_000101_01.jpg",
        "0007_c1s1_000151_02.jpg",
        "0010_c12s3_000001_01.jpg",  # a two-digit camera
        "-1_c1s1_000001_00.jpg",  # junk: dropped
    ],
    "query": ["0002_c3s1_000001_01.jpg", "0007_c2s1_000001_01.jpg"],
    "bounding_box_test": [
        "0002_c1s1_000002_01.jpg",
        "0007_c5s1_000001_01.jpg",
        "0007_c2s1_000009_01.jpg",
        "0000_c1s1_000003_02.jpg",  # distractor: kept
        "-1_c2s1_000004_01.jpg",  # junk: dropped
    ],
}


def market_tree(root: Path, folder: str = "market1501/Market-1501-v15.09.15", names=None) -> Path:
    """Write a Market-layout tree at root/folder; returns the folder."""
    data_dir = root / folder
    for split_folder, split_names in (names or MARKET_NAMES).items():
        write_images(data_dir / split_folder, split_names)
    (data_dir / "bounding_box_train" / "Thumbs.db").write_bytes(b"not an image")  # ignored: not .jpg
    return data_dir


DUKE_NAMES = {
    "bounding_box_train": ["0001_c2_f0046182.jpg", "0001_c6_f0071522.jpg", "0005_c2_f0046200.jpg"],
    "query": ["0003_c1_f0044158.jpg"],
    "bounding_box_test": ["0003_c8_f0061220.jpg", "0003_c1_f0044159.jpg", "0009_c4_f0000001.jpg"],
}


def duke_tree(root: Path) -> Path:
    return market_tree(root, "dukemtmc-reid/DukeMTMC-reID", DUKE_NAMES)


# ---------------------------------------------------------------------------------------------- MSMT17
MSMT_LISTS = {
    "list_train.txt": ["0000/0000_000_01_0303morning_0015_0.jpg 0", "0000/0000_001_03_0303morning_0016_0.jpg 0",
                       "0001/0001_000_14_0303noon_0100_1.jpg 1"],
    "list_val.txt": ["0001/0001_001_14_0303noon_0101_1.jpg 1", "0002/0002_000_02_0303afternoon_0001_0.jpg 2"],
    "list_query.txt": ["0000/0000_000_15_0113morning_0001_0.jpg 0", "0001/0001_000_02_0113noon_0002_0.jpg 1"],
    "list_gallery.txt": ["0000/0000_001_01_0113morning_0003_0.jpg 0", "0001/0001_001_05_0113noon_0004_0.jpg 1",
                         "0001/0001_002_02_0113noon_0005_0.jpg 1"],
}


def msmt_tree(root: Path, version: str = "MSMT17_V1") -> Path:
    train_dir, test_dir = {"MSMT17_V1": ("train", "test"), "MSMT17_V2": ("mask_train_v2", "mask_test_v2")}[version]
    data_dir = root / "msmt17" / version
    for list_name, lines in MSMT_LISTS.items():
        image_dir = data_dir / (train_dir if list_name in ("list_train.txt", "list_val.txt") else test_dir)
        write_images(image_dir, [line.split()[0] for line in lines])
        (data_dir / list_name).write_text("\n".join(lines) + "\n")
    return data_dir


# ---------------------------------------------------------------------------------------------- CUHK03
# One person = (pair, pid) with 10 image cells (5 per view); None = an empty cell (no image from that camera).
def cuhk03_people(seed: int = 0) -> dict[tuple[int, int], list[np.ndarray | None]]:
    rng = np.random.default_rng(seed)

    def image():
        return rng.integers(0, 256, size=(6, 3, 3), dtype=np.uint8)  # (H, W, 3), as MATLAB holds it

    people = {}
    for pair, persons in ((1, 3), (2, 2)):
        for pid in range(1, persons + 1):
            cells = [image(), image(), None, None, None, image(), None, None, None, None]
            people[(pair, pid)] = cells
    people[(2, 2)][5] = None  # this person has no image from the second camera
    return people


def write_cuhk03_raw_mat(path: Path, people: dict, testsets: list[list[tuple[int, int]]]) -> None:
    """A tiny `cuhk-03.mat` in MATLAB v7.3 form: HDF5 with object references, arrays stored transposed."""
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    names = itertools.count()
    with h5py.File(path, "w") as mat:
        refs = mat.create_group("#refs#")

        def store(array: np.ndarray, dtype=None):
            return refs.create_dataset(f"r{next(names)}", data=array, dtype=dtype).ref

        for kind, offset in (("detected", 0), ("labeled", 100)):
            pair_refs = []
            for pair in sorted({p for p, _ in people}):
                pids = sorted(pid for p, pid in people if p == pair)
                cells = np.empty((10, len(pids)), dtype=h5py.ref_dtype)  # MATLAB (persons, 10), transposed
                for column, pid in enumerate(pids):
                    for index, pixels in enumerate(people[(pair, pid)]):
                        if pixels is None:
                            cells[index, column] = store(np.zeros(2, dtype=np.uint64))  # MATLAB's []
                        else:  # labeled boxes differ from detected ones
                            cells[index, column] = store(((pixels.astype(int) + offset) % 256).astype(np.uint8).T)
                pair_refs.append(store(cells, h5py.ref_dtype))
            mat.create_dataset(kind, data=np.array([pair_refs], dtype=h5py.ref_dtype))  # (1, pairs)
        testset_refs = [store(np.array(testset, dtype=float).T) for testset in testsets]  # (2, n) each
        mat.create_dataset("testsets", data=np.array([testset_refs], dtype=h5py.ref_dtype))


def write_cuhk03_new_protocol_mat(path: Path, file_names: list[str], labels: list[int], train: list[int],
                                  query: list[int], gallery: list[int]) -> None:
    """`cuhk03_new_protocol_config_*.mat` (MATLAB v5) with 1-based indices into `filelist`."""
    from scipy.io import savemat

    path.parent.mkdir(parents=True, exist_ok=True)
    filelist = np.empty((len(file_names), 1), dtype=object)
    for i, name in enumerate(file_names):
        filelist[i, 0] = name
    column = lambda values: np.array(values, dtype=np.int32).reshape(-1, 1)  # noqa: E731  (integer, as shipped)
    savemat(str(path), {"filelist": filelist, "labels": column(labels), "train_idx": column(train),
                        "query_idx": column(query), "gallery_idx": column(gallery)})


# ---------------------------------------------------------------------------------------------- custom / synthetic
def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


# ---------------------------------------------------------------------------------------------- torchreid
def torchreid_reader(monkeypatch, file_name: str):
    """torchreid's reader module `torchreid/reid/data/datasets/image/<file_name>` as a test reference, with the
    package imports it needs stubbed (only its parsing functions are used, never its Dataset machinery)."""
    from tests.reference import load_torchreid_module

    for name in ("torchreid", "torchreid.reid", "torchreid.reid.data", "torchreid.reid.data.datasets"):
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name) or types.ModuleType(name))
    dataset_stub = types.ModuleType("torchreid.reid.data.datasets.dataset")
    dataset_stub.ImageDataset = object
    utils_stub = types.ModuleType("torchreid.reid.utils")
    utils_stub.read_json = lambda path: json.loads(Path(path).read_text())
    utils_stub.write_json = lambda obj, path: Path(path).write_text(json.dumps(obj))
    utils_stub.mkdir_if_missing = lambda path: os.makedirs(path, exist_ok=True)
    imageio_stub = types.ModuleType("imageio")
    imageio_stub.imwrite = lambda path, pixels: Image.fromarray(pixels).save(path)
    monkeypatch.setitem(sys.modules, "torchreid.reid.data.datasets.dataset", dataset_stub)
    monkeypatch.setitem(sys.modules, "torchreid.reid.utils", utils_stub)
    monkeypatch.setitem(sys.modules, "imageio", imageio_stub)
    return load_torchreid_module(f"torchreid/reid/data/datasets/image/{file_name}")
