"""Records, the dataset container, the registry every layout reader registers itself in, and the few rules
all readers share (junk, relabelling, tracklets, finding the dataset folder, naming a wrong layout).

A reader only parses a folder into records; decoding images is the loader's business (and `data check`'s).
"""

from __future__ import annotations

import functools
import inspect
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

from kdreid.data.images import IMAGE_SUFFIXES
from kdreid.errors import DatasetError

SPLITS = ("train", "query", "gallery")
JUNK_PID = -1  # Market-style junk boxes: dropped by every reader
DISTRACTOR_PID = 0  # Market-style distractors ("0000_..."): kept in the gallery as one more identity

# `PPPP_cC...`: pid (may be -1) and a camera number of any number of digits (a 15-camera domain writes c12).
MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)")


@dataclass(frozen=True)
class ImageRecord:
    """One image: where it is, who it shows, which camera saw it and which tracklet it belongs to.

    `pid` is relabelled 0..N-1 in the training split and kept raw in query/gallery (0 = distractor).
    `camid` is the camera number as written in the file name (1-based in Market/Duke/MSMT17, the view 1/2 in
    CUHK03); only equality matters.
    `tracklet` groups images known to show one person without cross-camera identity (DESIGN §3); -1 = none.
    In the training split it is relabelled 0..T-1; query/gallery of public datasets carry -1.
    """

    path: str
    pid: int
    camid: int
    tracklet: int = -1


@dataclass
class ReidDataset:
    """The three splits of one dataset, plus problems noticed while parsing (unparsable names...).

    `root` is the folder the images were found in (e.g. `.../market1501/Market-1501-v15.09.15`).
    """

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

    @property
    def num_train_tracklets(self) -> int:
        return len({r.tracklet for r in self.train})

    def split(self, name: str) -> list[ImageRecord]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}")
        return getattr(self, name)


DatasetReader = Callable[..., ReidDataset]
_READERS: dict[str, DatasetReader] = {}
# Readers of a family of datasets named `FAMILY:MEMBER` (`custom:site_a`, the folder ROOT/site_a), called
# `fn(root, member, **options)`; a member is a folder name, so one run can hold several of one's own datasets.
_FAMILIES: dict[str, DatasetReader] = {}
MEMBER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def register_dataset(*names: str):
    """Register a reader `fn(root, **options) -> ReidDataset` under one or more dataset names."""

    def decorator(reader: DatasetReader) -> DatasetReader:
        for name in names:
            if name in _READERS:
                raise RuntimeError(f"dataset name {name!r} registered twice")
            _READERS[name] = reader
        return reader

    return decorator


def register_dataset_family(family: str):
    """Register a reader `fn(root, member, **options) -> ReidDataset` for the names `FAMILY:MEMBER`."""

    def decorator(reader: DatasetReader) -> DatasetReader:
        if family in _FAMILIES:
            raise RuntimeError(f"dataset family {family!r} registered twice")
        _FAMILIES[family] = reader
        return reader

    return decorator


def dataset_names() -> list[str]:
    """The names `-d` takes: every registered dataset, and `FAMILY:FOLDER` for each family."""
    _load_readers()
    return sorted([*_READERS, *(f"{family}:FOLDER" for family in _FAMILIES)])


def _reader_of(name: str) -> DatasetReader:
    """The reader of dataset `name`, the member bound for `FAMILY:MEMBER`; an unknown name raises."""
    family, colon, member = name.partition(":")
    if not colon and name in _READERS:
        return _READERS[name]
    if colon and family in _FAMILIES:
        if not MEMBER_NAME.fullmatch(member):
            raise DatasetError(
                f"dataset {name!r}: after '{family}:' comes the name of a folder under --root (letters, digits, "
                f"'_', '-', '.'), e.g. {family}:site_a"
            )
        return functools.partial(_FAMILIES[family], member=member)
    raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(dataset_names())}")


def build_dataset(name: str, root: str | Path, **options) -> ReidDataset:
    """Parse dataset `name` under the parent folder `root` (torchreid's convention: `root/market1501/...`).

    `options` are the readers' keyword options (cuhk03: `labeled`, `classic_split`, `split_id`). A reader gets
    only those it takes, so one set of options can be passed for every dataset of a run; a name that no
    reader takes is a mistake and raises."""
    _load_readers()
    reader = _reader_of(name)
    known = {option for each in (*_READERS.values(), *_FAMILIES.values()) for option in _keyword_options(each)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise DatasetError(f"unknown dataset option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise DatasetError(f"dataset root {root} {what}; pass the parent folder of the datasets with --root")
    accepted = _keyword_options(reader)
    return reader(root, **{key: value for key, value in options.items() if key in accepted})


def _keyword_options(reader: DatasetReader) -> set[str]:
    parameters = list(inspect.signature(reader).parameters.values())[1:]  # the first one is `root`
    keyword_kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return {p.name for p in parameters if p.kind in keyword_kinds and p.default is not p.empty}


def _load_readers() -> None:
    # Importing the package runs every reader's @register_dataset.
    import kdreid.data.datasets  # noqa: F401


# ---------------------------------------------------------------------------------------------- shared rules
def relabel(records: list[ImageRecord]) -> list[ImageRecord]:
    """Train split: pids to 0..N-1 in sorted order of the raw pids; tracklets to 0..T-1 likewise (-1 stays -1)."""
    pid_map = {pid: i for i, pid in enumerate(sorted({r.pid for r in records}))}
    track_map = {t: i for i, t in enumerate(sorted({r.tracklet for r in records if r.tracklet != -1}))}
    track_map[-1] = -1
    return [ImageRecord(r.path, pid_map[r.pid], r.camid, track_map[r.tracklet]) for r in records]


def derive_tracklets(records: list[ImageRecord]) -> list[ImageRecord]:
    """Give every record without a tracklet the tracklet of its (raw pid, camera) pair.

    What a single-camera tracker would give for a public dataset: images of one person in one camera, never
    linked across cameras (DESIGN §3). Given tracklets keep their ids; derived ones are numbered after them so
    the two never collide. Call before `relabel` (it needs raw pids).
    """
    given = {r.tracklet for r in records if r.tracklet != -1}
    first_free = max(given) + 1 if given else 0
    pairs = sorted({(r.pid, r.camid) for r in records if r.tracklet == -1})
    pair_ids = {pair: first_free + i for i, pair in enumerate(pairs)}
    return [r if r.tracklet != -1 else replace(r, tracklet=pair_ids[(r.pid, r.camid)]) for r in records]


def make_dataset(
    name: str,
    root: Path,
    train: Iterable[ImageRecord],
    query: Iterable[ImageRecord],
    gallery: Iterable[ImageRecord],
    problems: list[str] | None = None,
) -> ReidDataset:
    """The common finish of every reader: drop junk, derive and relabel train tracklets and pids, sort by path.

    Train records come in with raw pids; query/gallery keep theirs (distractors, pid 0, stay in the gallery).
    """
    def keep(records: Iterable[ImageRecord]) -> list[ImageRecord]:
        return sorted((r for r in records if r.pid != JUNK_PID), key=lambda r: r.path)

    train_records = relabel(derive_tracklets(keep(train)))
    return ReidDataset(name, str(root), train_records, keep(query), keep(gallery), list(problems or []))


def parse_market_name(file_name: str) -> tuple[int, int] | None:
    """(pid, camid) from `PPPP_cC...` names (Market-1501, DukeMTMC-reID, custom, synthetic), or None."""
    match = MARKET_NAME.match(file_name)
    return (int(match.group(1)), int(match.group(2))) if match else None


# Image files a released layout does not read, named when a split holds only those (converted to another format).
_ANY_IMAGE_SUFFIXES = (*IMAGE_SUFFIXES, ".tif", ".tiff", ".gif")


def walk_files(folder: Path) -> list[Path]:
    """Every file under `folder`, sorted, following symlinked folders (each real folder once: a link loop is not
    walked twice). Hidden entries (.DS_Store, macOS's `._NAME` twins) and `__MACOSX` folders are not data."""
    seen: set[str] = set()
    files = []
    for top, folders, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            folders[:] = []
            continue
        seen.add(real)
        folders[:] = [name for name in folders if not name.startswith(".") and name != "__MACOSX"]
        files += [Path(top, name) for name in names if not name.startswith(".")]
    return sorted(files)


def read_market_style_folder(
    folder: Path, problems: list[str], extensions: Sequence[str] = (".jpg",), *, nested_read: bool = False
) -> list[ImageRecord]:
    """Every image in `folder` named `PID_cCAM*` as a record with raw pid (junk included; `make_dataset` drops
    it). Names that do not parse are listed in `problems` and skipped, so one stray file does not stop a run.
    Hidden files are not images (macOS's `._NAME.jpg` twins, .DS_Store): skipped, as torchreid's glob skips them.
    Sub-folders holding images are named in `problems` (not read) unless the caller reads them too
    (`nested_read`)."""
    # os.scandir: file type without a stat per file, which matters for MSMT17-size folders (126k images)
    try:
        with os.scandir(folder) as scanned:
            entries = [e for e in scanned if not e.name.startswith(".")]
    except PermissionError:
        raise DatasetError(f"cannot list {folder}: permission denied; make it readable (chmod -R u+rX)") from None
    suffixes = {e.name: os.path.splitext(e.name)[1].lower() for e in entries}
    names = sorted(e.name for e in entries if suffixes[e.name] in extensions and e.is_file())
    for entry in entries:
        if suffixes[entry.name] in extensions and entry.is_symlink() and not entry.is_file():
            problems.append(f"{folder / entry.name}: a link to a file that does not exist; re-link or remove it")
    for entry in entries if not nested_read else ():  # public layouts read a split flat, as released
        if entry.is_dir() and entry.name != "__MACOSX":
            nested = sum(path.suffix.lower() in extensions for path in walk_files(Path(entry.path)))
            if nested:
                problems.append(f"{folder / entry.name}: a folder of {nested} images inside a split, which this "
                                "layout does not read (images lie directly in the split folder, as released); move "
                                "them up or remove the folder")
    others = sorted(suffix for e in entries if (suffix := suffixes[e.name]) in _ANY_IMAGE_SUFFIXES
                    and suffix not in extensions and e.is_file())
    if others and not names:
        counts = ", ".join(f"{others.count(s)} {s}" for s in dict.fromkeys(others))
        problems.append(f"{folder}: no {'/'.join(extensions)} images but {counts} files; this layout reads "
                        f"{extensions[0]} images, as released: convert them")
    records = []
    for name in names:
        parsed = parse_market_name(name)
        if parsed is None:
            problems.append(f"{folder / name}: file name does not match PID_cCAM_*{extensions[0]}; rename or remove it")
            continue
        records.append(ImageRecord(os.path.join(folder, name), parsed[0], parsed[1]))
    return records


# ---------------------------------------------------------------------------------------------- folders
# What each dataset's folder looks like, to tell a user which layout they actually pointed at.
_LAYOUT_SIGNS: list[tuple[str, str, tuple[str, ...]]] = [
    ("Market-1501", "market1501", ("Market-1501-v15.09.15", "market1501")),
    ("DukeMTMC-reID", "dukemtmcreid", ("DukeMTMC-reID", "dukemtmc-reid")),
    ("MSMT17", "msmt17", ("MSMT17_V1", "MSMT17_V2", "msmt17", "mask_train_v2")),
    ("CUHK03", "cuhk03", ("cuhk03_release", "cuhk03", "cuhk03-np", "images_detected", "images_labeled",
                          "cuhk03_new_protocol_config_detected.mat")),
]
# Where each dataset's reader looks under --root: where to move it when it was found in another dataset's folder.
_LAYOUT_HOMES = {"market1501": "market1501/", "dukemtmcreid": "dukemtmc-reid/", "msmt17": "msmt17/",
                 "cuhk03": "cuhk03/"}


def layout_hint(folder: Path, expected: str, data_root: Path | None = None) -> str:
    """'; is this the X layout? then name it x' when `folder` (or its contents) looks like another dataset, or
    '; it holds X, Y (named x, y)' when it is a parent of other datasets; '' when nothing is recognised. Names,
    not flags: the dataset came from -d, -s or -t. With `data_root`, `folder` is the `expected` dataset's own
    folder under it: another dataset found there is to be moved where its own reader looks, not only named."""
    names = {folder.name}
    if folder.is_dir():
        names |= {child.name for child in folder.iterdir()}
    matches = [(title, dataset) for title, dataset, signs in _LAYOUT_SIGNS
               if dataset != expected and names & set(signs)]
    matches += [(name, name) for name in sorted(names) if name.startswith("synth_") and name != expected]
    if expected != "custom" and {"train", "query", "gallery"} <= names:
        matches.append(("custom (train/, query/, gallery/)", "custom"))
    if not matches and "list_train.txt" in names and expected != "msmt17":
        matches.append(("MSMT17 (list_train.txt)", "msmt17"))
    if not matches and "bounding_box_train" in names and expected in ("msmt17", "cuhk03", "custom"):
        matches.append(("Market-1501 (bounding_box_train/)", "market1501, dukemtmcreid or a synth_ name"))
    if len(matches) == 1 and data_root is not None and matches[0][1] in _LAYOUT_HOMES:
        title, name = matches[0]
        return (f"; it holds the {title} layout, which -d {name} reads under {data_root / _LAYOUT_HOMES[name]}: "
                "move it there")
    if len(matches) == 1:
        return f"; is this the {matches[0][0]} layout? then name it {matches[0][1]}"
    if matches:
        return f"; it holds {', '.join(t for t, _ in matches)} (named {', '.join(d for _, d in matches)})"
    return ""


def find_dataset_folder(root: Path, candidates: Sequence[Path], marker: str, dataset: str, expected: str) -> Path:
    """The first candidate folder holding `marker` (e.g. `bounding_box_train`). Otherwise one line that says
    where it was looked for (`expected`, e.g. "ROOT/market1501/[Market-1501-v15.09.15/]bounding_box_train/"),
    with a hint when the folder holds another dataset's layout."""
    for candidate in candidates:
        if (candidate / marker).exists():
            return candidate
    existing = next((c for c in candidates if c.is_dir()), None)
    if existing is None:
        hint = layout_hint(root, dataset)
    else:  # the dataset's own folder (--root itself when it carries the dataset's name)
        hint = layout_hint(existing, dataset, data_root=root.parent if existing == root else root)
    misplaced = None if hint else _misplaced_marker(root, candidates, marker, dataset)
    if misplaced is not None:
        raise DatasetError(
            f"{misplaced} is not where the {dataset} layout has it ({expected}); move the contents of "
            f"{misplaced.parent}/ there"
        )
    if existing is not None:
        raise DatasetError(f"expected {marker} under {existing}{hint}; the {dataset} layout is {expected}")
    raise DatasetError(
        f"no {dataset} data under {root}: expected {expected}{hint}; --root is the parent folder of the datasets"
    )


def _misplaced_marker(root: Path, candidates: Sequence[Path], marker: str, dataset: str) -> Path | None:
    """`marker` one folder off the layout, in or next to where it was looked for: a zip extracted twice
    (`Market-1501-v15.09.15/Market-1501-v15.09.15/`), a renamed folder (`ROOT/Market-1501/`), the files of a version
    folder extracted without it (`ROOT/msmt17/list_train.txt`). Folders named as another dataset's are left out."""
    others = {sign for _, name, signs in _LAYOUT_SIGNS if name != dataset for sign in signs}
    others |= {name for name in _READERS if name != dataset}
    places = [c for c in candidates if c.is_dir()]
    places += [c.parent for c in candidates if c.parent != c and c.parent.is_relative_to(root) and c.parent.is_dir()]
    for place in dict.fromkeys(places):
        if (place / marker).exists() and place not in candidates:
            return place / marker
        try:
            children = sorted(entry.path for entry in os.scandir(place) if entry.is_dir() and not
                              entry.name.startswith(".") and entry.name not in others
                              and not entry.name.startswith("synth_"))
        except OSError:
            continue
        for child in children:
            if Path(child) not in candidates and (Path(child) / marker).exists():
                return Path(child) / marker
    return None


def require_split_folder(folder: Path, fix: str) -> Path:
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "is missing"
        raise DatasetError(f"split folder {folder}/ {what}; {fix}")
    return folder
