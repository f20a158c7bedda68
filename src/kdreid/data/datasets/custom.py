"""A user's own cameras: a folder with train/, query/ and gallery/, labelled by a CSV manifest or by file names.

    ROOT/                         -d custom          (or ROOT/custom/)
        train/  query/  gallery/  images, in sub-folders if you like
        manifest.csv              optional: path,pid,camid[,tracklet][,split]
    ROOT/site_a/                  -d custom:site_a   (one of several: custom:site_a custom:site_b as two targets)

With `manifest.csv`, `path` is relative to the folder that holds it (or absolute); the split is the `split`
column when there is one, else the first folder of the path (train/, query/ or gallery/). `tracklet`, when
given, groups images one tracker linked in one camera; ids must be unique in the dataset. Without a manifest,
every image is named `PID_cCAM_anything.jpg` (e.g. `0007_c3_000120.jpg`) and train tracklets are derived from
(pid, camera) as for the public datasets. pid -1 = junk (dropped), pid 0 = distractor (kept in the gallery).
Camera numbers are kept as written. Evaluation only counts a query whose identity is in the gallery under
another camera: `kdreid data check -d custom` says so when no query has one.
"""

from __future__ import annotations

import csv
from pathlib import Path

from kdreid.data.datasets.base import (
    MEMBER_NAME,
    SPLITS,
    ImageRecord,
    ReidDataset,
    dataset_names,
    layout_hint,
    make_dataset,
    read_market_style_folder,
    register_dataset,
    register_dataset_family,
    require_split_folder,
    walk_files,
)
from kdreid.data.images import IMAGE_SUFFIXES
from kdreid.errors import DatasetError

CUSTOM_MANIFEST = "manifest.csv"
REQUIRED_COLUMNS = ("path", "pid", "camid")


@register_dataset("custom")
def read_custom(root: Path) -> ReidDataset:
    candidates = (root, root / "custom")
    folder = _first_custom_folder(candidates)
    if folder is None:
        raise _not_found("custom", candidates, _hint(root))
    return _read_custom_folder("custom", folder)


@register_dataset_family("custom")
def read_named_custom(root: Path, member: str) -> ReidDataset:
    """`custom:NAME`: the custom folder ROOT/NAME (or ROOT itself when it is called NAME)."""
    candidates = (root / member, root) if root.name == member else (root / member,)
    folder = _first_custom_folder(candidates)
    if folder is None:
        raise _not_found(f"custom:{member}", candidates, _hint(root))
    return _read_custom_folder(f"custom:{member}", folder)


def _hint(root: Path) -> str:
    """'; ROOT holds custom:a, custom:b' when ROOT's sub-folders are custom ones (what to name instead), else a hint
    of another layout."""
    layouts = set(dataset_names())  # other layouts' folders (synth_market/ has a manifest) are not custom ones
    others = sorted(f"custom:{d.name}" for d in root.iterdir()
                    if d.is_dir() and d.name not in layouts and MEMBER_NAME.fullmatch(d.name)
                    and _first_custom_folder((d,)))
    return f"; {root} holds {', '.join(others)}" if others else layout_hint(root, "custom")


def _first_custom_folder(candidates: tuple[Path, ...]) -> Path | None:
    return next((f for f in candidates if (f / CUSTOM_MANIFEST).is_file() or (f / "train").is_dir()), None)


def _not_found(name: str, candidates: tuple[Path, ...], hint: str) -> DatasetError:
    where = " or ".join(str(candidate) for candidate in candidates)
    return DatasetError(f"dataset {name}: expected train/, query/, gallery/ (and optionally {CUSTOM_MANIFEST}) under "
                        f"{where}{hint}")


def _read_custom_folder(name: str, folder: Path) -> ReidDataset:
    problems: list[str] = []
    if (folder / CUSTOM_MANIFEST).is_file():
        splits = read_manifest(folder, folder / CUSTOM_MANIFEST, problems)
    else:
        fix = f"put the images of each split in {folder}/train/, query/ and gallery/"
        # train/ alone is an unlabelled target (one's own tracker crops): nothing to evaluate, nothing missing
        unlabelled = not (folder / "query").exists() and not (folder / "gallery").exists()
        splits = {}
        for split in SPLITS:
            if unlabelled and split != "train":
                splits[split] = []
                continue
            split_dir = require_split_folder(folder / split, fix)
            splits[split] = []
            for sub_dir in sorted({p.parent for p in walk_files(split_dir)}):
                splits[split] += read_market_style_folder(sub_dir, problems, IMAGE_SUFFIXES, nested_read=True)
    return make_dataset(name, folder, splits["train"], splits["query"], splits["gallery"], problems)


def read_manifest(folder: Path, manifest_path: Path, problems: list[str]) -> dict[str, list[ImageRecord]]:
    """Records of a `path,pid,camid[,tracklet][,split]` CSV; bad rows become problems naming the row."""
    try:
        with open(manifest_path, newline="", encoding="utf-8-sig") as handle:  # -sig: spreadsheet exports add a BOM
            rows = list(csv.reader(handle))
    except (UnicodeDecodeError, csv.Error) as error:
        reason = f"not UTF-8 text ({error.reason} at byte {error.start})" if isinstance(error, UnicodeDecodeError) \
            else f"not a CSV file ({error})"
        raise DatasetError(f"{manifest_path} is {reason}; save it as UTF-8 CSV") from None
    if not rows:
        raise DatasetError(
            f"{manifest_path} is empty; write a header 'path,pid,camid[,tracklet][,split]' and one row per image"
        )
    header = [column.strip().lower() for column in rows[0]]
    if not set(REQUIRED_COLUMNS) <= set(header):
        raise DatasetError(
            f"{manifest_path}: the first line must be a header with columns path,pid,camid[,tracklet][,split]; "
            f"got {','.join(rows[0])}"
        )
    column = {name: header.index(name) for name in header}
    splits: dict[str, list[ImageRecord]] = {split: [] for split in SPLITS}
    first_line: dict[str, int] = {}  # path as written -> the line that listed it first
    for line_number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        where = f"{manifest_path}:{line_number}"
        try:
            values = {name: row[index].strip() for name, index in column.items()}
            pid, camid = int(values["pid"]), int(values["camid"])
            tracklet = int(values["tracklet"]) if values.get("tracklet") else -1
        except (IndexError, ValueError):
            problems.append(f"{where}: expected integer pid and camid (and tracklet), got {','.join(row)}; fix the row")
            continue
        # Labels are stored as int64 (a larger one fails far from here); negative ids other than the junk -1 mean
        # nothing in any protocol.
        if not -1 <= pid < 2**63 or not 0 <= camid < 2**31 or not -1 <= tracklet < 2**63:
            problems.append(f"{where}: pid {pid}, camid {camid}, tracklet {tracklet}: pid must be -1 (junk), 0 "
                            "(distractor) or a positive id, camid 0 or more, tracklet -1 (none) or more (all below "
                            "2**63); fix the row")
            continue
        if values["path"] in first_line:
            problems.append(f"{where}: {values['path']} is listed again (first at line {first_line[values['path']]}): "
                            "one row per image; remove the repeated row")
            continue
        first_line[values["path"]] = line_number
        relative = Path(values["path"])
        split = values.get("split") or (relative.parts[0] if len(relative.parts) > 1 else "")
        if split not in SPLITS:
            problems.append(
                f"{where}: split {split!r} of {values['path']} is not one of train, query, gallery (lower case); fix "
                "the row" if values.get("split") else
                f"{where}: cannot tell the split of {values['path']}; put it under train/, query/ or gallery/ "
                "or add a split column"
            )
            continue
        path = relative if relative.is_absolute() else folder / relative
        splits[split].append(ImageRecord(str(path), pid, camid, tracklet))
    return splits
