"""The synthetic domains of `kdreid data synth` (synth_market, synth_duke, synth_cuhk, synth_msmt), read with
the Market-1501 rules from their own folder:

    ROOT/synth_market/
        bounding_box_train/  query/  bounding_box_test/    PPPP_cCsS_FFFFFF_BB.jpg (camera may have 2 digits)
        manifest.csv         path,pid,camid,tracklet,split,...   (path relative to ROOT/synth_market/)

The manifest carries the generator's real tracklet ids (one person, one camera, consecutive frames), used in
place of the (pid, camera) tracklets of the public datasets; they must be unique within the domain. A domain
written in the MSMT17 layout instead (`list_train.txt`, `train/`, `test/`) is read with the MSMT17 rules.
"""

from __future__ import annotations

import csv
import re
from dataclasses import replace
from pathlib import Path

from kdreid.data.datasets.base import (
    JUNK_PID,
    ImageRecord,
    ReidDataset,
    find_dataset_folder,
    make_dataset,
    register_dataset,
)
from kdreid.data.datasets.market1501 import read_market_splits
from kdreid.data.datasets.msmt17 import image_dirs_of, read_msmt_splits
from kdreid.errors import DatasetError

SYNTHETIC_DOMAINS = ("synth_market", "synth_duke", "synth_cuhk", "synth_msmt")
MANIFEST = "manifest.csv"
_EXAMPLES = 3  # how many offending paths a summarised problem names


def read_synthetic_domain(root: Path, *, name: str) -> ReidDataset:
    domain_dir = root / name
    if not domain_dir.is_dir() and root.name == name:  # --root pointed at the domain itself
        domain_dir = root
    problems: list[str] = []
    msmt_dirs = [d for d in (domain_dir, domain_dir / "MSMT17_V1") if (d / "list_train.txt").is_file()]
    if msmt_dirs:
        data_dir = msmt_dirs[0]
        splits = read_msmt_splits(data_dir, image_dirs_of(data_dir), problems)
    else:
        expected = f"{domain_dir}/bounding_box_train/"
        data_dir = find_dataset_folder(root, [domain_dir], "bounding_box_train", name, expected)
        fix = f"regenerate it with: kdreid data synth --out {domain_dir.parent} --domains {name}"
        splits = read_market_splits(data_dir, fix, problems)
    splits = attach_manifest_tracklets(splits, domain_dir, problems)
    return make_dataset(name, data_dir, splits["train"], splits["query"], splits["gallery"], problems)


def attach_manifest_tracklets(
    splits: dict[str, list[ImageRecord]], domain_dir: Path, problems: list[str]
) -> dict[str, list[ImageRecord]]:
    """Raw records with the manifest's tracklet ids. Images missing from the manifest, or whose pid/camera
    differ from it, become problems (they keep tracklet -1: (pid, camera) in train). No manifest: unchanged."""
    manifest_path = domain_dir / MANIFEST
    if not manifest_path.is_file():
        return splits
    try:
        with open(manifest_path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            columns = set(reader.fieldnames or [])
    except (UnicodeDecodeError, csv.Error) as error:
        raise DatasetError(f"{manifest_path} is not a readable CSV file ({error}); regenerate the domain") from None
    if not {"path", "pid", "camid", "tracklet"} <= columns:
        raise DatasetError(
            f"{manifest_path} lacks the columns path, pid, camid, tracklet; regenerate the domain"
        )
    rows = {row["path"]: row for row in rows}
    missing: list[str] = []
    mismatched: list[str] = []

    def with_tracklet(record: ImageRecord) -> ImageRecord:
        if record.pid == JUNK_PID:  # dropped by make_dataset anyway
            return record
        relative = Path(record.path).relative_to(domain_dir).as_posix()
        row = rows.get(relative)
        tracklet = _integer(row.get("tracklet")) if row is not None else None
        if tracklet is None:
            missing.append(relative)
            return record
        if _integer(row["pid"]) != record.pid or _integer(row["camid"]) != record.camid:
            mismatched.append(relative)
        return replace(record, tracklet=tracklet)

    splits = {split: [with_tracklet(r) for r in records] for split, records in splits.items()}
    if missing:
        problems.append(
            f"{manifest_path}: {len(missing)} images have no tracklet there (e.g. {', '.join(missing[:_EXAMPLES])}); "
            "regenerate the domain or fix the manifest"
        )
    if mismatched:
        problems.append(
            f"{manifest_path}: pid/camid of {len(mismatched)} images differ from their file names "
            f"(e.g. {', '.join(mismatched[:_EXAMPLES])}); regenerate the domain"
        )
    return splits


def _integer(cell: str | None) -> int | None:
    """A manifest cell as an int; None when empty or not a plain integer (a damaged manifest, a short row)."""
    cell = (cell or "").strip()
    return int(cell) if re.fullmatch(r"-?[0-9]+", cell) else None


def _register_domain(name: str) -> None:
    @register_dataset(name)
    def read_domain(root: Path) -> ReidDataset:
        return read_synthetic_domain(root, name=name)


for _name in SYNTHETIC_DOMAINS:
    _register_domain(_name)
