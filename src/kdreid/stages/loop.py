"""The one training loop every stage runs.

A stage supplies what differs — a `train_step` that turns (epoch, iteration) into named losses, an `evaluate`
that returns metrics per dataset, and an optional `before_epoch` hook — and the loop does the rest: device,
bf16 autocast on CUDA, backward, gradient clipping, the LR schedule, NaN checks, progress bar, log lines,
TensorBoard scalars, a checkpoint every epoch, resume, evaluation every `eval_freq` epochs, checkpoint
selection without target test labels, `metrics.json` and `results.md`.
"""

from __future__ import annotations

import copy
import io
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from torch import nn

from kdreid.config import to_dict
from kdreid.data.augment import AugmentConfig
from kdreid.errors import CheckpointError, ConfigError, KdreidError, TrainingError
from kdreid.rundir import RunDir, atomic_write_bytes
from kdreid.stages.optim import OptimConfig, learning_rate, set_learning_rate

METRIC_KEYS = ("mAP", "rank1", "rank5", "rank10", "mINP")
SELECTION_RULES = {
    "last": "last epoch",
    "source-val": "best source-validation mAP (held-out source training identities)",
}


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
    select: Literal["last", "source-val"] = "last"
    source_val_ids: float = 0.1  # fraction of source training identities held out when select = source-val
    log_freq: int = 20  # iterations between log lines
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self) -> None:
        """Values no run can use: one ConfigError naming the flag, before any work is done."""
        positive = {"--epochs": self.epochs, "--height": self.height, "--width": self.width,
                    "--batch-size": self.batch_size}
        for flag, value in positive.items():
            if value < 1:
                raise ConfigError(f"{flag} must be at least 1, got {value}")
        if self.num_instances < 2:
            raise ConfigError(
                f"--num-instances must be at least 2 (the triplet and D-MMD losses need pairs), got {self.num_instances}"
            )
        if self.batch_size % self.num_instances:
            raise ConfigError(
                f"--batch-size {self.batch_size} is not a multiple of --num-instances {self.num_instances}"
            )
        if not self.optim.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.optim.lr}")
        if self.eval_freq < 0:
            raise ConfigError(f"--eval-freq must be 0 (at the end) or positive, got {self.eval_freq}")


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KdreidError(f"--device {name} asked for CUDA, but no GPU is visible; use --device cpu")
    return device


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace for reproducible matmuls, set before CUDA starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False


@dataclass
class StepContext:
    epoch: int  # 0-based
    iteration: int  # 0-based within the epoch
    generator: torch.Generator  # augmentation randomness, seeded from (seed, epoch, iteration)


@dataclass
class FitResult:
    final: dict  # {dataset: {metric: percent}} of the selected epoch
    epochs: list  # one entry per epoch: losses, lr, metrics when evaluated
    selection: str  # which rule chose the final weights, in words
    selected_epoch: int


def fit(
    *,
    run: RunDir,
    config: TrainConfig,
    stage_config,
    modules: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    batches_per_epoch: int,
    train_step: Callable[[StepContext], dict[str, torch.Tensor]],
    evaluate: Callable[[int], dict[str, dict[str, float]]],
    before_epoch: Callable[[int], None] | None = None,
    resume: bool = False,
    log=None,
) -> FitResult:
    """Train `modules` (the first one is the model whose weights are selected and saved) for config.epochs.

    `train_step` returns a dict of scalar losses whose "loss" entry is minimised; `evaluate(epoch)` returns
    {dataset: {"mAP", "rank1", ...}} in percent, and for select="source-val" a "source-val" entry.
    """
    log = log or run.logger()
    device = select_device(config.device)
    checkpoint_path = checkpoint_file(run.path)
    params = [p for group in optimizer.param_groups for p in group["params"]]

    history: list[dict] = []
    start_epoch = 0
    best = {"score": -math.inf, "epoch": -1, "state": None, "metrics": {}}
    refuse_occupied(run.path, resume)
    if resume and checkpoint_path.exists():
        state = load_training_state(checkpoint_path)
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        optimizer.load_state_dict(state["optimizer"])
        history = state["history"]
        start_epoch = state["epoch"]
        best.update(state["best"])
        _restore_rng(state["rng"])
        log.info(f"resumed from {checkpoint_path} at epoch {start_epoch}")

    use_amp = config.amp and device.type == "cuda"
    writer = _tensorboard(run.path / "tensorboard")
    model = next(iter(modules.values()))

    for epoch in range(start_epoch, config.epochs):
        if before_epoch is not None:
            before_epoch(epoch)  # may run the model in eval mode (pseudo-labels), so train mode comes after
        for module in modules.values():
            module.train()
        lr = learning_rate(config.optim, epoch, config.epochs)
        set_learning_rate(optimizer, lr)
        sums: dict[str, float] = {}
        started = time.perf_counter()
        bar = _progress(batches_per_epoch, f"epoch {epoch + 1}/{config.epochs}")
        for iteration in range(batches_per_epoch):
            generator = torch.Generator(device=device).manual_seed(_step_seed(config.seed, epoch, iteration))
            context = StepContext(epoch, iteration, generator)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                losses = train_step(context)
            loss = losses["loss"]
            values = {name: float(value.detach()) for name, value in losses.items()}
            bad = {name: value for name, value in values.items() if not math.isfinite(value)}
            if bad:
                raise TrainingError(
                    f"non-finite loss at epoch {epoch + 1}, iteration {iteration + 1}: "
                    + ", ".join(f"{name}={value}" for name, value in bad.items())
                    + "; lower --lr or check the inputs"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.optim.clip_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.optim.clip_grad_norm)
            optimizer.step()
            for name, value in values.items():
                sums[name] = sums.get(name, 0.0) + value
            if bar is not None:
                bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()}, refresh=False)
                bar.update()
        if bar is not None:
            bar.close()
        means = {name: total / max(1, batches_per_epoch) for name, total in sums.items()}
        seconds = time.perf_counter() - started
        entry = {"epoch": epoch + 1, "lr": lr, "losses": means, "seconds": round(seconds, 2)}
        log.info(
            f"epoch {epoch + 1}/{config.epochs} lr {lr:.2e} "
            + " ".join(f"{k} {v:.4f}" for k, v in means.items())
            + f" ({seconds:.1f} s)"
        )
        for name, value in means.items():
            writer.add_scalar(f"loss/{name}", value, epoch + 1)
        writer.add_scalar("lr", lr, epoch + 1)

        last = epoch + 1 == config.epochs
        if last or (config.eval_freq > 0 and (epoch + 1) % config.eval_freq == 0):
            metrics = evaluate(epoch)
            entry["metrics"] = metrics
            for dataset, values in metrics.items():
                log.info(f"  {dataset:<16} " + "  ".join(f"{k} {values[k]:.1f}" for k in METRIC_KEYS if k in values))
                for key, value in values.items():
                    writer.add_scalar(f"{dataset}/{key}", value, epoch + 1)
            score = metrics.get("source-val", {}).get("mAP", -math.inf) if config.select == "source-val" else epoch
            if config.select == "last" or score > best["score"]:
                best = {
                    "score": score,
                    "epoch": epoch + 1,
                    "state": copy.deepcopy(model.state_dict()) if config.select != "last" else None,
                    "metrics": metrics,
                }
        history.append(entry)
        save_training_state(
            checkpoint_path,
            {
                "epoch": epoch + 1,
                "modules": {name: module.state_dict() for name, module in modules.items()},
                "optimizer": optimizer.state_dict(),
                "history": history,
                "best": best,
                "rng": _capture_rng(),
                "config": to_dict(stage_config),
            },
        )
    writer.close()

    if config.select != "last" and best["state"] is not None:
        model.load_state_dict(best["state"])
    selection = SELECTION_RULES[config.select]
    if config.select != "last":
        selection += f" (epoch {best['epoch']})"
    return FitResult(final=best["metrics"], epochs=history, selection=selection, selected_epoch=best["epoch"])


def checkpoint_file(run_path: Path) -> Path:
    return Path(run_path) / "checkpoints" / "last.pt"


def refuse_occupied(run_path: Path, resume: bool) -> None:
    """A run folder that already holds a run is only continued with --resume; stages call this before they
    write anything there, so a mistaken command leaves the earlier run untouched."""
    if not resume and checkpoint_file(run_path).exists():
        raise TrainingError(
            f"{run_path} already holds a run ({checkpoint_file(run_path)}); pass --resume to continue it or "
            "choose another --out"
        )


def _step_seed(seed: int, epoch: int, iteration: int) -> int:
    # A stable mix of the three (never Python's salted hash): the same step draws the same augmentation on resume.
    return int(np.random.SeedSequence([seed, epoch, iteration]).generate_state(1, dtype=np.uint64)[0] >> 1)


def save_training_state(path: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_training_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated file, foreign pickle
        raise CheckpointError(
            f"cannot read the training checkpoint {path} ({type(error).__name__}); delete it to start over"
        ) from None


def _capture_rng() -> dict:
    _, keys, position, has_gauss, cached_gauss = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": position,
                  "has_gauss": has_gauss, "cached_gauss": cached_gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict) -> None:
    random.setstate((3, tuple(state["python"]), None))
    numpy_state = state["numpy"]
    np.random.set_state((
        "MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
        numpy_state["has_gauss"], numpy_state["cached_gauss"],
    ))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _progress(total: int, description: str):
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (CI logs, files); the log lines say the same.
    return tqdm(total=total, desc=description, unit="it", leave=False, dynamic_ncols=True, mininterval=1.0,
                disable=None)


class _NoWriter:
    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency; keep training if a user removed it
        return _NoWriter()
    return SummaryWriter(str(path))


def results_table(rows: list[dict], selection: str) -> str:
    """A Markdown table: one row per (model, dataset) with mAP and CMC in percent, and the selection rule."""
    lines = [
        "| model | dataset | grouping | mAP | R1 | R5 | R10 | mINP |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        m = row["metrics"]
        lines.append(
            f"| {row['model']} | {row['dataset']} | {row.get('grouping', '—')} | "
            + " | ".join(f"{m[k]:.1f}" if k in m else "—" for k in METRIC_KEYS)
            + " |"
        )
    lines.append("")
    lines.append(f"Checkpoint selection: {selection}. No number here comes from a checkpoint chosen on target test labels.")
    return "\n".join(lines) + "\n"
