"""MSMT17 (Wei et al., CVPR 2018), V1 or V2, read from its list files.

    ROOT/msmt17/MSMT17_V1/                      ROOT/msmt17/MSMT17_V2/
        train/0000/0000_000_01_0303morning_0015_0.jpg    mask_train_v2/...
        test/...                                          mask_test_v2/...
        list_train.txt  list_val.txt  list_query.txt  list_gallery.txt

A list line is `RELPATH PID` (`0000/0000_000_01_0303morning_0015_0.jpg 0`), pids 0-based; the camera is the
third `_` field of the file name (01..15), kept as written (1-based). Train = list_train + list_val, which
gives the published 1,041 ids / 32,621 images (torchreid adds list_val only with combineall, leaving 30,248);
query 3,060 ids / 11,659 images; gallery 3,060 / 82,161; 15 cameras. In the test lists pid 0 is a real identity.

A Market-style re-pack (`MSMT17_V1/bounding_box_train/...`, what the original KD-ReID code expected) is read
with the Market-1501 rules when no list files are there.
"""

from __future__ import annotations

import re
from pathlib import Path

from kdreid.data.datasets.base import ImageRecord, ReidDataset, find_dataset_folder, make_dataset, register_dataset
from kdreid.data.datasets.market1501 import read_market_layout
from kdreid.errors import DatasetError

# version folder -> (train images folder, test images folder); some V2 copies use train/ and test/ as well.
MSMT_VERSIONS = {"MSMT17_V1": ("train", "test"), "MSMT17_V2": ("mask_train_v2", "mask_test_v2")}
MSMT_LISTS = {
    "train": ("list_train.txt", "list_val.txt"),
    "query": ("list_query.txt",),
    "gallery": ("list_gallery.txt",),
}


def parse_msmt_camera(file_name: str) -> int | None:
    """The camera of `0000_000_01_0303morning_0015_0.jpg` (third `_` field, here 1), or None."""
    fields = file_name.split("_")
    # isdecimal, not isdigit: "²" is a digit that int() refuses.
    return int(fields[2]) if len(fields) > 2 and fields[2].isascii() and fields[2].isdecimal() else None


def read_list_file(list_path: Path, image_dir: Path, problems: list[str]) -> list[ImageRecord]:
    """Records of one MSMT17 list file; malformed lines become problems, not a stop."""
    records = []
    try:
        text = list_path.read_text(encoding="utf-8-sig")  # -sig: an editor that re-saved it may add a BOM
    except UnicodeDecodeError as error:
        raise DatasetError(f"{list_path} is not a UTF-8 text file ({error.reason} at byte {error.start}); "
                           "re-extract the dataset") from None
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        camid = parse_msmt_camera(Path(fields[0]).name) if len(fields) == 2 else None
        if camid is None or not re.fullmatch(r"-?[0-9]+", fields[1]):
            problems.append(f"{list_path}:{line_number}: expected 'DIR/PID_IDX_CAM_....jpg PID', got {line.strip()!r}")
            continue
        records.append(ImageRecord(str(image_dir / fields[0]), int(fields[1]), camid))
    return records


def read_msmt_splits(data_dir: Path, image_dirs: tuple[str, str], problems: list[str]) -> dict[str, list[ImageRecord]]:
    """Raw records of `data_dir/list_*.txt`; train images under `data_dir/image_dirs[0]`, test under `[1]`."""
    splits: dict[str, list[ImageRecord]] = {}
    shipped = ", ".join(name for names in MSMT_LISTS.values() for name in names)
    for split, list_names in MSMT_LISTS.items():
        image_dir = data_dir / (image_dirs[0] if split == "train" else image_dirs[1])
        if not image_dir.is_dir():
            raise DatasetError(
                f"image folder {image_dir}/ is missing; re-extract {data_dir.name} "
                f"(it ships {image_dirs[0]}/ and {image_dirs[1]}/)"
            )
        splits[split] = []
        for list_name in list_names:
            list_path = data_dir / list_name
            if not list_path.is_file():
                raise DatasetError(f"list file {list_path} is missing; re-extract {data_dir.name} (it ships {shipped})")
            splits[split] += read_list_file(list_path, image_dir, problems)
    return splits


def read_msmt_lists(name: str, data_dir: Path, image_dirs: tuple[str, str]) -> ReidDataset:
    problems: list[str] = []
    splits = read_msmt_splits(data_dir, image_dirs, problems)
    return make_dataset(name, data_dir, splits["train"], splits["query"], splits["gallery"], problems)


def image_dirs_of(data_dir: Path) -> tuple[str, str]:
    default = MSMT_VERSIONS.get(data_dir.name, MSMT_VERSIONS["MSMT17_V1"])
    for train_dir, test_dir in (default, *MSMT_VERSIONS.values()):
        if (data_dir / train_dir).is_dir() and (data_dir / test_dir).is_dir():
            return train_dir, test_dir
    return default


@register_dataset("msmt17")
def read_msmt17(root: Path) -> ReidDataset:
    base = root / "msmt17"
    candidates = [base / version for version in MSMT_VERSIONS] + [root / version for version in MSMT_VERSIONS]
    if root.name in MSMT_VERSIONS:
        candidates.append(root)
    has_lists = any((candidate / "list_train.txt").is_file() for candidate in candidates)
    repacks = [candidate for candidate in candidates if (candidate / "bounding_box_train").is_dir()]
    if repacks and not has_lists:  # the list files, as shipped, win over a re-pack
        return read_market_layout("msmt17", repacks[0], fix=f"restore the Market-style re-pack in {repacks[0]}/")
    expected = f"{base}/MSMT17_V1|MSMT17_V2/list_train.txt"
    data_dir = find_dataset_folder(root, candidates, "list_train.txt", "msmt17", expected)
    return read_msmt_lists("msmt17", data_dir, image_dirs_of(data_dir))
