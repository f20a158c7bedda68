"""Deployment without a dataset layout: embed a folder of images into a features file, query it.

    embedder = open_embedder("student.onnx")             # a kdreid checkpoint, an exported ONNX or TorchScript file
    result = extract_folder(embedder, "crops/")           # features (N, D), paths, pids/camids parsed from names
    save_features("gallery.npz", result.features, embedder=embedder)
    index = FeatureIndex(load_features("gallery.npz").features, metric="euclidean")
    distances, indices = index.search(query_features, k=10)   # (Q, k) each, nearest first

A features file is a NumPy `.npz`: `features` (N, D) float32 (not L2-normalised), `paths` (N,) str (absolute),
`pids` and `camids` (N,) int64 (-1 when the file name is not Market-style `PID_cCAM...`), and what made it:
`model`, `flip`, `height`, `width`, `format` = "kdreid-features", and a plain state dict's `arch` and `last_stride`
("" and 0 otherwise).

Search is exact. Gallery norms are computed once when the index is built; a query is one matrix product per chunk
of the gallery and a top-k, merged across chunks: one query against 1M 512-d features takes ~0.18 s on 2 loaded
CPU cores, 100 queries ~3.3 s (bench/search_speed.py). A faiss flat (exact) index is available with
`use_faiss=True` (`kdreid search --faiss`) but is not the default: on the same machine it was 2-4x slower than
the torch path (0.44 s per single query, 13 s per 100).
"""

from __future__ import annotations

import io
import json
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from kdreid.data.datasets.base import walk_files
from kdreid.data.images import IMAGE_SUFFIXES
from kdreid.errors import DatasetError, EvaluationError, KdreidError, why_not_a_file
from kdreid.evaluation.distance import check_metric
from kdreid.models.weights import model_kind
from kdreid.rundir import atomic_write_bytes, refuse_folder, refuse_overwriting_input

FEATURES_FORMAT = "kdreid-features"
RERANK_MAX_GALLERY = 50_000  # k-reciprocal re-ranking needs gallery-gallery neighbours: O(G^2) work
_SCORES_PER_CHUNK = 1 << 24  # query x gallery-chunk scores held at once (64 MB of float32)


# ------------------------------------------------------------------------------------------------ embedders
@dataclass
class Embedder:
    """uint8 images (N, H, W, 3) at height x width -> float32 features (N, D), from any kind of model file."""

    embed: Callable[[np.ndarray], np.ndarray]
    height: int
    width: int
    source: str
    kind: str  # "checkpoint", "onnx" or "torchscript"
    flip: bool = False
    batch_size: int = 64
    # A plain state dict's architecture and last stride (what -a / --last-stride said; recorded in a features file
    # so that `search` embeds its queries alike), and the checkpoint's model (None for an exported file).
    arch: str = ""
    last_stride: int = 0
    model: object = None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        features = self.embed(images)
        # What every caller relies on, checked once here for every kind of file: a model of another contract (an
        # image-to-image network) or a diverged one would otherwise be written and ranked as features.
        if features.ndim != 2 or len(features) != len(images):
            raise KdreidError(f"{self.source} returned an output of shape {tuple(features.shape)} for {len(images)} "
                              "images, not features (N, D): pass a re-ID model (kdreid export writes one)")
        if not np.isfinite(features).all():
            raise KdreidError(f"{self.source} gives NaN/inf features: its weights are damaged or its training "
                              "diverged; check the model and its checkpoint")
        return features


def open_embedder(path: str | Path, *, arch: str | None = None, flip: bool = False, batch_size: int = 64,
                  device: str | None = None, height: int | None = None, width: int | None = None,
                  last_stride: int | None = None) -> Embedder:
    """An Embedder for a kdreid checkpoint (or a plain state dict with `arch`, built with `last_stride`: default 1,
    2 for torchreid's ResNets), an ONNX file or a TorchScript file written by `kdreid export`. `flip` averages each
    image's features with its mirror's. height, width: the input size (default: the one the checkpoint records,
    else 256 x 128); an exported file takes only its own."""
    path = Path(path)
    if not path.is_file():
        raise KdreidError(f"model file {path} {why_not_a_file(path)}; pass a kdreid checkpoint or an exported .onnx "
                          "file")
    kind = model_kind(path)
    if kind == "onnx":
        return _onnx_embedder(path, flip, batch_size, height, width)
    if kind == "torchscript":
        return _torchscript_embedder(path, flip, batch_size, height, width)
    return _checkpoint_embedder(path, arch, flip, batch_size, device, height, width, last_stride)


def _as_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)  # (N, 3, H, W)


def _checkpoint_embedder(path: Path, arch, flip: bool, batch_size: int, device, height: int | None,
                         width: int | None, last_stride: int | None = None) -> Embedder:
    from kdreid.evaluation.features import embed_batch, load_model, model_input_size, pick_device

    from kdreid.models import check_input_size

    model = load_model(path, arch, last_stride)
    device = pick_device(device)
    recorded_height, recorded_width = model_input_size(model)
    height, width = height or recorded_height, width or recorded_width
    check_input_size(model, height, width)  # on the CPU, before any image is read
    model = model.eval().to(device)

    def embed(images: np.ndarray) -> np.ndarray:
        return embed_batch(model, _as_float(images).to(device), flip).cpu().numpy()

    plain = getattr(model, "load_report", None) is not None  # set for a plain state dict (built from the file)
    arch, last_stride = (model.arch, int(model.last_stride)) if plain else ("", 0)
    return Embedder(embed, height, width, str(path), "checkpoint", flip, batch_size, arch, last_stride, model)


def _exported_size(path: Path, metadata: dict, shape, height: int | None, width: int | None) -> tuple[int, int]:
    """The input size of an exported file: the one it records (or its fixed input shape), which --height/--width
    may not change; for a file that records none, theirs, else 256 x 128."""
    from kdreid.evaluation.features import DEFAULT_SIZE

    if "input_height" in metadata and "input_width" in metadata:
        fixed = int(metadata["input_height"]), int(metadata["input_width"])
    elif len(shape) == 4 and isinstance(shape[2], int) and isinstance(shape[3], int):
        fixed = shape[2], shape[3]
    else:
        return height or DEFAULT_SIZE[0], width or DEFAULT_SIZE[1]
    asked = height or fixed[0], width or fixed[1]
    if asked != fixed:
        raise KdreidError(f"{path} takes {fixed[0]}x{fixed[1]} images (its export size), not {asked[0]}x{asked[1]}; "
                          f"embed at its size, or export it again with --height {asked[0]} --width {asked[1]}")
    return fixed


def _onnx_embedder(path: Path, flip: bool, batch_size: int, height: int | None, width: int | None) -> Embedder:
    from kdreid.export import onnx_session, read_metadata

    session = onnx_session(path)
    model_input = session.get_inputs()[0]
    shape = model_input.shape
    if len(session.get_inputs()) != 1 or len(shape) != 4 or shape[1] not in (3, None) and isinstance(shape[1], int) \
            or model_input.type != "tensor(float)":
        described = ", ".join(f"{i.name} {i.type} {list(i.shape)}" for i in session.get_inputs())
        raise KdreidError(f"{path} takes {described}; kdreid feeds one float32 input of RGB images N x 3 x H x W in "
                          "[0, 1]: export the model with that input (kdreid export does)")
    height, width = _exported_size(path, read_metadata(path), model_input.shape, height, width)
    fixed_batch = model_input.shape[0] if isinstance(model_input.shape[0], int) else None

    def run(batch: np.ndarray) -> np.ndarray:  # (N, 3, H, W) float32 -> (N, D)
        if fixed_batch is None:
            return session.run(None, {model_input.name: batch})[0]
        if fixed_batch != 1:
            raise KdreidError(f"{path} takes batches of exactly {fixed_batch}; export it with --dynamic-batch")
        return np.concatenate([session.run(None, {model_input.name: batch[i:i + 1]})[0] for i in range(len(batch))])

    def embed(images: np.ndarray) -> np.ndarray:
        batch = _as_float(images)
        features = run(batch.numpy())
        if flip:
            features = (features + run(batch.flip(3).contiguous().numpy())) / 2
        return features.astype(np.float32)

    return Embedder(embed, height, width, str(path), "onnx", flip, batch_size)


def _torchscript_embedder(path: Path, flip: bool, batch_size: int, height: int | None, width: int | None) -> Embedder:
    from kdreid.export import _jit_load, read_metadata

    module = _jit_load(path).eval()
    height, width = _exported_size(path, read_metadata(path), (), height, width)

    def embed(images: np.ndarray) -> np.ndarray:
        batch = _as_float(images)
        with torch.no_grad():
            features = module(batch).float()
            if flip:
                features = (features + module(batch.flip(3)).float()) / 2
        return features.numpy()

    return Embedder(embed, height, width, str(path), "torchscript", flip, batch_size)


# ------------------------------------------------------------------------------------------------ extraction
@dataclass
class Extracted:
    features: np.ndarray  # (N, D) float32
    paths: list[str]
    pids: np.ndarray  # (N,) int64, -1 when the name carries none
    camids: np.ndarray
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why) of images that did not decode


def list_images(path: str | Path) -> list[Path]:
    """One image file, or every image under a folder (recursive, sorted)."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:  # else decoded, and "re-extract the dataset" would be wrong
            raise DatasetError(f"{path} is not an image file ({', '.join(IMAGE_SUFFIXES)}); pass an image or a folder "
                               "of images")
        return [path]
    if not path.is_dir():
        raise DatasetError(f"{path} does not exist; pass an image file or a folder of images")
    # Links to missing files stay: they are reported as skipped, with the other images that cannot be read.
    return [p for p in walk_files(path) if p.suffix.lower() in IMAGE_SUFFIXES]


def parse_labels(paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(pids, camids) from Market-style names `PID_cCAM...`; -1 for names that carry none."""
    from kdreid.data.datasets.base import parse_market_name

    parsed = [parse_market_name(Path(p).name) or (-1, -1) for p in paths]
    return (np.array([pid for pid, _ in parsed], dtype=np.int64).reshape(-1),
            np.array([cam for _, cam in parsed], dtype=np.int64).reshape(-1))


def extract_paths(embedder: Embedder, paths: list[str | Path], *, workers: int = 2) -> Extracted:
    """Embed `paths` in order; an image that cannot be decoded is skipped and listed in `skipped`."""
    from kdreid.data.cache import read_image

    def decode(path: str):  # -> (H, W, 3) uint8, or the reason it failed
        try:
            return read_image(path, embedder.height, embedder.width)
        except DatasetError as error:
            return str(error)

    paths = [str(p) for p in paths]
    kept, skipped, outputs = [], [], []
    batches = [paths[i:i + embedder.batch_size] for i in range(0, len(paths), embedder.batch_size)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for batch in batches:
            arrays = []
            for path, image in zip(batch, pool.map(decode, batch)):
                if isinstance(image, str):
                    skipped.append((path, image))
                else:
                    kept.append(path)
                    arrays.append(image)
            if arrays:
                outputs.append(np.asarray(embedder(np.stack(arrays)), dtype=np.float32))
    features = np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)
    pids, camids = parse_labels(kept)
    return Extracted(features, kept, pids, camids, skipped)


def extract_folder(embedder: Embedder, folder: str | Path, *, workers: int = 2) -> Extracted:
    paths = list_images(folder)
    if not paths:
        raise DatasetError(f"{folder} holds no image ({', '.join(IMAGE_SUFFIXES)})")
    return extract_paths(embedder, paths, workers=workers)


def save_features(path: str | Path, extracted: Extracted, embedder: Embedder) -> Path:
    """Write a features file (.npz) atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, format=FEATURES_FORMAT, features=extracted.features.astype(np.float32),
             # Absolute (links kept as named): a search run from another folder names images that open.
             paths=np.array([str(Path(p).absolute()) for p in extracted.paths], dtype=str),
             pids=extracted.pids, camids=extracted.camids,
             model=str(Path(embedder.source).resolve()), flip=embedder.flip, height=embedder.height,
             width=embedder.width, arch=embedder.arch, last_stride=embedder.last_stride)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


@dataclass
class FeatureFile:
    features: np.ndarray  # (N, D) float32
    paths: list[str]
    pids: np.ndarray
    camids: np.ndarray
    model: str
    flip: bool
    height: int
    width: int
    arch: str = ""  # a plain state dict's -a and --last-stride ("" and 0 otherwise, and in older files)
    last_stride: int = 0


def load_features(path: str | Path) -> FeatureFile:
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"features file {path} {why_not_a_file(path, model=False)}; write one with "
                              "`kdreid extract`")
    if not zipfile.is_zipfile(path):  # np.load would try it as a pickle and suggest loading it unsafely
        raise EvaluationError(f"{path} cannot be read as a features file (not an .npz archive); write it again "
                              "with `kdreid extract`")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "format" not in data.files or str(data["format"]) != FEATURES_FORMAT:
                raise EvaluationError(f"{path} is not a kdreid features file; write one with `kdreid extract`")
            features = np.asarray(data["features"], dtype=np.float32)
            if not np.isfinite(features).all():
                raise EvaluationError(f"{path} holds NaN/inf features; extract it again with a sound model")
            return FeatureFile(features.reshape(len(data["paths"]), -1), [str(p) for p in data["paths"]],
                               data["pids"], data["camids"], str(data["model"]), bool(data["flip"]),
                               int(data["height"]), int(data["width"]),
                               str(data["arch"]) if "arch" in data.files else "",
                               int(data["last_stride"]) if "last_stride" in data.files else 0)
    except (OSError, ValueError, zipfile.BadZipFile, KeyError) as error:
        raise EvaluationError(f"{path} cannot be read as a features file ({error}); write it again with "
                              "`kdreid extract`") from None


# ------------------------------------------------------------------------------------------------ search
class FeatureIndex:
    """Exact nearest-neighbour search over gallery features (G, D).

    euclidean: ||q - g||; cosine: 1 - cos(q, g) (the distances of kdreid.evaluation.distance). Norms (or the
    normalised gallery) are computed once here, so a query costs one pass over the gallery.
    """

    def __init__(self, gallery: np.ndarray | torch.Tensor, metric: str = "euclidean", *, use_faiss: bool = False):
        check_metric(metric)
        gallery = torch.as_tensor(gallery, dtype=torch.float32)
        if gallery.dim() != 2:
            raise EvaluationError(f"gallery features must be (N, D), got shape {tuple(gallery.shape)}")
        self.metric, self.dim, self.size = metric, gallery.shape[1], gallery.shape[0]
        self.gallery = F.normalize(gallery, dim=1) if metric == "cosine" else gallery.contiguous()
        # (G,) squared norms, without a (G, D) temporary (2 GB at 1M x 512)
        self.sq_norms = None if metric == "cosine" else torch.linalg.vector_norm(self.gallery, dim=1).square_()
        self.faiss_index = _faiss_index(self.gallery.numpy(), metric) if use_faiss else None

    def search(self, query: np.ndarray | torch.Tensor, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
        """query (Q, D) -> distances (Q, k') ascending and gallery indices (Q, k'), k' = min(k, G)."""
        query = torch.as_tensor(query, dtype=torch.float32)
        if query.dim() == 1:
            query = query[None]
        if query.shape[1] != self.dim:
            raise EvaluationError(f"query features are {query.shape[1]}-d but the gallery holds {self.dim}-d "
                                  "features; extract both with the same model")
        k = min(int(k), self.size)
        if k <= 0:
            return torch.zeros(len(query), 0), torch.zeros(len(query), 0, dtype=torch.long)
        if self.metric == "cosine":
            query = F.normalize(query, dim=1)
        if self.faiss_index is not None:
            scores, indices = self.faiss_index.search(query.numpy(), k)
            scores, indices = torch.from_numpy(scores), torch.from_numpy(indices).long()
            if self.metric == "cosine":
                return (1.0 - scores).clamp_(0.0, 2.0), indices
            return scores.clamp_(min=0.0).sqrt_(), indices  # faiss gives squared L2
        return self._search_chunked(query, k)

    def _search_chunked(self, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = max(k, _SCORES_PER_CHUNK // max(1, len(query)))
        scores = indices = None
        for start in range(0, self.size, chunk):
            block = self.gallery[start:start + chunk]  # (C, D)
            if self.metric == "cosine":
                block_scores = -(query @ block.T)  # (Q, C): smaller = closer
            else:  # ||g||^2 - 2 q.g; the query's own norm does not change its ranking and is added at the end
                block_scores = torch.addmm(self.sq_norms[start:start + chunk][None], query, block.T, alpha=-2.0)
            values, found = block_scores.topk(min(k, block_scores.shape[1]), dim=1, largest=False)
            found += start
            if scores is not None:
                # Merged chunk by chunk: the candidates held stay (Q, 2k). Kept for a final merge, every chunk's
                # would grow as Q x k x G / chunk, that is with Q^2 (a 20k-row query file against a 200k gallery:
                # 0.8 GB more at peak; the gallery searched against itself: tens of GB).
                values, order = torch.cat([scores, values], 1).topk(k, dim=1, largest=False)
                found = torch.cat([indices, found], 1).gather(1, order)
            scores, indices = values, found
        if self.metric == "cosine":
            return (1.0 + scores).clamp_(0.0, 2.0), indices
        return (scores + query.pow(2).sum(1, keepdim=True)).clamp_(min=0.0).sqrt_(), indices


def _faiss_index(gallery: np.ndarray, metric: str):
    try:
        import faiss
    except ImportError:
        raise EvaluationError("the faiss index needs faiss: pip install faiss-cpu (or search without --faiss)"
                              ) from None
    index = faiss.IndexFlatIP(gallery.shape[1]) if metric == "cosine" else faiss.IndexFlatL2(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery, dtype=np.float32))
    return index


def search_features(query: np.ndarray, gallery: np.ndarray, *, k: int = 10, metric: str = "euclidean",
                    rerank: bool = False, use_faiss: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k gallery (distances, indices), each (Q, k), for query (Q, D); with k-reciprocal re-ranking when
    `rerank` (Zhong et al. 2017, k1=20, k2=6, lambda=0.3), which needs the whole gallery-gallery neighbourhood."""
    if query.shape[1] != gallery.shape[1]:
        raise EvaluationError(f"query features are {query.shape[1]}-d but the gallery holds {gallery.shape[1]}-d "
                              "features; extract both with the same model")
    if not rerank:
        return FeatureIndex(gallery, metric, use_faiss=use_faiss).search(query, k)
    from kdreid.evaluation.features import check_room_for_evaluation
    from kdreid.evaluation.rerank import re_ranking_features

    if len(gallery) > RERANK_MAX_GALLERY:
        raise EvaluationError(f"--rerank needs gallery-gallery neighbours; {len(gallery)} gallery images is over "
                              f"{RERANK_MAX_GALLERY}: search without --rerank")
    # Re-ranking forms every query's distances to the whole gallery (a 20,000-row query file against 50,000 images:
    # 4 GB), and its own work beside them; the top-k is taken after.
    check_room_for_evaluation(len(query), len(gallery), query.shape[1], torch.device("cpu"), rerank=True,
                              metric=metric, task="search --rerank",
                              fix="search without --rerank, or on a machine with more memory")
    distances = re_ranking_features(torch.as_tensor(query), torch.as_tensor(gallery), metric=metric)  # (Q, G)
    return torch.as_tensor(distances).topk(min(k, len(gallery)), dim=1, largest=False)


# ------------------------------------------------------------------------------------------------ commands
def extract_command(args) -> int:
    """`kdreid extract`: features of every image under --images into --out; undecodable images listed last."""
    refuse_folder(args.out, "gallery.npz")  # before the extraction, not after it
    refuse_overwriting_input(args.out, {"--model": args.model})
    if Path(args.model).is_file() and model_kind(Path(args.model)) != "checkpoint":
        warn_unused({"-a": args.arch, "--last-stride": args.last_stride},
                    f"{args.model} is an exported model, which records its architecture")
    embedder = open_embedder(args.model, arch=args.arch, flip=args.flip, batch_size=args.batch_size,
                             device=args.device, height=args.height, width=args.width, last_stride=args.last_stride)
    from kdreid.evaluation.features import note_loaded_weights

    note_loaded_weights(embedder.model)
    extracted = extract_folder(embedder, args.images, workers=args.workers)
    for path, why in extracted.skipped:
        print(f"kdreid: skipped {path}: {why}", file=sys.stderr)
    if not extracted.paths:
        raise DatasetError(f"no image under {args.images} could be decoded ({len(extracted.skipped)} skipped); "
                           "nothing written")
    save_features(args.out, extracted, embedder)
    labelled = int((extracted.pids >= 0).sum())
    skipped = f", {len(extracted.skipped)} skipped" if extracted.skipped else ""
    print(f"wrote {args.out}: {len(extracted.paths)} images x {extracted.features.shape[1]}-d features "
          f"({labelled} with Market-style pid/camid){skipped}")
    return 0


def _same_file(a: Path, b: Path) -> bool:
    """The same path, or two files with the same bytes (a copied checkpoint is the same model)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()
    except OSError:  # the gallery's model moved or is gone: nothing says they differ
        return True


def _warn_if_embedded_otherwise(model: str, flip: bool, size: tuple[int, int], gallery: FeatureFile,
                                query: str) -> None:
    """Query and gallery features embedded otherwise (by another model, flip-averaged or not, at another input
    size) are not comparable, or not at full accuracy: the ranking still runs (two models may be meant to share an
    embedding space), with a warning that names the difference."""
    differences, unless = [], ""
    if model and gallery.model and not _same_file(Path(model), Path(gallery.model)):
        differences.append(f"by {model}, the gallery by {gallery.model}")
        unless = " (unless both files hold one model, e.g. a checkpoint and its export)"
    if flip != gallery.flip:
        differences.append(f"{'with' if flip else 'without'} flip-averaging, the gallery "
                           f"{'with' if gallery.flip else 'without'}")
    if tuple(size) != (gallery.height, gallery.width):
        differences.append(f"at {size[0]}x{size[1]}, the gallery at {gallery.height}x{gallery.width}")
    if differences:
        print(f"kdreid: warning: {query} {'; '.join(differences)}: distances mix two embeddings{unless}; embed both "
              "the same way (--model, --flip, --height/--width)", file=sys.stderr)


def warn_unused(flags: dict, why: str) -> None:
    """One warning naming the flags that were given (value not None) and that `why` makes pointless."""
    given = [flag for flag, value in flags.items() if value is not None]
    if given:
        print(f"kdreid: warning: {', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect: {why}",
              file=sys.stderr)


def search_command(args) -> int:
    """`kdreid search`: for each query image (or features file row), the ranked gallery paths and distances."""
    gallery = load_features(args.gallery)
    query_path = Path(args.query)
    if args.faiss and args.rerank:
        warn_unused({"--faiss": True}, "re-ranking computes the whole gallery-gallery neighbourhood with torch")
    if args.rerank and args.max_distance is not None:
        print("kdreid: warning: --max-distance with --rerank: a re-ranked distance depends on the other queries of "
              "the set, so a threshold measured by `kdreid evaluate --verification` does not carry over exactly",
              file=sys.stderr)
    if query_path.suffix.lower() == ".npz" and query_path.is_file():
        warn_unused({"--model": args.model, "-a": args.arch, "--last-stride": args.last_stride, "--flip": args.flip,
                      "--height": args.height, "--width": args.width}, f"{args.query} holds features already")
        query = load_features(query_path)
        query_features, query_paths = query.features, query.paths
        embedded = (query.model, query.flip, (query.height, query.width), f"{args.query} was extracted")
    else:
        model = args.model or gallery.model
        if not model or not Path(model).is_file():
            raise KdreidError(f"embedding {args.query} needs the model: pass --model (the gallery's recorded model "
                              f"{model or '(none)'} does not exist)")
        # Query images are embedded as the gallery was (its size and flip; for the gallery's own plain state dict,
        # its -a and --last-stride) unless the flags say otherwise.
        own = not args.model or _same_file(Path(model), Path(gallery.model))
        arch = args.arch or (gallery.arch if own and gallery.arch else None)
        last_stride = args.last_stride or (gallery.last_stride if own and gallery.last_stride else None)
        if Path(model).is_file() and model_kind(Path(model)) != "checkpoint":
            warn_unused({"-a": args.arch, "--last-stride": args.last_stride},
                        f"{model} is an exported model, which records its architecture")
            arch = last_stride = None
        embedder = open_embedder(model, arch=arch, flip=gallery.flip if args.flip is None else args.flip,
                                 height=args.height or gallery.height, width=args.width or gallery.width,
                                 last_stride=last_stride)
        from kdreid.evaluation.features import note_loaded_weights

        note_loaded_weights(embedder.model)
        embedded = (str(model), embedder.flip, (embedder.height, embedder.width), "the query images are embedded")
        images = list_images(query_path)
        if not images:
            raise DatasetError(f"{args.query} holds no image ({', '.join(IMAGE_SUFFIXES)})")
        extracted = extract_paths(embedder, images)
        for path, why in extracted.skipped:
            print(f"kdreid: skipped {path}: {why}", file=sys.stderr)
        if not extracted.paths:
            raise DatasetError(f"no query image under {args.query} could be decoded")
        query_features, query_paths = extracted.features, extracted.paths
    if query_features.shape[1] != gallery.features.shape[1]:
        raise EvaluationError(f"{args.gallery} holds {gallery.features.shape[1]}-d features but the query's are "
                              f"{query_features.shape[1]}-d; extract both with the same model")
    query_model, query_flip, query_size, who = embedded  # comparable in shape; perhaps not in meaning
    _warn_if_embedded_otherwise(query_model, query_flip, query_size, gallery, who)
    distances, indices = search_features(query_features, gallery.features, k=args.topk, metric=args.metric,
                                         rerank=args.rerank, use_faiss=args.faiss)
    # --max-distance: the cut-off `kdreid evaluate --verification` gives for a false-positive rate ("distance < d").
    rankings = [(query_name, [(distance, gallery.paths[index]) for distance, index in zip(row_d, row_i)
                              if args.max_distance is None or distance < args.max_distance])
                for query_name, row_d, row_i in zip(query_paths, distances.tolist(), indices.tolist())]
    if args.json:
        print(json.dumps([{"query": query_name, "results": [{"path": path, "distance": round(distance, 6)}
                                                            for distance, path in results]}
                          for query_name, results in rankings], indent=2))
        return 0
    for query_name, results in rankings:
        print(f"query {query_name}")
        for rank, (distance, path) in enumerate(results, start=1):
            print(f"  {rank:>3}  {distance:.4f}  {path}")
        if not results and args.max_distance is not None:
            print(f"  (no gallery image closer than --max-distance {args.max_distance:g})")
    return 0

