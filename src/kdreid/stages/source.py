"""Stage 1: supervised training on the labelled source(s).

Loss = cross-entropy with label smoothing (ε = 0.1) on the logits + batch-hard triplet (margin 0.3) on the
embedding before BNNeck, P×K batches by identity. The trained model is then evaluated on the source test split
and on every target named, which gives the "source only" rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from kdreid import distributed
from kdreid.evaluation.features import note_loaded_weights
from kdreid.losses import batch_hard_triplet, cross_entropy_label_smoothing
from kdreid.models import build_model, check_input_size
from kdreid.models.weights import embedding_dim_for
from kdreid.stages.common import (
    StageResult,
    begin_stage,
    check_loss_settings,
    stage_evaluator,
    finish_stage,
    stage_runner,
    DataOptions,
    EvalOptions,
)
from kdreid.stages.data import BatchSource, combine_train, hold_out_validation
from kdreid.stages.loop import StepContext, TrainConfig, fit
from kdreid.stages.optim import build_optimizer, check_setting
from kdreid.stages.speed import auto_compile_mode


@dataclass
class SourceConfig:
    # Settings that only decide what is evaluated: like loop.SELECTION_SETTINGS, they change no weights while the
    # final model is the last epoch's.
    EVALUATION_ONLY: ClassVar[tuple[str, ...]] = ("targets",)

    sources: list[str] = field(default_factory=lambda: ["msmt17"])
    targets: list[str] = field(default_factory=list)  # evaluated only: the "source only" rows
    arch: str = "resnet50"
    pretrained: str = "none"  # none | imagenet | PATH
    last_stride: int = 1
    label_smoothing: float = 0.1
    triplet_margin: float = 0.3
    soft_margin: bool = False
    out: str = "runs/source"
    data: DataOptions = field(default_factory=DataOptions)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalOptions = field(default_factory=EvalOptions)

    def validate(self) -> None:
        """Values no source training can use: one ConfigError naming the setting, before any work (also in a
        pipeline, before its first stage)."""
        self.train.validate()
        self.eval.validate()
        check_loss_settings(self)
        check_setting(self.last_stride in (1, 2), "last_stride", self.last_stride, "1 or 2")


def source_train_step(model: torch.nn.Module, batches: BatchSource, config: SourceConfig):
    """The stage's step for the loop (also what bench/train_speed.py times): CE + triplet on one P×K batch."""

    def train_step(context: StepContext) -> dict[str, torch.Tensor]:
        images, labels = batches.next_batch(context.generator)
        out = model(images)
        ce = cross_entropy_label_smoothing(out.logits, labels, config.label_smoothing)
        triplet = batch_hard_triplet(out.embedding, labels, config.triplet_margin, config.soft_margin)
        return {"loss": ce + triplet, "ce": ce, "triplet": triplet}

    return train_step


@stage_runner
def run(config: SourceConfig, *, resume: bool = False) -> StageResult:
    train = config.train
    start = begin_stage(config, resume=resume)
    run_dir, log, device, sources, targets = start.run, start.log, start.device, start.sources, start.targets
    records = combine_train(sources, combineall=config.data.combineall)
    validation = None
    if train.select == "source-val":
        validation = hold_out_validation(records, train.source_val_ids, train.seed)
        records = validation.train
    num_classes = 1 + max(r.pid for r in records)
    log.info(
        f"source {'+'.join(config.sources)}: {num_classes} identities, {len(records)} images; "
        f"{train.batch_size // train.num_instances}×{train.num_instances} batches; BatchNorm sees "
        f"{train.batch_size} images per forward on {device}"
    )

    # A weights file's embedding layer (SpCL's / OpenUnReID's `feat`) is loaded with it, as the distill stage does.
    model = build_model(config.arch, num_classes, pretrained=config.pretrained, last_stride=config.last_stride,
                        embedding_dim=embedding_dim_for(config.pretrained))
    note_loaded_weights(model, log.info, f"{config.arch} weights")
    check_input_size(model, train.height, train.width)
    model = model.to(device)
    distributed.sync_batchnorm(model)  # several processes: BatchNorm over the global batch
    batches = BatchSource(
        records, [r.pid for r in records], height=train.height, width=train.width, batch_size=train.batch_size,
        num_instances=train.num_instances, augment=train.augment, device=device, seed=train.seed, log=log,
    )
    optimizer = build_optimizer(model.parameters(), train.optim)
    train_step = source_train_step(model, batches, config)
    evaluate = stage_evaluator(model, sources + targets, validation, config, device, log)

    result = fit(
        run=run_dir, config=train, stage_config=config, modules={"model": model}, optimizer=optimizer,
        batches_per_epoch=len(batches), train_step=train_step, evaluate=evaluate,
        before_epoch=batches.start_epoch, resumables={"batches": batches}, resume=resume,
        reevaluate=start.evaluation_changed, log=log,
        compile_auto=auto_compile_mode(config.arch),
    )
    # `held_out` lets adapt and distill rebuild the same label space (and validation split) from the same data.
    held_out = {"fraction": train.source_val_ids, "seed": train.seed} if validation is not None else None
    return finish_stage(
        start, config, model, result, stage="source", label=f"source only ({config.arch})",
        datasets=config.sources, checkpoint_extra={"held_out": held_out},
    )

