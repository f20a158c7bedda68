"""The distillation stage's teacher forwards, one iteration's worth (one batch per target, each through its own
frozen teacher), timed three ways side by side:

  sequential   what `kdreid distill` does: T eval-mode forwards, no grad (bf16 autocast and channels_last on CUDA)
  vmapped      the T teachers' weights stacked and one `torch.func.vmap` call over (teacher, batch) pairs: one
               launch per layer instead of T (convolutions become grouped ones) — "batched across targets"
  cuda graph   the T sequential forwards captured once as a CUDA graph and replayed (CUDA only)

Each path's outputs are compared with the sequential ones (largest difference of the embeddings). Whether the
batched path pays decides whether the stage should use it: it only can where the teachers share an architecture.

    python bench/teacher_forward.py                       # CPU, ResNet-18 teachers at 128x64 (a minute)
    python bench/teacher_forward.py --device cuda --arch resnet50 --size 256x128 --batch 32 64
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from kdreid.models import build_model  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Milliseconds per call of `fn` (after two untimed calls)."""
    for _ in range(2):
        fn()
    sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - started) / repeats * 1000


def make_teachers(arch: str, count: int, device: torch.device) -> list[torch.nn.Module]:
    teachers = []
    for seed in range(count):
        torch.manual_seed(seed)
        model = build_model(arch, 10, pretrained="none").eval().requires_grad_(False)
        for module in model.modules():  # trained-looking BatchNorm statistics, different per teacher
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        if device.type == "cuda":
            model = model.to(device, memory_format=torch.channels_last)
        teachers.append(model.to(device))
    return teachers


def paths(teachers, images: torch.Tensor, device: torch.device) -> dict:
    """name -> a function returning the T embeddings (T, B, D) of one iteration."""
    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    @torch.no_grad()
    def sequential():
        with autocast():
            return torch.stack([t(x, return_all=True).embedding for t, x in zip(teachers, images)])

    params, buffers = torch.func.stack_module_state(teachers)
    skeleton = copy.deepcopy(teachers[0]).to("meta")

    def one(p, b, x):
        return torch.func.functional_call(skeleton, (p, b), (x,), {"return_all": True}).embedding

    batched = torch.func.vmap(one)

    @torch.no_grad()
    def vmapped():
        with autocast():
            return batched(params, buffers, images)

    found = {"sequential": sequential, "vmapped": vmapped}
    if device.type == "cuda":
        try:
            found["cuda graph"] = graphed(sequential, images)
        except Exception as error:  # the other rows still count
            print(f"cuda graph: capture failed ({type(error).__name__}: {error})", flush=True)
    return found


def graphed(forward, images: torch.Tensor):
    """`forward()`, which reads `images`, captured as a CUDA graph. `images` becomes the graph's static input:
    each replay first copies a batch into it, as the stage would copy each iteration's batches."""
    fresh = images.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (cuDNN picks its algorithms here)
        for _ in range(3):
            forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = forward()

    def replay():
        images.copy_(fresh)
        graph.replay()
        return output

    return replay


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--teachers", type=int, default=3)
    parser.add_argument("--batch", type=int, nargs="+", default=[32])
    parser.add_argument("--size", default="128x64", help="HxW")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    height, width = (int(v) for v in args.size.split("x"))
    torch.backends.cudnn.benchmark = device.type == "cuda"
    teachers = make_teachers(args.arch, args.teachers, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"## {args.teachers} {args.arch} teachers, one batch each, {height}x{width}, {name}, "
          f"torch {torch.__version__}")
    print(f"{'batch':>5} {'path':<12} {'ms/iteration':>13} {'vs sequential':>14} {'max |diff|':>11}")
    results = {}
    for batch in args.batch:
        torch.manual_seed(0)
        images = torch.rand(args.teachers, batch, 3, height, width, device=device)
        if device.type == "cuda":  # what the stage feeds them: channels_last batches
            images = torch.stack([x.contiguous(memory_format=torch.channels_last) for x in images])
        found = paths(teachers, images, device)
        reference = found["sequential"]().float()
        base = None
        for label, fn in found.items():
            try:
                ms = timed(fn, device, args.repeats)
                diff = (fn().float() - reference).abs().max().item()
            except Exception as error:  # one failing path must not hide the others' numbers
                print(f"{batch:>5} {label:<12} failed: {type(error).__name__}: {str(error)[:200]}", flush=True)
                continue
            base = base or ms
            results[(batch, label)] = ms
            print(f"{batch:>5} {label:<12} {ms:>13.2f} {base / ms:>13.2f}x {diff:>11.2e}", flush=True)
    return results


if __name__ == "__main__":
    main()
