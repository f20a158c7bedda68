"""DukeMTMC-reID (Ristani et al., ECCVW 2016; Zheng et al., ICCV 2017), in the Market-1501 folder layout.

    ROOT/dukemtmc-reid/DukeMTMC-reID/
        bounding_box_train/  0001_c2_f0046182.jpg   pid 0001, camera 2, frame 0046182
        query/
        bounding_box_test/

Published: train 702 ids / 16,522 images; query 702 / 2,228; gallery 1,110 ids (702 + 408 distractor
identities) / 17,661 images; 8 cameras. No junk images.
"""

from __future__ import annotations

from pathlib import Path

from kdreid.data.datasets.base import ReidDataset, find_dataset_folder, register_dataset
from kdreid.data.datasets.market1501 import candidate_folders, read_market_layout


@register_dataset("dukemtmcreid")
def read_dukemtmcreid(root: Path) -> ReidDataset:
    base = root / "dukemtmc-reid"
    candidates = candidate_folders(
        root,
        "dukemtmc-reid/DukeMTMC-reID",
        "dukemtmc-reid",
        "DukeMTMC-reID",
        own_names=("dukemtmc-reid", "DukeMTMC-reID"),
    )
    data_dir = find_dataset_folder(
        root, candidates, "bounding_box_train", "dukemtmcreid", f"{base}/DukeMTMC-reID/bounding_box_train/"
    )
    return read_market_layout("dukemtmcreid", data_dir, fix=f"re-extract DukeMTMC-reID.zip into {base}/")
