"""Dataset layout readers, one file each; importing this package registers them all.

    from kdreid.data.datasets import build_dataset
    dataset = build_dataset("market1501", "/data")   # /data/market1501/[Market-1501-v15.09.15/]...
"""

from kdreid.data.datasets.base import (
    DISTRACTOR_PID,
    JUNK_PID,
    SPLITS,
    ImageRecord,
    ReidDataset,
    build_dataset,
    dataset_names,
    register_dataset,
    relabel,
)
from kdreid.data.datasets import market1501, dukemtmcreid, msmt17, cuhk03, custom, synthetic  # noqa: F401,E402

__all__ = [
    "DISTRACTOR_PID",
    "JUNK_PID",
    "SPLITS",
    "ImageRecord",
    "ReidDataset",
    "build_dataset",
    "dataset_names",
    "register_dataset",
    "relabel",
]
