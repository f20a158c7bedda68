"""Records, the dataset container and the registry every layout reader registers itself in.

A reader only parses a folder into records; decoding images is the loader's business.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kdreid.errors import DatasetError


@dataclass(frozen=True)
class ImageRecord:
    """One image: where it is, who it shows, which camera saw it and which tracklet it belongs to.

    `pid` is relabelled 0..N-1 in the training split and kept raw in query/gallery (0 = distractor).
    `camid` is the camera number as written in the file name (1-based in Market/Duke).
    `tracklet` groups images known to show one person without cross-camera identity (DESIGN §3); -1 = none.
    """

    path: str
    pid: int
    camid: int
    tracklet: int = -1


@dataclass
class ReidDataset:
    """The three splits of one dataset, plus problems noticed while parsing (unparsable names...)."""

    name: str
    root: str
    train: list[ImageRecord]
    query: list[ImageRecord]
    gallery: list[ImageRecord]
    problems: list[str] = field(default_factory=list)

    @property
    def num_train_pids(self) -> int:
        return len({r.pid for r in self.train})

    @property
    def num_train_cams(self) -> int:
        return len({r.camid for r in self.train})

    def split(self, name: str) -> list[ImageRecord]:
        if name not in ("train", "query", "gallery"):
            raise ValueError(f"unknown split {name!r}")
        return getattr(self, name)


DatasetReader = Callable[..., ReidDataset]
_READERS: dict[str, DatasetReader] = {}


def register_dataset(*names: str):
    """Register a reader `fn(root, **options) -> ReidDataset` under one or more dataset names."""

    def decorator(reader: DatasetReader) -> DatasetReader:
        for name in names:
            if name in _READERS:
                raise RuntimeError(f"dataset name {name!r} registered twice")
            _READERS[name] = reader
        return reader

    return decorator


def dataset_names() -> list[str]:
    _load_readers()
    return sorted(_READERS)


def build_dataset(name: str, root: str | Path, **options) -> ReidDataset:
    """Parse dataset `name` under the parent folder `root` (torchreid's convention: `root/market1501/...`)."""
    _load_readers()
    if name not in _READERS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(sorted(_READERS))}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist; pass the parent folder of the datasets with --root")
    return _READERS[name](root, **options)


def _load_readers() -> None:
    # Importing the package runs every reader's @register_dataset.
    import kdreid.data.datasets  # noqa: F401


def relabel(records: list[ImageRecord]) -> list[ImageRecord]:
    """Train split: pids to 0..N-1 in sorted order of the raw pids; tracklets to 0..T-1 likewise."""
    pid_map = {pid: i for i, pid in enumerate(sorted({r.pid for r in records}))}
    track_map = {t: i for i, t in enumerate(sorted({r.tracklet for r in records}))}
    return [ImageRecord(r.path, pid_map[r.pid], r.camid, track_map[r.tracklet]) for r in records]
