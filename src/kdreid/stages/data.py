"""Training data for the stages: datasets combined and relabelled, a held-out source validation split, the
uint8 image cache and P×K batches drawn from it onto the training device."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from kdreid import distributed
from kdreid.data.augment import AugmentConfig, augment_batch
from kdreid.data.cache import decode_images
from kdreid.data.datasets.base import ImageRecord, ReidDataset, build_dataset
from kdreid.data.samplers import PKSampler
from kdreid.errors import DatasetError
from kdreid.evaluation.features import free_memory
from kdreid.stages.speed import host_to_device


def load_datasets(names: Sequence[str], root: str, options: dict | None = None) -> list[ReidDataset]:
    return [build_dataset(name, root, **(options or {}).get(name, {})) for name in names]


# A stage records the content of the datasets it read here (RUN/datasets.json), so that `kdreid pipeline` does not
# reuse a stage trained on data that were since regenerated or re-extracted under the same names.
DATASETS_FILE = "datasets.json"


def dataset_fingerprint(dataset: ReidDataset, root: str) -> str:
    """A dataset's content, without reading its images: SHA-256 over every split's image paths (relative to
    `root`, so a moved or copied data folder keeps it), labels and file sizes. Regenerated or re-extracted
    images change it (JPEG sizes follow the pixels); the same files elsewhere do not.

    `WHOLE/TRAIN`: the digest of every split, and the one of the training split alone, so that a stage whose
    query or gallery changed (an undecodable image replaced) is evaluated again rather than trained again."""
    whole, train = hashlib.sha256(), hashlib.sha256()
    for split in ("train", "query", "gallery"):
        for line in _record_lines(dataset, root, split):
            whole.update(line)
            if split == "train":
                train.update(line)
    return f"{whole.hexdigest()[:16]}/{train.hexdigest()[:16]}"


def evaluation_fingerprint(dataset: ReidDataset, root: str) -> str:
    """What an evaluation of `dataset` measured on, as `dataset_fingerprint` sees it: its query and gallery alone."""
    digest = hashlib.sha256()
    for split in ("query", "gallery"):
        for line in _record_lines(dataset, root, split):
            digest.update(line)
    return digest.hexdigest()[:16]


def _record_lines(dataset: ReidDataset, root: str, split: str) -> Iterator[bytes]:
    """One line per image of `split`: its path relative to `root`, labels and file size."""
    root = str(Path(root).expanduser().absolute())  # as build_dataset made the records' paths
    for record in getattr(dataset, split):
        try:
            size = os.stat(record.path).st_size
        except FileNotFoundError:  # a list file or manifest names an image that is not there
            raise DatasetError(f"image {record.path} ({dataset.name}, {split}) does not exist; restore it or take "
                               f"it out of the dataset's list (`kdreid data check -d {dataset.name}` lists every "
                               "missing file)") from None
        yield (f"{split}\t{os.path.relpath(record.path, root)}\t{record.pid}\t{record.camid}\t{record.tracklet}"
               f"\t{size}\n").encode("utf-8", "surrogateescape")  # names need not be UTF-8


def fingerprint_change(recorded: str, now: str, trains_on_all: bool = False) -> str | None:
    """How a dataset changed between two `dataset_fingerprint`s: None (not), "train" (what a model trained on: it
    is out of date) or "evaluation" (only its query or gallery: its numbers are). A run of an earlier kdreid
    recorded the whole digest only, and `trains_on_all` (a source under --combineall) trains on every split: any
    change then counts as "train"."""
    recorded_whole, _, recorded_train = recorded.partition("/")
    now_whole, _, now_train = now.partition("/")
    if recorded_whole == now_whole:
        return None
    return "evaluation" if recorded_train and recorded_train == now_train and not trains_on_all else "train"


def read_datasets_record(path: Path) -> dict[str, str] | None:
    """A run's DATASETS_FILE, {dataset: fingerprint}: empty when absent (a run from before it), None when damaged
    (which data the run trained on is then unknown)."""
    try:
        recorded = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


def combine_train(datasets: Sequence[ReidDataset], combineall: bool = False) -> list[ImageRecord]:
    """The training records of several datasets as one label space: pids and tracklets of each dataset are
    offset past the previous ones (as torchreid combines sources). With `combineall`, query and gallery
    identities (distractors excluded) join the training set under new labels."""
    combined: list[ImageRecord] = []
    pid_offset = tracklet_offset = 0
    for dataset in datasets:
        records = list(dataset.train)
        if combineall:
            records += _test_as_train(dataset, start_pid=dataset.num_train_pids, start_tracklet=1 + max(
                (r.tracklet for r in dataset.train), default=-1))
        combined += [
            ImageRecord(r.path, r.pid + pid_offset, r.camid, r.tracklet + tracklet_offset) for r in records
        ]
        pid_offset = 1 + max((r.pid for r in combined), default=-1)
        tracklet_offset = 1 + max((r.tracklet for r in combined), default=-1)
    if not combined:
        names = "+".join(dataset.name for dataset in datasets)
        first = next((problem for dataset in datasets for problem in dataset.problems), None)
        raise DatasetError(f"{names} has no training images; check the layout with: kdreid data check -d {names}"
                           + (f" (first problem: {first})" if first else ""))
    return combined


def _test_as_train(dataset: ReidDataset, start_pid: int, start_tracklet: int) -> list[ImageRecord]:
    # Market-style galleries use pid 0 for distractors (many different people), which must not become one
    # identity; in MSMT17 pid 0 is a real person. Classic CUHK03 repeats images across query and gallery.
    distractors = dataset.name != "msmt17"
    unique = {r.path: r for r in dataset.query + dataset.gallery if not (distractors and r.pid == 0)}
    records = [unique[path] for path in sorted(unique)]
    pids = {pid: start_pid + i for i, pid in enumerate(sorted({r.pid for r in records}))}
    tracklets = {key: start_tracklet + i for i, key in enumerate(sorted({(r.pid, r.camid) for r in records}))}
    return [ImageRecord(r.path, pids[r.pid], r.camid, tracklets[(r.pid, r.camid)]) for r in records]


@dataclass
class ValidationSplit:
    train: list[ImageRecord]
    query: list[ImageRecord]
    gallery: list[ImageRecord]


def hold_out_validation(records: Sequence[ImageRecord], fraction: float, seed: int) -> ValidationSplit:
    """Hold out `fraction` of the training identities (those seen by ≥ 2 cameras) as a validation
    query/gallery: one query per (identity, camera), the rest in the gallery, Market-style. The kept identities
    are relabelled 0..N-1. Used for checkpoint selection without touching any target test label."""
    cameras: dict[int, set[int]] = {}
    for r in records:
        cameras.setdefault(r.pid, set()).add(r.camid)
    eligible = sorted(pid for pid, cams in cameras.items() if len(cams) >= 2)
    count = int(round(fraction * len(cameras)))
    if count < 2 or count > len(eligible):
        raise DatasetError(
            f"cannot hold out {fraction:.0%} of {len(cameras)} source identities for validation "
            f"({len(eligible)} are seen by two cameras); change train.source_val_ids in a --config file or use "
            "--select last"
        )
    rng = np.random.default_rng([seed, 0x56414C])  # 'VAL'
    held = set(rng.choice(eligible, size=count, replace=False).tolist())
    kept = [r for r in records if r.pid not in held]
    pid_map = {pid: i for i, pid in enumerate(sorted({r.pid for r in kept}))}
    train = [ImageRecord(r.path, pid_map[r.pid], r.camid, r.tracklet) for r in kept]
    query, gallery, seen = [], [], set()
    for index in rng.permutation(len(records)):
        r = records[int(index)]
        if r.pid not in held:
            continue
        # Validation ids are shifted by one so that none is 0, the distractor id of the market protocol.
        shown = ImageRecord(r.path, r.pid + 1, r.camid, r.tracklet)
        if (r.pid, r.camid) in seen:
            gallery.append(shown)
        else:
            seen.add((r.pid, r.camid))
            query.append(shown)
    return ValidationSplit(train, sorted(query, key=lambda r: r.path), sorted(gallery, key=lambda r: r.path))


# The share of a GPU's free memory the image cache may take: the rest is for the model's activations, the optimiser
# and the other domains' caches (decoded after this one). A larger cache stays in RAM.
DEVICE_CACHE_SHARE = 0.5


def _gigabytes(count: float) -> str:
    return f"{count / 1e9:.2f} GB" if count >= 1e8 else f"{count / 1e6:.1f} MB"


def check_room_for_cache(count: int, height: int, width: int) -> None:
    """One line before decoding when the uint8 cache of `count` images cannot fit in RAM: the allocator's traceback
    otherwise, or the kernel's OOM killer halfway through the decoding."""
    # Under torchrun every process of the machine decodes its own copy, all at once (each checks before the others
    # have taken anything): the room is for all of them, else the checks pass and the copies meet the OOM killer.
    processes = distributed.local_world_size()
    needed = count * 3 * height * width * processes
    free = free_memory(torch.device("cpu"))
    if free is not None and needed > free:
        copies = f", one copy in each of {processes} processes" if processes > 1 else ""
        raise DatasetError(
            f"the training image cache needs {_gigabytes(needed)} ({count} images at {height}x{width}, uint8"
            f"{copies}) but the host has {_gigabytes(free)} available; train at a smaller --height/--width or on "
            f"fewer images{' or processes' if processes > 1 else ''}")


def cache_device(nbytes: int, device: torch.device) -> torch.device:
    """Where a cache of `nbytes` lives: on a CUDA `device` when it fits in DEVICE_CACHE_SHARE of its free memory, in
    RAM otherwise (and always on a CPU)."""
    if device.type != "cuda":
        return torch.device("cpu")
    free = free_memory(device)
    return device if free is None or nbytes <= DEVICE_CACHE_SHARE * free else torch.device("cpu")


class BatchSource:
    """P×K batches of one domain: a sampler over group labels, the decoded images, augmentation on `device`.

    `labels` are the groups batches are formed by (identities on a source, tracklets or pseudo-labels on a
    target); `next_batch(generator)` returns (images float (B, 3, H, W) in [0, 1], labels (B,)) on `device`.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        labels: Sequence[int],
        *,
        height: int,
        width: int,
        batch_size: int,
        num_instances: int,
        augment: AugmentConfig,
        device: torch.device,
        seed: int,
        what: str = "identities",
        images: torch.Tensor | None = None,
        log=None,
    ):
        self.records = list(records)
        self.augment = augment
        self.device = device
        if images is None:
            check_room_for_cache(len(self.records), height, width)
            images = decode_images([r.path for r in self.records], height, width, progress=True)
        self.images = images
        where = "RAM"
        if device.type == "cuda" and images.device.type != "cuda":
            # Decode once, then every batch is an on-device gather, when the cache fits beside the training.
            if cache_device(images.numel(), device).type == "cuda":
                self.images, where = images.to(device), f"{device} memory"
            else:
                where = (f"RAM: more than {DEVICE_CACHE_SHARE:.0%} of the {_gigabytes(free_memory(device) or 0)} "
                         f"{device} has free (each batch is gathered on the host and copied over)")
        elif images.device.type == "cuda":
            where = f"{images.device} memory"
        if log is not None:
            log.info(f"image cache: {len(self.records)} images at {height}x{width}, {_gigabytes(images.numel())} "
                     f"in {where}")
        self.set_labels(labels, batch_size=batch_size, num_instances=num_instances, seed=seed, what=what)
        self._iterator: Iterator[list[int]] | None = None
        self._drawn = 0
        self.last_index: torch.Tensor | None = None  # the last batch's positions in `records`, on `device`

    def set_labels(self, labels: Sequence[int], *, batch_size: int, num_instances: int, seed: int, what: str) -> None:
        """(Re)group the images, e.g. after pseudo-labels are refreshed. Label -1 (outliers) is left out."""
        labels = np.asarray(labels, dtype=np.int64)
        self.kept = np.flatnonzero(labels >= 0)
        self.labels = torch.as_tensor(labels)
        self._device_labels = self.labels.to(self.device)  # once per grouping, not per batch
        # Under torchrun each process draws its share (whole groups) of every global P×K batch.
        self.sampler = PKSampler(labels[self.kept], batch_size, num_instances, seed=seed, what=what,
                                 rank=distributed.rank(), world_size=distributed.world_size())
        self._grouping = {"batch_size": batch_size, "num_instances": num_instances, "seed": seed, "what": what}

    def __len__(self) -> int:
        return len(self.sampler)

    def start_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self._iterator = iter(self.sampler)
        self._drawn = 0  # batches taken from this iterator: with the sampler's epoch, the position to resume at

    def state_dict(self) -> dict:
        """Where sampling stands inside an epoch (for a checkpoint written mid-epoch): the group labels (they
        change with pseudo-labels), the sampler's epoch and the batches already drawn from it."""
        started = self._iterator is not None
        return {"labels": self.labels.clone(), "epoch": self.sampler.epoch if started else -1,
                "drawn": self._drawn if started else 0}

    def load_state_dict(self, state: dict) -> None:
        if not torch.equal(state["labels"], self.labels):
            self.set_labels(state["labels"].tolist(), **self._grouping)
        if state["epoch"] < 0:
            self._iterator = None
            return
        # The sampler's batches are a function of (seed, epoch): rebuild the epoch's and skip those already used.
        self.start_epoch(state["epoch"])
        for _ in range(state["drawn"]):
            next(self._iterator)
        self._drawn = state["drawn"]

    def next_batch(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            positions = next(self._iterator)
        except StopIteration:  # a shorter domain paired with a longer one wraps around within the epoch
            self.sampler.set_epoch(self.sampler.epoch + 10_000)
            self._iterator = iter(self.sampler)
            self._drawn = 0
            positions = next(self._iterator)
        self._drawn += 1
        # The batch's one host-to-device copy: its positions in `records` (also kept for per-image fields).
        positions = torch.as_tensor(self.kept[positions])
        index = host_to_device(positions, self.device)
        self.last_index = index
        if self.images.device.type == self.device.type:
            images = self.images[index]  # the cache lives on `device`
        else:  # a cache too large for the GPU: gathered in RAM, the batch copied over
            images = host_to_device(self.images[positions], self.device)
        labels = self._device_labels[index]
        # channels_last on CUDA, the layout the training loop gives the model there.
        layout = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
        return augment_batch(images, self.augment, generator, memory_format=layout), labels
