"""What every stage does around the loop: its run folder and config, datasets, evaluation of a model on
query/gallery splits, and the final files (`model.pt`, `metrics.json`, `results.md`)."""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Literal, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from kdreid import distributed
from kdreid.config import read_yaml
from kdreid.data.check import parse_problems_note, tracklets_across_cameras
from kdreid.data.datasets.base import ImageRecord, ReidDataset
from kdreid.data.samplers import groups_per_rank
from kdreid.errors import CheckpointError, ConfigError, DatasetError, KdreidError, sigterm_interrupts
from kdreid.models.weights import UnsafeCheckpointError
from kdreid.evaluation.features import evaluate_model, extract_features
from kdreid.evaluation.ranking import evaluation_warnings_to
from kdreid.models import save_checkpoint
from kdreid.rundir import (
    RunDir, atomic_write_bytes, atomic_write_text, exclusive, first_missing, remove_made_folder, write_json,
)
from kdreid.stages.data import (
    DATASETS_FILE, dataset_fingerprint, fingerprint_change, hold_out_validation, load_datasets, read_datasets_record,
)
from kdreid.stages.optim import check_setting
from kdreid.stages.pseudo_labels import PseudoLabelConfig, cluster_quality
from kdreid.stages.loop import (
    PATH_SETTINGS, FitResult, TrainConfig, absolute_path_setting, check_resumed_settings, has_checkpoint,
    checkpoint_file, load_training_state, measurement_changes, previous_checkpoint_file, refuse_occupied,
    results_table, seed_everything, select_device,
)


@dataclass
class DataOptions:
    """Dataset options shared by the stages (as torchreid's flags)."""

    root: str = "data"
    cuhk03_labeled: bool = False
    cuhk03_classic_split: bool = False
    cuhk03_split_id: int = 0  # which of the classic protocol's 20 splits (the new protocol has one)
    combineall: bool = False

    def reader_options(self, name: str) -> dict:
        if name == "cuhk03":
            return {"labeled": self.cuhk03_labeled, "classic_split": self.cuhk03_classic_split,
                    "split_id": self.cuhk03_split_id}
        return {}


@dataclass
class EvalOptions:
    metric: Literal["euclidean", "cosine"] = "euclidean"  # checked when the config is read, not after training
    flip: bool = False  # average the features of an image and its mirror
    batch_size: int = 128

    def validate(self) -> None:
        """Checked with the stage's other settings, not when the first evaluation comes, after an epoch."""
        check_setting(self.batch_size >= 1, "eval.batch_size", self.batch_size, "at least 1 (images)")


def check_loss_settings(config) -> None:
    """The source losses' settings every stage has: CE label smoothing (ε = 1 leaves no label in the target,
    torch refuses more) and the triplet margin (any finite one: a large negative margin switches the triplet term
    off, a CE-only run)."""
    check_setting(0 <= config.label_smoothing < 1, "label_smoothing", config.label_smoothing, "in [0, 1)")
    check_setting(-math.inf < config.triplet_margin < math.inf, "triplet_margin", config.triplet_margin,
                  "a finite number")


def how_measured(names: Sequence[str], options: EvalOptions, data: DataOptions) -> str:
    """How the numbers of `names` (datasets, or "source-val") were measured, for the line under a results table:
    re-ID numbers are only comparable with their distance and protocol beside them."""
    parts = [f"{options.metric} distances between {'flip-averaged ' if options.flip else ''}embeddings"]
    market = [name for name in names if protocol_for(name, data) == "market"]
    if market:
        parts.append(f"the market protocol for {', '.join(market)} (a query's gallery images of its identity in its "
                     "camera left out; mAP and CMC as torchreid computes them)")
    if "cuhk03" in names:
        boxes, split = cuhk03_boxes_and_split(data)
        parts.append(f"cuhk03 {boxes} boxes, {split}" + (", single-gallery-shot CMC" if data.cuhk03_classic_split
                                                         else ""))
    return "; ".join(parts)


def cuhk03_boxes_and_split(data: DataOptions) -> tuple[str, str]:
    """Which CUHK03 `data` reads, in words: its boxes ("labeled" or "detected") and its split ("classic split N" or
    "the 767/700 protocol"); its numbers depend on both as much as on the protocol."""
    return ("labeled" if data.cuhk03_labeled else "detected",
            f"classic split {data.cuhk03_split_id}" if data.cuhk03_classic_split else "the 767/700 protocol")


def protocol_for(name: str, data: DataOptions) -> str:
    """The cuhk03 single-gallery-shot protocol for CUHK03's classic 20-split setting, as torchreid's
    `use_metric_cuhk03`; the new 767/700 protocol and every other dataset use the market protocol, as the
    published numbers do."""
    return "cuhk03" if name == "cuhk03" and data.cuhk03_classic_split else "market"


def evaluate_split(
    model: nn.Module,
    query: Sequence[ImageRecord],
    gallery: Sequence[ImageRecord],
    *,
    height: int,
    width: int,
    device: torch.device,
    options: EvalOptions,
    protocol: str = "market",
    name: str = "validation",
    log=None,
) -> dict[str, float]:
    """mAP, rank-1/5/10/20 and mINP in percent of `model` on one query/gallery pair (`name` in errors). With a
    `log`, what the ranking warns of (queries skipped for want of a true match) is a line there, naming `name`."""
    split = SimpleNamespace(name=name, query=list(query), gallery=list(gallery))
    with evaluation_warnings_to(lambda message: log.warning(f"{name}: {message}")) if log is not None \
            else contextlib.nullcontext():
        result = evaluate_model(
            model, split, metric=options.metric, flip=options.flip, protocol=protocol, height=height, width=width,
            batch_size=options.batch_size, device=device,
        )
    return result.summary()


def evaluate_datasets(
    model: nn.Module, datasets: Sequence[ReidDataset], train: TrainConfig, device: torch.device,
    options: EvalOptions, data: DataOptions, log=None,
) -> dict[str, dict[str, float]]:
    """{dataset: metrics} of every dataset that has a query and a gallery (`evaluable`); warnings to `log`."""
    was_training = model.training
    model.eval()
    metrics = {
        dataset.name: evaluate_split(
            model, dataset.query, dataset.gallery, height=train.height, width=train.width, device=device,
            options=options, protocol=protocol_for(dataset.name, data), name=dataset.name, log=log,
        )
        for dataset in datasets if evaluable(dataset)
    }
    model.train(was_training)
    return metrics


def evaluable(dataset: ReidDataset) -> bool:
    """Whether a dataset has labelled query and gallery images to evaluate on: a target of one's own cameras may
    hold training images only (tracklets from a tracker), which adaptation needs and evaluation cannot use."""
    return bool(dataset.query) and bool(dataset.gallery)


def stage_evaluator(model: nn.Module, datasets: Sequence[ReidDataset], validation, config, device: torch.device,
                    log):
    """The `evaluate(epoch)` a stage gives the loop: every evaluable dataset's query/gallery, plus the held-out
    source identities as "source-val" when there are some (what --select source-val chooses by). A source under
    --combineall is not evaluated: its query and gallery are training images, its numbers would be recall."""
    for dataset in datasets:
        if trains_on_all(dataset.name, config):
            log.info(f"{dataset.name} is not evaluated: --combineall trains on its query and gallery too")
        elif not evaluable(dataset):
            log.warning(f"{dataset.name} has no query or no gallery images: it is not evaluated (its training "
                        "images are used)")
    datasets = [d for d in datasets if not trains_on_all(d.name, config)]
    targets = [d for d in datasets if d.name in config.targets]
    if config.train.select == "target-clusters" and not targets:
        raise ConfigError("--select target-clusters scores the targets' training images: name them with -t")

    def evaluate(epoch: int) -> dict[str, dict[str, float]]:
        metrics = evaluate_datasets(model, datasets, config.train, device, config.eval, config.data, log)
        if validation is not None:
            metrics["source-val"] = evaluate_split(
                model, validation.query, validation.gallery, height=config.train.height,
                width=config.train.width, device=device, options=config.eval, name="source-val", log=log,
            )
        if config.train.select == "target-clusters":
            metrics["target-clusters"] = target_cluster_quality(model, targets, config, device)
        return metrics

    return evaluate


def target_cluster_quality(model: nn.Module, targets: Sequence[ReidDataset], config, device) -> dict[str, float]:
    """`cluster_quality` of each target's training images (no labels read), averaged over the targets."""
    settings = getattr(config, "pseudo", None) or PseudoLabelConfig()
    scores = []
    for dataset in targets:
        features = extract_features(
            model, dataset.train, height=config.train.height, width=config.train.width,
            batch_size=config.eval.batch_size, device=device,
        ).features
        scores.append(cluster_quality(features, settings))
    return {key: sum(s[key] for s in scores) / len(scores) for key in scores[0]}


@dataclass
class StageStart:
    run: RunDir
    log: object  # logging.Logger writing to RUN/log.txt and stderr
    device: torch.device
    sources: list[ReidDataset]
    targets: list[ReidDataset]
    # Why a resumed run's final numbers no longer hold ("" when they do): a query or gallery changed, or a setting of
    # how they are measured. `fit` measures them again.
    evaluation_changed: str = ""


def stage_runner(run):
    """Wraps a stage's `run(config, resume=...)`. First `config.validate()`: a setting no run can use is one line
    before the run folder is made. The main process holds the run folder for the whole stage
    (`rundir.exclusive`: a second command writing there is refused). When the stage fails with a KdreidError (a bad
    input: a missing --init file, an unknown dataset, a wrong architecture, too few pseudo-label clusters, a NaN
    loss) before its first checkpoint, in a run folder this call created, the folder goes — a failed command leaves
    nothing half-written behind, and nothing that could be resumed is lost. A folder that already existed, or that
    holds a checkpoint or a model, is kept."""
    @functools.wraps(run)
    def guarded(config, *, resume: bool = False):
        config.validate()  # before the run folder below is made: a refused setting leaves nothing behind
        out = Path(config.out)
        created = first_missing(out)  # the folder, or its topmost parent, that this call makes
        if not distributed.is_main():
            with torch_settings_restored():
                return run(config, resume=resume)
        # Ctrl-C or SIGTERM before training's own handling begins (reading datasets, building models) is cleaned
        # up like a bad input: the config.yaml, log and datasets.json of a run that never trained are not a run.
        # Removed, if it must be, while the folder is held: before another process can take it.
        with exclusive(out), sigterm_interrupts(), torch_settings_restored():
            try:
                return run(config, resume=resume)
            except (KdreidError, KeyboardInterrupt):
                if created is not None and out.is_dir() and not (has_checkpoint(out) or (out / "model.pt").exists()):
                    RunDir(out).close_logger()
                    remove_made_folder(out, created)
                raise
            finally:
                # The run's log.txt is closed as the stage ends, however it ends: a long-lived process (a notebook,
                # a sweep) would otherwise keep one open file per run, and a later run in a folder made anew at the
                # same path would log to the deleted file and leave no log.txt.
                RunDir(out, create=False).close_logger()

    return guarded


@contextlib.contextmanager
def torch_settings_restored():
    """A stage sets process-wide torch switches for itself (deterministic algorithms, cuDNN autotuning: see
    seed_everything, tune_backends); they are put back when it ends. A deterministic stage used to leave every later
    one in the process deterministic (a pipeline's, or the caller's own torch code, where an operation without a
    deterministic kernel on CUDA then raises)."""
    deterministic, warn_only = torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark


def picture_sample(records: Sequence[ImageRecord], count: int, rng: np.random.Generator) -> list[ImageRecord]:
    """Up to `count` of `records`, drawn by `rng`, in their order: the images a stage's distance pictures compare
    (the same ones before and after training, from a generator seeded alike)."""
    chosen = sorted(rng.choice(len(records), size=min(count, len(records)), replace=False))
    return [records[i] for i in chosen]


def write_picture_data(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """A picture's arrays as RUN/<name>.npz: every process took part in extracting them; the main one writes."""
    if distributed.is_main():
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        atomic_write_bytes(path, buffer.getvalue())


def refuse_tracklets_across_cameras(dataset: ReidDataset, fix: str) -> None:
    """A target's training batches are grouped by tracklet: one whose tracklet ids span cameras (a custom
    manifest's column holding person ids, a multi-camera tracker's tracks) would give the stage cross-camera
    identity labels while its results say "tracklet". One line, before any training; `fix` names the way out."""
    crossing = tracklets_across_cameras(dataset.train)
    if crossing:
        raise DatasetError(
            f"target {dataset.name}: {len(crossing)} training tracklets span several cameras (e.g. tracklet "
            f"{crossing[0]}); a tracklet is one person in one camera, and one across cameras is the cross-camera "
            f"identity label unsupervised adaptation never reads: split them per camera ({fix}; `kdreid data "
            f"check -d {dataset.name}` lists them)"
        )


def refuse_repeated_datasets(sources: Sequence[str], targets: Sequence[str]) -> None:
    """A dataset named twice in -s or in -t is refused: read twice, each identity would become two classes (and
    its own negative), and a pipeline would train two teachers into one folder. So is one named by both: a target
    is another camera network, whose labels are never read; adapting to the labelled source, or distilling its
    teacher, is a slip (the source's query and gallery are evaluated without naming it with -t)."""
    for flag, names in (("-s", sources), ("-t", targets)):
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ConfigError(f"{flag} names {repeated[0]} twice; name each dataset once")
    both = [name for name in targets if name in sources]
    if both:
        raise ConfigError(f"-s and -t both name {both[0]}: a target is a dataset other than the source (the source "
                          "is evaluated too); leave it out of -t")


def begin_stage(config, *, resume: bool) -> StageStart:
    """What every stage does first, in this order: reject unusable settings and an occupied run folder before
    anything is written, then open the run folder (resolved config, log), seed, pick the device and read the
    source and target datasets. `config` has .out, .train, .data, .sources and .targets."""
    config.train.validate()
    refuse_repeated_datasets(config.sources, config.targets)
    _make_paths_absolute(config)
    # Under torchrun: join the other processes, and refuse a P×K batch they cannot share before any work.
    distributed.init(config.train.device)
    share = groups_per_rank(config.train.batch_size // config.train.num_instances, distributed.world_size(), "groups")
    if share < 2:  # each process's losses see only its share: one group is no negative, no between-class pair
        raise ConfigError(
            f"--batch-size {config.train.batch_size} with --num-instances {config.train.num_instances} gives each of "
            f"the {distributed.world_size()} processes one group per batch; the triplet and D-MMD losses, computed on "
            f"each process's share, need two or more: choose --batch-size at least "
            f"{2 * config.train.num_instances * distributed.world_size()}"
        )
    refuse_occupied(Path(config.out), resume)
    extended, measured_otherwise = None, ""
    trained = _trained_settings(Path(config.out)) if resume and has_checkpoint(Path(config.out)) else None
    if trained is not None:
        extended = check_resumed_settings(Path(config.out), trained, config)
        measured_otherwise = measurement_changes(trained, config)
    # Only the main process writes the run's files, and makes the folder: another process that made it first (in a
    # pipeline, where the processes have joined already) left the main one's stage_runner believing it existed
    # before, and a stage stopped before its first checkpoint kept its config.yaml, log.txt and datasets.json.
    run = RunDir(config.out, create=distributed.is_main())
    # The other processes log warnings to their console.
    log = run.logger() if distributed.is_main() else distributed.worker_logger()
    if extended:
        log.info(extended)
    if distributed.is_main():
        run.save_config(config)
    seed_everything(config.train.seed, config.train.deterministic)
    device = select_device(config.train.device)
    if distributed.world_size() > 1:
        share = config.train.batch_size // distributed.world_size()
        log.info(f"{distributed.world_size()} processes: each trains on {share} images of every global batch of "
                 f"{config.train.batch_size}, with BatchNorm statistics synchronised over the global batch")
    options = {name: config.data.reader_options(name) for name in [*config.sources, *config.targets]}
    sources = load_datasets(config.sources, config.data.root, options)
    targets = load_datasets(config.targets, config.data.root, options)
    for dataset in sources + targets:
        if (note := parse_problems_note(dataset)) is not None:
            log.warning(note)
    evaluation_changed = None
    if distributed.is_main():
        resuming = resume and has_checkpoint(run.path)
        data_changed = _record_datasets(run.path / DATASETS_FILE, sources + targets, config, log, resuming)
        evaluation_changed = "; ".join(filter(None, ["a query or gallery changed since" if data_changed else "",
                                                     measured_otherwise]))
    # Every process evaluates (each embeds its share): all must know whether the final numbers are measured again.
    evaluation_changed = distributed.broadcast_object(evaluation_changed)
    return StageStart(run, log, device, sources, targets, evaluation_changed)


def _make_paths_absolute(config) -> None:
    """The data root and the input files as absolute paths (`PATH_SETTINGS`): config.yaml, the checkpoints' records
    and a later `kdreid report` or `--resume` then name the same files from any working directory."""
    for key in PATH_SETTINGS:
        *parents, name = key.split(".")
        owner = functools.reduce(getattr, parents, config)
        if hasattr(owner, name):
            setattr(owner, name, absolute_path_setting(getattr(owner, name)))


def _trained_settings(run_path: Path) -> Mapping | None:
    """The settings a run's checkpoint was trained with: the config its training checkpoint records (the truth,
    even when config.yaml was deleted or edited, or the checkpoint copied from another run), else config.yaml;
    None when neither says (the training loop then reports the checkpoint it cannot read)."""
    for candidate in (checkpoint_file(run_path), previous_checkpoint_file(run_path)):
        try:  # read only: which file to resume from, and saying so, is the training loop's (it may set one aside)
            # keep: the training loop reads the same file next, without reading it again
            recorded = load_training_state(candidate, keep=True).get("config") if candidate.exists() else None
        except UnsafeCheckpointError:
            raise  # not damage: a file that would run code, refused now
        except CheckpointError:
            continue
        if isinstance(recorded, Mapping):
            return recorded
    return read_yaml(run_path / "config.yaml") if (run_path / "config.yaml").is_file() else None


def _record_datasets(path: Path, datasets: Sequence[ReidDataset], config, log, resuming: bool) -> bool:
    """RUN/datasets.json: the content of the datasets the run trains on. A resumed run keeps the record of its
    start: when the training files changed since, the model saw both, and `kdreid pipeline` must not take it for
    one trained on the new files (it trains the stage again). -> whether only a query or gallery changed since the
    run began (an undecodable image replaced): the record follows, and the final numbers are measured again."""
    now = {dataset.name: dataset_fingerprint(dataset, config.data.root) for dataset in datasets}
    before = read_datasets_record(path) if resuming else {}
    changes = []
    if before is None:
        log.warning(f"{path} was damaged: written again from the files read now")
    elif before:
        changes = [(name, fingerprint_change(before.get(name, fingerprint), fingerprint, trains_on_all(name, config)))
                   for name, fingerprint in now.items()]
        changed = [name for name, change in changes if change == "train"]
        if changed:  # its classifier, sampler positions and cached batches are those of the first files
            raise DatasetError(f"{', '.join(changed)} hold other training images than when the run in {path.parent} "
                               "began (regenerated or re-extracted): restore the files it began with, or start a "
                               "new run with another --out")
    write_json(path, now)
    return any(change == "evaluation" for _, change in changes)


def trains_on_all(name: str, config) -> bool:
    """Whether a stage trains on every split of dataset `name` (a source under --combineall), not its train only."""
    return config.data.combineall and name in config.sources


def refuse_other_source_label_space(init_model, flag: str, path: str, config) -> None:
    """A source-trained checkpoint's classifier rows are its sources' identities, combined in its `-s` order (and,
    under --combineall, with their query/gallery identities after them): the same sources in another order, or
    with --combineall on one side only, give another label space — silently misaligned when the identity count
    happens to match. One line naming what the checkpoint was trained with; nothing for a file that records no
    sources (a plain state dict of another toolkit)."""
    recorded = (getattr(init_model, "kdreid_meta", None) or {}).get("config") or {}
    sources = recorded.get("sources")
    if not isinstance(sources, list) or not sources:
        return
    combineall = bool((recorded.get("data") or {}).get("combineall", False))
    if list(sources) == list(config.sources) and combineall == bool(config.data.combineall):
        return

    def flags(names, all_ids):
        return f"-s {' '.join(names)}" + (" --combineall" if all_ids else "")

    raise ConfigError(
        f"{flag} {path} was trained with {flags(sources, combineall)}, but this run has "
        f"{flags(config.sources, config.data.combineall)}, another source label space"
        + (" (the identities are numbered in -s order)" if sorted(sources) == sorted(config.sources)
           != list(sources) else "")
        + f"; pass {flags(sources, combineall)}, or the checkpoint of a source run with "
        f"{flags(config.sources, config.data.combineall)}"
    )


def source_label_space(records: list[ImageRecord], init_model) -> tuple[list[ImageRecord], object]:
    """The source training records in the label space of a source-trained model: when its run held identities
    out for validation (`extra.held_out`), the same split is rebuilt, so the classifier rows line up and the
    held-out identities can validate this stage too. -> (training records, ValidationSplit or None)."""
    held_out = (getattr(init_model, "kdreid_meta", None) or {}).get("extra", {}).get("held_out")
    if not held_out:
        return records, None
    validation = hold_out_validation(records, held_out["fraction"], held_out["seed"])
    return validation.train, validation


@dataclass
class ResultRow:
    model: str
    dataset: str
    metrics: dict
    grouping: str = "—"


@dataclass
class StageResult:
    model_path: str
    final: dict  # {dataset: {metric: percent}} of the selected epoch
    fit: FitResult


def finish_stage(
    start: StageStart, config, model: nn.Module, result: FitResult, *, stage: str, label: str, datasets: list[str],
    grouping: str = "—", checkpoint_extra: dict | None = None, metrics_extra: dict | None = None,
) -> StageResult:
    """What every stage does last: RUN/model.pt (a kdreid checkpoint recording the stage and input size),
    metrics.json and results.md (one row per evaluated dataset, named `label`)."""
    model_path = start.run.path / "model.pt"
    extra = {"stage": stage, "input_size": [config.train.height, config.train.width], **(checkpoint_extra or {})}
    if distributed.is_main():
        save_checkpoint(model_path, model.cpu(), config=config, datasets=datasets, metrics=result.final,
                        extra=extra)
        if result.weights_time_ns is not None:  # no epoch trained: the weights are as old as their checkpoint
            os.utime(model_path, ns=(time.time_ns(), result.weights_time_ns))
        rows = [ResultRow(label, name, metrics, grouping) for name, metrics in result.final.items()
                if name != "target-clusters"]  # a score, not retrieval metrics: it stays in metrics.json
        measured = how_measured([row.dataset for row in rows], config.eval, config.data)
        write_results(start.run, result, rows, extra=metrics_extra, measured=measured)
        start.log.info(f"wrote {model_path}")
    distributed.barrier()  # the next stage of a pipeline reads model.pt on every process
    return StageResult(str(model_path), result.final, result)


def write_results(run: RunDir, result: FitResult, rows: list[ResultRow], extra: dict | None = None,
                  measured: str = "") -> None:
    """`metrics.json` (final metrics per dataset in percent, every epoch, the selection rule) and
    `results.md`."""
    run.save_metrics({"final": result.final, "epochs": result.epochs, "selection": result.selection, **(extra or {})})
    table = results_table([vars(row) for row in rows], result.selection, measured)
    atomic_write_text(run.path / "results.md", table)

