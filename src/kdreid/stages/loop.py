"""The one training loop every stage runs.

A stage supplies what differs — a `train_step` that turns (epoch, iteration) into named losses, an `evaluate`
that returns metrics per dataset, and an optional `before_epoch` hook — and the loop does the rest: device,
bf16 autocast on CUDA, backward, gradient clipping, the LR schedule, NaN checks, progress bar, log lines,
TensorBoard scalars, a checkpoint every epoch, resume, evaluation every `eval_freq` epochs and checkpoint
selection without target test labels (the stage writes `metrics.json` and `results.md` from the result:
`common.finish_stage`).

Resume. A checkpoint holds everything the next step depends on: the modules, the optimiser (whose state is the
only AMP state: bf16 autocast needs no GradScaler, unlike fp16), the position (the LR schedule is a function of
the epoch, the P×K sampler is seeded by (seed, epoch) and augmentation by (seed, epoch, iteration), so the
position is their state), every RNG state (Python, numpy, torch CPU and CUDA), the stage's `carried` state (what
it keeps from one epoch to the next) and, for a checkpoint written inside an epoch, the stage's `resumables`
(sampler positions, pseudo-labels, cached batches). It is written
atomically with a sha256 header (`RUN/checkpoints/last.pt`, the one before kept as `previous.pt`), so a kill at
any moment leaves a complete file and a damaged one is detected and skipped. With --deterministic a resumed
run is bit-identical to an uninterrupted one. SIGINT/SIGTERM finish the current step, write a checkpoint at
that position and stop with `TrainingInterrupted` (exit code 128 + signal), which says how to resume.
"""

from __future__ import annotations

import copy
import hashlib
import io
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import numpy as np
import torch
import yaml
from torch import nn

from kdreid import distributed
from kdreid.config import dump_yaml, flatten, to_dict
from kdreid.data.augment import AugmentConfig
from kdreid.errors import CheckpointError, ConfigError, KdreidError, TrainingError
from kdreid.evaluation.ranking import METRIC_COLUMNS
from kdreid.models.weights import TRAINING_STATE_FORMAT, TRAINING_STATE_MAGIC, UnsafeCheckpointError, safe_load
from kdreid.rundir import RunDir, absolute_path, atomic_write_bytes, make_folder, remove_stale_temporaries
from kdreid.stages.optim import OptimConfig, check_setting, learning_rate, set_learning_rate
from kdreid.stages.speed import (
    COMPILE_MODES, CompiledStep, LossWindow, resolve_compile, to_memory_format, tune_backends, use_channels_last,
)

METRIC_KEYS = tuple(key for _, key in METRIC_COLUMNS)
SELECTION_RULES = {
    "last": "last epoch",
    "source-val": "best source-validation mAP (held-out source training identities)",
    "target-clusters": "best label-free target score (silhouette of DBSCAN clusters of the targets' training "
                       "images × share clustered)",
}
# What each rule compares between evaluations: (entry of evaluate()'s result, its key); "last" compares epochs.
SELECTION_SCORES = {"source-val": ("source-val", "mAP"), "target-clusters": ("target-clusters", "score")}


# The largest input side any command takes (re-ID crops are ~256x128).
MAX_INPUT_SIDE = 4096


def check_input_side(flag: str, value: int) -> None:
    """One image of 100000x100000 exhausts the memory before any check can speak: refused here, for every command
    that takes --height/--width."""
    if value > MAX_INPUT_SIDE:
        raise ConfigError(f"{flag} {value} is far above any re-ID input size (they train at 256x128); give at most "
                          f"{MAX_INPUT_SIDE}")


@dataclass
class TrainConfig:
    """Settings every stage shares; the common CLI flags map onto these."""

    epochs: int = 60
    batch_size: int = 32  # P×K images per domain and step
    num_instances: int = 4  # K
    height: int = 256
    width: int = 128
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    eval_freq: int = 0  # evaluate every N epochs; 0 = at the end only
    select: Literal["last", "source-val", "target-clusters"] = "last"
    source_val_ids: float = 0.1  # fraction of source training identities held out when select = source-val
    log_freq: int = 20  # iterations between reads of the losses from the device (and NaN checks)
    compile: str = "auto"  # auto (the stage's choice on CUDA, off on CPU) | off | default | reduce-overhead | ...
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self) -> None:
        """Values no run can use: one ConfigError naming the flag, before any work is done."""
        positive = {"--epochs": self.epochs, "--height": self.height, "--width": self.width,
                    "--batch-size": self.batch_size}
        for flag, value in positive.items():
            if value < 1:
                raise ConfigError(f"{flag} must be at least 1, got {value}")
        check_input_side("--height", self.height)
        check_input_side("--width", self.width)
        if self.num_instances < 2:
            raise ConfigError(
                f"--num-instances must be at least 2 (the triplet and D-MMD losses need pairs), got {self.num_instances}"
            )
        if self.batch_size % self.num_instances:
            raise ConfigError(
                f"--batch-size {self.batch_size} is not a multiple of --num-instances {self.num_instances}"
            )
        if self.batch_size // self.num_instances < 2:
            # One group per batch: no negative for the triplet and no between-class pair for D-MMD, so both would
            # be 0 at every step without a word.
            raise ConfigError(
                f"--batch-size {self.batch_size} with --num-instances {self.num_instances} gives one group per batch; "
                f"the triplet and D-MMD losses need two or more: choose --batch-size at least {2 * self.num_instances} "
                "(P×K with P >= 2)"
            )
        if not 0 <= self.seed < 2**32:  # what numpy's and torch's generators take
            raise ConfigError(f"--seed must be between 0 and 2**32 - 1, got {self.seed}")
        if self.eval_freq < 0:
            raise ConfigError(f"--eval-freq must be 0 (at the end) or positive, got {self.eval_freq}")
        if self.select == "source-val":  # the fraction of identities held out: none, or all, leaves nothing to
            # validate on or to train on
            check_setting(0 < self.source_val_ids < 1, "train.source_val_ids", self.source_val_ids,
                          "a fraction strictly between 0 and 1")
        self.optim.validate()
        self.augment.validate()
        if self.compile != "auto" and self.compile not in COMPILE_MODES:
            raise ConfigError(f"--compile {self.compile!r} is not one of auto, {', '.join(COMPILE_MODES)}")


def select_device(name: str = "auto") -> torch.device:
    from kdreid.evaluation.features import pick_device

    return distributed.device_for(pick_device(name))  # under torchrun, "cuda" is this process's GPU


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace for reproducible matmuls, set before CUDA starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False


def _as_is(fn):
    return fn


@dataclass
class StepContext:
    epoch: int  # 0-based
    iteration: int  # 0-based within the epoch
    generator: torch.Generator  # augmentation randomness, seeded from (seed, epoch, iteration)
    compile_loss: Callable = _as_is  # fn -> fn through torch.compile when the step is compiled (CompiledStep.loss)


@dataclass
class FitResult:
    final: dict  # {dataset: {metric: percent}} of the selected epoch
    epochs: list  # one entry per epoch: losses, lr, metrics when evaluated
    selection: str  # which rule chose the final weights, in words
    selected_epoch: int
    # When this call trained no epoch (a resume after the last one): the time, in ns, of the checkpoint the weights
    # come from, which model.pt keeps, so that a pipeline does not take them for weights trained again.
    weights_time_ns: int | None = None


def fit(**arguments) -> FitResult:
    """Train `modules` (the first one is the model whose weights are selected and saved) for config.epochs.

    `train_step` returns a dict of scalar losses whose "loss" entry is minimised; `evaluate(epoch)` returns
    {dataset: {"mAP", "rank1", ...}} in percent, and the entry its selection rule compares (SELECTION_SCORES).

    `resumables`: what a stage keeps across the iterations of an epoch outside the modules and optimiser (its
    batch sources' sampler positions, pseudo-labels, a cached group of batches), by name: objects with
    `state_dict()` / `load_state_dict()`, or plain dicts (saved and restored in place). They are saved only in
    a checkpoint written inside an epoch (SIGINT/SIGTERM); resuming there restores them instead of calling
    `before_epoch`, so the epoch goes on exactly as it would have.

    `carried`: a plain dict of what a stage keeps from one epoch to the next rather than recomputing it in
    `before_epoch` (adapt's warm-up pseudo-labels); saved in every checkpoint and restored on every resume, before
    `before_epoch` runs.

    `compile_auto`: the compile mode that `--compile auto` stands for in this stage on CUDA (see
    `speed.auto_compile_mode`); on a CPU auto is always off.

    `reevaluate`: why the selected weights' numbers no longer hold (a resume after a query changed, or with another
    evaluation setting), or "": when set and this call did not measure them, they are measured again.

    SIGINT and SIGTERM are handled while this runs (the previous handlers are restored afterwards): the step in
    flight finishes, a checkpoint is written at that position and `TrainingInterrupted` is raised. A second
    signal stops at once (KeyboardInterrupt).
    """
    with _GracefulStop() as stop:
        return _train(stop=stop, **arguments)


def _train(
    *,
    stop: _GracefulStop,
    run: RunDir,
    config: TrainConfig,
    stage_config,
    modules: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    batches_per_epoch: int,
    train_step: Callable[[StepContext], dict[str, torch.Tensor]],
    evaluate: Callable[[int], dict[str, dict[str, float]]],
    before_epoch: Callable[[int], None] | None = None,
    resumables: Mapping[str, Any] | None = None,
    carried: dict[str, Any] | None = None,
    resume: bool = False,
    reevaluate: str = "",
    log=None,
    compile_auto: str = "off",
) -> FitResult:
    log = log or run.logger()
    stop.log = log
    checkpoint_time_ns = None  # of the checkpoint resumed from
    measured_now: set[int] = set()  # the epochs evaluated by this call (on the data as they are now)
    device = select_device(config.device)
    checkpoint_path = checkpoint_file(run.path)
    params = [p for group in optimizer.param_groups for p in group["params"]]

    history: list[dict] = []
    start_epoch = 0
    best = {"score": -math.inf, "epoch": -1, "state": None, "metrics": {}}
    resumables = dict(resumables or {})
    inside = None  # the position of a checkpoint written inside an epoch: iteration, loss sums, resumables
    refuse_occupied(run.path, resume)
    found = load_latest_training_state(run.path, log) if resume else None
    if found is not None:
        state, path = found
        checkpoint_time_ns = path.stat().st_mtime_ns
        try:
            for name, module in modules.items():
                module.load_state_dict(state["modules"][name])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as error:  # another model's checkpoint (a copied file)
            first = str(error).strip().splitlines()[-1].strip() if str(error).strip() else type(error).__name__
            raise TrainingError(f"{path} holds the training state of another model than this command builds "
                                f"({first[:200]}); resume with the command that began {run.path}, or choose "
                                "another --out") from None
        history = state["history"]
        start_epoch = state["epoch"]  # completed epochs
        best.update(state["best"])
        _restore_rng(state["rng"])
        inside = state.get("inside")
        if carried is not None:  # a checkpoint of an earlier kdreid has none: the stage recomputes it
            carried.update(state.get("carried", {}))
        evaluation_pending = state.get("evaluation_pending", False)
        # The weights and optimiser state are in place: the loaded copy is dropped, not held while training.
        found, state = path, None
        if start_epoch >= config.epochs:
            log.info(f"resumed from {path}: all {config.epochs} epochs were trained")
        else:
            where = f"epoch {start_epoch + 1}" + (f", iteration {inside['iteration'] + 1}" if inside else "")
            log.info(f"resumed from {path}: continuing at {where}")
    if start_epoch < config.epochs:
        _warn_of_settings_this_run_cannot_honour(config, log)
    distributed.broadcast_modules(modules.values())  # every process starts from the main one's weights
    if distributed.is_main():
        # The folders training writes to, made now: a file in their place is one line before the first epoch, not
        # a traceback after it. The run folder is this process's (stage_runner holds it): a temporary file there
        # is a write a killed run never finished.
        remove_stale_temporaries(make_folder(run.path))
        remove_stale_temporaries(make_folder(checkpoint_path.parent))
        make_folder(run.path / "tensorboard")

    def write_checkpoint(completed_epochs: int, position: dict | None = None, evaluation_pending: bool = False) -> None:
        if not distributed.is_main():
            return  # one writer: the main process (all hold the same weights)
        state = {
            "format": TRAINING_STATE_FORMAT,
            "epoch": completed_epochs,
            "modules": {name: module.state_dict() for name, module in modules.items()},
            "optimizer": optimizer.state_dict(),
            "history": history,
            "best": best,
            "rng": _capture_rng(),
            "config": to_dict(stage_config),
        }
        if carried:
            state["carried"] = _tensors_to(dict(carried), torch.device("cpu"))
        if position is not None:
            state["inside"] = position
        if evaluation_pending:
            state["evaluation_pending"] = True
        save_training_state(checkpoint_path, state)

    def evaluate_epoch(epoch: int, entry: dict) -> None:
        """Evaluate the model trained for `epoch`: its metrics go in its history `entry`, and `best` follows the
        selection rule. A failure (an image that does not decode, no valid query) loses no training: the epoch is
        saved as trained but not evaluated, and --resume evaluates it again before going on."""
        nonlocal best
        try:
            with compiled.eager():  # evaluation batch sizes vary: no recompilation
                metrics = evaluate(epoch)
        except KdreidError as error:
            write_checkpoint(epoch + 1, evaluation_pending=True)
            error.args = (f"{error} (evaluating epoch {epoch + 1}, whose training is saved in {checkpoint_path}: "
                          "fix that and --resume, which evaluates it again)",)
            raise
        entry["metrics"] = metrics
        measured_now.add(epoch + 1)
        for dataset, values in metrics.items():
            shown = [k for k in METRIC_KEYS if k in values] or list(values)  # a selection score has its own keys
            log.info(f"  {dataset:<16} " + "  ".join(f"{k} {values[k]:.1f}" for k in shown))
            for key, value in values.items():
                writer.add_scalar(f"{dataset}/{key}", value, epoch + 1)
        if config.select in SELECTION_SCORES:
            entry_name, key = SELECTION_SCORES[config.select]
            score = metrics.get(entry_name, {}).get(key, -math.inf)
        else:
            score = epoch
        if config.select == "last" or score > best["score"]:
            best = {
                "score": score,
                "epoch": epoch + 1,
                "state": copy.deepcopy(model.state_dict()) if config.select != "last" else None,
                "metrics": metrics,
            }

    hold_at = _test_hold_step()
    use_amp = config.amp and device.type == "cuda"
    # A resumed run drops the scalars logged after its checkpoint, so no curve holds an epoch twice.
    writer = _tensorboard(run.path / "tensorboard", purge_step=start_epoch + 1 if found is not None else None) \
        if distributed.is_main() else _NoWriter()
    model = next(iter(modules.values()))
    # channels_last while training on CUDA (back to the default layout at the end), and torch.compile if asked.
    channels_last = use_channels_last(device)
    tune_backends(device, config.deterministic)
    if channels_last:
        to_memory_format(modules.values(), torch.channels_last)
    mode = resolve_compile(config.compile, device, compile_auto, distributed.is_distributed())
    compiled = CompiledStep(model, mode, device, log)

    if found is not None and evaluation_pending:
        log.info(f"evaluating epoch {start_epoch} again: its evaluation failed before the run stopped")
        evaluate_epoch(start_epoch - 1, history[-1])
        write_checkpoint(start_epoch)

    for epoch in range(start_epoch, config.epochs):
        resuming_inside = inside is not None and epoch == start_epoch
        if resuming_inside:
            # What before_epoch and the first steps left (checkpoints load onto the CPU: tensors go back to device).
            _load_resumables(resumables, _own_resumables(inside), device)
        elif before_epoch is not None:
            with compiled.eager():
                before_epoch(epoch)  # may run the model in eval mode (pseudo-labels), so train mode comes after
        for module in modules.values():
            module.train()
        lr = learning_rate(config.optim, epoch, config.epochs)
        set_learning_rate(optimizer, lr)
        window = LossWindow(epoch)  # losses stay on the device; read every log_freq iterations
        first_iteration, seconds_before = 0, 0.0
        if resuming_inside:
            first_iteration, seconds_before = inside["iteration"], inside["seconds"]
            window.sums, window.counts = dict(inside["loss_sums"]), dict(inside["loss_counts"])
        started = time.perf_counter()
        bar = _progress(batches_per_epoch, f"epoch {epoch + 1}/{config.epochs}", initial=first_iteration) \
            if distributed.is_main() else None
        for iteration in range(first_iteration, batches_per_epoch):
            if epoch * batches_per_epoch + iteration == hold_at:
                _hold(epoch * batches_per_epoch + iteration, stop)
            if stop.requested():  # between steps: the previous one is complete, this one not begun
                window.flush()  # a non-finite loss must stop the run, not be saved
                # The sums so far as means over the processes (every process calls this): the main process writes
                # the checkpoint, and every process resumes from its sums; its own share's would stand for all.
                loss_sums = distributed.mean_across_ranks(dict(window.sums))
                # What each process keeps inside the epoch, for each: a cached group of batches (distill) holds
                # that process's share of the images, which only it may train on again.
                states = distributed.all_objects(_tensors_to(_resumable_states(resumables), torch.device("cpu")))
                write_checkpoint(epoch, {
                    "iteration": iteration,
                    "loss_sums": loss_sums,
                    "loss_counts": dict(window.counts),
                    "seconds": seconds_before + time.perf_counter() - started,
                    "resumables": states[0],
                    **({"rank_resumables": states[1:]} if len(states) > 1 else {}),
                })
                if bar is not None:
                    bar.close()
                raise stop.interrupted(f"at epoch {epoch + 1}, iteration {iteration + 1} of {batches_per_epoch}",
                                       checkpoint_path)
            compiled.step_begin()

            def forward_backward(iteration=iteration) -> dict[str, torch.Tensor]:
                # The generator is made here so that a step repeated after a compile failure draws the same.
                # Each process augments its own share of the batch: its own stream (rank 0's is a one-process
                # run's).
                step_seed = _step_seed(config.seed, epoch, iteration) + distributed.rank()
                generator = torch.Generator(device=device).manual_seed(step_seed)
                context = StepContext(epoch, iteration, generator, compiled.loss)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    losses = train_step(context)
                optimizer.zero_grad(set_to_none=True)
                losses["loss"].backward()
                return losses

            rewind = None
            if compiled.first_step_pending:  # a compile failure repeats this step eagerly: same batches, same RNG
                drawn_before, rng_before = _resumable_states(resumables), _capture_rng()

                def rewind():
                    _load_resumables(resumables, drawn_before, device)
                    _restore_rng(rng_before)
            losses = compiled.run(forward_backward, rewind)
            distributed.average_gradients(params)  # several processes: the mean over their batches' shares
            if config.optim.clip_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.optim.clip_grad_norm)
            # A non-finite loss is caught at the next flush (naming its step), before the epoch's checkpoint.
            optimizer.step()
            window.add(iteration, losses)
            if (iteration + 1) % max(1, config.log_freq) == 0 or iteration + 1 == batches_per_epoch:
                window.flush()
                if bar is not None:
                    bar.set_postfix({k: f"{v:.3f}" for k, v in window.last.items()}, refresh=False)
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.close()
        means = distributed.mean_across_ranks(window.means())  # over the global batch
        distributed.check_same_weights(modules.values())  # several processes: still the same weights on each
        seconds = seconds_before + time.perf_counter() - started
        entry = {"epoch": epoch + 1, "lr": lr, "losses": means, "seconds": round(seconds, 2)}
        log.info(
            f"epoch {epoch + 1}/{config.epochs} lr {lr:.2e} "
            + " ".join(f"{k} {v:.4f}" for k, v in means.items())
            + f" ({seconds:.1f} s)"
        )
        for name, value in means.items():
            writer.add_scalar(f"loss/{name}", value, epoch + 1)
        writer.add_scalar("lr", lr, epoch + 1)

        history.append(entry)
        if epoch + 1 == config.epochs or (config.eval_freq > 0 and (epoch + 1) % config.eval_freq == 0):
            evaluate_epoch(epoch, entry)
        write_checkpoint(epoch + 1)
        if stop.requested():  # also after the last epoch (a signal in its evaluation): the stage must not go on
            where = f"after epoch {epoch + 1}" + (", the last (resuming only writes the stage's model)"
                                                  if epoch + 1 == config.epochs else "")
            writer.close()  # its scalars so far reach the file (it writes them out every two minutes otherwise)
            raise stop.interrupted(where, checkpoint_path)
    writer.close()
    compiled.release()
    if channels_last:
        to_memory_format(modules.values(), torch.contiguous_format)

    _warn_if_no_epoch_scored_apart(config.select, history, best["epoch"], log)
    if config.select != "last" and best["state"] is not None:
        model.load_state_dict(best["state"])
    if reevaluate and best["epoch"] not in measured_now:
        # The selected weights were measured on other data (an undecodable image replaced in a query) or in another
        # way (another distance, more targets): the numbers are those of the data and settings now. The selection
        # stands: no rule reads a target's query or gallery, and a changed setting the selection reads is refused.
        log.info(f"evaluating epoch {best['epoch']}'s weights again: {reevaluate}")
        best["metrics"] = evaluate(best["epoch"] - 1)
    selection = SELECTION_RULES[config.select]
    if config.select != "last":
        selection += f" (epoch {best['epoch']})"
    trained_none = config.epochs <= start_epoch
    return FitResult(final=best["metrics"], epochs=history, selection=selection, selected_epoch=best["epoch"],
                     weights_time_ns=checkpoint_time_ns if trained_none else None)


def _warn_of_settings_this_run_cannot_honour(config: TrainConfig, log) -> None:
    """Settings that this run's length reduces to nothing, said before it trains rather than left to be found in
    the numbers: a warm-up as long as the run (the rate never reaches --lr), and a checkpoint selection with one
    evaluated epoch to choose from (the last: --select chooses among the epochs --eval-freq evaluates)."""
    optim = config.optim
    if optim.warmup_epochs >= config.epochs:
        peak = learning_rate(optim, config.epochs - 1, config.epochs)
        log.warning(f"the warm-up (train.optim.warmup_epochs {optim.warmup_epochs}) is as long as the run (--epochs "
                    f"{config.epochs}): the learning rate rises to {peak:.2e} and never reaches --lr {optim.lr:g}; "
                    "give train.optim.warmup_epochs a smaller value in a --config file, or train longer")
    evaluated = sum(1 for epoch in range(1, config.epochs + 1)
                    if epoch == config.epochs or (config.eval_freq > 0 and epoch % config.eval_freq == 0))
    if config.select != "last" and evaluated < 2:
        log.warning(f"--select {config.select} chooses among the evaluated epochs, and --eval-freq "
                    f"{config.eval_freq} evaluates only the last of the {config.epochs}: the model is the last "
                    "epoch's; give --eval-freq N to evaluate every N epochs")


def _warn_if_no_epoch_scored_apart(select: str, history: list[dict], kept: int, log) -> None:
    """A selection whose every evaluation gave the same score (target-clusters gives -100 whenever fewer than two
    clusters form) chose nothing: it kept its first epoch. Said, rather than reported as a choice."""
    if select not in SELECTION_SCORES:
        return
    entry_name, key = SELECTION_SCORES[select]
    scores = [entry["metrics"].get(entry_name, {}).get(key) for entry in history if "metrics" in entry]
    if len(scores) > 1 and len(set(scores)) == 1:
        hint = (" (fewer than two DBSCAN clusters formed at every evaluation)"
                if select == "target-clusters" and scores[0] == -100 else "")
        log.warning(f"--select {select}: all {len(scores)} evaluations scored {scores[0]}{hint}, so none was "
                    f"better; the model is epoch {kept}'s, the first evaluated")


def checkpoint_file(run_path: Path) -> Path:
    return Path(run_path) / "checkpoints" / "last.pt"


def has_checkpoint(run_path: Path) -> bool:
    """Whether a run folder holds a training checkpoint to resume from (last.pt, or previous.pt when last.pt is
    damaged or gone)."""
    return checkpoint_file(run_path).exists() or previous_checkpoint_file(run_path).exists()


def previous_checkpoint_file(run_path: Path) -> Path:
    """The checkpoint before last.pt, kept so that a damaged last.pt still leaves a complete one."""
    return Path(run_path) / "checkpoints" / "previous.pt"


def refuse_occupied(run_path: Path, resume: bool) -> None:
    """A run folder that already holds a run is only continued with --resume; stages call this before they
    write anything there, so a mistaken command leaves the earlier run untouched."""
    resumable = has_checkpoint(run_path)
    if not resume and resumable:
        raise TrainingError(
            f"{run_path} already holds a run ({checkpoint_file(run_path)}); pass --resume to continue it or "
            "choose another --out"
        )
    if not resumable and (Path(run_path) / "model.pt").exists():  # finished, its checkpoints deleted
        raise TrainingError(
            f"{run_path} already holds a finished model ({Path(run_path) / 'model.pt'}) and no checkpoint to "
            "continue from; choose another --out"
        )
    # Another command's (a pipeline's) or another program's results: a training run would overwrite them. (A run
    # killed before its first checkpoint leaves only config.yaml and log.txt: the same command may start again.)
    foreign = [name for name in ("metrics.json", "results.md", "stages", "student.pt")
               if not resumable and (Path(run_path) / name).exists()]
    if foreign:
        raise TrainingError(f"{run_path} holds another run's files ({foreign[0]}), not a checkpoint of this "
                            "command; choose another --out")


# Settings of a stage config (dotted keys) that decide how a run executes or what it reports, never the weights it
# trains: a resumed run may change them, and `kdreid pipeline` reuses a finished stage across them. `deterministic`
# only picks reproducible kernels for the same computation; `eval.batch_size` gives the same features in other
# batches; `data.root` says where the datasets lie, not which ones (their names do), so a moved data folder
# resumes and keeps the pipeline's stages.
RUN_ONLY_SETTINGS = frozenset({
    "out", "histogram_images", "train.device", "train.compile", "train.log_freq", "train.deterministic",
    "eval.batch_size", "data.root",
})
# Settings that reach the weights only through the epoch a score keeps (`select` source-val or target-clusters):
# how often and how that score is measured, and which source identities are held out for it. A stage config may
# add its own (EVALUATION_ONLY: the source stage's targets, which it only evaluates on).
SELECTION_SETTINGS = frozenset({"train.eval_freq", "train.source_val_ids", "eval.metric", "eval.flip"})
# Settings that decide how the numbers are measured, never which weights are kept when `select` is last.
MEASUREMENT_SETTINGS = frozenset({"eval.metric", "eval.flip"})
_UNSET = "(unset)"
# Settings that name files or folders. A run saves them absolute, so that its config.yaml means the same files from
# any working directory (`kdreid report`, a resume from elsewhere); they are compared as the files they name
# (symlinks resolved), which also reads a config.yaml of an older kdreid (paths as typed) from the folder its command
# ran in.
PATH_SETTINGS = ("data.root", "init", "student_init", "teachers", "pretrained")
_NAMES_NOT_PATHS = ("", "none", "imagenet")  # values of those settings that name no file (in any case)


def absolute_path_setting(value: Any, resolve: Callable[[str], str] = absolute_path) -> Any:
    """A PATH_SETTINGS value with its paths absolute (`rundir.absolute_path`), or as `resolve` makes them."""
    if isinstance(value, list):
        return [absolute_path_setting(item, resolve) for item in value]
    if isinstance(value, str) and value.lower() not in _NAMES_NOT_PATHS:
        return resolve(value)
    return value


def changed_settings(saved: Mapping[str, Any], stage_config) -> dict[str, tuple[Any, Any]]:
    """Every setting that differs between a saved config.yaml and `stage_config`: {dotted key: (saved, now)}.
    A setting the saved file predates (written by an older kdreid) counts at its default: a new setting's default
    is what kdreid did before it existed."""
    defaults = flatten(yaml.safe_load(dump_yaml(type(stage_config)())))
    before = defaults | flatten(saved)
    now = flatten(yaml.safe_load(dump_yaml(stage_config)))  # through YAML, as the saved one went
    for settings in (before, now):  # a path names the same file however it is spelt (relative, through a link)
        settings.update({key: absolute_path_setting(settings[key], os.path.realpath)
                         for key in (*PATH_SETTINGS, "out") if key in settings})
    return {key: (before.get(key, _UNSET), now.get(key, _UNSET)) for key in sorted(before.keys() | now.keys())
            if before.get(key, _UNSET) != now.get(key, _UNSET)}


def changes_weights(key: str, stage_config, also_run_only: tuple[str, ...] = ()) -> bool:
    """Whether setting `key` of `stage_config` can change the weights the stage keeps."""
    if key in RUN_ONLY_SETTINGS or key in also_run_only:
        return False
    selection_only = SELECTION_SETTINGS | set(getattr(stage_config, "EVALUATION_ONLY", ()))
    return not (stage_config.train.select == "last" and key in selection_only)


def measurement_changes(saved: Mapping[str, Any], stage_config) -> str:
    """The settings of how a run's numbers are measured (the distance, flip averaging, a source stage's targets) that
    differ between `saved` and `stage_config`, in words, or "". A resumed run measures its final weights again when
    they changed: its numbers would otherwise be those of the old settings, written beside the new ones."""
    keys = MEASUREMENT_SETTINGS | set(getattr(stage_config, "EVALUATION_ONLY", ()))
    changed = {key: values for key, values in changed_settings(saved, stage_config).items() if key in keys}
    return ", ".join(f"{key} {was!r} -> {now!r}" for key, (was, now) in changed.items())


def check_resumed_settings(run_path: Path, saved: Mapping[str, Any], stage_config) -> str | None:
    """A run resumes with the settings it was trained with (`saved`, its config.yaml): only more epochs, what
    `changes_weights` lets change, the start weights (`init`, `student_init`: the checkpoint replaces them) and the
    teachers' paths (a moved run folder: distillation checks their weights, `distill.check_same_teachers`) may
    differ; anything else is one TrainingError naming the settings, before anything is written. Returns a
    line to log when the run is extended."""
    differences = {key: values for key, values in changed_settings(saved, stage_config).items()
                   if changes_weights(key, stage_config, ("init", "student_init", "teachers"))}
    more_epochs = differences.pop("train.epochs", None)
    if more_epochs is not None and not more_epochs[1] > more_epochs[0]:
        differences["train.epochs"] = more_epochs  # fewer epochs than trained: a different schedule
    if differences:
        listed = ", ".join(f"{name} {was!r} -> {now!r}" for name, (was, now) in differences.items())
        raise TrainingError(
            f"{run_path} was trained with other settings than this command's ({listed}); resume it with its own "
            f"settings ({Path(run_path) / 'config.yaml'}) or choose another --out"
        )
    if more_epochs is not None:
        return (f"resuming for {more_epochs[1]} epochs instead of {more_epochs[0]}: the learning-rate schedule runs "
                "to the new end")
    return None


def _step_seed(seed: int, epoch: int, iteration: int) -> int:
    # A stable mix of the three (never Python's salted hash): the same step draws the same augmentation on resume.
    return int(np.random.SeedSequence([seed, epoch, iteration]).generate_state(1, dtype=np.uint64)[0] >> 1)


# First line of a training checkpoint: TRAINING_STATE_MAGIC + b"1 sha256=<hex> bytes=<n>\n", then torch.save bytes.
# The digest and length catch a truncated or half-copied file (a zip's own CRCs are not always checked on read).
_HEADER_VERSION = 1


def save_training_state(path: Path, state: dict) -> None:
    """Write `state` atomically to `path` behind a sha256 header, keeping the file it replaces as previous.pt."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    header = TRAINING_STATE_MAGIC + f"{_HEADER_VERSION} sha256={digest} bytes={len(payload)}\n".encode()
    _keep_as_previous(path)
    atomic_write_bytes(path, header + payload)


def _keep_as_previous(path: Path) -> None:
    """previous.pt := last.pt, without a moment where last.pt is missing (a hard link, renamed into place)."""
    if not path.exists():
        return
    previous = path.with_name("previous.pt")
    link = path.with_name(".previous.pt.link")
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
        os.replace(link, previous)
    except OSError:  # no hard links here: rename; until the new last.pt lands, the loader reads previous.pt
        link.unlink(missing_ok=True)
        os.replace(path, previous)


# A checkpoint read with `keep=True` (a resume's settings check, before its models are built), handed to the next
# read of the same unchanged file (the training loop's) instead of reading, hashing and unpickling it a second time:
# hundreds of MB for a large model. At most one, and only once.
_KEPT: dict[tuple, dict] = {}


def _file_identity(path: Path) -> tuple | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return os.path.realpath(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def load_training_state(path: Path, *, keep: bool = False) -> dict:
    """A training checkpoint's dict, after checking its header's length and sha256 (files written before the
    header existed are read without). CheckpointError when it is truncated or damaged, UnsafeCheckpointError
    when unpickling it would run code. `keep`: the next call for the same unchanged file returns this dict (once)
    without reading the file again."""
    path = Path(path)
    identity = _file_identity(path)
    kept = _KEPT.pop(identity, None)
    if kept is not None:
        return kept
    state = _read_training_state(path)
    if keep and identity is not None:
        _KEPT.clear()
        _KEPT[identity] = state
    return state


def _read_training_state(path: Path) -> dict:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read it ({error.strerror or error})") from None
    payload = data
    if data.startswith(TRAINING_STATE_MAGIC):
        end = data.find(b"\n", 0, 256)
        if end < 0:
            raise CheckpointError(f"{path}: truncated (inside its header)")
        header = data[len(TRAINING_STATE_MAGIC):end].decode("ascii", "replace")
        fields = dict(item.split("=", 1) for item in header.split() if "=" in item)
        payload = data[end + 1:]
        expected = fields.get("bytes", "")
        if not expected.isdigit() or "sha256" not in fields:
            raise CheckpointError(f"{path}: damaged header")
        if len(payload) != int(expected):
            raise CheckpointError(f"{path}: truncated ({len(payload)} of {expected} bytes)")
        if hashlib.sha256(payload).hexdigest() != fields["sha256"]:
            raise CheckpointError(f"{path}: damaged (its sha256 does not match its header)")
    state = safe_load(io.BytesIO(payload), str(path))
    if not isinstance(state, dict) or not {"epoch", "modules", "optimizer", "rng"} <= set(state):
        raise CheckpointError(f"{path}: not a kdreid training checkpoint")
    return state


def load_latest_training_state(run_path: Path, log=None) -> tuple[dict, Path] | None:
    """The newest complete training checkpoint of a run folder and its path: last.pt, or previous.pt when last.pt
    is missing or damaged (with a warning naming it; the damaged file is set aside as last.pt.damaged so that the
    next checkpoint does not turn it into previous.pt). None when the run has no checkpoint yet."""
    last, previous = checkpoint_file(run_path), previous_checkpoint_file(run_path)
    problems = []
    for candidate in (last, previous):
        if not candidate.exists():
            continue
        try:
            state = load_training_state(candidate)
        except UnsafeCheckpointError:
            raise  # not damage: someone put a file here that would run code; stop rather than skip it
        except CheckpointError as error:
            problems.append(str(error))
            continue
        if problems:
            message = f"{problems[0]}; skipped it and resumed from {candidate}"
            (log.warning if log is not None else print)(f"warning: {message}")
            if distributed.is_main():  # one process sets it aside; the others may or may not have seen it
                os.replace(last, last.with_name(last.name + ".damaged"))
        return state, candidate
    if problems:
        raise CheckpointError(
            f"no complete checkpoint to resume from ({'; '.join(problems)}); delete {last.parent} to start over"
        )
    return None


class TrainingInterrupted(TrainingError):
    """SIGINT/SIGTERM stopped training after a checkpoint; `exit_code` is the shell's 128 + signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


class _GracefulStop:
    """SIGINT/SIGTERM while training: note the signal and let the loop stop between two steps (the step in flight
    is finished, a checkpoint written). A second signal stops at once. The handlers are only installed from the
    main thread (Python's rule) and the previous ones are put back on exit. A signal the process was started with
    ignored (a script's `kdreid ... &`: the shell ignores SIGINT there, so that Ctrl-C stops the script, not its
    background jobs) stays ignored, as Python leaves it."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal: int | None = None
        self.log = None
        self._previous: dict = {}

    def __enter__(self) -> _GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            # None: the handler was not installed from Python; the default is the closest we can restore.
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        message = (f"{signal.Signals(signum).name} received: finishing the current step, then writing a checkpoint "
                   "(send it again to stop at once)")
        if self.log is not None:
            self.log.warning(message)
        else:
            print(message, file=sys.stderr, flush=True)

    def requested(self) -> bool:
        """Whether to stop now. Under torchrun the processes agree (one small all-reduce per step): a process
        that stopped alone would leave the others waiting in the next gradient all-reduce."""
        agreed = distributed.max_across_ranks(self.signal or 0)
        if agreed and self.signal is None:
            self.signal = agreed  # another process got the signal; stop at the same step with it
        return self.signal is not None

    def interrupted(self, where: str, checkpoint: Path) -> TrainingInterrupted:
        name = signal.Signals(self.signal).name
        return TrainingInterrupted(
            f"stopped by {name} {where}; the checkpoint {checkpoint} holds that position: run the same command "
            "with --resume to continue exactly from there", self.signal,
        )


def _resumable_states(resumables: Mapping[str, Any]) -> dict:
    return {name: dict(obj) if isinstance(obj, dict) else obj.state_dict() for name, obj in resumables.items()}


def _own_resumables(inside: Mapping[str, Any]) -> Mapping[str, Any]:
    """This process's resumable states of a checkpoint written inside an epoch: the main process's, or, under
    torchrun with as many processes as wrote it, the ones this process kept (its share of a cached group)."""
    others = inside.get("rank_resumables") or []
    if distributed.rank() > 0 and len(others) + 1 == distributed.world_size():
        return others[distributed.rank() - 1]
    return inside["resumables"]


def _load_resumables(resumables: Mapping[str, Any], states: Mapping[str, Any], device: torch.device) -> None:
    """Put saved states back in place. A plain dict's tensors (e.g. distillation's cached group of image batches)
    move to `device`: the checkpoint was loaded onto the CPU, and the steps that read them run on `device`."""
    missing = sorted(set(resumables) - set(states))
    if missing:
        raise CheckpointError(f"the checkpoint was written inside an epoch but lacks the state of {', '.join(missing)}")
    for name, obj in resumables.items():
        if isinstance(obj, dict):
            obj.clear()
            obj.update(_tensors_to(states[name], device))
        else:
            obj.load_state_dict(states[name])


def _tensors_to(value: Any, device: torch.device) -> Any:
    """`value` with every tensor inside its dicts, lists and tuples moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _tensors_to(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_tensors_to(item, device) for item in value)
    return value


# Test-only hook (tests/stages/test_resume.py): KDREID_TEST_HOLD_AT_STEP=N makes the loop print a marker line
# before global step N (epoch × batches per epoch + iteration, 0-based) and wait there, up to two minutes, until
# a signal arrives, so that a test can kill or signal the process at a known point without sleeping and guessing.
_HOLD_VARIABLE = "KDREID_TEST_HOLD_AT_STEP"


def _test_hold_step() -> int | None:
    value = os.environ.get(_HOLD_VARIABLE, "")
    return int(value) if value.strip().lstrip("-").isdigit() else None


def _hold(step: int, stop: _GracefulStop) -> None:
    print(f"kdreid-test: holding before step {step}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + 120
    while stop.signal is None and time.monotonic() < deadline:
        time.sleep(0.01)


def _capture_rng() -> dict:
    _, keys, position, has_gauss, cached_gauss = np.random.get_state()
    python_state = random.getstate()
    state = {
        "python": list(python_state[1]),
        "python_gauss": python_state[2],  # the second value of random.gauss's last pair, kept for its next call
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": position,
                  "has_gauss": has_gauss, "cached_gauss": cached_gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict) -> None:
    random.setstate((3, tuple(state["python"]), state.get("python_gauss")))  # absent in older checkpoints
    numpy_state = state["numpy"]
    np.random.set_state((
        "MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
        numpy_state["has_gauss"], numpy_state["cached_gauss"],
    ))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _progress(total: int, description: str, initial: int = 0):
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (CI logs, files); the log lines say the same.
    return tqdm(total=total, desc=description, unit="it", leave=False, dynamic_ncols=True, mininterval=1.0,
                disable=None, initial=initial)


class _NoWriter:
    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def _tensorboard(path: Path, purge_step: int | None = None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency; keep training if a user removed it
        return _NoWriter()
    return SummaryWriter(str(path), purge_step=purge_step)


def percent_cell(value: float | None) -> str:
    """A table cell in percent; n/a where a value could not be measured (no valid query: NaN, null in
    metrics.json), as `kdreid evaluate` prints it."""
    return "n/a" if value is None or value != value else f"{value:.1f}"


def results_table(rows: list[dict], selection: str, measured: str = "") -> str:
    """A Markdown table: one row per (model, dataset) with mAP and CMC in percent, how they were `measured`
    (distances, protocol), and the selection rule."""
    lines = [
        "| model | dataset | grouping | " + " | ".join(title for title, _ in METRIC_COLUMNS) + " |",
        "|---|---|---|" + "---|" * len(METRIC_COLUMNS),
    ]
    for row in rows:
        m = row["metrics"]
        lines.append(
            f"| {row['model']} | {row['dataset']} | {row.get('grouping', '—')} | "
            + " | ".join(percent_cell(m[k]) if k in m else "—" for k in METRIC_KEYS)
            + " |"
        )
    lines.append("")
    if measured:
        lines.append(f"Measured with {measured}.")
    lines.append(f"Checkpoint selection: {selection}. No number here comes from a checkpoint chosen on target test labels.")
    return "\n".join(lines) + "\n"
