"""`kdreid data check`: parse a dataset, count ids/images/cameras per split as torchreid counts them, and list
every problem found (not just the first): unreadable or truncated images, names that do not parse, empty
splits, queries that evaluation could not score, tracklets that cross cameras."""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict

from kdreid.data.datasets.base import SPLITS, ReidDataset, build_dataset
from kdreid.data.images import find_unreadable_images
from kdreid.errors import DatasetError

_SHOWN_PROBLEMS = 50  # the table lists this many; --json lists all
_CUHK03_FLAGS = ("--cuhk03-labeled", "--cuhk03-classic-split", "--split-id")


def dataset_statistics(dataset: ReidDataset) -> dict[str, dict[str, int]]:
    """{"train"|"query"|"gallery": {"ids", "images", "cameras"}}. Junk is already dropped by the readers;
    the distractor pid 0 counts as one identity in the gallery, as torchreid counts it."""
    return {
        split: {
            "ids": len({r.pid for r in records}),
            "images": len(records),
            "cameras": len({r.camid for r in records}),
        }
        for split in SPLITS
        for records in [dataset.split(split)]
    }


def queries_without_cross_camera_match(dataset: ReidDataset) -> int:
    """How many queries have no gallery image of their identity from another camera. The market protocol drops
    same-pid same-camera gallery items, so these queries score nothing and evaluation skips them."""
    gallery_cameras: dict[int, set[int]] = defaultdict(set)
    for record in dataset.gallery:
        gallery_cameras[record.pid].add(record.camid)
    return sum(1 for q in dataset.query if not gallery_cameras.get(q.pid, set()) - {q.camid})


def tracklets_across_cameras(records) -> list[int]:
    """The tracklet ids (sorted) that more than one camera saw: each is a cross-camera identity label, which the
    unsupervised stages must never read (DESIGN §3)."""
    cameras: dict[int, set[int]] = defaultdict(set)
    for record in records:
        if record.tracklet >= 0:
            cameras[record.tracklet].add(record.camid)
    return sorted(t for t, cams in cameras.items() if len(cams) > 1)


def tracklet_problems(dataset: ReidDataset) -> list[str]:
    """Train tracklets must show one person in one camera (DESIGN §3); a tracklet id reused across cameras or
    people would leak cross-camera identity into the unsupervised stages."""
    people: dict[int, set[int]] = defaultdict(set)
    for record in dataset.train:
        people[record.tracklet].add(record.pid)
    problems = []
    crossing = tracklets_across_cameras(dataset.train)
    mixed = sorted(t for t, pids in people.items() if len(pids) > 1)
    if crossing:
        problems.append(
            f"{dataset.root}: {len(crossing)} train tracklets span several cameras (e.g. tracklet {crossing[0]}); "
            "tracklet ids must be unique in the dataset and stay within one camera"
        )
    if mixed:
        problems.append(
            f"{dataset.root}: {len(mixed)} train tracklets hold several identities (e.g. tracklet {mixed[0]}); "
            "tracklet ids must be unique in the dataset, not numbered per identity"
        )
    return problems


def find_problems(dataset: ReidDataset, verify: bool = True, workers: int | None = None) -> list[str]:
    """Every problem, one line each naming the path and the fix: parse problems of the reader, empty splits,
    no scorable query, tracklets crossing cameras, and missing (or, with `verify`, undecodable) images."""
    problems = list(dataset.problems)
    for split in SPLITS:
        if not dataset.split(split) and not (split != "train" and is_unlabelled_target(dataset)):
            problems.append(f"{dataset.root}: the {split} split of {dataset.name} has no images; check the layout")
    if dataset.query and dataset.gallery and queries_without_cross_camera_match(dataset) == len(dataset.query):
        problems.append(
            f"{dataset.root}: no query has a gallery image of its identity from another camera (every query shares "
            "its camera with all of its gallery matches), so evaluation would score nothing; add gallery images of "
            "the query identities from other cameras, or check the camera ids"
        )
    problems += tracklet_problems(dataset)
    # each file once: in the classic CUHK03 protocol query and gallery are the same images
    paths = list(dict.fromkeys(r.path for split in SPLITS for r in dataset.split(split)))
    if verify:
        unreadable = find_unreadable_images(paths, workers)
    else:
        unreadable = [(path, "file is missing") for path in paths if not os.path.isfile(path)]
    problems += [f"{path}: {reason}; re-extract the dataset or remove the file" for path, reason in unreadable]
    return problems


def parse_problems_note(dataset: ReidDataset) -> str | None:
    """One line for the commands that train on or evaluate `dataset` when its reader left files or manifest rows out
    (names that do not parse, links to nothing, images of a format the layout does not read...): they go on
    without them, but not silently. None when nothing was left out."""
    if not dataset.problems:
        return None
    count = len(dataset.problems)
    return (f"{dataset.name}: {count} file{'s' if count > 1 else ''} or row{'s' if count > 1 else ''} left out while "
            f"reading it (e.g. {dataset.problems[0]}); `kdreid data check -d {dataset.name}` lists "
            f"{'them' if count > 1 else 'it'}")


def is_unlabelled_target(dataset: ReidDataset) -> bool:
    """One's own cameras with training images only (tracker crops): a target to adapt to, with nothing to evaluate,
    which the custom formats allow (docs/datasets.md); the released layouts always have a query and a gallery."""
    return dataset.name.startswith("custom") and bool(dataset.train) and not dataset.query and not dataset.gallery


def format_report(dataset: ReidDataset, statistics: dict, problems: list[str], verified: bool) -> str:
    lines = [f"{dataset.name}: {dataset.root}", f"  {'split':<8}{'ids':>8}{'images':>10}{'cameras':>9}"]
    for split in SPLITS:
        row = statistics[split]
        lines.append(f"  {split:<8}{row['ids']:>8,}{row['images']:>10,}{row['cameras']:>9,}")
    lines.append(f"  train tracklets: {dataset.num_train_tracklets:,}")
    if is_unlabelled_target(dataset):
        lines.append("  note: no query or gallery: an unlabelled target (adapt and distill train on it, nothing "
                     "evaluates it)")
    unmatched = queries_without_cross_camera_match(dataset)
    if 0 < unmatched < len(dataset.query):
        lines.append(
            f"  note: {unmatched:,} of {len(dataset.query):,} queries have no cross-camera match; evaluation skips them"
        )
    images = len({r.path for split in SPLITS for r in dataset.split(split)})
    checked = f"{images:,} images decoded" if verified else f"{images:,} images listed (not decoded: --no-verify)"
    if not problems:
        lines.append(f"{checked}; no problems found")
    else:
        lines.append(f"{checked}; {len(problems):,} problem{'s' if len(problems) > 1 else ''}:")
        lines += [f"  - {problem}" for problem in problems[:_SHOWN_PROBLEMS]]
        if len(problems) > _SHOWN_PROBLEMS:
            lines.append(f"  ... and {len(problems) - _SHOWN_PROBLEMS:,} more (--json lists them all)")
    return "\n".join(lines)


def dataset_from_args(args) -> ReidDataset:
    """The dataset a `kdreid data` command names (`--root`, `-d` and the CUHK03 flags, which only -d cuhk03 takes)."""
    options = {}
    if args.dataset == "cuhk03":
        options = dict(labeled=args.cuhk03_labeled, classic_split=args.cuhk03_classic_split, split_id=args.split_id)
    elif args.cuhk03_labeled or args.cuhk03_classic_split or args.split_id != 0:
        raise DatasetError(f"{', '.join(_CUHK03_FLAGS)} apply only to -d cuhk03, not to -d {args.dataset}")
    return build_dataset(args.dataset, args.root, **options)


def check_command(args) -> int:
    """`kdreid data check`: 0 without problems, 1 with problems; a usage error raises DatasetError (exit 2)."""
    dataset = dataset_from_args(args)
    statistics = dataset_statistics(dataset)
    verify = not args.no_verify
    if verify and not args.json:
        print(f"decoding every image of {dataset.name} (skip with --no-verify) ...", file=sys.stderr, flush=True)
    problems = find_problems(dataset, verify=verify)
    if args.json:
        print(json.dumps({**statistics, "problems": problems}, indent=2))
    else:
        print(format_report(dataset, statistics, problems, verified=verify))
    return 1 if problems else 0
