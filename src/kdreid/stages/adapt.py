"""Stage 2: single-target adaptation with D-MMD (Mekhazni et al., ECCV 2020), giving one teacher per target.

Each step draws a source P×K batch by identity and a target P×K batch by *group*, and minimises

    CE + triplet on the source  +  w · [MMD(within_s, within_t) + MMD(between_s, between_t) + MMD(f_s, f_t)]

with the D-MMD terms switched on from epoch `dmmd_start` (see kdreid.losses.mmd for the exact definition).
Target groups never come from cross-camera identity labels unless asked for as an oracle:

- `tracklet` (default): the dataset's tracklet ids (a tracker's output; for public datasets, (pid, camera) of
  the training split, which holds no cross-camera identity);
- `pseudo`: DBSCAN clusters of target embeddings on the k-reciprocal Jaccard distance, refreshed every epoch
  D-MMD reads them (the warm-up before `dmmd_start` keeps its first epoch's), outliers left out (SpCL's settings);
- `oracle`: the target's identity labels, for ablations only; every table row says so.

`blend` adapts one model to the union of several targets (the baseline KD-ReID compares against).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from kdreid import distributed
from kdreid.data.datasets.base import ImageRecord
from kdreid.errors import CheckpointError, ConfigError, DatasetError
from kdreid.evaluation.features import extract_features
from kdreid.losses import batch_hard_triplet, cross_entropy_label_smoothing, dmmd_terms, euclidean_distances
from kdreid.losses.mmd import within_between
from kdreid.models import check_input_size, load_checkpoint
from kdreid.stages.common import (
    DataOptions,
    EvalOptions,
    StageResult,
    begin_stage,
    check_loss_settings,
    refuse_tracklets_across_cameras,
    stage_evaluator,
    finish_stage,
    picture_sample,
    refuse_other_source_label_space,
    stage_runner,
    source_label_space,
    write_picture_data,
)
from kdreid.stages.data import BatchSource, combine_train
from kdreid.stages.loop import StepContext, TrainConfig, fit
from kdreid.stages.optim import build_optimizer, check_setting
from kdreid.stages.pseudo_labels import PseudoLabelConfig, clustering_distances, dbscan

DMMD_TERMS = ("within", "between", "features")
# The D-MMD histograms' data (kdreid.viz.histograms), before and after adaptation.
PICTURE_DATA = ("distances_before.npz", "distances_after.npz")


@dataclass
class AdaptConfig:
    sources: list[str] = field(default_factory=lambda: ["msmt17"])
    targets: list[str] = field(default_factory=lambda: ["market1501"])
    blend: bool = False  # several targets: adapt one model to their union
    arch: str = ""  # empty: the architecture of the --init checkpoint
    init: str = ""  # the source-trained kdreid checkpoint to start from
    grouping: Literal["tracklet", "pseudo", "oracle"] = "tracklet"
    dmmd_start: int = 0  # first (0-based) epoch with the D-MMD terms; the original code used 25
    dmmd_weight: float = 1.0
    # Which D-MMD terms enter the loss (all three in the paper); for ablations such as distances only.
    dmmd_terms: list[str] = field(default_factory=lambda: list(DMMD_TERMS))
    # How the source batch's pairs split into within/between classes for D-MMD. "identity" (the paper): same
    # person, usually across cameras. "tracklet": same person and camera, the kind of pair a tracklet-grouped
    # target has (its same-person cross-camera pairs are unknown and fall in "between"); see docs/algorithms.md.
    dmmd_source_groups: Literal["identity", "tracklet"] = "identity"
    # L2-normalise the embeddings inside the D-MMD terms (not in the paper): removes the scale the fixed kernel
    # bandwidths otherwise let training change instead of the distributions.
    dmmd_normalize: bool = False
    # A group with fewer than K images repeats some in its P×K chunk (as torchreid's sampler): "count" keeps two
    # copies of one image as a within-class pair, as the original code did (reference defect 32: kept and
    # documented); "exclude" leaves those pairs out. docs/algorithms.md has how many there are and what it changed.
    dmmd_copies: Literal["count", "exclude"] = "count"
    label_smoothing: float = 0.1
    triplet_margin: float = 0.3
    pseudo: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    histogram_images: int = 1000  # per domain, for the distance histograms saved before and after
    out: str = "runs/adapt"
    data: DataOptions = field(default_factory=DataOptions)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalOptions = field(default_factory=EvalOptions)

    def validate(self) -> None:
        """Values no adaptation can use: one ConfigError naming the flag, before any work (also in a pipeline,
        before its earlier stages train)."""
        self.train.validate()
        self.eval.validate()
        check_loss_settings(self)
        if len(self.targets) > 1 and not self.blend:
            raise ConfigError(
                f"adapt makes one teacher per target but got {len(self.targets)} targets; run it once per target, "
                "or pass --blend to adapt one model to their union"
            )
        if not self.init:
            raise ConfigError("adapt starts from a source-trained model: pass --init SOURCE_RUN/model.pt")
        unknown = sorted(set(self.dmmd_terms) - set(DMMD_TERMS))
        # A term named twice (`--dmmd-terms within within`, or a --config list) would be summed twice into the loss:
        # twice --dmmd-weight for it, without a word.
        if unknown or not self.dmmd_terms or len(set(self.dmmd_terms)) < len(self.dmmd_terms):
            raise ConfigError(
                f"--dmmd-terms {' '.join(self.dmmd_terms) or '(none)'}: choose one or more of {', '.join(DMMD_TERMS)}, "
                "each once"
            )
        if not 0 <= self.dmmd_weight < math.inf:  # a negative weight would maximise the discrepancy
            raise ConfigError(f"--dmmd-weight must be 0 (a control run) or positive, got {self.dmmd_weight}")
        if self.dmmd_start < 0:
            raise ConfigError(f"--dmmd-start is a 0-based epoch, 0 or more; got {self.dmmd_start}")
        if self.dmmd_copies not in ("count", "exclude"):
            raise ConfigError(f"--dmmd-copies {self.dmmd_copies!r}: choose count or exclude")
        if self.histogram_images < 0:
            raise ConfigError(f"histogram_images is a number of images per domain, 0 or more; got "
                              f"{self.histogram_images}")
        # DBSCAN on the Jaccard distance (pseudo-labels, and the target-clusters score): k-reciprocal neighbourhoods
        # of k1 and k2 images, a core point with min_samples neighbours within eps.
        pseudo = self.pseudo
        check_setting(0 < pseudo.eps < math.inf, "pseudo.eps", pseudo.eps, "a positive distance")
        for key in ("min_samples", "k1", "k2"):
            check_setting(getattr(pseudo, key) >= 1, f"pseudo.{key}", getattr(pseudo, key), "at least 1")


GROUPING_NAMES = {"tracklet": "tracklets", "pseudo": "pseudo-labels", "oracle": "oracle identities"}


@stage_runner
def run(config: AdaptConfig, *, resume: bool = False) -> StageResult:
    train = config.train
    start = begin_stage(config, resume=resume)
    run_dir, log, device, sources, targets = start.run, start.log, start.device, start.sources, start.targets
    source_records = combine_train(sources, combineall=config.data.combineall)
    if config.grouping == "tracklet":
        for dataset in targets:
            refuse_tracklets_across_cameras(dataset, "or use --grouping pseudo, or --grouping oracle if they are "
                                                     "identities")
    target_records = combine_train(targets)
    try:
        source_model = load_checkpoint(config.init, arch=config.arch or None)
    except CheckpointError as error:  # named as the flag the file came from
        raise CheckpointError(f"--init {error}") from None
    refuse_other_source_label_space(source_model, "--init", config.init, config)
    source_records, validation = source_label_space(source_records, source_model)
    if validation is None and train.select == "source-val":
        raise ConfigError(
            f"--select source-val needs a source model trained with --select source-val; {config.init} was not"
        )
    num_classes = 1 + max(r.pid for r in source_records)
    if source_model.num_classes != num_classes:
        raise ConfigError(
            f"{config.init} was trained on {source_model.num_classes} source identities, but the sources "
            f"{'+'.join(config.sources)} have {num_classes}; pass the checkpoint of a source run on the same data"
        )
    check_input_size(source_model, train.height, train.width)
    model = distributed.sync_batchnorm(source_model.train().to(device))  # BatchNorm over the global batch
    arch = model.arch
    source_batches = BatchSource(
        source_records, [r.pid for r in source_records], height=train.height, width=train.width,
        batch_size=train.batch_size, num_instances=train.num_instances, augment=train.augment, device=device,
        seed=train.seed, log=log,
    )
    source_dmmd_groups = None  # None: the identity labels of the batch
    if config.dmmd_source_groups == "tracklet":
        if any(r.tracklet < 0 for r in source_records):
            raise DatasetError(
                f"--dmmd-source-groups tracklet: source {'+'.join(config.sources)} has training images without a "
                "tracklet id; use --dmmd-source-groups identity"
            )
        source_dmmd_groups = torch.tensor([r.tracklet for r in source_records], device=device)
    initial_groups = _initial_groups(config, target_records)
    target_batches = BatchSource(
        target_records, initial_groups, height=train.height, width=train.width, batch_size=train.batch_size,
        num_instances=train.num_instances, augment=train.augment, device=device, seed=train.seed + 1,
        what=GROUPING_NAMES[config.grouping], log=log,
    )
    log.info(
        f"adapt {'+'.join(config.sources)} -> {'+'.join(config.targets)} with {arch}; target grouping: "
        f"{GROUPING_NAMES[config.grouping]}"
        + (" (ORACLE: uses target identity labels)" if config.grouping == "oracle" else "")
        + f"; D-MMD ({'+'.join(config.dmmd_terms)}, source pairs by {config.dmmd_source_groups}"
        + (", normalised embeddings" if config.dmmd_normalize else "")
        + (", copies of one image left out" if config.dmmd_copies == "exclude" else "") + ") "
        f"from epoch {config.dmmd_start + 1}, weight {config.dmmd_weight}; "
        f"BatchNorm sees {train.batch_size} images per forward"
    )
    if config.dmmd_start >= train.epochs:
        log.warning(f"--dmmd-start {config.dmmd_start} >= --epochs {train.epochs}: D-MMD never runs, so this run only "
                    "fine-tunes on the source; lower --dmmd-start or raise --epochs")
    optimizer = build_optimizer(model.parameters(), train.optim)
    _save_histograms(run_dir.path / PICTURE_DATA[0], model, source_records, target_records, config, device)

    # Pseudo-labels are refreshed every epoch that D-MMD reads them. Before it starts, the target batches only move
    # the BatchNorm statistics and no loss reads their groups: the first epoch's clustering serves the whole warm-up
    # (the paper's 25 epochs would cluster 25 times for nothing: about two minutes each for a Market-size target on
    # 2 CPU cores), kept in every checkpoint so that a resumed warm-up batches the target as an uninterrupted one.
    carried: dict = {"warm_up_labels": None}

    def before_epoch(epoch: int) -> None:
        if config.grouping == "pseudo":
            warm_up = epoch < config.dmmd_start
            if warm_up and carried["warm_up_labels"] is not None:
                labels = carried["warm_up_labels"].numpy()
            else:
                # The main process's clustering for all: every process must group the target the same way.
                labels = distributed.broadcast_array(pseudo_labels(model, target_records, config, device))
                until = f" (for the warm-up: clustered again from epoch {config.dmmd_start + 1}, where D-MMD starts)"
                log.info(f"pseudo-labels: {labels.max() + 1} clusters, {(labels >= 0).sum()} of {len(labels)} images "
                         f"kept{until if warm_up else ''}")
                if warm_up:
                    carried["warm_up_labels"] = torch.as_tensor(labels)
            kept = labels >= 0
            try:
                target_batches.set_labels(
                    labels, batch_size=train.batch_size, num_instances=train.num_instances, seed=train.seed + 1,
                    what=GROUPING_NAMES["pseudo"],
                )
            except DatasetError as error:  # too few clusters this epoch: tracklets are the other unsupervised way
                # After a checkpoint, other settings are a new run (--resume refuses them): say where it goes.
                where = " (with another --out: this run's checkpoints hold its settings)" if epoch > 0 else ""
                # The clustering's own settings are the first thing to change: eps 0.6 suits a well-trained model,
                # and a barely trained one sees everyone as alike (one cluster) or no one (only outliers).
                raise DatasetError(
                    f"epoch {epoch + 1}: {error}, or change the clustering (now {labels.max() + 1} clusters of "
                    f"{kept.sum()} images with pseudo.eps {config.pseudo.eps}, pseudo.min_samples "
                    f"{config.pseudo.min_samples}: set them in a --config file), or group the target by --grouping "
                    f"tracklet{where}"
                ) from None
        source_batches.start_epoch(epoch)
        target_batches.start_epoch(epoch)

    def train_step(context: StepContext) -> dict[str, torch.Tensor]:
        source_images, source_labels = source_batches.next_batch(context.generator)
        target_images, target_groups = target_batches.next_batch(context.generator)
        # Two forwards, as the original: each BatchNorm sees one domain's batch at a time.
        source_out = model(source_images)
        dmmd_on = context.epoch >= config.dmmd_start
        # Before D-MMD starts no loss uses the target batch: its forward only moves the BatchNorm statistics
        # (as the original's did), so it keeps no graph — half the step's activation memory, fewer autograd nodes.
        with torch.set_grad_enabled(torch.is_grad_enabled() and dmmd_on):
            target_out = model(target_images)
        ce = cross_entropy_label_smoothing(source_out.logits, source_labels, config.label_smoothing)
        triplet = batch_hard_triplet(source_out.embedding, source_labels, config.triplet_margin)
        losses = {"ce": ce, "triplet": triplet}
        total = ce + triplet
        if dmmd_on:
            source_groups = (source_labels if source_dmmd_groups is None
                             else source_dmmd_groups[source_batches.last_index])
            minimised = config.dmmd_weight != 0
            # A control run (weight 0) still logs the terms, but builds no graph and runs no backward through them.
            with torch.set_grad_enabled(torch.is_grad_enabled() and minimised):
                exclude = config.dmmd_copies == "exclude"
                terms = context.compile_loss(dmmd_terms)(
                    source_out.embedding, source_groups, target_out.embedding, target_groups,
                    normalize=config.dmmd_normalize, source_images=source_batches.last_index if exclude else None,
                    target_images=target_batches.last_index if exclude else None,
                )
            losses.update(terms)  # all three are logged; only the chosen ones are minimised
            if minimised:
                total = total + config.dmmd_weight * sum(terms[f"mmd_{name}"] for name in config.dmmd_terms)
        return {"loss": total, **losses}

    evaluate = stage_evaluator(model, targets + sources, validation, config, device, log)

    # The loop must know the epoch length before pseudo-labels exist: an epoch is as long as the source's.
    result = fit(
        run=run_dir, config=train, stage_config=config, modules={"model": model}, optimizer=optimizer,
        batches_per_epoch=len(source_batches), train_step=train_step,
        evaluate=evaluate,
        before_epoch=before_epoch, resumables={"source_batches": source_batches, "target_batches": target_batches},
        carried=carried,
        resume=resume, reevaluate=start.evaluation_changed, log=log,
    )
    finished = finish_stage(
        start, config, model, result, stage="adapt",
        label=f"{'blend' if config.blend else 'teacher'} D-MMD ({arch})", datasets=config.sources + config.targets,
        grouping=config.grouping, checkpoint_extra={"grouping": config.grouping},
        metrics_extra={"grouping": config.grouping},
    )
    # After the results: the picture's data must not cost the trained model when it cannot be written.
    _save_histograms(run_dir.path / PICTURE_DATA[1], model, source_records, target_records, config, device)
    return finished


def _initial_groups(config: AdaptConfig, records: list[ImageRecord]) -> list[int]:
    if config.grouping in ("tracklet", "oracle"):
        groups = [r.tracklet if config.grouping == "tracklet" else r.pid for r in records]
        if min(groups) < 0:
            raise DatasetError(
                f"target {'+'.join(config.targets)} has training images without a tracklet id; "
                "use --grouping pseudo"
            )
        sizes = np.bincount(groups)
        needed = config.train.batch_size // config.train.num_instances
        if (sizes >= 2).sum() < needed:
            raise DatasetError(
                f"target {'+'.join(config.targets)} has {(sizes >= 2).sum()} {GROUPING_NAMES[config.grouping]} "
                f"with two or more images, fewer than the {needed} a batch needs: D-MMD needs within-group pairs; "
                "use --grouping pseudo or a smaller --batch-size"
            )
        return groups
    # Pseudo-labels are computed at the start of every epoch; until then each image is its own group, which
    # only serves to size the sampler.
    return list(range(len(records)))


def pseudo_labels(model, records: list[ImageRecord], config: AdaptConfig, device) -> np.ndarray:
    """DBSCAN clusters of the target's training embeddings on the k-reciprocal Jaccard distance (-1: outlier)."""
    features = extract_features(
        model, records, height=config.train.height, width=config.train.width,
        batch_size=config.eval.batch_size, device=device,
    ).features
    return dbscan(clustering_distances(features, config.pseudo), config.pseudo.eps, config.pseudo.min_samples)


def _save_histograms(path, model, source_records, target_records, config: AdaptConfig, device) -> None:
    """Within- and between-identity distances of source and target training images, for D-MMD's picture.
    Target identities are used here for the diagnostic only, never for training."""
    arrays = {}
    rng = np.random.default_rng([config.train.seed, 0x48495354])  # 'HIST'
    for domain, records in (("source", source_records), ("target", target_records)):
        subset = picture_sample(records, config.histogram_images, rng)
        features = extract_features(
            model, subset, height=config.train.height, width=config.train.width,
            batch_size=config.eval.batch_size, device=device,
        ).features
        within, between = within_between(euclidean_distances(features), torch.tensor([r.pid for r in subset]))
        arrays[f"{domain}_within"] = within.numpy()
        arrays[f"{domain}_between"] = between.numpy()
    write_picture_data(path, arrays)
