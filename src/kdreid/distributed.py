"""Several processes training one model: `torchrun --nproc_per_node=N kdreid <stage> ...`.

torchrun starts one process per device and tells each its place through the environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Every function here is a no-op, or returns its input, in a process that
torchrun did not start, so the stages call them unconditionally and a plain run is unchanged.

How a stage runs on W processes (docs/distributed.md has the full story):

- Batches: the global P×K batch (`--batch-size`) is cut into W parts of P/W whole groups (the P×K sampler), so
  that the triplet and D-MMD losses, computed on each process's own part, see every group complete.
- Gradients: after each backward, `average_gradients` replaces every gradient by its mean over the processes,
  what DistributedDataParallel does, so all processes take the same optimiser step (see that function for why
  kdreid does it itself).
- BatchNorm: `sync_batchnorm` makes every BatchNorm of a trained model normalise with the statistics of the
  whole global batch, so a layer sees the same images whatever W is.
- Evaluation: each process embeds 1/W of the images and `gather_rows` gives every process all features.
- Files: only the main process (rank 0) writes; `barrier` lets the others wait for it.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from datetime import timedelta
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from kdreid.errors import ConfigError

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# ------------------------------------------------------------------------------------------------ process group
def launched() -> bool:
    """Whether torchrun (or an equivalent launcher) started this process as one of several."""
    return all(name in os.environ for name in _TORCHRUN_VARIABLES) and int(os.environ["WORLD_SIZE"]) > 1


def init(device: str = "auto") -> bool:
    """Join the process group when launched by torchrun (once; later calls do nothing): NCCL when training
    on CUDA, gloo on the CPU. `device` is the stage's --device. Returns whether this process is distributed."""
    if is_distributed():
        return True
    if not launched():
        return False
    on_cuda = not device.startswith("cpu") and torch.cuda.is_available()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} asked for CUDA, but no GPU is visible; use --device cpu")
    if device.startswith("cuda:"):
        raise ConfigError(
            f"--device {device} would put every process on one GPU; under torchrun use --device cuda (or auto): "
            "each process takes the GPU of its LOCAL_RANK (choose the GPUs with CUDA_VISIBLE_DEVICES)"
        )
    if on_cuda:
        if local_rank() >= torch.cuda.device_count():
            raise ConfigError(
                f"process {rank()} has LOCAL_RANK {local_rank()} but this node shows {torch.cuda.device_count()} "
                "GPU(s); start at most that many processes per node (--nproc_per_node)"
            )
        torch.cuda.set_device(local_rank())
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # torchrun sets it; variables left in a shell do not
        # Joining waits (up to the timeout below) for every other process: say for what, and how to stop waiting.
        print(f"kdreid: warning: joining {os.environ['WORLD_SIZE']} processes at {os.environ['MASTER_ADDR']}:"
              f"{os.environ['MASTER_PORT']} as process {rank()}, because RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR "
              "and MASTER_PORT are set and torchrun did not start this one; for a single process, unset them",
              file=sys.stderr, flush=True)
    # A generous timeout: a main process evaluating or writing a large checkpoint keeps the others waiting.
    dist.init_process_group("nccl" if on_cuda else "gloo", timeout=timedelta(minutes=60))
    atexit.register(cleanup)
    return True


_ended_together = False  # this process's last command ended as the others' did (`mark_ended_together`)


def mark_ended_together(together: bool) -> None:
    """Whether the command ended where every process ends it: it succeeded, training stopped at a signal (the
    processes agree on the step), or an error that every process raised at the same point (`on_every_process`)."""
    global _ended_together
    _ended_together = together


def cleanup() -> None:
    """Leave the process group (registered at exit by `init`). After a command that every process ended together,
    first wait for the others: one that tore its connections down while a peer's gloo threads still used them made
    that peer abort at exit ("terminate called without an active exception", exit -6). Not after a failure, where
    the others may never come (a process that failed alone)."""
    if not is_distributed():
        return
    if _ended_together:
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001 -- a peer gone already: leaving is all that is left to do
            pass
    dist.destroy_process_group()


def end_process(code: int) -> None:
    """End a torchrun process whose command is over, with exit status `code`: leave the group (`cleanup`), flush
    the logs and the console, and exit at once, without Python's teardown. There, gloo's threads still aborted a
    process now and then after everything was written and the group left ("terminate called without an active
    exception", SIGABRT), and torchrun reported a run that had succeeded as failed (once in some 200 runs under
    load; it failed a CI run). The stages close their files themselves; what the teardown would still do (atexit
    handlers, freeing memory) is nothing a finished command needs."""
    cleanup()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader gone, or a stream closed: nothing more can reach it
            pass
    os._exit(code)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    if is_distributed():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0)) if launched() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0)) if launched() else 0


def local_world_size() -> int:
    """The processes of this run on this machine (torchrun's LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if launched() else 1


def is_main() -> bool:
    """The process that writes files and logs: rank 0, or the only one."""
    return rank() == 0


def worker_logger() -> logging.Logger:
    """The log of a process other than the main one: warnings and errors on its console, tagged with its rank
    (the main process writes the run's log.txt and says everything else once)."""
    log = logging.getLogger(f"kdreid.rank{rank()}")
    if not log.handlers:
        log.setLevel(logging.WARNING)
        log.propagate = False
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter(f"[rank {rank()}] %(message)s"))
        log.addHandler(console)
    return log


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def device_for(device: torch.device) -> torch.device:
    """A CUDA device without an index means this process's GPU (LOCAL_RANK) in a distributed run."""
    if device.type == "cuda" and device.index is None and is_distributed():
        return torch.device("cuda", local_rank())
    return device


def _comm_device() -> torch.device:
    # NCCL moves CUDA tensors only; gloo moves CPU tensors.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# ------------------------------------------------------------------------------------------------ training
def average_gradients(parameters: Iterable[torch.Tensor], bucket_bytes: int = 32 << 20) -> None:
    """Replace each parameter's gradient by its mean over the processes (one all-reduce per ~32 MB bucket).

    This is DistributedDataParallel's arithmetic without its wrapper. DDP assumes that every forward's outputs
    reach the loss and that each parameter is used once per backward; distill breaks both (a multi-head student
    trains one head per step, its classifier is unused without --lda-weight, one projector per teacher, and two
    forwards per step when it also learns on source images), which DDP can only follow with
    `find_unused_parameters`, and that fails ("marked as ready twice") once a step has two forwards. Averaging
    after the backward works for every stage alike.

    Parameters without a gradient are skipped and keep `None` (so weight decay and momentum leave them alone,
    as in a one-process run). Every process must have gradients for the same parameters: the stages ensure this
    by deciding everything that selects a loss term (target order, heads) identically on every process.
    """
    if world_size() == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    scale = 1.0 / world_size()
    # Buckets of one dtype and device, flattened into one buffer each: few large messages, not one per tensor.
    bucket: list[torch.Tensor] = []
    size = 0
    for grad in grads:
        if bucket and (grad.dtype != bucket[0].dtype or grad.device != bucket[0].device or size >= bucket_bytes):
            _all_reduce_mean(bucket, scale)
            bucket, size = [], 0
        bucket.append(grad)
        size += grad.numel() * grad.element_size()
    if bucket:
        _all_reduce_mean(bucket, scale)


def _all_reduce_mean(grads: list[torch.Tensor], scale: float) -> None:
    device = _comm_device()
    flat = torch.cat([g.reshape(-1) for g in grads]).to(device)
    dist.all_reduce(flat)
    flat.mul_(scale)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def broadcast_modules(modules: Iterable[nn.Module]) -> None:
    """Give every process the main process's parameters and buffers (as DDP does when it wraps a model), so
    that training starts from the same weights even if the processes built them differently."""
    if world_size() == 1:
        return
    device = _comm_device()
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            data = tensor.data.to(device)
            dist.broadcast(data, src=0)
            tensor.data.copy_(data)


def check_same_weights(modules: Iterable[nn.Module]) -> None:
    """Raise if the processes no longer hold the same weights (a bug: each applies the same averaged gradient
    to the same weights, so they stay bit-identical). Compares a float64 sum per parameter and buffer."""
    if world_size() == 1:
        return
    names, sums = [], []
    for index, module in enumerate(modules):
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            names.append(f"{index}.{name}")
            sums.append(tensor.detach().double().sum())
    local = torch.stack(sums).to(_comm_device()) if sums else torch.zeros(0, dtype=torch.float64,
                                                                          device=_comm_device())
    gathered = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(gathered, local)
    for other, values in enumerate(gathered):
        differing = ((values != gathered[0]) & ~(values.isnan() & gathered[0].isnan())).nonzero()
        if len(differing):
            raise RuntimeError(
                f"process {other} holds other weights than process 0 (first: {names[int(differing[0])]}): "
                "the processes took different steps"
            )


def mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """{name: value} averaged over the processes (the same names on each, in the same order)."""
    if world_size() == 1 or not values:
        return values
    numbers = torch.tensor(list(values.values()), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(numbers)
    return {name: float(v) / world_size() for name, v in zip(values, numbers.tolist())}


def max_across_ranks(value: int) -> int:
    """The largest of every process's `value` (e.g. a signal number, 0 for none), known to all processes."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def broadcast_array(array: np.ndarray) -> np.ndarray:
    """The main process's array on every process (same shape and dtype everywhere), e.g. pseudo-labels, so
    that every process groups the data the same way even if its own computation differed in the last bit."""
    if world_size() == 1:
        return array
    tensor = torch.from_numpy(np.ascontiguousarray(array)).to(_comm_device())
    dist.broadcast(tensor, src=0)
    return tensor.cpu().numpy()


def all_objects(value) -> list:
    """Every process's `value` (any picklable object, CPU tensors inside), in rank order, on every process."""
    if world_size() == 1:
        return [value]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value):
    """The main process's `value` (any picklable object) on every process: one decision taken for all."""
    if world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


# ------------------------------------------------------------------------------------------------ evaluation
def shard(count: int) -> range:
    """This process's contiguous share of `count` items (all of them when not distributed)."""
    size = world_size()
    # rank() is torchrun's RANK even before the process joins the group (is_main decides with it then): a process
    # that never joins (a script under torchrun that calls no init) has all the items, not the slice past the end.
    index = rank() if size > 1 else 0
    return range(count * index // size, count * (index + 1) // size)


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Concatenate, in rank order, every process's (n_r, D) tensor: shards of different lengths (an empty
    shard may be (0, 0)) -> (Σ n_r, D) on every process, on `local`'s device."""
    if world_size() == 1:
        return local
    device = _comm_device()
    shapes = [torch.zeros(2, dtype=torch.int64, device=device) for _ in range(world_size())]
    dist.all_gather(shapes, torch.tensor(local.shape, dtype=torch.int64, device=device))
    rows = [int(s[0]) for s in shapes]
    width = max(int(s[1]) for s in shapes)
    # all_gather needs equal shapes: pad every shard to the longest, then cut the padding off again.
    padded = torch.zeros(max(rows), width, dtype=torch.float32, device=device)
    padded[: local.shape[0], : local.shape[1]] = local.to(device, torch.float32)
    pieces = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(pieces, padded)
    return torch.cat([piece[:n] for piece, n in zip(pieces, rows)]).to(local.device, local.dtype)


# ------------------------------------------------------------------------------------------------ BatchNorm
class SyncBatchNorm(nn.SyncBatchNorm):
    """BatchNorm over the global batch of all processes, on any device.

    In training mode the mean and variance of each channel are those of the union of every process's batch, so
    the normalisation, the running statistics and the gradients are those of one process holding the whole
    global batch. On CUDA this is torch's fused SyncBatchNorm; torch's refuses CPU tensors, so on the CPU (gloo)
    the same statistics are computed here with differentiable all-reduces (the backward of a sum over processes
    is again a sum over processes, which carries every process's loss into each one's inputs). The state dict
    is that of a BatchNorm: checkpoints load into plain models.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.is_cuda or not (self.training and world_size() > 1):
            return super().forward(input)
        return _global_batch_norm(self, input)


class _SumOverProcesses(torch.autograd.Function):
    """A differentiable all-reduce (sum): every process's output depends on every process's input, so the
    gradient of each input is the sum over the processes of their outputs' gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


def _global_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    all_reduce = _SumOverProcesses.apply
    dims = [0, *range(2, x.dim())]  # every dimension but the channels
    shape = [1, -1] + [1] * (x.dim() - 2)
    # In float64: the backward through the mean and the variance sums N·H·W terms that nearly cancel, and float32
    # loses ~1e-3 of the gradient that way over a deep network (torch's CPU BatchNorm accumulates in float64 too).
    x64 = x.double()
    local_count = torch.tensor([x.numel() // x.shape[1]], dtype=torch.float64, device=x.device)
    # One all-reduce per forward (and so one per backward) for the sums, the sums of squares and the element
    # count (a shard may differ in size): per-layer latency, not bandwidth, is the cost of synchronised
    # BatchNorm. In float64, E[x²] − E[x]² keeps ~1e-16·(mean/std)² of precision: plenty.
    sums = all_reduce(torch.cat([x64.sum(dims), x64.pow(2).sum(dims), local_count]))
    channels = x.shape[1]
    count = float(sums[-1].detach())  # global N·H·W
    mean = sums[:channels] / count  # (C,)
    variance = (sums[channels:-1] / count - mean.pow(2)).clamp(min=0)  # biased, what normalisation uses
    centred = x64 - mean.view(shape)
    out = centred * torch.rsqrt(variance + bn.eps).view(shape)
    if bn.affine:
        out = out * bn.weight.double().view(shape) + bn.bias.double().view(shape)
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            bn.running_mean.lerp_(mean.detach().to(bn.running_mean.dtype), momentum)
            unbiased = variance.detach() * count / max(count - 1, 1)
            bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), momentum)
    return out.to(x.dtype)


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """In a distributed run, replace (in place) every BatchNorm1d/2d of `module` by a `SyncBatchNorm` that shares
    its parameters and buffers (an optimiser made before still holds the right tensors). Returns `module`;
    unchanged when not distributed."""
    if world_size() == 1:
        return module
    for name, child in list(module.named_children()):
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)) and not isinstance(child, nn.SyncBatchNorm):
            setattr(module, name, _as_sync(child))
        else:
            sync_batchnorm(child)
    return module


def _as_sync(bn: nn.modules.batchnorm._BatchNorm) -> SyncBatchNorm:
    synced = SyncBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if bn.affine:
        synced.weight, synced.bias = bn.weight, bn.bias
    if bn.track_running_stats:
        synced.running_mean, synced.running_var = bn.running_mean, bn.running_var
        synced.num_batches_tracked = bn.num_batches_tracked
    synced.train(bn.training)
    return synced


def average_list(values: Sequence[float]) -> list[float]:
    """Floats averaged over the processes: one decision (e.g. the order of the targets) for all of them."""
    averaged = mean_across_ranks({str(i): float(v) for i, v in enumerate(values)})
    return [averaged[str(i)] for i in range(len(values))]
