"""Stage 3: multi-target distillation (KD-ReID): one adapted teacher per target teaches one small student.

For each target t, teacher t (frozen, eval mode, no gradients) sees target t's batch and the student learns its
batch geometry:

    loss_t = lkdt · KD(target batch) + lkds · KD(source batch)
             + lda · (D-MMD(source, target t) + CE + triplet on the source, with the student's own classifier)

where KD = ‖D(student) − D(teacher)‖_F on the cosine-distance matrices of the pre-BNNeck embeddings
(`kd_style outputs`; `kd_feature: neck` compares the retrieval features after BNNeck instead), or Heo et
al.'s margin loss on the stage maps through 1×1 conv+BN projectors (`feats`, scaled by `feats_weight`), or both
(`all`). See kdreid.losses.distill.

How the visits map onto the shared loop, which does one backward and one optimiser step per `train_step` call:

- `target_alt batch`: one loop iteration is one (iteration, target) pair, so an epoch has `iterations × T` loop
  iterations (iterations = the longest target's batches per epoch). Loop iterations g·T … g·T+T−1 form group g:
  its first one draws the source batch and one batch per target and fixes the visiting order of the group
  (`random`: a fresh permutation; `fixed`: the given order; `shift`: ascending global MMD between the student's
  source and target embeddings of these batches, measured without gradients); each of the T steps then trains
  on the next target of that order. One optimiser step per target per iteration, as the original.
- `target_alt full`: the loop walks target order[0]'s whole epoch of batches, then order[1]'s, and so on (an
  epoch has Σ_t len(target t) loop iterations); the order is fixed at the start of each epoch (`shift`: mean
  MMD over `shift_batches` batch pairs per target).

The learning-rate schedule steps once per epoch (the loop sets it), whatever T is. Unlike the original code:
multi-head classifiers are created before the optimiser (so they train), feature KD works for any
student/teacher pair (the projectors are in the optimiser), and teachers stay in eval mode unless
`teacher_mode: train` asks for the original's behaviour (their BatchNorm statistics then follow each batch).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np
import torch
from torch import nn

from kdreid import distributed
from kdreid.config import from_dict
from kdreid.errors import CheckpointError, ConfigError, DatasetError, TrainingError
from kdreid.evaluation.features import extract_features, note_loaded_weights
from kdreid.losses import batch_hard_triplet, cross_entropy_label_smoothing, dmmd_terms, mmd
from kdreid.losses.distill import bn_margins, cosine_distance_matrix, distance_kd, margin_feature_loss
from kdreid.models import build_model, build_projector, check_input_size, load_checkpoint
from kdreid.models.dsbn import DSBatchNorm
from kdreid.models.weights import embedding_dim_for, embedding_dim_of
from kdreid.rundir import write_json
from kdreid.stages.common import (
    DataOptions,
    EvalOptions,
    StageResult,
    begin_stage,
    check_loss_settings,
    refuse_other_source_label_space,
    refuse_tracklets_across_cameras,
    stage_evaluator,
    finish_stage,
    picture_sample,
    stage_runner,
    source_label_space,
    write_picture_data,
)
from kdreid.stages.data import BatchSource, combine_train
from kdreid.stages.loop import StepContext, TrainConfig, fit, has_checkpoint
from kdreid.stages.optim import build_optimizer
from kdreid.stages.presets import PRESETS


def _kd_train_defaults() -> TrainConfig:
    # Distillation has no general re-ID default to fall back on: its defaults are the paper preset's, the original
    # KD script's schedule (stages/presets.py says why the decay is at epochs 20 and 40).
    return from_dict(TrainConfig, PRESETS["paper"]["distill"]["train"], where="paper preset")


@dataclass
class DistillConfig:
    sources: list[str] = field(default_factory=lambda: ["msmt17"])
    targets: list[str] = field(default_factory=lambda: ["market1501"])
    teachers: list[str] = field(default_factory=list)  # one checkpoint per target, in the targets' order
    teacher_arch: str = ""  # set: the plain state dicts among the teachers are of this architecture (kdreid
    # checkpoints among them keep the architecture and stride they record)
    # The last-stage stride those plain teachers were trained with; their weights do not record it. 1: SpCL,
    # OpenUnReID, fast-reid, kdreid; 2: torchreid's ResNets and the original KD-ReID/D-MMD code.
    teacher_last_stride: int = 1
    teacher_mode: Literal["eval", "train"] = "eval"  # train = the original code's BatchNorm behaviour (ablation)
    arch: str = ""  # the student: empty = the architecture of student_init, or osnet_x0_25 without one
    student_init: str = ""  # source-trained kdreid checkpoint of the student (recommended)
    pretrained: str = "none"  # student weights when there is no student_init: none | imagenet | PATH
    target_alt: Literal["batch", "full"] = "batch"
    target_order: Literal["random", "fixed", "shift"] = "random"
    kd_style: Literal["outputs", "feats", "all"] = "outputs"
    # Which vectors `outputs` KD compares: the pre-BNNeck embedding (DESIGN §5, the original's space) or the
    # retrieval feature after BNNeck, whose geometry is the one evaluated (docs/algorithms.md says when it helps).
    kd_feature: Literal["embedding", "neck"] = "embedding"
    lkdt_weight: float = 1.0  # KD on target images
    lkds_weight: float = 0.0  # KD on source images (with the same teacher)
    lda_weight: float = 0.0  # the student's own D-MMD + CE + triplet
    feats_weight: float = 1e-3  # on the margin feature loss: the 1/1000 of Heo et al.'s code and the original
    multi_head: bool = False  # one classifier per target
    shift_batches: int = 4  # target_alt full + shift: batch pairs per target to measure the MMD on
    label_smoothing: float = 0.1
    triplet_margin: float = 0.3
    histogram_images: int = 300  # per target, for the teacher-vs-student distance picture saved before and after
    out: str = "runs/distill"
    data: DataOptions = field(default_factory=DataOptions)
    train: TrainConfig = field(default_factory=_kd_train_defaults)
    eval: EvalOptions = field(default_factory=EvalOptions)

    def validate(self) -> None:
        self.train.validate()
        self.eval.validate()
        check_loss_settings(self)
        if not self.targets:
            raise ConfigError("distill needs at least one target: -t T1 T2 ...")
        if self.histogram_images < 0:
            raise ConfigError(f"histogram_images is a number of images per target, 0 or more; got "
                              f"{self.histogram_images}")
        if len(self.teachers) != len(self.targets):
            raise ConfigError(
                f"{len(self.teachers)} teacher(s) for {len(self.targets)} target(s) ({' '.join(self.targets)}): "
                "pass one --teachers checkpoint per target, in the same order"
            )
        weights = {"--lkdt-weight": self.lkdt_weight, "--lkds-weight": self.lkds_weight,
                   "--lda-weight": self.lda_weight, "feats_weight": self.feats_weight}
        for flag, value in weights.items():
            if not 0 <= value < math.inf:  # NaN included
                raise ConfigError(f"{flag} must be 0 or positive, got {value}")
        if self.lkdt_weight == 0 and self.lkds_weight == 0 and self.lda_weight == 0:
            raise ConfigError("--lkdt-weight, --lkds-weight and --lda-weight are all 0: nothing to train")
        if self.shift_batches < 1:
            raise ConfigError(f"shift_batches must be at least 1, got {self.shift_batches}")
        if self.student_init and self.pretrained not in ("", "none"):
            raise ConfigError(f"--pretrained {self.pretrained} has no effect with --student-init (the student starts "
                              "from that checkpoint); leave one of them out")
        if self.teacher_last_stride not in (1, 2):
            raise ConfigError(f"--teacher-last-stride must be 1 or 2, got {self.teacher_last_stride}")
        if self.teacher_last_stride != 1 and not self.teacher_arch:
            raise ConfigError("--teacher-last-stride applies to plain state dicts (--teacher-arch ARCH); a kdreid "
                              "checkpoint records its own: leave it out")


# ------------------------------------------------------------------------------------------------ visiting order
def target_order(
    style: str, count: int, *, rng: np.random.Generator | None = None, shifts: Sequence[float] | None = None
) -> list[int]:
    """Indices of the `count` targets in the order they are visited.

    fixed: as given; random: a permutation drawn from `rng`; shift: ascending `shifts` (the domain shift
    between source and each target; the closest target first, ties in the given order)."""
    if style == "fixed":
        return list(range(count))
    if style == "random":
        if rng is None:
            raise ValueError("random order needs an rng")
        return [int(i) for i in rng.permutation(count)]
    if style == "shift":
        if shifts is None or len(shifts) != count:
            raise ValueError(f"shift order needs {count} shifts, got {shifts}")
        return [int(i) for i in np.argsort(np.asarray(shifts, dtype=np.float64), kind="stable")]
    raise ValueError(f"unknown target order {style!r}")


def batch_schedule(iteration: int, count: int) -> tuple[int, int]:
    """`target_alt batch`: loop iteration -> (group, position within the group's visiting order)."""
    return divmod(iteration, count)


def full_schedule(iteration: int, lengths: Sequence[int], order: Sequence[int]) -> tuple[int, int]:
    """`target_alt full`: loop iteration -> (target index, batch within that target's epoch), walking the targets'
    epochs one after the other in `order`. lengths[t]: batches per epoch of target t."""
    for target in order:
        if iteration < lengths[target]:
            return target, iteration
        iteration -= lengths[target]
    raise IndexError(f"iteration past the epoch's {sum(lengths)} batches")


def _order_rng(seed: int, epoch: int, group: int) -> np.random.Generator:
    # Stable across runs and resumes (never Python's hash); 0x4F524452 = 'ORDR'.
    return np.random.default_rng([seed, 0x4F524452, epoch, group])


# ------------------------------------------------------------------------------------------------ models
class Teacher(nn.Module):
    """A frozen teacher and what distilling from it needs: the margins of its stage maps (Heo et al.)."""

    def __init__(self, model: nn.Module, mode: str):
        super().__init__()
        self.model = model.requires_grad_(False)
        self.mode = mode
        for j, bn in enumerate(model.stage_batchnorms()):
            if isinstance(bn, DSBatchNorm):  # a domain-specific teacher: the branch it evaluates with
                bn = bn.bns[model.default_domain]
            self.register_buffer(f"margin{j}", bn_margins(bn.weight, bn.bias), persistent=False)

    @property
    def margins(self) -> list[torch.Tensor]:
        return [getattr(self, f"margin{j}") for j in range(len(self.model.stage_channels))]

    @torch.no_grad()
    def forward(self, images: torch.Tensor):
        # eval: BatchNorm uses the teacher's own statistics; train: the batch's, and they keep updating, as the
        # original code ran its teachers (for ablation only). Set on every call: nothing else may change it.
        self.model.train(self.mode == "train")
        return self.model(images, return_all=True)


def load_teacher(path: str, arch: str = "", last_stride: int = 1) -> nn.Module:
    """A kdreid checkpoint, or (with `arch`) a plain state dict of another toolkit, built with `last_stride`, as an
    eval-mode model. A kdreid checkpoint is rebuilt as it records itself (architecture, last stride, embedding,
    DSBN) even with `arch`: `arch` and `last_stride` describe the plain state dicts that may sit beside it (mixed
    teachers), and rebuilding it with them would give another network, or refuse a teacher of another
    architecture."""
    try:
        return load_checkpoint(path)  # its metadata too: the target checks (check_teacher_targets) apply
    except CheckpointError as error:
        if "not a kdreid checkpoint" not in str(error):
            raise
        if not arch:
            raise CheckpointError(
                f"{path}: not a kdreid checkpoint; to load a plain state dict of another toolkit, pass "
                "--teacher-arch ARCH"
            ) from None
    # with the embedding layer the file holds, if any (SpCL's and the seed's `feat`)
    return build_model(arch, 0, pretrained=path, last_stride=last_stride, embedding_dim=embedding_dim_of(path)).eval()


# RUN/teachers.json: a digest of each teacher's weights when the run began.
# The student-against-teachers distances' data (kdreid.viz.kd), before and after distillation.
PICTURE_DATA = ("kd_distances_before.npz", "kd_distances_after.npz")
TEACHERS_FILE = "teachers.json"
_WEIGHTS_DIGEST = "weights sha256:"  # a record's prefix; without it (runs begun by an older kdreid), the file's SHA-256


def check_same_teachers(run: Path, teachers: Sequence[str], models: Sequence[nn.Module], *, resuming: bool) -> None:
    """A resumed distillation must learn from the teachers it began with: the same paths may hold other models since
    (a teacher trained again in place, a relative path read from another folder), and other paths the same ones (a
    pipeline's run folder moved: its teachers move with it). The first run records a digest of each teacher's weights
    (`models`, loaded from `teachers`); a resume with other weights is refused. The weights, not the file: a
    pipeline's teacher measured again with another distance is the same teacher in a file that records other
    numbers."""
    record = run / TEACHERS_FILE
    now = [_WEIGHTS_DIGEST + weights_digest(model) for model in models]
    if resuming and record.is_file():
        try:
            before = json.loads(record.read_text())
            if not (isinstance(before, list) and all(isinstance(digest, str) for digest in before)):
                raise ValueError("not a list of digests")
        except (OSError, ValueError) as error:
            raise TrainingError(f"{record} cannot be read ({error}); delete it to resume without checking that the "
                                "teachers are the files the run began with") from None
        for position, (path, was, digest) in enumerate(zip(teachers, before, now), start=1):
            if was != (digest if was.startswith(_WEIGHTS_DIGEST) else file_digest(path)):
                raise TrainingError(
                    f"teacher {position} ({path}) is not the model {run} began with (its weights differ); resume "
                    "with the run's own teachers or choose another --out"
                )
        return
    write_json(record, now)


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over a model's state dict: every name, dtype, shape and the tensor's bytes, in order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}\t{tensor.dtype}\t{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_teacher_targets(teachers: Sequence[nn.Module], paths: Sequence[str], targets: Sequence[str],
                          sources: Sequence[str]) -> None:
    """Refuse a kdreid teacher that was not trained on the target at its position (teachers in another order,
    or never adapted). A plain state dict of another toolkit records no datasets and is not checked."""
    for position, (teacher, path, target) in enumerate(zip(teachers, paths, targets), start=1):
        datasets = list((getattr(teacher, "kdreid_meta", None) or {}).get("datasets") or [])
        if not datasets or target in datasets:
            continue
        adapted_to = [d for d in datasets if d not in sources]
        if adapted_to:
            raise ConfigError(
                f"teacher {position} ({path}) was adapted to {', '.join(adapted_to)}, but target {position} is "
                f"{target}: pass --teachers in the targets' order"
            )
        raise ConfigError(
            f"teacher {position} ({path}) was trained on {', '.join(datasets)} only, not on target {position} "
            f"{target}: pass a teacher adapted to {target} (kdreid adapt -t {target})"
        )


def teacher_groupings(teachers: Sequence[nn.Module]) -> list[str]:
    """How each teacher grouped its target's images when it was adapted, as its checkpoint records it (`tracklet`,
    `pseudo`, `oracle`); "—" for a kdreid teacher that never saw its target grouped (not from `adapt`), "unrecorded"
    for a plain state dict of another toolkit."""
    groupings = []
    for teacher in teachers:
        meta = getattr(teacher, "kdreid_meta", None)
        groupings.append("unrecorded" if not meta else str((meta.get("extra") or {}).get("grouping") or "—"))
    return groupings


def student_grouping(teacher_groupings: Iterable[str]) -> str:
    """A student's grouping cell in a results table: its own target batches come by tracklet (its only use of
    groups is its own D-MMD); what its teachers learnt from their grouping, it inherits (an oracle teacher makes an
    oracle student)."""
    return f"tracklet; teachers {', '.join(dict.fromkeys(teacher_groupings))}"


def multi_head_copy(model: nn.Module, heads: int) -> nn.Module:
    """The same model with `heads` classifiers, each a copy of `model`'s one (built anew, so that every head's
    parameters exist before the optimiser is made)."""
    args = dict(model.build_args)
    if args.get("num_heads", 1) != 1 or getattr(model, "classifier", None) is None:
        raise ConfigError(f"--multi-head needs a single-head student with a classifier; {model.arch} has none")
    args.update(num_classes=[model.num_classes] * heads, num_heads=heads)
    copy = build_model(model.arch, **args)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    for i in range(heads):
        state[f"classifiers.{i}.weight"] = model.classifier.weight.detach().clone()
    copy.load_state_dict(state)
    copy.kdreid_meta = getattr(model, "kdreid_meta", {})
    return copy


class _KDVectors(nn.Module):
    """A network's vectors that distance distillation compares (`kd_feature`), as the model output that
    `extract_features` embeds."""

    def __init__(self, network: nn.Module, kd_feature: str):
        super().__init__()
        self.network, self.kd_feature = network, kd_feature

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return getattr(self.network(images, return_all=True), self.kd_feature)


def _save_kd_distances(path: Path, student: nn.Module, teachers: nn.ModuleList, targets, config: DistillConfig,
                       device: torch.device, reuse: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """For `kdreid.viz.kd`: on a fixed sample of each target's training images, the cosine distances between
    pairs that its teacher and the student give (the matrices distance KD matches, both networks in eval mode),
    and whether a pair shows one identity (for the picture only, never for training). `reuse`: arrays of an
    earlier call of this run whose teachers' distances still hold (frozen teachers, the same sample); -> the arrays."""
    arrays: dict[str, np.ndarray] = {"targets": np.array([dataset.name for dataset in targets])}
    rng = np.random.default_rng([config.train.seed, 0x4B44])  # 'KD'
    was_training = student.training
    for t, dataset in enumerate(targets):
        subset = picture_sample(dataset.train, config.histogram_images, rng)
        upper = torch.triu_indices(len(subset), len(subset), offset=1)
        networks = [("student", student)]
        if reuse is not None:
            arrays.update({f"t{t}_{key}": reuse[f"t{t}_{key}"] for key in ("teacher", "same")})
        else:
            networks.append(("teacher", teachers[t].model))
            pids = torch.tensor([r.pid for r in subset])
            arrays[f"t{t}_same"] = (pids[upper[0]] == pids[upper[1]]).numpy()
        for name, network in networks:
            vectors = extract_features(_KDVectors(network, config.kd_feature), subset, height=config.train.height,
                                       width=config.train.width, batch_size=config.eval.batch_size,
                                       device=device).features
            arrays[f"t{t}_{name}"] = cosine_distance_matrix(vectors)[upper[0], upper[1]].numpy()
    student.train(was_training)
    write_picture_data(path, arrays)
    return arrays


def feature_kd(projector: nn.Module, student_maps, teacher_maps, margins) -> torch.Tensor:
    """Margin feature loss between the student's maps, projected to the teacher's widths and sizes, and the
    teacher's."""
    return margin_feature_loss(projector(student_maps, teacher_maps), teacher_maps, margins)


# ------------------------------------------------------------------------------------------------ the stage
@stage_runner
def run(config: DistillConfig, *, resume: bool = False) -> StageResult:
    # The teachers are read before the run folder is made: a teacher of the wrong target stops here, not after
    # the datasets are read.
    teacher_models = [load_teacher(path, config.teacher_arch, config.teacher_last_stride) for path in config.teachers]
    check_teacher_targets(teacher_models, config.teachers, config.targets, config.sources)
    train = config.train
    start = begin_stage(config, resume=resume)
    run_dir, log, device, sources, targets = start.run, start.log, start.device, start.sources, start.targets
    if distributed.is_main():
        check_same_teachers(run_dir.path, config.teachers, teacher_models,
                            resuming=resume and has_checkpoint(run_dir.path))
    for path, teacher in zip(config.teachers, teacher_models):
        note_loaded_weights(teacher, log.info, f"teacher {path}")
    groupings = teacher_groupings(teacher_models)
    for path, grouping in zip(config.teachers, groupings):
        if grouping == "oracle":
            log.warning(f"teacher {path} was adapted with --grouping oracle (the target's identity labels): this "
                        "student is an ablation, not unsupervised adaptation")
    source_records = combine_train(sources, combineall=config.data.combineall)

    # The student: from its source-trained checkpoint (same label space as the sources), or built anew.
    validation = None
    if config.student_init:
        try:
            student = load_checkpoint(config.student_init, arch=config.arch or None)
        except CheckpointError as error:  # named as the flag the file came from
            raise CheckpointError(f"--student-init {error}") from None
        # Its classifier (--lda-weight's CE) and its held-out source identities must be this run's sources'.
        held_out = (getattr(student, "kdreid_meta", None) or {}).get("extra", {}).get("held_out")
        if config.lda_weight > 0 or held_out:
            refuse_other_source_label_space(student, "--student-init", config.student_init, config)
        source_records, validation = source_label_space(source_records, student)
    else:
        student = None
    if train.select == "source-val" and validation is None:
        raise ConfigError(
            "--select source-val needs a --student-init trained with --select source-val (its held-out identities)"
        )
    num_classes = 1 + max(r.pid for r in source_records)
    if student is None:
        student = build_model(config.arch or "osnet_x0_25", num_classes, pretrained=config.pretrained,
                              embedding_dim=embedding_dim_for(config.pretrained))
        note_loaded_weights(student, log.info, f"student {student.arch} weights")
    elif config.lda_weight > 0 and set(np.atleast_1d(student.num_classes).tolist()) != {num_classes}:
        raise ConfigError(  # (a multi-head student: the same source classes in each of its heads)
            f"{config.student_init} was trained on {student.num_classes} source identities, but the sources "
            f"{'+'.join(config.sources)} have {num_classes}; --lda-weight needs the student of a source run on "
            "the same data"
        )
    # One target has one head: --multi-head changes nothing there (the model keeps its single classifier).
    multi_head = config.multi_head and len(targets) > 1
    heads = getattr(student, "num_heads", 1)
    if heads > 1:  # a multi-head distillation's student: its heads belong to the targets it was distilled on
        recorded = list(getattr(student, "kdreid_meta", {}).get("extra", {}).get("targets") or [])
        if (multi_head or config.lda_weight > 0) and not (multi_head and heads == len(targets)
                                                          and recorded in ([], list(config.targets))):
            raise ConfigError(
                f"{config.student_init} has {heads} classifiers, one per target of a --multi-head distillation"
                f"{' (' + ' '.join(recorded) + ')' if recorded else ''}: continue it with --multi-head and the same "
                "targets in the same order, or start from a single-head student (train-source's model.pt)"
            )
    elif multi_head:
        student = multi_head_copy(student, len(targets))
    for network in (student, *teacher_models):  # the teachers see the student's batches
        check_input_size(network, train.height, train.width)
    student = distributed.sync_batchnorm(student.train().to(device))  # BatchNorm over the global batch

    teachers = nn.ModuleList(Teacher(model, config.teacher_mode) for model in teacher_models).to(device)
    if device.type == "cuda":  # the layout the loop gives the student and its batches there (no-grad, bf16 autocast)
        teachers.to(memory_format=torch.channels_last)
    use_feats = config.kd_style in ("feats", "all")
    use_outputs = config.kd_style in ("outputs", "all")
    # One projector per teacher (their widths may differ), made before the optimiser so that it trains.
    projectors = nn.ModuleList(build_projector(student, t.model) for t in teachers if use_feats).to(device)
    distributed.sync_batchnorm(projectors)
    if config.teacher_mode == "train":  # teachers that normalise with batch statistics see the global batch too
        distributed.sync_batchnorm(teachers)

    for teacher, path in zip(teachers, config.teachers):
        extra = getattr(teacher.model, "kdreid_meta", {}).get("extra", {})
        size = extra.get("input_size")
        if size and list(size) != [train.height, train.width]:
            log.warning(f"teacher {path} was trained at {size[0]}x{size[1]}, distilled at {train.height}x{train.width}")
        if extra.get("stage", "adapt") != "adapt":
            log.warning(f"teacher {path} comes from the {extra['stage']} stage, not adapt: it was not adapted to "
                        "its target")

    need_source = config.lkds_weight > 0 or config.lda_weight > 0 or config.target_order == "shift"
    # Source images are decoded only when a loss or the shift order uses them (MSMT17 is 30k images).
    source_batches = BatchSource(
        source_records, [r.pid for r in source_records], height=train.height, width=train.width,
        batch_size=train.batch_size, num_instances=train.num_instances, augment=train.augment, device=device,
        seed=train.seed, log=log,
    ) if need_source else None
    target_batches = []
    for t, dataset in enumerate(targets):
        tracklets = [r.tracklet for r in dataset.train]
        if min(tracklets) < 0:
            raise DatasetError(
                f"target {dataset.name} has training images without a tracklet id; distill samples target batches "
                "by tracklet (give the custom manifest a tracklet column)"
            )
        refuse_tracklets_across_cameras(dataset, "distill samples its target batches by tracklet")
        target_batches.append(BatchSource(
            dataset.train, tracklets, height=train.height, width=train.width, batch_size=train.batch_size,
            num_instances=train.num_instances, augment=train.augment, device=device, seed=train.seed + 1 + t,
            what="tracklets", log=log,
        ))

    count = len(targets)
    lengths = [len(b) for b in target_batches]
    iterations = max(lengths)
    batches_per_epoch = iterations * count if config.target_alt == "batch" else sum(lengths)
    log.info(
        f"distill {'+'.join(config.sources)} -> {' '.join(config.targets)}: student {student.arch} "
        f"({sum(p.numel() for p in student.parameters()):,} parameters), teachers "
        + ", ".join(f"{t.model.arch} ({path})" for t, path in zip(teachers, config.teachers))
        + f"; target_alt {config.target_alt}, order {config.target_order}, kd_style {config.kd_style} "
        f"on the {config.kd_feature}, lkdt {config.lkdt_weight}, lkds {config.lkds_weight}, "
        f"lda {config.lda_weight}, teachers in {config.teacher_mode} mode; "
        f"{batches_per_epoch} optimiser steps per epoch"
    )
    # (A weights file may hold a source-trained student; none and imagenet do not.)
    if not config.student_init and str(config.pretrained).lower() in ("none", "imagenet"):
        start_weights = "random weights" if str(config.pretrained).lower() == "none" else "ImageNet weights"
        log.warning(f"no --student-init: the student starts from {start_weights}, not from a source-trained model "
                    "(KD-ReID's student is trained on the source first: pass --student-init SOURCE_RUN/model.pt)")
    if config.multi_head and config.lda_weight == 0:
        log.warning("--multi-head without --lda-weight: no loss reaches the classifiers, so the heads stay as they are")
    optimizer = build_optimizer(list(student.parameters()) + list(projectors.parameters()), train.optim)

    @torch.no_grad()
    def embed(images: torch.Tensor) -> torch.Tensor:
        # Eval mode: measuring the domain shift must not move the student's BatchNorm statistics.
        was_training = student.training
        student.eval()
        embeddings = student(images, return_all=True).embedding  # (B, D), before BNNeck
        student.train(was_training)
        return embeddings

    def domain_shift(source_images: torch.Tensor, target_images: torch.Tensor) -> float:
        return float(mmd(embed(source_images), embed(target_images)))

    state: dict = {"order": list(range(count)), "group": None}

    def before_epoch(epoch: int) -> None:
        if source_batches is not None:
            source_batches.start_epoch(epoch)
        for batches in target_batches:
            batches.start_epoch(epoch)
        state["group"] = None
        if config.target_alt == "full":
            shifts = None
            if config.target_order == "shift":
                generator = torch.Generator(device=device).manual_seed(train.seed * 1000 + epoch)
                shifts = []
                for batches in target_batches:
                    values = [
                        domain_shift(source_batches.next_batch(generator)[0], batches.next_batch(generator)[0])
                        for _ in range(config.shift_batches)
                    ]
                    shifts.append(float(np.mean(values)))
                shifts = distributed.average_list(shifts)  # one order for every process (each saw its share)
                # The measurement consumed batches: start the epoch's sampling afresh.
                source_batches.start_epoch(epoch)
                for batches in target_batches:
                    batches.start_epoch(epoch)
                log.info("domain shift (MMD) per target: " + ", ".join(
                    f"{name} {value:.4f}" for name, value in zip(config.targets, shifts)))
            state["order"] = target_order(
                config.target_order, count, rng=_order_rng(train.seed, epoch, 0), shifts=shifts
            )

    def step_batches(context: StepContext):
        """(target index, source batch or None, target batch) of this loop iteration."""
        if config.target_alt == "full":
            t, _ = full_schedule(context.iteration, lengths, state["order"])
            source = source_batches.next_batch(context.generator) if need_source else None
            return t, source, target_batches[t].next_batch(context.generator)
        group, position = batch_schedule(context.iteration, count)
        if position == 0 or state["group"] is None:
            source = source_batches.next_batch(context.generator) if need_source else None
            batches = [b.next_batch(context.generator) for b in target_batches]
            shifts = None
            if config.target_order == "shift":
                source_embeddings = embed(source[0])
                shifts = [float(mmd(source_embeddings, embed(images))) for images, _ in batches]
                shifts = distributed.average_list(shifts)  # one order for every process (each saw its share)
            order = target_order(config.target_order, count, rng=_order_rng(train.seed, context.epoch, group),
                                 shifts=shifts)
            state["group"] = {"source": source, "targets": batches, "order": order}
        current = state["group"]
        t = current["order"][position]
        return t, current["source"], current["targets"][t]

    def kd_terms(t: int, images: torch.Tensor, student_out, prefix: str) -> dict[str, torch.Tensor]:
        teacher_out = teachers[t](images)
        terms = {}
        if use_outputs:
            terms[f"kd_{prefix}"] = distance_kd(getattr(student_out, config.kd_feature),
                                                getattr(teacher_out, config.kd_feature))
        if use_feats:
            terms[f"feat_{prefix}"] = config.feats_weight * feature_kd(
                projectors[t], student_out.feature_maps, teacher_out.feature_maps, teachers[t].margins
            )
        return terms

    def train_step(context: StepContext) -> dict[str, torch.Tensor]:
        t, source, (target_images, target_groups) = step_batches(context)
        target_out = student(target_images)
        total = target_out.embedding.new_zeros((), dtype=torch.float32)
        losses: dict[str, torch.Tensor] = {}
        if config.lkdt_weight > 0:
            terms = kd_terms(t, target_images, target_out, "target")
            losses.update(terms)
            total = total + config.lkdt_weight * sum(terms.values())
        if config.lkds_weight > 0 or config.lda_weight > 0:
            source_images, source_labels = source
            source_out = student(source_images)
            if config.lkds_weight > 0:
                terms = kd_terms(t, source_images, source_out, "source")
                losses.update(terms)
                total = total + config.lkds_weight * sum(terms.values())
            if config.lda_weight > 0:
                logits = source_out.logits[t] if multi_head else source_out.logits
                da = {
                    "ce": cross_entropy_label_smoothing(logits, source_labels, config.label_smoothing),
                    "triplet": batch_hard_triplet(source_out.embedding, source_labels, config.triplet_margin),
                    **dmmd_terms(source_out.embedding, source_labels, target_out.embedding, target_groups),
                }
                losses.update(da)
                total = total + config.lda_weight * sum(da.values())
        return {"loss": total, **losses}

    evaluate = stage_evaluator(student, targets + sources, validation, config, device, log)
    # The student before its first step: a resumed run's weights come back inside `fit`, so this is its starting
    # point too, drawn with this run's `histogram_images` as the "after" file will be.
    before = _save_kd_distances(run_dir.path / PICTURE_DATA[0], student, teachers, targets, config, device)

    result = fit(
        run=run_dir, config=train, stage_config=config, modules={"student": student, "projectors": projectors},
        optimizer=optimizer, batches_per_epoch=batches_per_epoch, train_step=train_step, evaluate=evaluate,
        before_epoch=before_epoch, resume=resume, reevaluate=start.evaluation_changed, log=log,
        # A checkpoint inside an epoch keeps the sampling positions and the group's visiting order and batches.
        resumables={"order_and_group": state,
                    **({"source_batches": source_batches} if source_batches is not None else {}),
                    **{f"target_batches{t}": batches for t, batches in enumerate(target_batches)}},
    )
    finished = finish_stage(
        start, config, student, result, stage="distill",
        label=f"KD-ReID student ({student.arch}, kd {config.kd_style}, {config.target_alt}/{config.target_order})",
        datasets=config.sources + config.targets,
        grouping=student_grouping(groupings),
        checkpoint_extra={"targets": list(config.targets), "teachers": list(config.teachers),
                          "teacher_groupings": groupings},
        metrics_extra={"student": student.arch, "targets": list(config.targets), "teacher_groupings": groupings},
    )
    # After the results: the picture's data must not cost the trained student when it cannot be written.
    # Teachers in eval mode are frozen, their distances the same: measured once. (In train mode, an ablation,
    # their BatchNorm statistics moved with the batches, and are measured again.)
    _save_kd_distances(run_dir.path / PICTURE_DATA[1], student, teachers, targets, config, device,
                       reuse=before if config.teacher_mode == "eval" else None)
    return finished
