"""Feature extraction and the evaluation of a model on a dataset's query and gallery.

Models take RGB float images in [0, 1], N x 3 x H x W, and normalise inside (DESIGN §4), so extraction only
decodes, resizes and batches. Batches run without gradients, in bf16 autocast on CUDA, optionally averaging the
embeddings of each image and its horizontal mirror (`flip`).

    extractor = FeatureExtractor("runs/kd/model.pt")          # a kdreid checkpoint, or a model
    features = extractor(["a.jpg", "b.jpg"])                  # (2, D) float32 on the CPU
    result = evaluate_model(model, build_dataset("market1501", "data"), flip=True)
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from kdreid import distributed
from kdreid.errors import CheckpointError, EvaluationError, KdreidError, why_not_a_file
from kdreid.evaluation.distance import compute_distance_matrix
from kdreid.evaluation.ranking import METRIC_COLUMNS, RankResult, evaluate, ranking_memory
from kdreid.evaluation.rerank import re_ranking_features, re_ranking_memory

log = logging.getLogger(__name__)

DEFAULT_SIZE = (256, 128)  # (height, width): the re-ID convention, and what kdreid trains at by default


@dataclass
class Features:
    """Embeddings of a list of images with their labels: features (N, D) float32 on the CPU."""

    features: torch.Tensor
    pids: np.ndarray
    camids: np.ndarray
    paths: list[str]

    def __len__(self) -> int:
        return len(self.paths)


# ------------------------------------------------------------------------------------------------ models
def load_model(path: str | Path, arch: str | None = None, last_stride: int | None = None) -> nn.Module:
    """A model in eval mode on the CPU from a kdreid checkpoint, or from another toolkit's plain state dict when
    `arch` names its architecture: built with the embedding layer the file holds, if any (SpCL's and OpenUnReID's
    `feat`), and with `last_stride` (default 1; 2 for torchreid's ResNets, which a stride-1 model embeds
    differently). A kdreid checkpoint records its own stride: another `last_stride` is refused."""
    from kdreid.models import build_model, load_checkpoint
    from kdreid.models.weights import CHECKPOINT_FORMAT, embedding_dim_of, read_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file {path} {why_not_a_file(path)}; pass the model.pt a kdreid run wrote")
    content = read_file(path)
    if isinstance(content, dict) and content.get("format") == CHECKPOINT_FORMAT:
        model = load_checkpoint(path, arch=arch)
        recorded = getattr(model, "last_stride", 1)
        if last_stride is not None and last_stride != recorded:
            raise CheckpointError(f"{path} is a kdreid checkpoint of last stride {recorded}, not {last_stride}: "
                                  "leave --last-stride out (it is for plain state dicts with -a)")
        return model
    if arch is None:
        raise CheckpointError(f"{path} is a plain state dict with no architecture recorded; name it with -a ARCH "
                              "(e.g. -a resnet50 or -a osnet_x0_25)")
    model = build_model(arch, num_classes=0, pretrained=str(path), embedding_dim=embedding_dim_of(path),
                        last_stride=1 if last_stride is None else last_stride)
    return model.eval()


def note_loaded_weights(model: nn.Module, say=None, what: str = "") -> None:
    """Say what a weights file gave `model` (tensors loaded, missing, discarded: its `load_report`), so that a head
    left untrained or a file of another toolkit's layout shows: with `say` (a run log's info), as `what: …`; else
    one stderr line (a command given a plain state dict with -a ARCH)."""
    report = getattr(model, "load_report", None)
    if report is None:
        return
    if say is not None:
        say(f"{what}: {report.summary()}")
    else:
        print(f"kdreid: {report.summary()}", file=sys.stderr)


def model_input_size(model: nn.Module) -> tuple[int, int]:
    """(height, width) the model was trained at, when its checkpoint records it; else 256 x 128."""
    meta = getattr(model, "kdreid_meta", None) or {}
    found = _find_size(meta.get("extra")) or _find_size(meta.get("config"))
    return found or DEFAULT_SIZE


def _find_size(tree: Any) -> tuple[int, int] | None:
    """The first {height, width} pair (or `input_size: [h, w]`) in nested config dicts."""
    if not isinstance(tree, dict):
        return None
    if isinstance(tree.get("height"), int) and isinstance(tree.get("width"), int):
        return tree["height"], tree["width"]
    size = tree.get("input_size")
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) for v in size):
        return int(size[0]), int(size[1])
    for value in tree.values():
        if (found := _find_size(value)) is not None:
            return found
    return None


def pick_device(name: str | torch.device | None = None) -> torch.device:
    """`--device` as a torch.device: None or "auto" is CUDA when a GPU is visible, else the CPU. A name torch does
    not know, or CUDA without a GPU, is one line (not a RuntimeError from the first tensor moved there)."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise KdreidError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):  # mps, meta, xpu...: kdreid is built and tested for these two
        raise KdreidError(f"--device {name}: kdreid runs on the CPU or CUDA; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KdreidError(f"--device {name} asked for CUDA, but no GPU is visible; use --device cpu")
    return device


# ------------------------------------------------------------------------------------------------ extraction
@torch.no_grad()
def embed_batch(model: nn.Module, images: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """(N, D) float32 embeddings of float images (N, 3, H, W) in [0, 1] already on the model's device."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=images.is_cuda)
    with autocast:
        features = model(images).float()
        if flip:
            # The mean of the image's and its mirror's embedding: people are left-right symmetric, the model
            # is not quite, and averaging removes part of that noise (a common re-ID test-time augmentation).
            features = (features + model(images.flip(3)).float()) / 2
    return features


def _records_fields(records) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Paths, pids, camids of records; plain paths get pid and camid -1 (unknown)."""
    paths = [str(r) if isinstance(r, (str, Path)) else str(r.path) for r in records]
    pids = np.array([getattr(r, "pid", -1) for r in records], dtype=np.int64)
    camids = np.array([getattr(r, "camid", -1) for r in records], dtype=np.int64)
    return paths, pids, camids


def extract_features(
    model: nn.Module,
    records: Sequence,
    *,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 128,
    flip: bool = False,
    device: str | torch.device | None = None,
    workers: int = 2,
    progress: bool = False,
) -> Features:
    """Embed every image of `records` (ImageRecord-like: .path .pid .camid; or plain paths), in order.

    Images are decoded by `workers` threads one batch ahead of the model, resized to height x width (default:
    the size the checkpoint records, else 256 x 128). The model is put in eval mode and on `device`.

    In a distributed run (torchrun) each process embeds its share of the images and every process gets all
    features back, so every process must call this together.
    """
    from kdreid.data.cache import read_image

    paths, pids, camids = _records_fields(records)
    if not paths:
        return Features(torch.zeros(0, 0), pids, camids, paths)
    device = pick_device(device)
    default_h, default_w = model_input_size(model)
    height, width = height or default_h, width or default_w
    model = model.eval().to(device)
    mine = distributed.shard(len(paths))  # all of them unless several processes share the work
    batches = [paths[i:min(i + batch_size, mine.stop)] for i in range(mine.start, mine.stop, batch_size)]

    def decode(batch: list[str]) -> torch.Tensor:  # (B, 3, H, W) uint8, pinned when it goes to a GPU
        images = torch.from_numpy(np.stack([read_image(p, height, width) for p in batch])).permute(0, 3, 1, 2)
        return images.pin_memory() if device.type == "cuda" else images

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), desc="extracting features", unit="img", leave=False, disable=None)
    outputs = []
    failure = None
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            pending = pool.submit(decode, batches[0]) if batches else None
            for index in range(len(batches)):
                images = pending.result()
                if index + 1 < len(batches):
                    pending = pool.submit(decode, batches[index + 1])
                images = images.to(device, non_blocking=True).float().div_(255)
                outputs.append(embed_batch(model, images, flip).cpu())
                if bar is not None:
                    bar.update(len(images))
    except KdreidError as error:  # an image of this process's share that does not decode
        if distributed.world_size() == 1:
            raise
        failure = error
    finally:
        if bar is not None:
            bar.close()
    # Several processes: each says whether its share failed, so that every process raises the same error here
    # together. Otherwise the others waited in the gathering below for the one that failed, and died in it with
    # gloo's "Connection closed by peer" traceback when it exited; and a training stage's main process, not the
    # one that failed, never wrote the checkpoint that the failed one's message told the user to --resume from.
    failed = [f for f in distributed.all_objects(failure) if f is not None]  # (one process: no collective)
    if failed:
        error = failure or failed[0]
        error.on_every_process = True  # the processes end together (distributed.cleanup)
        raise error
    # A process whose share is empty still takes part in the gathering.
    local = torch.cat(outputs) if outputs else torch.zeros(0, 0)
    return Features(distributed.gather_rows(local), pids, camids, paths)


class FeatureExtractor:
    """Embeddings for trackers and notebooks: `FeatureExtractor(model_or_path)(images) -> (N, D)` float32 CPU tensor.

    images: a list of image paths; a list of H x W x 3 uint8 RGB arrays (any size); an (N, H, W, 3) uint8 array;
    or a tensor (N, 3, H, W) / (3, H, W), uint8 or float in [0, 1]. Everything is resized to height x width
    (default: the checkpoint's training size, else 256 x 128).
    """

    def __init__(self, model_or_path: nn.Module | str | Path, *, arch: str | None = None, height: int | None = None,
                 width: int | None = None, batch_size: int = 64, flip: bool = False, normalize: bool = False,
                 device: str | torch.device | None = None):
        model = model_or_path if isinstance(model_or_path, nn.Module) else load_model(model_or_path, arch)
        self.device = pick_device(device)
        self.model = model.eval().to(self.device)
        default_h, default_w = model_input_size(model)
        self.height, self.width = height or default_h, width or default_w
        self.batch_size, self.flip, self.normalize = batch_size, flip, normalize

    def __call__(self, images) -> torch.Tensor:
        batch = self._as_float_batch(images)  # (N, 3, H, W) float in [0, 1], CPU
        outputs = [embed_batch(self.model, batch[i:i + self.batch_size].to(self.device), self.flip).cpu()
                   for i in range(0, len(batch), self.batch_size)]
        features = torch.cat(outputs) if outputs else torch.zeros(0, 0)
        return F.normalize(features, dim=1) if self.normalize and len(features) else features

    def _as_float_batch(self, images) -> torch.Tensor:
        size = (self.height, self.width)
        if isinstance(images, torch.Tensor):
            batch = images[None] if images.dim() == 3 else images
            if batch.dim() != 4 or batch.shape[1] != 3:
                raise EvaluationError(f"image tensors must be (N, 3, H, W) or (3, H, W), got {tuple(images.shape)}")
            batch = batch.detach().cpu()
            if batch.dtype == torch.uint8 and tuple(batch.shape[2:]) != size:
                # Decoded images (torchvision.io's layout): resized as files and arrays are, by PIL from uint8, so
                # a crop gives the embedding `kdreid extract` gave its file, not a float resize's (~1/255 apart).
                images = list(batch.permute(0, 2, 3, 1).contiguous().numpy())
                return self._as_float_batch(images)
            batch = batch.float() / 255 if batch.dtype == torch.uint8 else batch.float()
            if batch.numel():
                low, high = float(batch.min()), float(batch.max())
                # Slack for a caller's own resampling (bicubic overshoots [0, 1] a little); 0..255 values and
                # ImageNet-normalised ones (about -2.1..2.6) lie far outside.
                if low < -0.25 or high > 1.25:
                    hint = ("divide 0..255 values by 255" if low >= 0 else
                            "pass the images before ImageNet normalisation (the model normalises inside)")
                    raise EvaluationError(f"float image tensors must hold RGB values in [0, 1], got {low:.3g}.."
                                          f"{high:.3g}; {hint}, or pass a uint8 tensor")
            if tuple(batch.shape[2:]) != size:
                batch = F.interpolate(batch, size=size, mode="bilinear", align_corners=False, antialias=True)
            return batch
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        if isinstance(images, (str, Path)) or (isinstance(images, np.ndarray) and images.ndim == 3):
            images = [images]
        arrays = [self._as_array(item) for item in images]
        if not arrays:
            return torch.zeros(0, 3, *size)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255)

    def _as_array(self, item) -> np.ndarray:
        from kdreid.data.cache import read_image

        if isinstance(item, (str, Path)):
            return read_image(str(item), self.height, self.width)
        array = np.asarray(item)
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
            raise EvaluationError(f"image arrays must be H x W x 3 uint8 RGB, got shape {array.shape} dtype "
                                  f"{array.dtype}")
        if array.shape[:2] != (self.height, self.width):
            # The same resize as decoding from a file, so a path and its decoded array give the same embedding.
            array = np.asarray(Image.fromarray(array).resize((self.width, self.height), Image.BILINEAR))
        return array


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate_features(
    query: Features,
    gallery: Features,
    *,
    metric: str = "euclidean",
    normalize: bool = False,
    rerank: bool = False,
    protocol: str = "market",
    max_rank: int = 50,
    device: str | torch.device | None = None,
    verification: bool = False,
) -> RankResult:
    """Distances (optionally k-reciprocal re-ranked) and ranking metrics of query features against gallery ones;
    with `verification`, the result's `.verification` holds the positive/negative pairs' histograms of those
    distances (kdreid.evaluation.verification)."""
    if len(query) == 0:
        raise EvaluationError("empty query set: the dataset's query split holds no image")
    if len(gallery) == 0:
        raise EvaluationError("empty gallery: the dataset's gallery split holds no image")
    device = pick_device(device)
    check_room_for_evaluation(len(query), len(gallery), query.features.shape[1], device, metric=metric,
                              normalize=normalize, rerank=rerank, copied=query.features.device != device)
    query_features, gallery_features = query.features.to(device), gallery.features.to(device)
    if normalize:
        query_features, gallery_features = F.normalize(query_features, dim=1), F.normalize(gallery_features, dim=1)
    if rerank:
        distmat = re_ranking_features(query_features, gallery_features, metric=metric)
    else:
        distmat = compute_distance_matrix(query_features, gallery_features, metric=metric)
    result = evaluate(distmat, query.pids, gallery.pids, query.camids, gallery.camids, max_rank=max_rank,
                      protocol=protocol, device=device)
    if verification:
        from kdreid.evaluation.verification import verification_statistics

        result.verification = verification_statistics(distmat, query.pids, gallery.pids, query.camids, gallery.camids)
    return result


def free_memory(device: torch.device) -> int | None:
    """Bytes that a new tensor can take on `device` now: CUDA's free memory plus what PyTorch holds cached; on the
    CPU, the system's available memory within this process's cgroup limits (Linux). None when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open(_MEMINFO) as handle:
            available = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    room = _cgroup_room()
    return available if room is None else min(available, room)


# Where Linux shows a process's memory limits. A container's are at the mount's root; a batch job's (Slurm, a
# systemd unit) are on its own group and that group's parents, named in /proc/self/cgroup, while the root has none:
# read there too, and in cgroup v1's layout (still common on clusters), else a job over its limit meets the OOM
# killer instead of the one-line refusal.
_MEMINFO = Path("/proc/meminfo")
_CGROUP_ROOT = Path("/sys/fs/cgroup")
_SELF_CGROUP = Path("/proc/self/cgroup")
# (folder under the mount, limit file, usage file, memory.stat key of the reclaimable page cache) for v2 and v1
_CGROUP_LAYOUTS = (("", "memory.max", "memory.current", "inactive_file"),
                   ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"))


def _cgroup_room() -> int | None:
    """The least room left under the memory limits of this process's cgroup and its parents; None without one."""
    try:  # lines "0::/path" (v2) and "N:memory:/path" (v1)
        groups = [line.split(":", 2) for line in _SELF_CGROUP.read_text().splitlines()]
    except OSError:
        groups = []
    own = {"": next((g[2] for g in groups if len(g) == 3 and g[0] == "0" and not g[1]), "/"),
           "memory": next((g[2] for g in groups if len(g) == 3 and "memory" in g[1].split(",")), "/")}
    room = None
    for mount, limit_name, usage_name, inactive in _CGROUP_LAYOUTS:
        parts = Path(own[mount].strip() or "/").parts[1:]
        for depth in range(len(parts) + 1):  # the mount's root (a container's own), then down to the own group
            folder = _CGROUP_ROOT / mount / Path(*parts[:depth])
            try:
                limit = (folder / limit_name).read_text().strip()
                if limit == "max" or int(limit) >= 1 << 62:  # v1 writes "no limit" as a huge number
                    continue
                # The page cache of the images just read counts as used there, but the kernel drops it for a new
                # tensor: only the rest is taken (a false refusal would cost more than the traceback it replaces).
                stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
                used = int((folder / usage_name).read_text()) - int(stat.get(inactive, 0))
            except (OSError, ValueError):
                continue
            left = max(int(limit) - used, 0)
            room = left if room is None else min(room, left)
    return room


def evaluation_memory(num_queries: int, num_gallery: int, dim: int, device: torch.device, *,
                      metric: str = "euclidean", normalize: bool = False, rerank: bool = False,
                      copied: bool = False) -> int:
    """Bytes `evaluate_features` takes on `device` beyond the features it is given, at its peak: their copy when
    `copied` there (to a GPU) and when normalised, the (Q, G) float32 distance matrix, and the largest of its passes'
    temporaries (the cosine distance's normalised copy or re-ranking's work, then the ranking chunks). Live tensors
    only: glibc's heap may keep some of what was freed on top (bench/evaluation_memory.py measures both)."""
    features = 4 * (num_queries + num_gallery) * dim
    if rerank:
        passes = re_ranking_memory(num_queries, num_gallery, dim)
    else:
        passes = features if metric == "cosine" else 0
    passes = max(passes, ranking_memory(num_queries, num_gallery, device))
    held = features * (int(copied) + int(normalize))
    return 4 * num_queries * num_gallery + held + passes + _EVALUATION_SLACK


_EVALUATION_SLACK = 64 << 20  # code pages and small buffers that first use brings in (10-40 MB measured)


def check_room_for_evaluation(num_queries: int, num_gallery: int, dim: int, device: torch.device, *,
                              task: str = "", fix: str = "", **options) -> None:
    """One line, before any work, when what an evaluation holds (`evaluation_memory`, `options` its keywords)
    cannot fit in the memory `device` has free: the allocator's traceback (or the kernel's OOM killer) otherwise.
    `task` and `fix` name it and the way out in that line when it is not an evaluation (a re-ranked search)."""
    needed = evaluation_memory(num_queries, num_gallery, dim, device, **options)
    free = free_memory(device)
    if free is None or needed <= free:
        return
    gigabytes = lambda count: f"{count / 1e9:.1f} GB"  # noqa: E731
    hint = fix or ("evaluate on the CPU (--device cpu) if the host has that room" if device.type == "cuda"
                   else "evaluate on a machine with more memory")
    what = task or ("the evaluation with re-ranking" if options.get("rerank") else "the evaluation")
    raise EvaluationError(
        f"{num_queries} queries x {num_gallery} gallery images: {what} needs {gigabytes(needed)} (the query-gallery "
        f"distance matrix alone {gigabytes(4 * num_queries * num_gallery)}), but {device} has {gigabytes(free)} "
        f"free; {hint}")


def evaluate_model(
    model: nn.Module,
    dataset,
    *,
    metric: str = "euclidean",
    normalize: bool = False,
    rerank: bool = False,
    flip: bool = False,
    protocol: str = "market",
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    workers: int = 2,
    progress: bool = False,
) -> RankResult:
    """Extract query and gallery features of `dataset` (.query, .gallery lists of records) and rank them."""
    if not dataset.query:
        raise EvaluationError(f"empty query set: dataset {getattr(dataset, 'name', '?')} has no query image")
    options = dict(height=height, width=width, batch_size=batch_size, flip=flip, device=device, workers=workers,
                   progress=progress)
    query = extract_features(model, dataset.query, **options)
    gallery = extract_features(model, dataset.gallery, **options)
    return evaluate_features(query, gallery, metric=metric, normalize=normalize, rerank=rerank, protocol=protocol,
                             device=device)



# ------------------------------------------------------------------------------------------------ command
def _check_evaluation_folder(out: Path) -> None:
    """`evaluate --out` writes OUT/metrics.json: refused, before any work, where that is not a folder or where it
    would overwrite a training run's results (its metrics.json is the stage's; a pipeline reusing the stage would
    report the evaluation's numbers as the stage's)."""
    if out.exists() and not out.is_dir():
        raise EvaluationError(f"--out {out} is a file, not a folder; choose another --out")
    trained = [name for name in ("model.pt", "checkpoints", "stages", "student.pt") if (out / name).exists()]
    if trained:
        raise EvaluationError(f"--out {out} is a training run's folder (it holds {trained[0]}), whose metrics.json "
                              f"is the run's own: write the evaluation beside it, e.g. --out {out / 'evaluation'}")
    _earlier_evaluations(out / "metrics.json")  # one it cannot merge into stops the command now, not after the work


def _earlier_evaluations(path: Path) -> dict:
    """OUT/metrics.json of the evaluations written there before, to merge into ({} when none): one line when it is
    not one (damaged, or another program's file)."""
    import json

    if not path.exists():
        return {}
    try:
        metrics = json.loads(path.read_bytes())
    except (OSError, ValueError) as error:  # ValueError: not JSON, or not UTF-8
        raise EvaluationError(f"{path} cannot be read as JSON ({type(error).__name__}); remove it or choose another "
                              "--out") from None
    if not isinstance(metrics, dict) or not all(isinstance(metrics.get(key, {}), dict)
                                                for key in ("final", "verification")):
        raise EvaluationError(f"{path} is not an evaluation's metrics.json (expected {{\"final\": {{target: "
                              "metrics}}); remove it or choose another --out")
    return metrics


def _settings_per_target(recorded, targets) -> dict:
    """`evaluated_with` as {target: settings}. A file from before held one set for all its targets (those of the
    command that wrote it last) with the protocol per target: it is spread over its targets."""
    if not isinstance(recorded, dict):
        return {}
    if "model" not in recorded:
        return dict(recorded)
    protocols = recorded.get("protocol") if isinstance(recorded.get("protocol"), dict) else {}
    return {target: {**recorded, "protocol": protocols.get(target)} for target in targets if target in protocols}


def _trained_on_test_images(model: nn.Module, target: str) -> str | None:
    """Why the numbers of `model` on `target` would be recall rather than re-ID accuracy: it trained on that
    dataset's query and gallery images (a source under --combineall), as its checkpoint records."""
    config = (getattr(model, "kdreid_meta", None) or {}).get("config") or {}
    data = config.get("data") or {}
    if data.get("combineall") and target in (config.get("sources") or []):
        return (f"trained on {target}'s query and gallery images too (--combineall): its numbers on {target} "
                "measure recall of training images, not re-identification (the training stage did not evaluate it)")
    return None


def _other_cuhk03_split(model: nn.Module, classic: bool, split_id: int) -> str | None:
    """Why the numbers would be void when `model` trained on CUHK03 images of another split than the one evaluated:
    the test persons of one CUHK03 split (classic or new protocol) are training persons of the others."""
    meta = getattr(model, "kdreid_meta", None) or {}
    if "cuhk03" not in (meta.get("datasets") or []):
        return None
    data = (meta.get("config") or {}).get("data") or {}
    trained = (bool(data.get("cuhk03_classic_split")), int(data.get("cuhk03_split_id") or 0))
    if trained == (classic, split_id):
        return None

    def name(split: tuple[bool, int]) -> str:
        return f"the classic split {split[1]}" if split[0] else "the new protocol"

    flags = f"--cuhk03-classic-split --split-id {trained[1]}" if trained[0] else "no --cuhk03-classic-split"
    return (f"trained on CUHK03 images of {name(trained)}, evaluated on {name((classic, split_id))}: its test "
            f"persons may be training persons of the model; evaluate on the run's own split ({flags})")


def evaluate_command(args) -> int:
    """`kdreid evaluate`: one table row per target (percent), `--json` for machines, `--out RUN` writes
    RUN/metrics.json ({"final": {target: {mAP, rank1, rank5, rank10, rank20, mINP}}}, merged into an existing file).
    With --out the folder is held for the whole command (`rundir.exclusive`): a second `evaluate --out` there, or a
    training writing there, is refused in one line naming it, rather than both merging into one metrics.json (one
    target's numbers lost) and removing each other's staged pictures."""
    if not args.out:
        return _evaluate_command(args)
    from kdreid.rundir import exclusive, first_missing, remove_made_folder_if_unused

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise EvaluationError(f"--out {out} is a file, not a folder; choose another --out")
    made = first_missing(out)  # a call that wrote nothing removes the folder (and parents) it made
    with exclusive(out):
        try:
            return _evaluate_command(args)
        finally:
            remove_made_folder_if_unused(out, made)


def _evaluate_command(args) -> int:
    import json

    from kdreid.data.check import parse_problems_note
    from kdreid.data.datasets.base import build_dataset
    from kdreid.errors import DatasetError
    from kdreid.evaluation.ranking import evaluation_warnings_to
    from kdreid.models.weights import model_kind
    from kdreid.rundir import write_json
    from kdreid.stages.common import DataOptions, cuhk03_boxes_and_split, protocol_for
    from kdreid.stages.data import evaluation_fingerprint

    # How every target is read and scored, as the training stages read and score it (so a run's metrics.json and
    # this agree), unless --protocol names one protocol for all.
    data_options = DataOptions(cuhk03_labeled=args.cuhk03_labeled, cuhk03_classic_split=args.cuhk03_classic_split,
                               cuhk03_split_id=args.split_id)
    if (args.cuhk03_labeled or args.cuhk03_classic_split or args.split_id) and "cuhk03" not in args.targets:
        raise DatasetError("--cuhk03-labeled, --cuhk03-classic-split and --split-id apply only to -t cuhk03")
    visrank = getattr(args, "visrank", 0)
    if visrank and not args.out:
        raise EvaluationError("--visrank writes pictures into the run folder: pass --out FOLDER")
    topk = getattr(args, "visrank_topk", None)
    if topk is not None and not visrank:
        print("kdreid: warning: --visrank-topk has no effect without --visrank N (queries to draw)", file=sys.stderr)
    topk = 10 if topk is None else topk
    if visrank < 0 or (visrank and topk < 1):
        raise EvaluationError(f"--visrank {visrank} --visrank-topk {topk}: --visrank must be 0 or more and "
                              "--visrank-topk at least 1")
    aqe = _aqe_setting(args)
    visactmap = getattr(args, "visactmap", 0)
    if visactmap < 0:
        raise EvaluationError(f"--visactmap {visactmap}: the number of images must be 0 or more")
    if visactmap and not args.out:
        raise EvaluationError("--visactmap writes pictures into the run folder: pass --out FOLDER")
    if visactmap and Path(args.model).is_file() and model_kind(Path(args.model)) != "checkpoint":
        raise EvaluationError(f"--visactmap: {args.model} is an exported file, without the feature maps that "
                              "activation maps show; pass its checkpoint (model.pt)")
    if args.out:
        _check_evaluation_folder(Path(args.out))
    device = pick_device(args.device)
    embed, note_weights, model, input_size = _embedder_of(args, device)
    # Every target is read before the first is evaluated: a misspelt one stops the command before any work.
    datasets = {target: build_dataset(target, args.root, **data_options.reader_options(target))
                for target in args.targets}
    for target, dataset in datasets.items():
        if (note := parse_problems_note(dataset)) is not None:
            print(f"kdreid: warning: {note}", file=sys.stderr)
        for split in ("query", "gallery"):  # named here, before any work: evaluate_features does not know the dataset
            if not getattr(dataset, split):
                raise EvaluationError(f"dataset {target} has no {split} image under {dataset.root}: it cannot be "
                                      "evaluated (an unlabelled target's training images only?); give it a query "
                                      "and a gallery, or leave it out of -t")
    # What each target's numbers were measured on, for the folder's record: `kdreid aggregate` names evaluations
    # of other files under one name (data regenerated, another --scale or seed of `kdreid data synth`).
    data_digests = {target: evaluation_fingerprint(dataset, args.root)
                    for target, dataset in datasets.items()} if args.out else {}
    note_weights()  # what the weights file gave the model, once the command can run: a mistake stays one line
    final: dict[str, dict[str, float | None]] = {}
    verification: dict[str, dict] = {}  # per target, with --verification (VerificationResult.summary())
    pictures = _StagedPictures(Path(args.out) if args.out else None)
    protocols = {target: args.protocol or protocol_for(target, data_options) for target in args.targets}
    # CUHK03's numbers depend on its boxes and split as much as on the protocol: named beside them and recorded.
    splits = {target: "{} boxes of {}".format(*cuhk03_boxes_and_split(data_options))
              for target in args.targets if target == "cuhk03"}
    described = f"{args.metric}{_aqe_text(aqe)}{', re-ranked' if args.rerank else ''}"
    try:
        for target, dataset in datasets.items():
            print(f"{target}{f' ({splits[target]})' if target in splits else ''}: "
                  f"{len(dataset.query)} queries, {len(dataset.gallery)} gallery images, "
                  f"{protocols[target]} protocol, {args.metric} distances{', flip-averaged' if args.flip else ''}"
                  f"{_aqe_text(aqe)}{', k-reciprocal re-ranked' if args.rerank else ''}", file=sys.stderr)
            with evaluation_warnings_to(lambda message: print(f"kdreid: warning: {target}: {message}",
                                                              file=sys.stderr)):
                query, gallery = embed(dataset.query), embed(dataset.gallery)
                if aqe:  # before everything that ranks: the table, --visrank and --verification see the same
                    query, gallery = expand_features(query, gallery, device=device, **aqe)
                result = evaluate_features(query, gallery, metric=args.metric, rerank=args.rerank,
                                           protocol=protocols[target], device=device,
                                           verification=args.verification)
            if visrank:
                from kdreid.viz.ranking import visualize_ranked_results

                pictures.add("visrank", target, "ranked results", visualize_ranked_results(
                    query, gallery, pictures.folder("visrank"), prefix=target, num_queries=visrank, topk=topk,
                    metric=args.metric, rerank=args.rerank, title=f"{target}: {Path(args.model).name}, {described}"))
            elif args.out:  # an earlier evaluation's ranking (another model or setting) must not stay beside these
                pictures.add("visrank", target, "", [])
            if visactmap:
                from kdreid.viz.actmap import visualize_activation_maps

                pictures.add("actmap", target, "activation maps", visualize_activation_maps(
                    [(Path(args.model).name, model)], dataset.query, pictures.folder("actmap"), prefix=target,
                    num_images=visactmap, device=device, title=f"{target}: where {Path(args.model).name} looks",
                    size=(args.height, args.width)))  # the size the numbers beside them were measured at
            elif args.out:  # likewise an earlier evaluation's activation maps (of another model, perhaps)
                pictures.add("actmap", target, "", [])
            if args.verification:
                verification[target] = result.verification.summary()
                if args.out:
                    from kdreid.viz.verification import verification_picture

                    pictures.add("verification", target, "verification picture", [verification_picture(
                        result.verification, pictures.folder("verification") / f"{target}.png",
                        title=f"{target}: {Path(args.model).name}, {described}")])
            elif args.out:
                # An earlier evaluation's picture, with other settings, must not stay beside these numbers.
                pictures.add("verification", target, "", [])
            final[target] = {key: (None if value != value else round(value, 4))  # NaN -> null (JSON has no NaN)
                             for key, value in result.summary().items()}

        if args.out:
            path = Path(args.out) / "metrics.json"
            metrics = _earlier_evaluations(path)
            metrics.setdefault("final", {}).update(final)
            # A target's verification figures belong to the evaluation that measured them: one evaluated again
            # without --verification loses its old ones (other settings gave them), and its old picture with them.
            earlier = {target: summary for target, summary in metrics.get("verification", {}).items()
                       if target not in final}
            metrics.pop("verification", None)
            if earlier or verification:
                metrics["verification"] = {**earlier, **verification}
            # Per target: the folder may gather evaluations of several models or settings, one target at a time.
            settings = _settings_per_target(metrics.get("evaluated_with"), metrics["final"])
            model_file = str(Path(args.model).absolute())
            settings.update({target: dict(model=model_file, metric=args.metric, rerank=args.rerank, flip=args.flip,
                                          aqe=aqe or False, protocol=protocols[target],
                                          height=input_size[0], width=input_size[1],  # the numbers depend on it
                                          **({"split": splits[target]} if target in splits else {}),
                                          data=data_digests[target])
                             for target in final})
            metrics["evaluated_with"] = settings
            write_json(path, metrics)
            pictures.install()
    finally:
        pictures.discard()
    if args.json:
        print(json.dumps({"final": final, **({"verification": verification} if verification else {})}, indent=2))
        return 0
    print(format_table(final))
    if verification:
        print(format_verification(verification))
    if args.out:
        print(f"metrics written to {Path(args.out) / 'metrics.json'}", file=sys.stderr)
    return 0


class _StagedPictures:
    """The pictures of one `kdreid evaluate --out OUT` call, drawn into OUT/.evaluate.new/ and moved into OUT's
    picture folders only once metrics.json holds the numbers they go with: an evaluation that fails halfway (an
    image that does not decode in the second target) leaves OUT's pictures as they were, never some of its own
    beside the earlier numbers."""

    FOLDERS = ("visrank", "actmap", "verification")

    def __init__(self, out: Path | None):
        self.out = out
        self.staging = out / ".evaluate.new" if out is not None else None
        self.drawn: list[tuple[str, str, str, list[Path]]] = []  # (folder, target, what, staged files)
        if out is None:
            return
        for folder in self.FOLDERS:  # checked before any work: the move at the end must not fail
            if (out / folder).exists() and not (out / folder).is_dir():
                raise EvaluationError(f"{out / folder} is a file where kdreid keeps its {folder} pictures; move it "
                                      "or choose another --out")
        self.discard()  # what a killed call left

    def folder(self, name: str) -> Path:
        return self.staging / name

    def add(self, folder: str, target: str, what: str, files: list[Path]) -> None:
        """`files` drawn for `target` (none: the target's earlier pictures in `folder` only go)."""
        self.drawn.append((folder, target, what, list(files)))

    def install(self) -> None:
        """Replace each drawn target's earlier pictures with the new ones, and say where they are."""
        from kdreid.viz.common import remove_pages

        for folder, target, what, files in self.drawn:
            final = self.out / folder
            if folder == "verification":
                (final / f"{target}.png").unlink(missing_ok=True)
            elif final.is_dir():
                remove_pages(final, target)
            if files:
                final.mkdir(parents=True, exist_ok=True)
            for staged in files:
                os.replace(staged, final / staged.name)
            if what:
                print(f"{target}: {what} in {', '.join(str(final / f.name) for f in files) or '(none drawn)'}",
                      file=sys.stderr)

    def discard(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)


def _aqe_setting(args) -> dict | None:
    """{k, alpha} of `evaluate --aqe`, checked before any work; None without it (whose -k/-alpha are named as
    having no effect)."""
    from kdreid.evaluation.query_expansion import AQE_ALPHA, AQE_K, check_aqe

    k, alpha = getattr(args, "aqe_k", None), getattr(args, "aqe_alpha", None)
    if not getattr(args, "aqe", False):
        if k is not None or alpha is not None:
            print("kdreid: warning: --aqe-k and --aqe-alpha have no effect without --aqe", file=sys.stderr)
        return None
    setting = {"k": AQE_K if k is None else k, "alpha": AQE_ALPHA if alpha is None else alpha}
    check_aqe(**setting)
    return setting


def _aqe_text(aqe: dict | None) -> str:
    return f", alpha query expansion (k {aqe['k']}, alpha {aqe['alpha']:g})" if aqe else ""


def expand_features(query: Features, gallery: Features, *, k: int, alpha: float,
                    device: str | torch.device | None = None) -> tuple[Features, Features]:
    """`Features` of query and gallery after alpha query expansion (kdreid.evaluation.query_expansion), computed on
    `device`, returned on the CPU as extraction returns them."""
    from dataclasses import replace

    from kdreid.evaluation.query_expansion import alpha_query_expansion

    device = pick_device(device)
    expanded_query, expanded_gallery = alpha_query_expansion(query.features.to(device), gallery.features.to(device),
                                                             k=k, alpha=alpha)
    return replace(query, features=expanded_query.cpu()), replace(gallery, features=expanded_gallery.cpu())


def _embedder_of(args, device: torch.device) -> tuple[Callable[[Sequence], Features], Callable[[], None],
                                                     nn.Module | None, tuple[int, int]]:
    """(`records -> Features`, `note()`, the model, the input size (height, width) the images are resized to) for
    `kdreid evaluate --model`: a kdreid checkpoint (or -a ARCH state dict) run by torch, or a file `kdreid export`
    wrote, run as `kdreid extract` runs it (so the deployed file's own numbers are measured; no model then);
    `note()` says what a weights file gave the model."""
    from kdreid.deploy import extract_paths, open_embedder, warn_unused
    from kdreid.errors import DatasetError
    from kdreid.models import check_input_size
    from kdreid.models.weights import model_kind

    path = Path(args.model)
    if path.is_file() and model_kind(path) != "checkpoint":
        # --device still places the ranking; the file itself runs as `extract` runs it (on the CPU).
        warn_unused({"-a": args.arch, "--last-stride": args.last_stride},
                    f"{path} is an exported model: it runs as `kdreid extract` runs it")
        if "cuhk03" in args.targets:  # the check a checkpoint gets (_other_cuhk03_split) needs what it trained on
            print(f"kdreid: warning: {path} is an exported file, which does not record the CUHK03 split it was "
                  "trained on: evaluate its checkpoint to have that checked", file=sys.stderr)
        embedder = open_embedder(path, flip=args.flip, batch_size=args.batch_size, height=args.height,
                                 width=args.width)

        def embed_exported(records) -> Features:
            extracted = extract_paths(embedder, [r.path for r in records], workers=args.workers)
            if extracted.skipped:  # an evaluation of a subset would be another evaluation: refused, as in training
                why = extracted.skipped[0][1]
                raise DatasetError(f"{why} ({len(extracted.skipped)} image(s) of the split could not be read)")
            features = torch.from_numpy(extracted.features) if len(records) else torch.zeros(0, 0)
            return Features(features, np.array([r.pid for r in records], dtype=np.int64),
                            np.array([r.camid for r in records], dtype=np.int64), [r.path for r in records])

        return embed_exported, lambda: None, None, (embedder.height, embedder.width)
    model = load_model(path, args.arch, args.last_stride)
    if "cuhk03" in args.targets and (leak := _other_cuhk03_split(model, args.cuhk03_classic_split, args.split_id)):
        print(f"kdreid: warning: {args.model} {leak}", file=sys.stderr)
    for target in args.targets:
        if leak := _trained_on_test_images(model, target):
            print(f"kdreid: warning: {args.model} {leak}", file=sys.stderr)
    trained_height, trained_width = model_input_size(model)
    check_input_size(model, args.height or trained_height, args.width or trained_width)

    def embed_checkpoint(records) -> Features:
        return extract_features(model, records, height=args.height, width=args.width, batch_size=args.batch_size,
                                flip=args.flip, device=device, workers=args.workers, progress=sys.stderr.isatty())

    return (embed_checkpoint, lambda: note_loaded_weights(model), model,
            (args.height or trained_height, args.width or trained_width))


def format_verification(verification: dict[str, dict]) -> str:
    """Per target, TPR (percent) at each FPR level with its distance threshold, and the ROC AUC."""
    from kdreid.evaluation.verification import threshold_text

    name_width = max([len("verification"), *map(len, verification)])
    levels = [level["fpr"] for level in next(iter(verification.values()))["at_fpr"]]
    lines = ["verification".ljust(name_width)
             + "".join(f"TPR@FPR={fpr:.0e}".replace("e-0", "e-").rjust(18) for fpr in levels) + "AUC".rjust(8)]
    for target, summary in verification.items():
        cells = "".join(("n/a" if level["tpr"] is None else
                         f"{level['tpr']:.1f} d<{threshold_text(level['threshold'])}").rjust(18)
                        for level in summary["at_fpr"])
        auc = "n/a".rjust(8) if summary["auc"] is None else f"{summary['auc']:8.4f}"
        lines.append(target.ljust(name_width) + cells + auc)
    return "\n".join(lines)


def format_table(final: dict[str, dict[str, float | None]]) -> str:
    """Fixed-width rows: target, then mAP, CMC and mINP in percent (`METRIC_COLUMNS`)."""
    name_width = max([len("target"), *map(len, final)])
    lines = ["target".ljust(name_width) + "".join(f"{title:>8}" for title, _ in METRIC_COLUMNS)]
    for target, values in final.items():
        cells = "".join(f"{'n/a':>8}" if values.get(key) is None else f"{values[key]:8.1f}"
                        for _, key in METRIC_COLUMNS)
        lines.append(target.ljust(name_width) + cells)
    return "\n".join(lines)
