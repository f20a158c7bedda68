"""Training throughput (images/s) of source training, side by side, on the same synthetic images on disk:

  kdreid        the stage's own path, eager (--compile off): uint8 image cache on the device, batch augmentation
                there, bf16 autocast, channels_last, fused optimiser, losses read every `log_freq` steps; timed
                inside `fit` (the loop every stage runs) with the source stage's `train_step`
  kdreid+compile the same with `--compile MODE` (torch.compile of the model; reduce-overhead = CUDA graphs)
  plain         a plain PyTorch loop: DataLoader workers decoding JPEGs, torchvision CPU transforms (Resize,
                RandomHorizontalFlip, Pad+RandomCrop, ToTensor, torchreid's RandomErasing), fp32, same model/losses
  bare step     the model step alone on one fixed device batch (no data path, no loop): the eager ceiling
  data path     kdreid's batches alone (P×K sampling, cache gather, augmentation on the device), no model: what
                the data path costs a step, host launch time included
  torchreid     torchreid 0.2.5's own ImageDataManager (RandomIdentitySampler) and ImageTripletEngine step, loaded
                from the sdist in .cache/reference/ (its cv2/gdown imports stubbed: only visualisation uses them)

plus the adaptation stage (ResNet-50, D-MMD on; source + target images/s, `--adapt-compile MODE`), the distillation
stage (3 ResNet-50 teachers, OSNet x0.25 student) in student images/s, and with --accuracy
the fast-vs-plain accuracy check: the same short training from scratch, 3 seeds each, mAP on the domain's
query/gallery.

    python bench/train_speed.py --tiny                      # CPU, < 1 min: every path runs, numbers meaningless
    python bench/train_speed.py --device cuda               # R50 and OSNet x0.25, batch 64 (16×4), 256×128
    python bench/train_speed.py --device cuda --only kdreid --compile reduce-overhead --models osnet_x0_25
    python bench/train_speed.py --device cuda --accuracy --only none
    python bench/train_speed.py --device cuda --accuracy --only none --acc-paths fast compiled --acc-arch resnet18

Batch 64 = P 16 × K 4 at 256×128, CE (label smoothing 0.1) + batch-hard triplet (0.3), Adam. kdreid's ResNet-50
uses last stride 1 (the stage default, 1.5× the FLOPs; `--last-stride 2` times kdreid's paths at torchreid's
stride); torchreid's resnet50 uses its own default, last stride 2.
kdreid paths: one warm-up epoch of --steps steps (compilation happens there), then one timed epoch of --steps.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # the GPU machine runs from a checkout, without kdreid installed
TORCHREID = REPO / ".cache" / "reference" / "torchreid-0.2.5"

from kdreid.data.augment import IMAGENET_MEAN, AugmentConfig  # noqa: E402
from kdreid.data.cache import decode_images  # noqa: E402
from kdreid.data.datasets.base import build_dataset  # noqa: E402
from kdreid.data.samplers import PKSampler  # noqa: E402
from kdreid.data.synthetic import generate  # noqa: E402
from kdreid.losses import batch_hard_triplet, cross_entropy_label_smoothing  # noqa: E402
from kdreid.models import build_model, save_checkpoint  # noqa: E402
from kdreid.rundir import RunDir  # noqa: E402
from kdreid.stages import adapt, distill, source  # noqa: E402
from kdreid.stages.common import DataOptions, EvalOptions, evaluate_datasets  # noqa: E402
from kdreid.stages.data import BatchSource  # noqa: E402
from kdreid.stages.loop import TrainConfig, TrainingInterrupted, fit, seed_everything, select_device  # noqa: E402
from kdreid.stages.optim import OptimConfig, build_optimizer, learning_rate  # noqa: E402

SOURCE = "synth_market"
TARGETS = ("synth_duke", "synth_cuhk", "synth_msmt")
ALL_PATHS = ("kdreid", "compiled", "bare", "data", "plain", "torchreid", "adapt", "distill")


# ------------------------------------------------------------------------------------------------ helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quiet_logger(path: Path) -> logging.Logger:
    """INFO to a file, warnings (e.g. a compile fallback) also to stderr."""
    log = logging.getLogger(f"bench.{path}")
    log.setLevel(logging.INFO)
    log.propagate = False
    if not log.handlers:
        path.parent.mkdir(parents=True, exist_ok=True)
        log.addHandler(logging.FileHandler(path))
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(logging.WARNING)
        log.addHandler(console)
    return log


def ensure_data(root: Path, domains, scale: float, workers: int, size: tuple[int, int] | None = None) -> None:
    missing = [d for d in domains if not (root / d / "bounding_box_train").is_dir()]
    if missing:
        started = time.perf_counter()
        summaries = generate(root, missing, scale=scale, seed=0, workers=workers, size=size)
        print(f"[data] wrote {', '.join(missing)} at scale {scale} under {root} "
              f"({sum(s.images for s in summaries)} images, {time.perf_counter() - started:.1f} s)", flush=True)


def train_records(root: Path, name: str = SOURCE):
    dataset = build_dataset(name, str(root))
    return dataset, list(dataset.train)


def base_train_config(args, **changes) -> TrainConfig:
    config = TrainConfig(
        epochs=2, batch_size=args.batch, num_instances=args.instances, height=args.height, width=args.width,
        device=args.device, log_freq=args.log_freq, optim=OptimConfig(optimizer="adam", lr=3.5e-4, warmup_epochs=0),
    )
    for key, value in changes.items():
        setattr(config, key, value)
    return config


# ---------------------------------------------------------------------------------------- kdreid (the stage path)
def kdreid_speed(args, arch: str, records, cache: torch.Tensor, compile_mode: str, work: Path) -> dict:
    """The source stage's train_step inside `fit`: epoch 1 warms up (compiles), epoch 2 is timed by `fit`."""
    device = select_device(args.device)
    seed_everything(0, False)
    config = source.SourceConfig(sources=[SOURCE], arch=arch, last_stride=args.last_stride,
                                 train=base_train_config(args, compile=compile_mode))
    num_classes = 1 + max(r.pid for r in records)
    model = build_model(arch, num_classes, pretrained="none", last_stride=config.last_stride).to(device)
    batches = BatchSource(
        records, [r.pid for r in records], height=args.height, width=args.width, batch_size=args.batch,
        num_instances=args.instances, augment=config.train.augment, device=device, seed=0, images=cache,
    )
    optimizer = build_optimizer(model.parameters(), config.train.optim)
    run_dir = Path(tempfile.mkdtemp(dir=work, prefix=f"kdreid_{arch}_{compile_mode}_")) / "run"
    log = quiet_logger(run_dir / "log.txt")
    started = time.perf_counter()
    result = fit(
        run=RunDir(run_dir), config=config.train, stage_config=config, modules={"model": model},
        optimizer=optimizer, batches_per_epoch=args.steps, train_step=source.source_train_step(model, batches, config),
        evaluate=lambda epoch: {}, before_epoch=batches.start_epoch, log=log,
    )
    warmup_seconds = result.epochs[0]["seconds"]
    seconds = result.epochs[-1]["seconds"]
    fell_back = "failed" in (run_dir / "log.txt").read_text()
    del model, optimizer, batches
    return {
        "images_per_s": args.steps * args.batch / seconds, "seconds": seconds, "steps": args.steps,
        "warmup_epoch_s": warmup_seconds, "wall_s": time.perf_counter() - started,
        "loss": result.epochs[-1]["losses"]["loss"], "compile": compile_mode,
        **({"compile_fell_back": True} if fell_back else {}),
    }


# ------------------------------------------------------------------------------------------------ bare step (ceiling)
def bare_speed(args, arch: str, num_classes: int) -> dict:
    """The model step alone on one fixed batch already on the device (no data path, no loop): bf16 autocast on
    CUDA, channels_last, fused Adam, the same losses; a ceiling for the eager kdreid path."""
    device = select_device(args.device)
    torch.manual_seed(0)
    model = build_model(arch, num_classes, pretrained="none", last_stride=args.last_stride).to(device).train()
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model.to(memory_format=layout)
    optimizer = build_optimizer(model.parameters(), OptimConfig(optimizer="adam", lr=3.5e-4))
    images = torch.rand(args.batch, 3, args.height, args.width, device=device).contiguous(memory_format=layout)
    labels = torch.arange(args.batch // args.instances, device=device).repeat_interleave(args.instances)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(images)
            loss = cross_entropy_label_smoothing(out.logits, labels, 0.1) + batch_hard_triplet(out.embedding, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    for _ in range(args.warmup):
        step()
    sync(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync(device)
    seconds = time.perf_counter() - started
    return {"images_per_s": args.steps * args.batch / seconds, "seconds": seconds, "steps": args.steps,
            "loss": float(loss.detach())}


# ------------------------------------------------------------------------------------------------ data path alone
def data_speed(args, records, cache: torch.Tensor) -> dict:
    """kdreid's batches without a model: P×K sampling on the host, the gather from the device cache and the
    augmentation kernels. Its host time per batch is what a launch-bound step pays on top of the bare step."""
    device = select_device(args.device)
    batches = BatchSource(
        records, [r.pid for r in records], height=args.height, width=args.width, batch_size=args.batch,
        num_instances=args.instances, augment=AugmentConfig(), device=device, seed=0, images=cache,
    )
    batches.start_epoch(0)
    generator = torch.Generator(device=device).manual_seed(0)
    for _ in range(args.warmup):
        batches.next_batch(generator)
    sync(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        images, _ = batches.next_batch(generator)
    host_seconds = time.perf_counter() - started  # the host is free again: all launched, nothing waited for
    sync(device)
    seconds = time.perf_counter() - started
    return {"images_per_s": args.steps * args.batch / seconds, "seconds": seconds, "steps": args.steps,
            "host_ms_per_batch": host_seconds / args.steps * 1e3, "ms_per_batch": seconds / args.steps * 1e3}


# ------------------------------------------------------------------------------------------------ plain PyTorch
def cpu_transform(height: int, width: int, augment: AugmentConfig):
    """torchvision's CPU pipeline for the same augmentations (and torchreid's RandomErasing), on PIL images."""
    from torchvision import transforms as T

    erasing = _torchreid_random_erasing()
    steps = [T.Resize((height, width)), T.RandomHorizontalFlip(augment.flip)]
    if augment.pad:
        steps += [T.Pad(augment.pad), T.RandomCrop((height, width))]
    steps += [T.ToTensor()]
    if augment.erase:
        steps += [erasing(probability=augment.erase, sl=augment.erase_area[0], sh=augment.erase_area[1],
                          r1=augment.erase_aspect, mean=list(IMAGENET_MEAN))]
    return T.Compose(steps)


class MissingReference(RuntimeError):
    """torchreid 0.2.5's sources are not in .cache/reference/: the rows that need them fail with this one line."""


def require_torchreid(what: str) -> None:
    if not (TORCHREID / "torchreid").is_dir():
        raise MissingReference(
            f"torchreid 0.2.5's sources are missing ({what} needs them): extract its sdist to {TORCHREID} "
            "(`make test` downloads it to .cache/reference/; then `tar -xzf .cache/reference/torchreid-0.2.5.tar.gz "
            "-C .cache/reference`)")


def _torchreid_random_erasing():
    import importlib.util

    require_torchreid("the plain path's RandomErasing")
    path = TORCHREID / "torchreid" / "reid" / "data" / "transforms.py"
    spec = importlib.util.spec_from_file_location("torchreid_ref_transforms", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RandomErasing


class DiskImages(torch.utils.data.Dataset):
    def __init__(self, records, transform):
        self.records, self.transform = records, transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        from PIL import Image

        record = self.records[index]
        with Image.open(record.path) as image:
            return self.transform(image.convert("RGB")), record.pid


class PlainTrainer:
    """What a plain PyTorch user writes: DataLoader + CPU transforms, fp32, default (foreach) Adam, a loss
    `.item()` per step. Same model, losses, sampler, optimiser settings and LR schedule as the stage."""

    def __init__(self, args, arch: str, records, seed: int = 0, optim: OptimConfig | None = None):
        self.device = select_device(args.device)
        seed_everything(seed, False)
        self.args = args
        self.optim = optim or OptimConfig(optimizer="adam", lr=3.5e-4, warmup_epochs=0)
        num_classes = 1 + max(r.pid for r in records)
        self.model = build_model(arch, num_classes, pretrained="none", last_stride=args.last_stride)
        self.model = self.model.to(self.device).train()
        self.optimizer = build_optimizer(self.model.parameters(), self.optim, fused=False)
        self.sampler = PKSampler([r.pid for r in records], args.batch, args.instances, seed=seed)
        cuda = self.device.type == "cuda"
        self.loader = torch.utils.data.DataLoader(
            DiskImages(records, cpu_transform(args.height, args.width, AugmentConfig())), batch_sampler=self.sampler,
            num_workers=args.workers, pin_memory=cuda, persistent_workers=args.workers > 0,
            prefetch_factor=4 if args.workers > 0 else None,
        )
        self.epoch = 0
        self._iterator = None

    def batches(self):
        while True:
            self.sampler.set_epoch(self.epoch)
            yield from self.loader
            self.epoch += 1

    def step(self, images, labels) -> float:
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        out = self.model(images)
        loss = cross_entropy_label_smoothing(out.logits, labels, 0.1) + batch_hard_triplet(out.embedding, labels, 0.3)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def speed(self, warmup: int, steps: int) -> dict:
        stream = self.batches()
        for _ in range(warmup):
            self.step(*next(stream))
        sync(self.device)
        started = time.perf_counter()
        for _ in range(steps):
            loss = self.step(*next(stream))
        sync(self.device)
        seconds = time.perf_counter() - started
        return {"images_per_s": steps * self.args.batch / seconds, "seconds": seconds, "steps": steps, "loss": loss}

    def train_epochs(self, epochs: int) -> None:
        for epoch in range(epochs):
            self.epoch = epoch
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate(self.optim, epoch, epochs)
            self.sampler.set_epoch(epoch)
            for images, labels in self.loader:
                self.step(images, labels)


# ------------------------------------------------------------------------------------------------ torchreid 0.2.5
def import_torchreid():
    require_torchreid("the torchreid row")
    for name in ("cv2", "gdown"):  # imported by visualisation and download helpers only
        try:
            __import__(name)
        except ImportError:
            sys.modules[name] = types.ModuleType(name)
    sys.path.insert(0, str(TORCHREID))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Cython evaluation unavailable": training does not evaluate here
        import torchreid
    return torchreid


def torchreid_speed(args, arch: str, root: Path, work: Path) -> dict:
    torchreid = import_torchreid()
    device = select_device(args.device)
    cuda = device.type == "cuda"
    tr_root = work / "torchreid_root"
    tr_root.mkdir(parents=True, exist_ok=True)
    link = tr_root / "market1501"  # torchreid's Market-1501 reader on the same images (6 cameras, one digit)
    if not link.exists():
        link.symlink_to((root / SOURCE).resolve())
    printed = io.StringIO()
    torch.manual_seed(0)
    with contextlib.redirect_stdout(printed):
        manager = torchreid.data.ImageDataManager(
            root=str(tr_root), sources="market1501", height=args.height, width=args.width,
            transforms=["random_flip", "random_crop", "random_erase"], batch_size_train=args.batch,
            batch_size_test=args.batch, workers=args.workers, num_instances=args.instances,
            train_sampler="RandomIdentitySampler", use_gpu=cuda,
        )
        model = torchreid.models.build_model(arch, num_classes=manager.num_train_pids, loss="triplet",
                                             pretrained=False, use_gpu=cuda)
        model = model.to(device)
        optimizer = torchreid.optim.build_optimizer(model, optim="adam", lr=3.5e-4)
        engine = torchreid.engine.ImageTripletEngine(manager, model, optimizer, margin=0.3, weight_t=1, weight_x=1,
                                                     use_gpu=cuda, label_smooth=True)
    model.train()

    def batches():
        while True:
            yield from manager.train_loader

    stream = batches()
    for _ in range(args.warmup):
        engine.forward_backward(next(stream))
    sync(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        summary = engine.forward_backward(next(stream))
    sync(device)
    seconds = time.perf_counter() - started
    return {"images_per_s": args.steps * args.batch / seconds, "seconds": seconds, "steps": args.steps,
            "loss": summary.get("loss_t", math.nan) + summary.get("loss_x", math.nan)}


# ------------------------------------------------------------------------------------------------ distillation
def distill_speed(args, root: Path, work: Path, compile_mode: str) -> dict:
    """kdreid's distill stage, 3 targets, one teacher each (ResNet-50, random weights: speed does not depend on
    them), OSNet x0.25 student; `target_alt batch`, KD on outputs. Epoch 2 timed; student images/s."""
    out = Path(tempfile.mkdtemp(dir=work, prefix=f"distill_{compile_mode}_")) / "run"
    teachers = []
    for target in TARGETS:
        path = work / f"teacher_{target}.pt"
        if not path.exists():
            torch.manual_seed(0)
            save_checkpoint(path, build_model(args.teacher, 10, pretrained="none"), datasets=[target],
                            extra={"stage": "adapt", "input_size": [args.height, args.width]})
        teachers.append(str(path))
    train = base_train_config(args, compile=compile_mode)
    train.optim = OptimConfig(optimizer="sgd", lr=0.01, momentum=0.9, nesterov=False, warmup_epochs=0)
    config = distill.DistillConfig(
        sources=[SOURCE], targets=list(TARGETS), teachers=teachers, arch=args.student, out=str(out),
        data=DataOptions(root=str(root)), train=train, eval=EvalOptions(batch_size=256),
    )
    steps = len(TARGETS) * max(
        len(PKSampler([r.tracklet for r in build_dataset(t, str(root)).train], args.batch, args.instances,
                      what="tracklets"))
        for t in TARGETS
    )
    return stage_speed(distill.run, config, steps, steps * args.batch, compile_mode)


def stage_speed(run, config, steps: int, images_per_epoch: int, compile_mode: str) -> dict:
    """`run(config)` (a stage), its output kept quiet unless a compilation fell back; the second epoch timed."""
    started = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()) as printed:
        result = run(config)
    if "failed" in printed.getvalue():
        print(printed.getvalue(), file=sys.stderr)
    seconds = result.fit.epochs[-1]["seconds"]
    return {"images_per_s": images_per_epoch / seconds, "seconds": seconds, "steps": steps,
            "warmup_epoch_s": result.fit.epochs[0]["seconds"], "wall_s": time.perf_counter() - started,
            "compile": compile_mode}


def adapt_speed(args, root: Path, work: Path, compile_mode: str) -> dict:
    """kdreid's adaptation stage (D-MMD on from the first epoch, tracklets of the first target), ResNet-50 from
    random weights as the source model; one source and one target batch a step. Epoch 2 timed; images/s counts
    both batches (what an adaptation epoch costs per image it walks)."""
    dataset, records = train_records(root)
    init = work / f"source_{args.adapt_arch}.pt"
    if not init.exists():
        torch.manual_seed(0)
        model = build_model(args.adapt_arch, dataset.num_train_pids, pretrained="none")
        save_checkpoint(init, model, datasets=[SOURCE], extra={"stage": "source"})
    out = Path(tempfile.mkdtemp(dir=work, prefix=f"adapt_{compile_mode}_")) / "run"
    config = adapt.AdaptConfig(
        sources=[SOURCE], targets=[TARGETS[0]], init=str(init), dmmd_start=0, out=str(out), histogram_images=64,
        data=DataOptions(root=str(root)), train=base_train_config(args, compile=compile_mode),
        eval=EvalOptions(batch_size=256),
    )
    steps = len(PKSampler([r.pid for r in records], args.batch, args.instances, what="identities"))
    return stage_speed(adapt.run, config, steps, 2 * steps * args.batch, compile_mode)


# ------------------------------------------------------------------------------------------------ accuracy check
def accuracy_check(args, root: Path, work: Path) -> dict:
    """The same short training from scratch on each of --acc-paths: the fast path (the source stage itself,
    eager), the same compiled (--acc-compile) and the plain path; mAP on the domain's query/gallery, per seed,
    mean ± std."""
    dataset, records = train_records(root)
    optim = OptimConfig(optimizer="adam", lr=3.5e-4, scheduler="cosine", warmup_epochs=1)
    rows: dict[str, list[float]] = {name: [] for name in args.acc_paths}
    for seed in args.seeds:
        timings = []
        for name in args.acc_paths:
            started = time.perf_counter()
            if name == "plain":
                train = base_train_config(args, epochs=args.acc_epochs, seed=seed, optim=optim)
                trainer = PlainTrainer(args, args.acc_arch, records, seed=seed, optim=optim)
                trainer.train_epochs(args.acc_epochs)
                metrics = evaluate_datasets(trainer.model, [dataset], train, trainer.device,
                                            EvalOptions(batch_size=256), DataOptions(root=str(root)))
            else:
                mode = args.acc_compile if name == "compiled" else "off"
                train = base_train_config(args, epochs=args.acc_epochs, seed=seed, compile=mode, optim=optim)
                out = Path(tempfile.mkdtemp(dir=work, prefix=f"acc_{name}_{seed}_")) / "run"
                config = source.SourceConfig(sources=[SOURCE], arch=args.acc_arch, last_stride=args.last_stride,
                                             out=str(out), data=DataOptions(root=str(root)), train=train,
                                             eval=EvalOptions(batch_size=256))
                with contextlib.redirect_stderr(io.StringIO()):
                    metrics = source.run(config).final
                if name == "compiled" and "failed" in (out / "log.txt").read_text():
                    print(f"[accuracy] seed {seed}: the compiled run fell back to eager (see {out / 'log.txt'})")
            rows[name].append(metrics[SOURCE]["mAP"])
            timings.append(f"{name} mAP {rows[name][-1]:.1f} ({time.perf_counter() - started:.0f} s incl. eval)")
        print(f"[accuracy] seed {seed}: " + ", ".join(timings), flush=True)
    summary = {name: {"mAP": values, "mean": float(np.mean(values)), "std": float(np.std(values, ddof=1))
                      if len(values) > 1 else 0.0} for name, values in rows.items()}
    summary["setting"] = (f"{args.acc_arch} from scratch, {args.acc_epochs} epochs, {len(records)} images of {SOURCE}, "
                          f"{args.height}x{args.width}, batch {args.batch}, Adam 3.5e-4 cosine"
                          + (f", compiled = --compile {args.acc_compile}" if "compiled" in rows else ""))
    return summary


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per path")
    parser.add_argument("--warmup", type=int, default=15, help="untimed steps first (plain, torchreid)")
    parser.add_argument("--size", default="256x128", help="HxW of the training input")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--instances", type=int, default=4, help="K of the P×K batches")
    parser.add_argument("--models", nargs="+", default=None, help="default: resnet50 osnet_x0_25")
    parser.add_argument("--only", nargs="+", default=None, choices=[*ALL_PATHS, "none"],
                        help="which paths to run (default: all; none: only --accuracy)")
    parser.add_argument("--compile", default="reduce-overhead",
                        help="mode of the kdreid+compile path: default, reduce-overhead, max-autotune-no-cudagraphs")
    parser.add_argument("--compile-models", nargs="+", default=None,
                        help="models timed with --compile (default: all of --models)")
    parser.add_argument("--distill-compile", default="off", help="compile mode of the distillation run")
    parser.add_argument("--adapt-compile", default="off", help="compile mode of the adaptation run")
    parser.add_argument("--adapt-arch", default="resnet50", help="architecture of the adapted model")
    parser.add_argument("--student", default="osnet_x0_25")
    parser.add_argument("--teacher", default="resnet50", help="architecture of the 3 distillation teachers")
    parser.add_argument("--data", default=None, help="folder of the synthetic domains (generated there if absent)")
    parser.add_argument("--scale", type=float, default=0.2, help="scale of the generated source domain")
    parser.add_argument("--distill-scale", type=float, default=0.04, help="scale of the generated target domains")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="DataLoader workers (plain, torchreid) and generator processes")
    parser.add_argument("--log-freq", type=int, default=50)
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--compare", default=None,
                        help="a --json of an earlier run on the same machine: its rows join the table (ratios)")
    parser.add_argument("--accuracy", action="store_true", help="fast vs plain mAP over --seeds")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--acc-arch", default="resnet50")
    parser.add_argument("--acc-epochs", type=int, default=12)
    parser.add_argument("--acc-paths", nargs="+", default=["fast", "plain"], choices=["fast", "compiled", "plain"],
                        help="paths of the accuracy check (compiled: the fast path with --acc-compile)")
    parser.add_argument("--acc-compile", default="reduce-overhead", help="compile mode of the 'compiled' path")
    parser.add_argument("--last-stride", type=int, default=1, choices=[1, 2],
                        help="ResNet last stride of kdreid's paths (1: the stage default; torchreid uses 2)")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke run in < 1 min: 64x32, batch 16, 2 steps, tiny domains (figures meaningless)")
    args = parser.parse_args(argv)
    if args.tiny:
        # Light models only (ResNet-50 steps take seconds on 2 busy cores) and no compilation (minutes on a CPU;
        # tests/stages/test_optim_fast_path.py covers it): this checks that every path runs, not its speed.
        args.device = "cpu" if args.device == "auto" else args.device
        args.size, args.batch, args.steps, args.warmup, args.scale, args.distill_scale = "64x32", 16, 2, 1, 0.02, 0.01
        args.acc_epochs, args.seeds, args.workers = 1, args.seeds[:2], min(args.workers, 2)
        args.models = args.models or ["osnet_x0_25"]
        args.teacher, args.acc_arch, args.adapt_arch, args.log_freq = "osnet_x0_25", "osnet_x0_25", "osnet_x0_25", 1
        args.only = args.only or [p for p in ALL_PATHS if p != "compiled"]
        torch.set_num_threads(1)  # the 2-core box is shared: one thread avoids oversubscription stalls
    args.only = args.only or list(ALL_PATHS)
    args.models = args.models or ["resnet50", "osnet_x0_25"]
    args.height, args.width = (int(v) for v in args.size.lower().split("x"))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.accuracy and "plain" in args.acc_paths:
        try:  # before any work: the check would stop at its first plain run, after the first fast one
            require_torchreid("--accuracy's plain path")
        except MissingReference as error:
            raise SystemExit(f"train_speed.py: {error}") from None
    device = select_device(args.device)
    args.device = str(device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"[setup] {name}; torch {torch.__version__}; batch {args.batch} ({args.batch // args.instances}x"
          f"{args.instances}) at {args.height}x{args.width}; {args.steps} timed steps; workers {args.workers}",
          flush=True)
    work_context = tempfile.TemporaryDirectory() if args.work is None else contextlib.nullcontext(args.work)
    results: dict = {"device": name, "torch": torch.__version__, "size": [args.height, args.width],
                     "batch": args.batch, "steps": args.steps, "speed": {}}
    with work_context as work:
        work = Path(work)
        work.mkdir(parents=True, exist_ok=True)  # a named --work folder need not exist yet
        root = Path(args.data) if args.data else work / "data"
        paths = [p for p in args.only if p != "none"]
        size = (args.height, args.width) if args.tiny else None  # tiny images render faster
        ensure_data(root, [SOURCE], args.scale, args.workers, size)
        if {"adapt", "distill"} & set(paths):
            for target in TARGETS if "distill" in paths else TARGETS[:1]:
                # tiny: each target small enough for a few batches per epoch (MSMT17's style has 4× CUHK03's ids)
                tiny_scale = {"synth_msmt": 0.003, "synth_duke": 0.006}.get(target, 0.01)
                scale = tiny_scale if args.tiny else args.distill_scale
                ensure_data(root, [target], scale, args.workers, size)
        dataset, records = train_records(root)
        print(f"[setup] {SOURCE}: {len(records)} training images, {dataset.num_train_pids} identities", flush=True)
        cache = None
        if {"kdreid", "compiled", "data"} & set(paths):
            started = time.perf_counter()
            cache = decode_images([r.path for r in records], args.height, args.width, workers=args.workers)
            print(f"[setup] decoded {len(records)} images into the uint8 cache in {time.perf_counter() - started:.1f} s"
                  f" ({cache.numel() / 1e9:.2f} GB)", flush=True)
            if device.type == "cuda":
                cache = cache.to(device)  # shared by the runs: BatchSource keeps a cache already on the device

        def attempt(label: str, fn):
            print(f"[run] {label} ...", flush=True)
            try:
                row = fn()
            except TrainingInterrupted as stopped:  # the step's `timeout` (SIGTERM): stop here, keep the rows so far
                results["speed"][label] = {"error": str(stopped)}
                save_json(results, args.json)
                print(f"[run] {label}: {stopped}", flush=True)
                sys.exit(stopped.exit_code)
            except MissingReference as error:  # one line, not a traceback: nothing is wrong with kdreid
                print(f"[run] {label}: failed: {error}", flush=True)
                row = {"error": str(error)}
            except Exception as error:  # one failing path must not hide the others' numbers
                traceback.print_exc()
                row = {"error": f"{type(error).__name__}: {error}"}
            results["speed"][label] = row
            save_json(results, args.json)  # after every row: a run cut short keeps what it measured
            if "images_per_s" in row:
                print(f"[run] {label}: {row['images_per_s']:,.0f} img/s "
                      f"({row['steps']} steps in {row['seconds']:.2f} s)"
                      + (f"; warm-up epoch {row['warmup_epoch_s']:.1f} s" if "warmup_epoch_s" in row else "")
                      + (f"; host {row['host_ms_per_batch']:.2f} ms a batch" if "host_ms_per_batch" in row else ""),
                      flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return row

        if "data" in paths:  # the same for every model
            attempt("data path (no model)", lambda: data_speed(args, records, cache))
        for arch in args.models:
            # A ResNet timed at another last stride is another network: its rows say so.
            restrided = arch.startswith("resnet") and args.last_stride != 1
            model_label = f"{arch}@stride{args.last_stride}" if restrided else arch
            if "kdreid" in paths:
                attempt(f"{model_label} kdreid", lambda: kdreid_speed(args, arch, records, cache, "off", work))
            if "compiled" in paths and arch in (args.compile_models or args.models):
                attempt(f"{model_label} kdreid+compile({args.compile})",
                        lambda: kdreid_speed(args, arch, records, cache, args.compile, work))
            if "bare" in paths:
                attempt(f"{model_label} bare step", lambda: bare_speed(args, arch, dataset.num_train_pids))
            if "plain" in paths:
                attempt(f"{model_label} plain",
                        lambda: PlainTrainer(args, arch, records).speed(args.warmup, args.steps))
            if "torchreid" in paths:
                attempt(f"{model_label} torchreid", lambda: torchreid_speed(args, arch, root, work))
        if "adapt" in paths:
            compiled = f"+compile({args.adapt_compile})" if args.adapt_compile != "off" else ""
            attempt(f"adapt {args.adapt_arch}{compiled} (source+target)",
                    lambda: adapt_speed(args, root, work, args.adapt_compile))
        if "distill" in paths:
            attempt(f"distill 3 teachers ({args.student} student)",
                    lambda: distill_speed(args, root, work, args.distill_compile))
        if args.accuracy:
            results["accuracy"] = accuracy_check(args, root, work)

    print_table(results, args)
    save_json(results, args.json)
    return results


def save_json(results: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(results, indent=2))


def print_table(results: dict, args) -> None:
    speed = dict(results["speed"])
    if args.compare and Path(args.compare).is_file():
        earlier = json.loads(Path(args.compare).read_text()).get("speed", {})
        speed.update({f"{label} [earlier run]": row for label, row in earlier.items() if label not in speed})
    if speed:
        print(f"\n## Training images/s — {results['device']}, torch {results['torch']}, batch {args.batch}, "
              f"{args.height}x{args.width}")
        print(f"{'path':<44} {'img/s':>9} {'vs torchreid':>13} {'vs plain':>9}")
        crossed = False
        for label, row in speed.items():
            if "images_per_s" not in row:
                print(f"{label:<44} {'failed':>9}  {row.get('error', '')[:80]}")
                continue
            arch = label.split()[0]
            ratios = []
            for base in ("torchreid", "plain"):
                found = next(((key, speed[key]) for key in (f"{arch} {base}", f"{arch} {base} [earlier run]")
                              if key in speed and "images_per_s" in speed[key]), None)
                mine = label.removesuffix(" [earlier run]").endswith(base)
                if found is None or mine:
                    ratios.append("")
                    continue
                # A ratio between this run and the --compare run was not measured side by side: marked.
                across = found[0].endswith("[earlier run]") != label.endswith("[earlier run]")
                crossed = crossed or across
                ratios.append(f"{row['images_per_s'] / found[1]['images_per_s']:.2f}x" + ("*" if across else ""))
            print(f"{label:<44} {row['images_per_s']:>9,.0f} {ratios[0]:>13} {ratios[1]:>9}")
        if crossed:
            print(f"* against a row of the earlier run ({args.compare}), not measured side by side in this one")
    accuracy = results.get("accuracy")
    if accuracy:
        paths = [name for name in ("fast", "compiled", "plain") if name in accuracy]
        print(f"\n## Accuracy, {' vs '.join(paths)} ({accuracy['setting']})")
        for name in paths:
            row = accuracy[name]
            print(f"{name:<8} mAP per seed {', '.join(f'{v:.1f}' for v in row['mAP'])}: "
                  f"mean {row['mean']:.1f} ± {row['std']:.1f} (sample std over {len(row['mAP'])} seeds)")
        for name in paths[1:]:
            gap = accuracy[paths[0]]["mean"] - accuracy[name]["mean"]
            spread = max(accuracy[paths[0]]["std"], accuracy[name]["std"])
            print(f"{paths[0]} − {name} = {gap:+.1f} mAP; largest seed spread {spread:.1f}")


if __name__ == "__main__":
    main()
