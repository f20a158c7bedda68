"""The whole method in one call: source training, one D-MMD teacher per target, the blended baseline and the
KD-ReID student, each stage in its own folder under RUN/stages/, then one table over all of them.

    RUN/stages/source_<teacher_arch>/   source training of the teachers' architecture ("source only" row)
    RUN/stages/source_<student_arch>/   the same for the student's architecture (skipped when it is the same)
    RUN/stages/teacher_<target>/        D-MMD from the source model to one target, for each target
    RUN/stages/blend/                   the student architecture adapted with D-MMD to the union of the targets
    RUN/stages/distill/                 the student, taught by the teachers in target order

A stage is reused, make-style, when its folder holds `model.pt`, the `config.yaml` saved there equals the
config it would run now, and its model is newer than the models it starts from; a folder with a training
checkpoint but no `model.pt` (a crash) is resumed; anything else there is stale and trained again.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import yaml

from kdreid import distributed
from kdreid.config import dump_yaml
from kdreid.errors import ConfigError
from kdreid.models import count_macs, load_checkpoint
from kdreid.rundir import RunDir, atomic_write_bytes, atomic_write_text, write_json
from kdreid.stages import adapt, distill, source
from kdreid.stages.common import evaluate_datasets
from kdreid.stages.data import load_datasets
from kdreid.stages.loop import SELECTION_RULES, checkpoint_file, select_device
from kdreid.stages.presets import resolve_config

STAGE_OVERRIDES = ("common", "source", "adapt", "blend", "distill")


@dataclass
class PipelineConfig:
    sources: list[str] = field(default_factory=lambda: ["msmt17"])
    targets: list[str] = field(default_factory=lambda: ["market1501", "dukemtmcreid", "cuhk03"])
    teacher_arch: str = "resnet50"
    student_arch: str = "osnet_x0_25"
    root: str = "data"
    out: str = "runs/pipeline"
    preset: str = "paper"  # the stage presets every stage starts from ("" = the dataclass defaults)
    # Per-stage settings over the preset, as mappings of (dotted or nested) keys of that stage's config, e.g.
    # {"train.epochs": 3} or {"train": {"epochs": 3}}. `common` applies to every stage, `source` to both source
    # runs, `adapt` to the teachers and the blend, `blend` to the blend only, `distill` to the student.
    common: Any = field(default_factory=dict)
    source: Any = field(default_factory=dict)
    adapt: Any = field(default_factory=dict)
    blend: Any = field(default_factory=dict)
    distill: Any = field(default_factory=dict)

    def validate(self) -> None:
        if not self.sources:
            raise ConfigError("pipeline needs a labelled source: -s SOURCE")
        if not self.targets:
            raise ConfigError("pipeline needs at least one target: -t T1 T2 ...")
        repeated = sorted({t for t in self.targets if self.targets.count(t) > 1})
        if repeated:
            raise ConfigError(f"target(s) {', '.join(repeated)} given twice in -t; name each target once")
        for name in STAGE_OVERRIDES:
            if not isinstance(getattr(self, name), Mapping):
                raise ConfigError(f"pipeline setting {name!r} must be a mapping of stage settings, "
                                  f"got {getattr(self, name)!r}")


@dataclass
class PipelineResult:
    out: str
    metrics: dict  # what RUN/metrics.json holds
    ran: list[str]  # stages trained (or resumed) in this call
    reused: list[str]  # stages whose finished model was kept


def flatten(mapping: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"train": {"epochs": 3}} -> {"train.epochs": 3}; dotted keys pass through."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def stage_configs(config: PipelineConfig) -> dict[str, Any]:
    """Every stage's resolved config, by stage name, in the order they run."""
    run = Path(config.out) / "stages"
    preset = config.preset or None

    def resolve(cls, stage: str, layers: list[Mapping], fixed: dict):
        # Precedence, lowest first: defaults, the preset, `common`, the stage's own settings, then what the
        # pipeline decides (datasets, architectures, inputs, folders), which no setting may change.
        overrides: dict[str, Any] = {}
        for layer in (config.common, *layers):
            overrides.update(flatten(layer))
        overrides.update(fixed)
        overrides["data.root"] = config.root
        return resolve_config(cls, stage, preset=preset, overrides=overrides)

    def source_name(arch: str) -> str:
        return f"source_{arch}"

    configs: dict[str, Any] = {}
    for arch in dict.fromkeys([config.teacher_arch, config.student_arch]):  # once when they are the same
        # No targets here: the pipeline evaluates the model on them afterwards, so that the source model (and
        # everything made from it) is reused when targets are added or removed.
        configs[source_name(arch)] = resolve(source.SourceConfig, "source", [config.source], {
            "sources": config.sources, "targets": [], "arch": arch,
            "out": str(run / source_name(arch)),
        })
    teacher_init = str(run / source_name(config.teacher_arch) / "model.pt")
    student_init = str(run / source_name(config.student_arch) / "model.pt")
    for target in config.targets:
        configs[f"teacher_{target}"] = resolve(adapt.AdaptConfig, "adapt", [config.adapt], {
            "sources": config.sources, "targets": [target], "blend": False, "arch": config.teacher_arch,
            "init": teacher_init, "out": str(run / f"teacher_{target}"),
        })
    configs["blend"] = resolve(adapt.AdaptConfig, "adapt", [config.adapt, config.blend], {
        "sources": config.sources, "targets": config.targets, "blend": True, "arch": config.student_arch,
        "init": student_init, "out": str(run / "blend"),
    })
    configs["distill"] = resolve(distill.DistillConfig, "distill", [config.distill], {
        "sources": config.sources, "targets": config.targets, "arch": config.student_arch,
        "teachers": [str(run / f"teacher_{t}" / "model.pt") for t in config.targets],
        "student_init": student_init, "out": str(run / "distill"),
    })
    return configs


def stage_inputs(stage_config) -> list[Path]:
    """The model files a stage starts from (its results are stale when one of them is newer)."""
    paths = [getattr(stage_config, "init", ""), getattr(stage_config, "student_init", "")]
    paths += list(getattr(stage_config, "teachers", []))
    return [Path(p) for p in paths if p]


def _same_config(saved: Path, stage_config) -> bool:
    if not saved.is_file():
        return False
    try:
        return yaml.safe_load(saved.read_text()) == yaml.safe_load(dump_yaml(stage_config))
    except yaml.YAMLError:
        return False


def _newer_than_inputs(path: Path, inputs: list[Path]) -> bool:
    mtime = path.stat().st_mtime_ns
    return all(not p.exists() or p.stat().st_mtime_ns <= mtime for p in inputs)


def stage_state(stage_config) -> str:
    """"done" (reuse), "resume" (interrupted, same config and inputs) or "fresh" (train from the start)."""
    folder = Path(stage_config.out)
    same = _same_config(folder / "config.yaml", stage_config)
    inputs = stage_inputs(stage_config)
    model = folder / "model.pt"
    # finish_stage writes model.pt, then metrics.json: a stage is finished when both are there.
    finished = model.is_file() and (folder / "metrics.json").is_file()
    if same and finished and _newer_than_inputs(model, inputs):
        return "done"
    checkpoint = checkpoint_file(folder)
    if same and not finished and checkpoint.is_file() and _newer_than_inputs(checkpoint, inputs):
        return "resume"
    return "fresh"


RUNNERS: dict[type, Callable] = {
    source.SourceConfig: source.run, adapt.AdaptConfig: adapt.run, distill.DistillConfig: distill.run,
}


def run_stage(name: str, stage_config, log) -> tuple[dict, bool]:
    """Run one stage, or reuse it. -> (final metrics {dataset: {metric: percent}}, whether it trained)."""
    folder = Path(stage_config.out)
    state = stage_state(stage_config)
    if state == "done":
        log.info(f"stage {name}: reusing {folder / 'model.pt'} (same config, newer than its inputs)")
        return json.loads((folder / "metrics.json").read_text())["final"], False
    if state == "fresh" and folder.exists():
        # Only the pipeline writes here: a changed config or a retrained input makes the old run meaningless.
        log.info(f"stage {name}: {folder} holds an older run (other config or inputs); training it again")
        if distributed.is_main():
            shutil.rmtree(folder)
        distributed.barrier()  # under torchrun, no process looks at the folder while it is being removed
    log.info(f"stage {name}: {'resuming' if state == 'resume' else 'training'} in {folder}")
    result = RUNNERS[type(stage_config)](stage_config, resume=state == "resume")
    return result.final, True


def evaluate_on_targets(name: str, stage_config, targets: list[str], log) -> dict:
    """A stage's model on every target (source stages evaluate on their sources, teachers on their own target
    only), cached next to the model and recomputed when the model is newer."""
    folder = Path(stage_config.out)
    cache = folder / "all_targets.json"
    model_path = folder / "model.pt"
    if cache.is_file() and _newer_than_inputs(cache, [model_path]):
        cached = json.loads(cache.read_text())
        if cached.get("targets") == targets:
            return cached["metrics"]
    log.info(f"stage {name}: evaluating {model_path} on {', '.join(targets)}")
    data = stage_config.data
    datasets = load_datasets(targets, data.root, {t: data.reader_options(t) for t in targets})
    device = select_device(stage_config.train.device)
    model = load_checkpoint(model_path).to(device)
    metrics = evaluate_datasets(model, datasets, stage_config.train, device, stage_config.eval, data)
    if distributed.is_main():
        write_json(cache, {"targets": targets, "metrics": metrics})
    distributed.barrier()
    return metrics


@torch.inference_mode()
def images_per_second(model: torch.nn.Module, height: int, width: int, device: torch.device,
                      batch_size: int = 32, seconds: float = 1.0) -> float:
    """Eval-mode forward throughput on `device`: a warm-up, then timed batches for about `seconds`."""
    model = model.eval().to(device)
    images = torch.rand(batch_size, 3, height, width, device=device)
    model(images)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    done, started = 0, time.perf_counter()
    while True:
        model(images)
        sync()
        done += batch_size
        elapsed = time.perf_counter() - started
        if elapsed >= seconds or done >= 100 * batch_size:
            return done / elapsed


def deployed_parameters(model: torch.nn.Module) -> int:
    """Parameters of the retrieval model: without the identity classifier(s), which deployment drops (as
    `kdreid models` counts)."""
    return sum(p.numel() for name, p in model.named_parameters()
               if name.split(".", 1)[0] not in ("classifier", "classifiers"))


def _copy(source_path: Path, target: Path) -> None:
    atomic_write_bytes(target, Path(source_path).read_bytes())


def results_markdown(config: PipelineConfig, metrics: dict, rows: list[tuple[str, dict]], info: dict,
                     selection: str) -> str:
    targets = config.targets
    header = "| model | " + " | ".join(f"{t} mAP | {t} R1" for t in targets) + " | mean mAP |"
    lines = [
        f"# {'+'.join(config.sources)} -> {', '.join(targets)}",
        "",
        header,
        "|---|" + "---|---|" * len(targets) + "---|",
    ]
    for label, per_target in rows:
        cells, maps = [], []
        for t in targets:
            m = per_target.get(t)
            if m is None:
                cells += ["—", "—"]
            else:
                cells += [f"{m['mAP']:.1f}", f"{m['rank1']:.1f}"]
                maps.append(m["mAP"])
        mean = f"{sum(maps) / len(maps):.1f}" if len(maps) == len(targets) else "—"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean} |")
    lines += [
        "",
        f"Student {info['arch']}: {info['parameters'] / 1e6:.3f} M parameters (without classifier), {info['macs'] / 1e6:.1f} M MACs "
        f"per {info['height']}x{info['width']} image, {info['images_per_second']:.0f} images/s "
        f"(eval forward, batch {info['batch_size']}, {info['device']}).",
        "",
        "Teachers' rows: each teacher on every target; its own target is what the `teachers` entry of "
        "metrics.json holds. Target grouping for D-MMD: "
        f"{metrics.get('grouping', 'tracklet')}. Checkpoint selection: {selection}. No number here comes "
        "from a checkpoint chosen on target test labels.",
    ]
    return "\n".join(lines) + "\n"


def run(config: PipelineConfig) -> PipelineResult:
    """Run (or continue) the whole pipeline; see the module docstring for the folders and files."""
    config.validate()
    configs = stage_configs(config)  # every config error surfaces before any training
    # Under torchrun every process runs this function; the first stage's device decides the backend, and only
    # the main process writes the pipeline's own files.
    distributed.init(next(iter(configs.values())).train.device)
    main = distributed.is_main()
    out = RunDir(config.out)
    log = out.logger() if main else distributed.worker_logger()
    if main:
        out.save_config(config)
    log.info(f"pipeline {'+'.join(config.sources)} -> {', '.join(config.targets)}: teachers "
             f"{config.teacher_arch}, student {config.student_arch}, preset {config.preset or 'none'}; "
             f"{len(configs)} stages in {Path(config.out) / 'stages'}")

    finals: dict[str, dict] = {}
    ran, reused = [], []
    for name, stage_config in configs.items():
        finals[name], trained = run_stage(name, stage_config, log)
        (ran if trained else reused).append(name)

    targets = config.targets
    teacher_all = {
        t: evaluate_on_targets(f"teacher_{t}", configs[f"teacher_{t}"], targets, log) for t in targets
    }
    for arch in dict.fromkeys([config.teacher_arch, config.student_arch]):
        name = f"source_{arch}"
        finals[name] = {**finals[name], **evaluate_on_targets(name, configs[name], targets, log)}

    def on_targets(final: dict) -> dict:
        return {t: final[t] for t in targets if t in final}

    source_teacher = finals[f"source_{config.teacher_arch}"]
    source_student = finals[f"source_{config.student_arch}"]
    metrics = {
        "source_only": on_targets(source_teacher),
        "source_only_student": on_targets(source_student),
        "teachers": {t: teacher_all[t][t] for t in targets},
        "blend": on_targets(finals["blend"]),
        "student": on_targets(finals["distill"]),
        "teachers_on_all_targets": teacher_all,
        "grouping": configs["blend"].grouping,
    }

    run_path = Path(config.out)
    if not main:
        return PipelineResult(str(run_path), metrics, ran, reused)
    # Final models at the top of the run folder (atomic copies: a crash never leaves half a file).
    stages = run_path / "stages"
    _copy(stages / "distill" / "model.pt", run_path / "student.pt")
    for t in targets:
        _copy(stages / f"teacher_{t}" / "model.pt", run_path / f"teacher_{t}.pt")
    for arch in dict.fromkeys([config.teacher_arch, config.student_arch]):
        _copy(stages / f"source_{arch}" / "model.pt", run_path / f"source_{arch}.pt")

    distill_config = configs["distill"]
    height, width = distill_config.train.height, distill_config.train.width
    device = select_device(distill_config.train.device)
    student = load_checkpoint(run_path / "student.pt")
    batch_size = 32
    info = {
        "arch": student.arch, "parameters": deployed_parameters(student), "macs": count_macs(student, height, width),
        "height": height, "width": width, "batch_size": batch_size, "device": str(device),
        "images_per_second": round(images_per_second(student, height, width, device, batch_size), 1),
    }
    metrics["student_model"] = info
    write_json(run_path / "metrics.json", metrics)

    same_arch = config.teacher_arch == config.student_arch
    rows = [(f"source only ({config.teacher_arch})", source_teacher)]
    if not same_arch:
        rows.append((f"source only ({config.student_arch})", source_student))
    rows += [(f"teacher {t} (D-MMD, {config.teacher_arch})", teacher_all[t]) for t in targets]
    rows.append((f"blend (D-MMD on all targets, {config.student_arch})", finals["blend"]))
    rows.append((f"KD-ReID student ({config.student_arch})", finals["distill"]))
    table = results_markdown(config, metrics, rows, info, SELECTION_RULES[distill_config.train.select])
    atomic_write_text(run_path / "results.md", table)
    log.info(f"wrote {run_path / 'metrics.json'}, {run_path / 'results.md'} and the final models in {run_path}")
    return PipelineResult(str(run_path), metrics, ran, reused)
