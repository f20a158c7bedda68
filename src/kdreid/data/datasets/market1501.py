"""Market-1501 (Zheng et al., ICCV 2015) and every dataset written in its layout.

    ROOT/market1501/[Market-1501-v15.09.15/]
        bounding_box_train/  0002_c1s1_000451_03.jpg   pid 0002, camera 1, sequence 1, frame 000451, box 03
        query/
        bounding_box_test/   0000_... = distractor (kept), -1_... = junk (dropped)

Published: train 751 ids / 12,936 images; query 750 / 3,368; gallery 751 ids (750 + the distractor label 0) /
15,913 images; 6 cameras. The camera number is parsed with any number of digits (`c(\\d+)`) and kept as written.
"""

from __future__ import annotations

from pathlib import Path

from kdreid.data.datasets.base import (
    ImageRecord,
    ReidDataset,
    find_dataset_folder,
    make_dataset,
    read_market_style_folder,
    register_dataset,
    require_split_folder,
)

MARKET_SPLIT_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
MARKET_VERSION_FOLDER = "Market-1501-v15.09.15"


def read_market_splits(data_dir: Path, fix: str, problems: list[str]) -> dict[str, list[ImageRecord]]:
    """Raw records (raw pids, junk included) of `data_dir/{bounding_box_train,query,bounding_box_test}`."""
    return {
        split: read_market_style_folder(require_split_folder(data_dir / folder_name, fix), problems)
        for split, folder_name in MARKET_SPLIT_FOLDERS.items()
    }


def read_market_layout(name: str, data_dir: Path, fix: str) -> ReidDataset:
    """Parse a folder in the Market-1501 layout into a dataset (junk dropped, train relabelled)."""
    problems: list[str] = []
    splits = read_market_splits(data_dir, fix, problems)
    return make_dataset(name, data_dir, splits["train"], splits["query"], splits["gallery"], problems)


def candidate_folders(root: Path, *relative: str, own_names: tuple[str, ...] = ()) -> list[Path]:
    """`root/<relative>` for each, then `root` itself when its own name says it is the dataset folder (a user
    who points --root at the dataset rather than at its parent)."""
    candidates = [root / r for r in relative]
    if root.name in own_names:
        candidates.append(root)
    return candidates


@register_dataset("market1501")
def read_market1501(root: Path) -> ReidDataset:
    base = root / "market1501"
    candidates = candidate_folders(
        root,
        f"market1501/{MARKET_VERSION_FOLDER}",
        "market1501",
        MARKET_VERSION_FOLDER,
        own_names=("market1501", MARKET_VERSION_FOLDER),
    )
    data_dir = find_dataset_folder(
        root, candidates, "bounding_box_train", "market1501", f"{base}/[{MARKET_VERSION_FOLDER}/]bounding_box_train/"
    )
    return read_market_layout("market1501", data_dir, fix=f"re-extract {MARKET_VERSION_FOLDER}.zip into {base}/")
