"""Wall time per stage of `kdreid pipeline` (1 source + 3 targets) on synthetic domains, with a shortened
schedule and a clearly labelled extrapolation to the full one.

    python bench/pipeline_time.py --device cuda --scale 0.05 --epochs-scale 0.05     # a couple of minutes on a GPU
    python bench/pipeline_time.py --tiny                                            # CPU smoke run

What runs is `kdreid.stages.pipeline.run` — what `kdreid pipeline -s synth_msmt -t synth_market synth_duke synth_cuhk
--preset paper` runs — with every stage's epochs (and its epoch-valued settings: milestones, warm-up, D-MMD start,
evaluation frequency) multiplied by --epochs-scale. Each stage is timed as a whole (image decoding, training,
evaluation, checkpoint); the stage's own per-epoch training seconds come from its metrics.json.

The extrapolation (printed as such, never as a measurement) is, per stage:
    setup and evaluation seconds as measured + steady training seconds per epoch × the preset's epochs
                                               × (full-size training images / the images used here)
where the steady epoch is the mean of every epoch but the first: the first also pays one-off costs (cuDNN
autotuning, compilation, the caching allocator's growth), which are counted once, with the setup. Full size is,
with `--full-size market` (the default: the workload of the 45-minute target, "Market-size synthetic domains, ~13k
training images each"), Market-1501's 12,936 training images for every domain; with `--full-size real`, the
real dataset each synthetic domain mimics at --scale 1 (MSMT17 32,621 training images; Market-1501 12,936;
DukeMTMC-reID 16,522; CUHK03 7,365): the original paper's workload. An epoch of source training and of adaptation
walks the source's images; an epoch of distillation walks the largest target's batches once per target.
Evaluation time is not scaled (it grows with the gallery, which the figure leaves out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from kdreid.data.datasets.base import build_dataset  # noqa: E402
from kdreid.data.synthetic import generate  # noqa: E402
from kdreid.stages import pipeline  # noqa: E402
from kdreid.stages.presets import PRESETS  # noqa: E402

REAL_TRAIN_IMAGES = {"synth_msmt": 32621, "synth_market": 12936, "synth_duke": 16522, "synth_cuhk": 7365}
MARKET_TRAIN_IMAGES = REAL_TRAIN_IMAGES["synth_market"]


def full_train_images(domain: str, full_size: str, measured: int) -> int:
    """Training images of `domain` in the workload extrapolated to (see the module docstring)."""
    if full_size == "market":
        return MARKET_TRAIN_IMAGES
    return REAL_TRAIN_IMAGES.get(domain, measured)


def scaled_schedule(stage: str, preset: str, factor: float) -> dict:
    """The preset's epoch-valued settings of `stage` multiplied by `factor` (at least 1 epoch)."""
    settings = PRESETS[preset].get(stage, {})
    train = settings.get("train", {})
    epochs = train.get("epochs")
    if epochs is None:
        return {}

    def scale(value: int) -> int:
        return max(0, round(value * factor))

    out = {"train.epochs": max(1, scale(epochs))}
    optim = train.get("optim", {})
    if "milestones" in optim:
        out["train.optim.milestones"] = [scale(m) for m in optim["milestones"]]
    if "warmup_epochs" in optim:
        out["train.optim.warmup_epochs"] = scale(optim["warmup_epochs"])
    if train.get("eval_freq"):
        out["train.eval_freq"] = max(1, scale(train["eval_freq"]))
    if "dmmd_start" in settings:
        out["dmmd_start"] = scale(settings["dmmd_start"])
    return out


def stage_row(name: str, stage_config, wall: float, args, train_images: dict) -> dict:
    """Measured and extrapolated seconds of one finished stage (see the module docstring)."""
    metrics = json.loads((Path(stage_config.out) / "metrics.json").read_text())
    epoch_seconds = [e["seconds"] for e in metrics["epochs"]]
    stage = "distill" if name == "distill" else ("source" if name.startswith("source") else "adapt")
    full_epochs = PRESETS[args.preset][stage]["train"]["epochs"]
    if stage == "distill":
        ratio = max(full_train_images(t, args.full_size, train_images[t]) for t in args.targets) / max(
            train_images[t] for t in args.targets)
    else:
        ratio = full_train_images(args.source, args.full_size, train_images[args.source]) / train_images[args.source]
    steady = epoch_seconds[1:] or epoch_seconds  # the first epoch's one-off costs are not scaled
    mean_epoch = sum(steady) / len(steady)
    overhead = wall - mean_epoch * len(epoch_seconds)  # decoding, evaluation, checkpoints, warm-up: not scaled
    return {"stage": name, "wall_s": wall, "epochs_run": len(epoch_seconds), "train_s": sum(epoch_seconds),
            "mean_epoch_s": mean_epoch, "full_epochs": full_epochs, "image_ratio": ratio,
            "extrapolated_full_s": overhead + mean_epoch * full_epochs * ratio, "kind": stage}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    parser.add_argument("--source", default="synth_msmt")
    parser.add_argument("--targets", nargs="+", default=["synth_market", "synth_duke", "synth_cuhk"])
    parser.add_argument("--scale", type=float, default=0.05, help="size of the generated domains (1 = full size)")
    parser.add_argument("--size", default=None, help="HxW of the generated images (default: each domain's own)")
    parser.add_argument("--full-size", choices=["market", "real"], default="market",
                        help="workload extrapolated to: every domain Market-size (12,936 training images; the "
                             "target's) or each domain's real dataset size (MSMT17's 32,621 for synth_msmt)")
    parser.add_argument("--epochs-scale", type=float, default=0.05, help="fraction of the preset's epochs to run")
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--teacher-arch", default="resnet50")
    parser.add_argument("--student-arch", default="osnet_x0_25")
    parser.add_argument("--train-size", default=None, help="HxW training input (default: the preset's)")
    parser.add_argument("--compile", default=None, help="--compile of every stage (default: the stage default)")
    parser.add_argument("--data", default=None, help="folder of the domains (generated there when absent)")
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--dmmd-factor", type=float, default=0.5,
                        help="also extrapolate with this fraction of the adaptation epochs (the issue's 'half')")
    parser.add_argument("--batch-size", type=int, default=None, help="P×K batch of every stage (default: preset)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny domains, 64x32, 1 epoch per stage")
    args = parser.parse_args(argv)
    if args.tiny:
        args.device = args.device or "cpu"
        args.scale, args.size, args.train_size, args.epochs_scale = 0.01, "64x32", "64x32", 0.0
        args.teacher_arch = "osnet_x0_25"  # one light architecture: one source run, fast teachers
        args.batch_size = 16
        args.workers = min(args.workers, 2)

    import torch

    from kdreid.stages.loop import select_device

    device = select_device(args.device or "auto")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"[setup] {device_name}; torch {torch.__version__}", flush=True)

    temporary = tempfile.TemporaryDirectory() if args.out is None or args.data is None else nullcontext()
    with temporary as scratch:
        data = Path(args.data or Path(scratch) / "data")
        out = Path(args.out or Path(scratch) / "run")
        domains = [args.source, *args.targets]
        missing = [d for d in domains if not (data / d / "bounding_box_train").is_dir()]
        if missing:
            size = tuple(int(v) for v in args.size.split("x")) if args.size else None
            started = time.perf_counter()
            generate(data, missing, scale=args.scale, seed=0, size=size, workers=args.workers)
            print(f"[data] generated {', '.join(missing)} at scale {args.scale} "
                  f"in {time.perf_counter() - started:.0f} s",
                  flush=True)
        train_images = {d: len(build_dataset(d, str(data)).train) for d in domains}
        print("[data] training images: " + ", ".join(f"{d} {n}" for d, n in train_images.items()), flush=True)

        common: dict = {}
        if args.device:
            common["train.device"] = args.device
        if args.compile:
            common["train.compile"] = args.compile
        if args.batch_size:
            common["train.batch_size"] = args.batch_size
        if args.train_size:
            height, width = (int(v) for v in args.train_size.split("x"))
            common.update({"train.height": height, "train.width": width})
        config = pipeline.PipelineConfig(
            sources=[args.source], targets=list(args.targets), root=str(data), out=str(out), preset=args.preset,
            teacher_arch=args.teacher_arch, student_arch=args.student_arch,
            common=common,
            source=scaled_schedule("source", args.preset, args.epochs_scale),
            adapt=scaled_schedule("adapt", args.preset, args.epochs_scale),
            distill=scaled_schedule("distill", args.preset, args.epochs_scale),
        )
        rows = []
        original = pipeline.run_stage

        def timed_stage(name, stage_config, log, *shared):
            # Each stage is reported as soon as it ends, so that a run cut short still says what it measured.
            started = time.perf_counter()
            result = original(name, stage_config, log, *shared)
            row = stage_row(name, stage_config, time.perf_counter() - started, args, train_images)
            rows.append(row)
            if args.json:  # so far: a run cut by its time limit keeps the stages it finished
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps({"device": device_name, "rows": rows, "partial": True}, indent=2))
            print(f"[stage] {name}: {row['wall_s']:.1f} s measured ({row['epochs_run']} epochs, {row['train_s']:.1f} s "
                  f"training) -> EXTRAPOLATED {row['extrapolated_full_s']:.0f} s for {row['full_epochs']} epochs on "
                  f"{row['image_ratio']:.1f}x the images", flush=True)
            return result

        pipeline.run_stage = timed_stage  # the pipeline looks the function up at call time
        started = time.perf_counter()
        try:
            pipeline.run(config)
        finally:
            pipeline.run_stage = original
        total = time.perf_counter() - started

    print(f"\n## kdreid pipeline, {args.source} -> {' '.join(args.targets)}, preset {args.preset}, "
          f"epochs × {args.epochs_scale}, domains at scale {args.scale}; {device_name}, torch {torch.__version__}")
    print(f"{'stage':<22} {'measured s':>10} {'epochs':>6} {'train s':>8} | {'EXTRAPOLATED full s':>20}")
    for row in rows:
        print(f"{row['stage']:<22} {row['wall_s']:>10.1f} {row['epochs_run']:>6} {row['train_s']:>8.1f} | "
              f"{row['extrapolated_full_s']:>20.0f}")
    measured = sum(r["wall_s"] for r in rows)
    full = sum(r["extrapolated_full_s"] for r in rows)
    # The same with only dmmd_factor of the adaptation (D-MMD) epochs.
    saved = (1 - args.dmmd_factor)
    half = sum(r["extrapolated_full_s"]
               - (r["kind"] == "adapt") * saved * r["mean_epoch_s"] * r["full_epochs"] * r["image_ratio"]
               for r in rows)
    # The blend is a baseline row nothing else uses (`kdreid pipeline --no-blend-baseline` leaves it out).
    blend = sum(r["extrapolated_full_s"] for r in rows if r["stage"] == "blend")
    print(f"measured: {measured:.0f} s in the stages, {total:.0f} s for the whole pipeline call")
    print(f"EXTRAPOLATED (not measured) to the full {args.preset} schedule on {args.full_size}-size domains: "
          f"{full / 60:.1f} min ({(full - blend) / 60:.1f} min without the blend baseline); with "
          f"{args.dmmd_factor:g}× the adaptation epochs: {half / 60:.1f} min")
    result = {"device": device_name, "torch": torch.__version__, "rows": rows, "measured_total_s": total,
              "extrapolated_full_min": full / 60,
              "extrapolated_without_blend_min": (full - blend) / 60,
              "extrapolated_dmmd_factor_min": half / 60, "settings": vars(args)}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
