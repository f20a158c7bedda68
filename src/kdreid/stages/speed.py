"""What makes the training step fast on a GPU without changing what it computes: no host-device sync per
step (losses stay on the device and are read every `log_freq` steps), channels_last memory layout, and an
optional `torch.compile` of the trained model for launch-bound small models (OSNet x0.25), and of a stage's
loss where the stage asks (D-MMD).

On the CPU every piece is a no-op or the same code path, so CI exercises it without a GPU.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from kdreid.errors import ConfigError, KdreidError, TrainingError

# "off" and the torch.compile modes that train. "reduce-overhead" records CUDA graphs (the win for launch-bound
# models); "max-autotune-no-cudagraphs" autotunes kernels (minutes of compilation) without graphs.
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune-no-cudagraphs")


class LossWindow:
    """Losses of the last few steps, kept on the device; `flush()` reads them in one transfer.

    A `.item()` per step would make the host wait for the GPU every step, so the GPU could never run ahead of
    Python. The NaN/inf check happens at the flush and names the first bad step and loss term of the window.
    """

    def __init__(self, epoch: int):
        self.epoch = epoch
        self.pending: list[tuple[int, tuple[str, ...], torch.Tensor]] = []  # (iteration, names, values (T,))
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.last: dict[str, float] = {}

    def add(self, iteration: int, losses: dict[str, torch.Tensor]) -> None:
        names = tuple(losses)
        values = torch.stack([value.detach().float().reshape(()) for value in losses.values()])  # (T,)
        self.pending.append((iteration, names, values))

    def flush(self) -> None:
        """Move the pending values to the host (one sync), check them, add them to the epoch sums."""
        if not self.pending:
            return
        host = torch.cat([values for _, _, values in self.pending]).cpu().tolist()
        position = 0
        for iteration, names, _ in self.pending:
            row = dict(zip(names, host[position : position + len(names)]))
            position += len(names)
            bad = {name: value for name, value in row.items() if not math.isfinite(value)}
            if bad:
                self.pending = []
                raise TrainingError(
                    f"non-finite loss at epoch {self.epoch + 1}, iteration {iteration + 1}: "
                    + ", ".join(f"{name}={value}" for name, value in bad.items())
                    + "; lower --lr or check the inputs"
                )
            for name, value in row.items():
                self.sums[name] = self.sums.get(name, 0.0) + value
                self.counts[name] = self.counts.get(name, 0) + 1
            self.last = row
        self.pending = []

    def means(self) -> dict[str, float]:
        self.flush()
        return {name: total / self.counts[name] for name, total in self.sums.items()}


def use_channels_last(device: torch.device) -> bool:
    # On CUDA, cuDNN's NHWC kernels (with bf16) avoid layout transposes; on the CPU it brings nothing reliable.
    return device.type == "cuda"


def tune_backends(device: torch.device, deterministic: bool) -> None:
    """cuDNN autotuning for the fixed training shapes (P×K batches never change size). Left off in deterministic
    mode, where algorithm choice must not vary. TF32 stays off: the losses compute distances in float32 on purpose."""
    if device.type == "cuda" and not deterministic:
        torch.backends.cudnn.benchmark = True


def to_memory_format(modules, memory_format: torch.memory_format) -> None:
    """Convert the 4-D parameters and buffers of `modules` in place (the optimiser keeps the same tensors)."""
    for module in modules:
        module.to(memory_format=memory_format)


def auto_compile_mode(arch: str) -> str:
    """What `--compile auto` means for a stage training `arch` on a GPU. OSNet's eager step is launch-bound
    (hundreds of small kernels: x0.25 trains at 1,113 img/s eagerly on an H200 and 6,621 with CUDA graphs), and
    training with CUDA graphs reached the eager mAP (ResNet-18, 3 seeds; docs/training-speed.md). The ResNets'
    eager step is much less launch-bound, so they stay eager unless asked (compilation takes minutes per run)."""
    return "reduce-overhead" if arch.startswith("osnet") else "off"


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` (a small host tensor: a batch's indices) on `device`, without making the host wait for the GPU.

    CUDA performs a stream synchronisation before a copy from pageable host memory ("API synchronization
    behavior" in the CUDA runtime docs), `non_blocking` or not: the host would wait for all queued work, every
    step. A copy from pinned memory is queued like a kernel; PyTorch's caching host allocator keeps the pinned
    block until that copy has run."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def resolve_compile(mode: str, device: torch.device, auto: str = "off", distributed: bool = False) -> str:
    """The compile mode to use. "auto" is the stage's `auto` on one GPU and off elsewhere: compiling for a CPU
    takes minutes, and with several processes SyncBatchNorm's collectives run inside the forward, where CUDA
    graphs have not been tried."""
    if mode == "auto":
        return auto if device.type == "cuda" and not distributed else "off"
    if mode not in COMPILE_MODES:
        raise ConfigError(f"--compile {mode!r} is not one of auto, {', '.join(COMPILE_MODES)}")
    return mode


class CompiledStep:
    """`torch.compile` of one model's forward, in place (its state_dict keys stay as they are), with a fallback.

    Compilation happens at the first call, so errors surface there: `run(step)` runs the first step (forward
    and backward) under a guard and, if compilation fails, logs why, removes the compiled forward and runs
    the step again eagerly, on the same batch. Evaluation runs eagerly (`eager()`), so varying eval batch sizes
    cause no recompilation.
    """

    def __init__(self, model: nn.Module, mode: str, device: torch.device, log):
        self.model = model
        self.mode = mode
        self.log = log
        self.active = False
        self.checked = False
        self._reset_pending = False  # dynamo's caches are cleared between steps, never inside one
        self._losses: dict = {}  # loss function -> its wrapper (see `loss`)
        if mode == "off":
            return
        if not hasattr(torch, "compile") or not hasattr(model, "compile"):
            log.warning(f"--compile {mode}: this torch ({torch.__version__}) has no torch.compile; training eagerly")
            return
        if mode == "reduce-overhead" and device.type != "cuda":
            log.warning("--compile reduce-overhead records CUDA graphs, which need a GPU; using mode default")
            self.mode = "default"
        if getattr(model, "_kdreid_compile_mode", None) != self.mode:
            model.compile(mode=self.mode)
            model._kdreid_compile_mode = self.mode
        self.active = True
        log.info(f"torch.compile ({self.mode}) of {type(model).__name__}: the first step compiles (can take minutes)")

    @property
    def uses_cuda_graphs(self) -> bool:
        return self.active and self.mode == "reduce-overhead"

    @property
    def first_step_pending(self) -> bool:
        """Whether the next `run` is the guarded first step (one that may be repeated eagerly)."""
        return self.active and not self.checked

    def step_begin(self) -> None:
        self._reset_dynamo_if_pending()
        # CUDA graph trees reuse output memory between replays; marking each training step keeps a second
        # forward in the same step (distillation) from being mistaken for the next step.
        if self.uses_cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def run(self, step, rewind=None):
        """Run `step()` (forward + backward); the first time under the compilation guard. If that compilation
        fails, `rewind()` puts back what the failed attempt consumed (its batches), so that the eager repeat
        trains on the same batch and the run is the eager run's."""
        if not self.first_step_pending:
            return step()

        def repeat():
            if rewind is not None:
                rewind()
            return step()

        result = self._guarded(step, repeat)
        self.checked = True
        return result

    def _guarded(self, attempt, eager):
        """`attempt()`, the first call of something compiled; if compilation fails there, say why, train eagerly
        from now on, and return `eager()` instead."""
        try:
            return attempt()
        except (KeyboardInterrupt, KdreidError):  # a user mistake or a NaN: the eager step would say the same
            raise
        except Exception as error:  # any compiler failure
            self.fall_back(error)
            return eager()

    def loss(self, fn):
        """`fn` (a loss function with fixed shapes per step) through torch.compile while the model's forward is
        compiled, `fn` itself otherwise. D-MMD eagerly is hundreds of small kernels, each Gaussian block
        materialised 19 wide; compiled they fuse into a few (bench/dmmd_cost.py --compiled). Mode default:
        CUDA graphs stay the model's. A loss may first run after the guarded first step (D-MMD starts at
        `--dmmd-start`), so its own first call is guarded the same way: a failure means eager training."""
        if not self.active:
            return fn
        if fn not in self._losses:
            fused, checked = torch.compile(fn, mode="default"), False

            def call(*args, **kwargs):
                nonlocal checked
                if not self.active:  # fell back since
                    return fn(*args, **kwargs)
                if checked:
                    return fused(*args, **kwargs)
                result = self._guarded(lambda: fused(*args, **kwargs), lambda: fn(*args, **kwargs))
                checked = True
                return result

            self._losses[fn] = call
        return self._losses[fn]

    def fall_back(self, error: BaseException) -> None:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        self.log.warning(
            f"torch.compile ({self.mode}) failed ({type(error).__name__}: {reason[:300]}); training eagerly"
        )
        self.release()
        # A loss fails inside a step whose compiled forward still awaits its backward: clear the compiled code
        # once that step is over.
        self._reset_pending = True

    def _reset_dynamo_if_pending(self) -> None:
        if self._reset_pending and hasattr(torch, "_dynamo"):
            torch._dynamo.reset()
        self._reset_pending = False

    def release(self) -> None:
        """Back to the eager forward (after training: later evaluation and export see a plain module)."""
        self._reset_dynamo_if_pending()
        if self.active:
            self.model._compiled_call_impl = None  # what nn.Module.compile() set; None restores the eager forward
            self.model._kdreid_compile_mode = None
            self.active = False

    def eager(self):
        """Context for evaluation: the compiled forward is bypassed."""
        if not self.active:
            return nullcontext()
        if hasattr(torch.compiler, "set_stance"):
            return torch.compiler.set_stance("force_eager")
        return self._without_compiled_forward()

    @contextmanager
    def _without_compiled_forward(self):
        # torch < 2.6 has no set_stance: the module's compiled forward is set aside (as `release` does) and put back.
        compiled, self.model._compiled_call_impl = self.model._compiled_call_impl, None
        try:
            yield
        finally:
            self.model._compiled_call_impl = compiled
