"""The whole method in one call: source training, one D-MMD teacher per target, the blended baseline and the
KD-ReID student, each stage in its own folder under RUN/stages/, then one table over all of them.

    RUN/stages/source_<teacher_arch>/   source training of the teachers' architecture ("source only" row)
    RUN/stages/source_<student_arch>/   the same for the student's architecture (skipped when it is the same)
    RUN/stages/teacher_<target>/        D-MMD from the source model to one target, for each target
    RUN/stages/blend/                   the student architecture adapted with D-MMD to the union of the targets
                                        (a baseline row; `blend_baseline: false` / --no-blend-baseline skips it)
    RUN/stages/distill/                 the student, taught by the teachers in target order

A stage is reused, make-style, when its folder holds `model.pt`, the `config.yaml` saved there agrees with the
config it would run now on every setting that decides its weights (see `loop.changes_weights`; the paths of its
input models may differ), its model is newer than the models it starts from, and its datasets hold the files
it was trained on (`datasets.json`: paths, labels and sizes; a moved data folder keeps them); a folder with a training
checkpoint but no `model.pt` (a crash) is resumed, and so is a finished one whose numbers no longer hold (its query
or gallery files changed, or the distance or flip setting did: with no epoch left, it measures them again, and
one stopped before it wrote its 'after' picture data, which it writes then);
anything else there is stale and trained again, after a log line that says why.
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import yaml

from kdreid import distributed
from kdreid.config import flatten, read_yaml
from kdreid.errors import ConfigError, KdreidError, sigterm_interrupts
from kdreid.models import count_macs, load_checkpoint
from kdreid.rundir import (
    RunDir, absolute_path, atomic_write_bytes, atomic_write_text, exclusive, first_missing, remove_made_folder,
    remove_stale_temporaries, write_json,
)
from kdreid.stages import adapt, distill, source
from kdreid.stages.common import (
    evaluate_datasets, how_measured, refuse_repeated_datasets, refuse_tracklets_across_cameras, trains_on_all,
)
from kdreid.stages.data import (
    DATASETS_FILE, dataset_fingerprint, fingerprint_change, load_datasets, read_datasets_record,
)
from kdreid.stages.loop import (
    SELECTION_RULES, changed_settings, changes_weights, checkpoint_file, measurement_changes, percent_cell,
    select_device,
)
from kdreid.stages.presets import PRESETS, resolve_config

STAGE_OVERRIDES = ("common", "source", "adapt", "blend", "distill", "overrides")

# The inputs a stage starts from (`init`, `student_init`, `teachers`) are wired by the pipeline from its run folder
# and checked by modification time (`stage_inputs`), so their paths never decide a reuse.
PIPELINE_WIRED_SETTINGS = ("init", "student_init", "teachers")


@dataclass
class PipelineConfig:
    sources: list[str] = field(default_factory=lambda: ["msmt17"])
    targets: list[str] = field(default_factory=lambda: ["market1501", "dukemtmcreid", "cuhk03"])
    teacher_arch: str = "resnet50"
    student_arch: str = "osnet_x0_25"
    root: str = "data"
    out: str = "runs/pipeline"
    preset: str = "paper"  # the stage presets every stage starts from ("" = the dataclass defaults)
    # The blend row: the student's architecture adapted with D-MMD to the targets' union, the baseline the paper
    # compares the student with. Nothing else uses it: off, the pipeline saves a whole adaptation stage.
    blend_baseline: bool = True
    # Per-stage settings over the preset, as mappings of (dotted or nested) keys of that stage's config, e.g.
    # {"train.epochs": 3} or {"train": {"epochs": 3}}. `common` applies to every stage, `source` to both source
    # runs, `adapt` to the teachers and the blend, `blend` to the blend only, `distill` to the student.
    common: Any = field(default_factory=dict)
    source: Any = field(default_factory=dict)
    adapt: Any = field(default_factory=dict)
    blend: Any = field(default_factory=dict)
    distill: Any = field(default_factory=dict)
    # Applied to every stage after its own section: where `kdreid pipeline` puts its stage flags, so that a
    # flag wins over the --config file as it does in the standalone stages.
    overrides: Any = field(default_factory=dict)

    def validate(self) -> None:
        if not self.sources:
            raise ConfigError("pipeline needs a labelled source: -s SOURCE")
        if not self.targets:
            raise ConfigError("pipeline needs at least one target: -t T1 T2 ...")
        refuse_repeated_datasets(self.sources, self.targets)
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


def resolve_pipeline_config(*, preset: str | None = None, config_file: str | None = None,
                            overrides: Mapping[str, Any] | None = None) -> PipelineConfig:
    """The pipeline's config: defaults < the preset's `pipeline` section < the YAML file < `overrides`. The preset
    is `preset` (--preset), else the one the YAML file names, else the default, so that `preset: quick` in the
    file picks quick's teachers as --preset quick does."""
    if config_file is not None:
        data = read_yaml(config_file)
        named = data.get("preset") if isinstance(data, Mapping) else None
        # Checked even when --preset wins over it: a misspelt name in a file someone reuses should not lie there.
        if isinstance(named, str) and named and named not in PRESETS:
            raise ConfigError(f"{config_file}: unknown preset {named!r}; known: {', '.join(sorted(PRESETS))}")
        if isinstance(data, Mapping) and isinstance(data.get("pipeline"), Mapping):  # the presets' own layout
            raise ConfigError(f"{config_file}: a `pipeline:` section is how presets are written; in a pipeline's "
                              f"--config its keys ({', '.join(data['pipeline'])}) go at the top level")
        if preset is None and isinstance(named, str):
            preset = named
    if preset is None:
        preset = PipelineConfig().preset
    return resolve_config(PipelineConfig, "pipeline", preset=preset or None, config_file=config_file,
                          overrides=overrides)


def stage_configs(config: PipelineConfig) -> dict[str, Any]:
    """Every stage's resolved config, by stage name, in the order they run."""
    run = Path(config.out) / "stages"
    preset = config.preset or None
    ignored: set[str] = set()  # keys already named as set by the pipeline

    def resolve(cls, stage: str, layers: list[Mapping], fixed: dict, sections: tuple[str, ...] = ()):
        # Precedence, lowest first: defaults, the preset, `common`, the stage's own settings, `overrides` (the
        # CLI flags), then what the pipeline decides (datasets, architectures, inputs, folders), which no setting
        # may change.
        settings: dict[str, Any] = {}
        for layer in (config.common, *layers, config.overrides):
            settings.update(flatten(layer))
        # What the pipeline decides wins over a section's value: said once, not silently dropped.
        for key in sorted(set(settings) & {*fixed, "data.root"}):
            if key not in ignored:
                ignored.add(key)
                print(f"kdreid: warning: the pipeline sets {key} of its stages itself (datasets, architectures, "
                      f"input models, folders, data root); {key} in the --config file's stage sections is not "
                      "used", file=sys.stderr)
        settings.update(fixed)
        settings["data.root"] = config.root
        try:
            resolved = resolve_config(cls, stage, preset=preset, overrides=settings)
            # Here, not when the stage starts after hours of the earlier ones.
            getattr(resolved, "validate", resolved.train.validate)()
            return resolved
        except ConfigError as error:  # the layers are merged by now: say where the value can have come from
            sections = ("common", *(sections or (stage,)))
            message = str(error)
            if message.startswith("config."):
                message = f"{sections[-1]}." + message[len("config."):]
            named = ", ".join(f"`{s}`" for s in sections[:-1]) + f" or `{sections[-1]}`"
            raise ConfigError(f"{message} (set in the --config file's {named} section, or by a flag)") from None

    def source_name(arch: str) -> str:
        return f"source_{arch}"

    configs: dict[str, Any] = {}
    for arch in dict.fromkeys([config.teacher_arch, config.student_arch]):  # once when they are the same
        # No targets here: the pipeline evaluates the model on them afterwards, so that the source model (and
        # everything made from it) is reused when targets are added or removed.
        source_config = resolve(source.SourceConfig, "source", [config.source], {
            "sources": config.sources, "targets": [], "arch": arch,
            "out": str(run / source_name(arch)),
        })
        if str(source_config.pretrained).lower() == "imagenet":  # a missing file: now, not after the first stage
            from kdreid.models.registry import get_spec
            from kdreid.models.weights import resolve_imagenet

            # The pipeline takes no weights file (its two source stages are two architectures).
            resolve_imagenet(get_spec(arch), otherwise="pass --pretrained none (both source stages then start "
                                                       "from random weights)")
        if source_config.train.select == "target-clusters":
            # It scores target images, which source training does not see: the source model keeps its last epoch.
            source_config.train.select = "last"
        configs[source_name(arch)] = source_config
    teacher_init = str(run / source_name(config.teacher_arch) / "model.pt")
    student_init = str(run / source_name(config.student_arch) / "model.pt")
    for target in config.targets:
        configs[f"teacher_{target}"] = resolve(adapt.AdaptConfig, "adapt", [config.adapt], {
            "sources": config.sources, "targets": [target], "blend": False, "arch": config.teacher_arch,
            "init": teacher_init, "out": str(run / f"teacher_{target}"),
        })
    if config.blend_baseline:
        configs["blend"] = resolve(adapt.AdaptConfig, "adapt", [config.adapt, config.blend], {
            "sources": config.sources, "targets": config.targets, "blend": True, "arch": config.student_arch,
            "init": student_init, "out": str(run / "blend"),
        }, sections=("adapt", "blend"))
    configs["distill"] = resolve(distill.DistillConfig, "distill", [config.distill], {
        "sources": config.sources, "targets": config.targets, "arch": config.student_arch,
        "teachers": [str(run / f"teacher_{t}" / "model.pt") for t in config.targets],
        "student_init": student_init, "out": str(run / "distill"),
    })
    return configs


class DatasetFingerprints:
    """Each dataset as the stages read it (root, reader options), and its `dataset_fingerprint`, computed once per
    pipeline call: listing and statting MSMT17's 126k files takes seconds, and seven stages ask."""

    def __init__(self):
        self._known: dict[tuple, str] = {}
        self._datasets: dict[tuple, Any] = {}

    def of(self, name: str, data) -> str:
        key = self._key(name, data)
        if key not in self._known:
            self._known[key] = dataset_fingerprint(self.dataset(name, data), data.root)
        return self._known[key]

    def dataset(self, name: str, data):
        """The dataset as the stages read it (DatasetError when missing or unreadable), parsed once."""
        key = self._key(name, data)
        if key not in self._datasets:
            self._datasets[key] = load_datasets([name], data.root, {name: data.reader_options(name)})[0]
        return self._datasets[key]

    @staticmethod
    def _key(name: str, data) -> tuple:
        return name, data.root, tuple(sorted(data.reader_options(name).items()))


def check_architectures(configs: Mapping[str, Any]) -> None:
    """Every stage's architecture built once, and fed one image of its input size, before the first stage trains:
    an unknown name or a size it cannot take is one line now, not after hours of the earlier stages."""
    from kdreid.models import build_model, check_input_size

    checked = set()
    for stage_config in configs.values():
        arch = getattr(stage_config, "arch", "") or ""
        size = (stage_config.train.height, stage_config.train.width)
        if not arch or (arch, size) in checked:
            continue
        checked.add((arch, size))
        check_input_size(build_model(arch, num_classes=0), *size)


def check_datasets(configs: Mapping[str, Any], targets: list[str], fingerprints: DatasetFingerprints) -> None:
    """Parse every source and target the stages read, with each stage's reader options, so that a missing or
    unreadable dataset stops the pipeline before hours of training rather than at the first stage that needs it.
    The source stages name no target, but the pipeline evaluates them on every target afterwards."""
    for stage_config in configs.values():
        for name in dict.fromkeys([*stage_config.sources, *stage_config.targets, *targets]):
            fingerprints.of(name, stage_config.data)
        # Tracklets across cameras stop the stage that groups its target batches by them: say so now.
        if isinstance(stage_config, distill.DistillConfig):
            fix = "distill samples its target batches by tracklet"
        elif getattr(stage_config, "grouping", "") == "tracklet":
            fix = "or set `adapt: {grouping: pseudo}` in the --config file"
        else:
            continue
        for name in stage_config.targets:
            refuse_tracklets_across_cameras(fingerprints.dataset(name, stage_config.data), fix)


def stage_inputs(stage_config) -> list[Path]:
    """The model files a stage starts from (its results are stale when one of them is newer)."""
    paths = [getattr(stage_config, "init", ""), getattr(stage_config, "student_init", "")]
    paths += list(getattr(stage_config, "teachers", []))
    return [Path(p) for p in paths if p]


def _describe(changes: Mapping[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key} {before} -> {now}" for key, (before, now) in changes.items())


def _read_saved_config(path: Path) -> Mapping | None:
    try:
        saved = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (yaml.YAMLError, UnicodeDecodeError):  # damaged: the stage trains again, as with any unreadable config
        return None
    return saved if isinstance(saved, Mapping) else None


def _newer_inputs(path: Path, inputs: list[Path]) -> list[Path]:
    mtime = path.stat().st_mtime_ns
    return [p for p in inputs if p.exists() and p.stat().st_mtime_ns > mtime]


def _changed_datasets(recorded_file: Path, stage_config, fingerprints: DatasetFingerprints) -> dict[str, str] | None:
    """{dataset: "train" or "evaluation"} of the datasets whose content differs from what the stage recorded when
    it ran (`fingerprint_change`; a stage from before the record existed is taken as it is); None when the record
    is damaged (what the stage trained on is unknown)."""
    recorded = read_datasets_record(recorded_file)
    if recorded is None:
        return None
    changes = {name: fingerprint_change(fingerprint, fingerprints.of(name, stage_config.data),
                                        trains_on_all(name, stage_config))
               for name, fingerprint in recorded.items()}
    return {name: change for name, change in changes.items() if change}


def _damaged_results(folder: Path) -> str | None:
    """What makes a finished stage's results unusable (a truncated copy, a disk error), or None: its metrics.json
    must hold a "final" table and its model.pt must load."""
    from kdreid.errors import KdreidError
    from kdreid.models.weights import read_file

    try:
        final = json.loads((folder / "metrics.json").read_bytes())["final"]
        if not isinstance(final, dict):
            raise TypeError("its final entry is not a table")
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{folder / 'metrics.json'} is damaged ({type(error).__name__})"
    try:
        read_file(folder / "model.pt")
    except KdreidError as error:
        return str(error)
    return None


# The picture data a stage writes after its results (adapt: D-MMD histograms; distill: student against teachers), by
# the file it writes before training: a stage stopped between its results and that file would otherwise be reused
# without it, and `kdreid report` would call the finished stage unfinished.
PICTURE_DATA = (adapt.PICTURE_DATA, distill.PICTURE_DATA)


def _missing_picture_data(folder: Path) -> Path | None:
    """The 'after' picture data a finished stage lacks although it wrote the 'before' one, or None."""
    for before, after in PICTURE_DATA:
        if (folder / before).is_file() and not (folder / after).is_file():
            return folder / after
    return None


@dataclass
class StageState:
    action: str  # "done" (reuse), "resume" (interrupted, same weight settings and inputs) or "fresh" (train anew)
    reason: str  # why, for the log line


def stage_state(stage_config, fingerprints: DatasetFingerprints | None = None) -> StageState:
    folder = Path(stage_config.out)
    model = folder / "model.pt"
    # finish_stage writes model.pt, then metrics.json: a stage is finished when both are there, and readable.
    finished = model.is_file() and (folder / "metrics.json").is_file()
    damaged = _damaged_results(folder) if finished else None
    if damaged:  # its training checkpoint, when it has one, writes them again (a resume with no epoch left)
        finished = False
    checkpoint = checkpoint_file(folder)
    if not finished and not checkpoint.is_file():
        return StageState("fresh", f"{damaged}, and it has no training checkpoint" if damaged
                          else "no finished model or training checkpoint")
    saved = _read_saved_config(folder / "config.yaml")
    if saved is None:
        return StageState("fresh", f"no readable {folder / 'config.yaml'}")
    changes = changed_settings(saved, stage_config)
    differing = {key: values for key, values in changes.items()
                 if changes_weights(key, stage_config, PIPELINE_WIRED_SETTINGS)}
    if differing:
        return StageState("fresh", f"settings that change its weights differ: {_describe(differing)}")
    newer = _newer_inputs(model if finished else checkpoint, stage_inputs(stage_config))
    if newer:
        return StageState("fresh", f"its input {newer[0]} was trained again after it")
    changed = _changed_datasets(folder / DATASETS_FILE, stage_config, fingerprints or DatasetFingerprints())
    if changed is None:
        return StageState("fresh", f"its {DATASETS_FILE} is damaged: the data it trained on are unknown")
    trained_on_other = [name for name, change in changed.items() if change == "train"]
    if trained_on_other:
        return StageState("fresh", f"dataset {trained_on_other[0]} under {stage_config.data.root} holds other "
                                   "files than it was trained on (regenerated or re-extracted)")
    evaluated_on_other = (f"the query/gallery of dataset {next(iter(changed))} under {stage_config.data.root} hold "
                          "other files than it was evaluated on") if changed else ""
    measured_otherwise = measurement_changes(saved, stage_config)
    if measured_otherwise:
        measured_otherwise = f"its numbers were measured otherwise ({measured_otherwise})"
    remeasure = "; ".join(filter(None, [evaluated_on_other, measured_otherwise]))
    if remeasure and finished and not checkpoint.is_file():  # only a new run measures its numbers again
        return StageState("fresh", f"{remeasure}, and it has no training checkpoint")
    if remeasure:  # the same training images: resumed, the run measures its numbers on the files, as told, now
        return StageState("resume", f"{remeasure}; same weights, evaluated again")
    missing = _missing_picture_data(folder) if finished else None
    if missing and checkpoint.is_file():  # stopped while it extracted them, after its results were written
        return StageState("resume", f"{missing} is missing (it was stopped after its results); its checkpoint "
                                    "writes it again, training nothing")
    if finished:
        # A reused model keeps the numbers it measured: evaluation settings changed since are named here.
        ignored = f"; ignoring {_describe(changes)}" if changes else ""
        return StageState("done", f"same weight settings, newer than its inputs{ignored}")
    return StageState("resume", f"{damaged}; its checkpoint writes them again" if damaged
                      else "interrupted, same weight settings and inputs")


RUNNERS: dict[type, Callable] = {
    source.SourceConfig: source.run, adapt.AdaptConfig: adapt.run, distill.DistillConfig: distill.run,
}


def run_stage(name: str, stage_config, log, fingerprints: DatasetFingerprints | None = None) -> tuple[dict, bool]:
    """Run one stage, or reuse it. -> (final metrics {dataset: {metric: percent}}, whether it trained)."""
    folder = Path(stage_config.out)
    # Under torchrun the main process decides for all: a process that looked at the folder after another had
    # begun writing to it would decide otherwise and wait in another collective (a deadlock).
    distributed.barrier()
    state, remove, finished = distributed.broadcast_object(
        (stage_state(stage_config, fingerprints), folder.exists(), (folder / "model.pt").is_file())
        if distributed.is_main() else None
    )
    if state.action == "done":
        log.info(f"stage {name}: reusing {folder / 'model.pt'} ({state.reason})")
        return json.loads((folder / "metrics.json").read_text())["final"], False
    if state.action == "fresh" and remove:
        # Only the pipeline writes here: other weight settings or a retrained input make the old run meaningless.
        if distributed.is_main():
            with exclusive(folder):  # not from under a `kdreid` command training there on its own
                log.info(f"stage {name}: removing {folder}{' and its finished model' if finished else ''} to train "
                         f"it again: {state.reason}")
                shutil.rmtree(folder)
    distributed.barrier()  # no process looks at the folder before the main one has removed it
    log.info(f"stage {name}: " + (f"resuming in {folder} ({state.reason})" if state.action == "resume"
                                   else f"training in {folder}"))
    result = RUNNERS[type(stage_config)](stage_config, resume=state.action == "resume")
    return result.final, True


def evaluate_on_targets(name: str, stage_config, targets: list[str], log, fingerprints: DatasetFingerprints) -> dict:
    """A stage's model on every target (source stages evaluate on their sources, teachers on their own target
    only), cached next to the model and recomputed when the model is newer, a target's files changed or the numbers
    are measured otherwise (distance, flip)."""
    folder = Path(stage_config.out)
    cache = folder / "all_targets.json"
    model_path = folder / "model.pt"
    data = stage_config.data
    contents = {t: fingerprints.of(t, data) for t in targets}
    measured = {"metric": stage_config.eval.metric, "flip": stage_config.eval.flip}  # what changes the numbers
    if cache.is_file() and not _newer_inputs(cache, [model_path]):
        try:
            cached = json.loads(cache.read_bytes())
        except ValueError:  # damaged: it is only a cache, computed again below
            cached = {}
        if isinstance(cached, dict) and cached.get("targets") == targets and cached.get("datasets") == contents \
                and cached.get("eval") == measured:
            return cached["metrics"]
    log.info(f"stage {name}: evaluating {model_path} on {', '.join(targets)}")
    datasets = load_datasets(targets, data.root, {t: data.reader_options(t) for t in targets})
    device = select_device(stage_config.train.device)
    model = load_checkpoint(model_path).to(device)
    metrics = evaluate_datasets(model, datasets, stage_config.train, device, stage_config.eval, data, log)
    if distributed.is_main():
        write_json(cache, {"targets": targets, "datasets": contents, "eval": measured, "metrics": metrics})
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


def remove_stale_copies(run_path: Path, current: Sequence[str], log) -> None:
    """The top-level teacher_*.pt / source_*.pt of stages this command no longer has (a target left out of -t,
    another --teacher-arch): an earlier command's copies, which would be deployed as this run's models. Each goes
    only while its stage folder still holds the same model (the same bytes: nothing is lost); otherwise it is
    named."""
    for path in sorted([*run_path.glob("teacher_*.pt"), *run_path.glob("source_*.pt")]):
        if path.stem in current or not path.is_file():
            continue
        original = run_path / "stages" / path.stem / "model.pt"
        if original.is_file() and filecmp.cmp(original, path, shallow=False):
            path.unlink()
            log.info(f"removed {path}: a copy of {original}, a stage this command does not have")
        else:
            log.warning(f"{path} is not a model of this command's stages (left by an earlier command); remove it "
                        "by hand if it is not needed")


ORACLE_MARK = "**oracle** (target labels)"
GROUPING_LEGEND = {
    "tracklet": "tracklet ids, one person in one camera, no cross-camera identity",
    "pseudo": "clusters of the target embeddings, no labels",
    "oracle": "the targets' identity labels, an ablation and not unsupervised adaptation",
}


@dataclass
class TableRow:
    label: str
    grouping: str  # the target grouping its training used: a GROUPING_LEGEND key, or "—" without target images
    select: str  # its checkpoint selection rule: a SELECTION_RULES key
    per_target: dict  # {target: {metric: percent}}


def target_grouping(stage_config) -> str | None:
    """How a stage grouped its target batches: None in source training (it sees no target image), the adapt
    stages' `grouping`, tracklets in distillation (its only use of groups is the student's own D-MMD)."""
    if isinstance(stage_config, source.SourceConfig):
        return None
    return stage_config.grouping if isinstance(stage_config, adapt.AdaptConfig) else "tracklet"


def stage_training(configs: Mapping[str, Any], targets: Sequence[str]) -> dict:
    """metrics.json's `training`: how each stage trained, as the table's grouping and selection columns say it: how
    it grouped its target batches and the rule that chose its checkpoint; for the student also its teachers'
    groupings (one per target), which it inherits (oracle teachers make an oracle student)."""
    training = {name: {"grouping": target_grouping(c), "select": c.train.select} for name, c in configs.items()}
    if "distill" in training:
        training["distill"]["teacher_groupings"] = [target_grouping(configs[f"teacher_{t}"]) for t in targets]
    return training


def _grouping_cell(stage_config) -> str:
    grouping = target_grouping(stage_config)
    return "—" if grouping is None else ORACLE_MARK if grouping == "oracle" else grouping


def results_markdown(config: PipelineConfig, rows: list[TableRow], info: dict,
                     configs: Mapping[str, Any] | None = None) -> str:
    """The pipeline's table; with the stages' `configs`, how its numbers were measured (distance, protocol, CUHK03
    boxes and split), as each stage's own results.md says it: re-ID numbers mean little without."""
    targets = config.targets
    header = "| model | grouping | selection | " + " | ".join(f"{t} mAP | {t} R1" for t in targets) + " | mean mAP |"
    lines = [
        f"# {'+'.join(config.sources)} -> {', '.join(targets)}",
        "",
        header,
        "|---|---|---|" + "---|---|" * len(targets) + "---|",
    ]
    for row in rows:
        cells, maps = [], []
        for t in targets:
            m = row.per_target.get(t)
            if m is None:
                cells += ["—", "—"]
            else:
                cells += [percent_cell(m["mAP"]), percent_cell(m["rank1"])]
                maps.append(m["mAP"])
        mean = percent_cell(sum(maps) / len(maps)) if len(maps) == len(targets) and None not in maps else "—"
        lines.append(f"| {row.label} | {row.grouping} | {row.select} | " + " | ".join(cells) + f" | {mean} |")
    groupings = [g for g in GROUPING_LEGEND if any(g in row.grouping for row in rows)]
    rules = [r for r in SELECTION_RULES if any(row.select == r for row in rows)]
    lines += [
        "",
        f"Student {info['arch']}: {info['parameters'] / 1e6:.3f} M parameters (without classifier), "
        f"{info['macs'] / 1e6:.1f} M MACs per {info['height']}x{info['width']} image, "
        f"{info['images_per_second']:.0f} images/s (eval forward, batch {info['batch_size']}, {info['device']}).",
        "",
        "Teachers' rows: each teacher on every target; its own target is what the `teachers` entry of "
        "metrics.json holds. Grouping, the target groups a row's D-MMD trained on: "
        + "; ".join(f"{g}: {GROUPING_LEGEND[g]}" for g in groupings)
        + ". The student draws its target batches by tracklet and learns from teachers of the grouping it names. "
        "Selection: " + "; ".join(f"{r}: {SELECTION_RULES[r]}" for r in rules)
        + ". No number here comes from a checkpoint chosen on target test labels.",
    ]
    if configs:
        measured = {name: how_measured(targets, c.eval, c.data) for name, c in configs.items()}
        if len(set(measured.values())) == 1:
            lines += ["", f"Measured with {next(iter(measured.values()))}."]
        else:
            lines += ["", "Measured with, per stage: " + "; ".join(f"{name}: {how}" for name, how in measured.items())
                      + "."]
    return "\n".join(lines) + "\n"


def table_rows(config: PipelineConfig, configs: Mapping[str, Any], finals: Mapping[str, dict],
               teacher_all: Mapping[str, dict]) -> list[TableRow]:
    """The results table's rows, each with the grouping and selection of the stage that trained it."""
    def row(label: str, name: str, per_target: dict, grouping: str = "") -> TableRow:
        return TableRow(label, grouping or _grouping_cell(configs[name]), configs[name].train.select, per_target)

    rows = [row(f"source only ({arch})", f"source_{arch}", finals[f"source_{arch}"])
            for arch in dict.fromkeys([config.teacher_arch, config.student_arch])]
    rows += [row(f"teacher {t} (D-MMD, {config.teacher_arch})", f"teacher_{t}", teacher_all[t]) for t in config.targets]
    if "blend" in configs:
        rows.append(row(f"blend (D-MMD on all targets, {config.student_arch})", "blend", finals["blend"]))
    rows.append(row(f"KD-ReID student ({config.student_arch})", "distill", finals["distill"],
                    grouping=distill.student_grouping(_grouping_cell(configs[f"teacher_{t}"]) for t in config.targets)))
    return rows


def run(config: PipelineConfig) -> PipelineResult:
    """Run (or continue) the whole pipeline; see the module docstring for the folders and files."""
    config.validate()
    held = [name for name in ("model.pt", "checkpoints") if (Path(config.out) / name).exists()]
    if held:  # a stage's run folder: the pipeline's files would overwrite its config.yaml and metrics.json
        raise ConfigError(f"{config.out} is a training run's folder (it holds {held[0]}), not a pipeline's; choose "
                          "another --out")
    config.root = absolute_path(config.root)  # as the stages save theirs: `kdreid report` works from anywhere
    configs = stage_configs(config)  # every config error surfaces before any training
    check_architectures(configs)  # and every architecture that cannot be built or take its images
    fingerprints = DatasetFingerprints()
    check_datasets(configs, config.targets, fingerprints)  # and every missing dataset
    # The folder, or its topmost parent, that this call makes: looked at before joining the other processes, which
    # make it (RunDir below) only once every process has joined.
    created = first_missing(config.out)
    # Under torchrun every process runs this function; the first stage's device decides the backend, and only
    # the main process writes the pipeline's own files.
    distributed.init(next(iter(configs.values())).train.device)
    # The main process holds the pipeline's folder: a second pipeline there would train, or remove, the stage
    # folders this one trains in.
    # A refusal to take the folder (another pipeline holds it) is not caught below: the folder is that one's, even
    # when it did not exist yet as this call looked (two pipelines started together).
    with exclusive(config.out) if distributed.is_main() else contextlib.nullcontext(), sigterm_interrupts():
        try:
            return _run_stages(config, configs, fingerprints)
        except (KdreidError, KeyboardInterrupt):
            # A folder this call made, where no stage kept a model or a checkpoint (each removes its own after an
            # early failure): the pipeline's config.yaml and log alone are not a run to continue. Removed while
            # still held, before another process can take it.
            stages = Path(config.out) / "stages"
            kept = stages.is_dir() and any(stages.rglob("*.pt"))  # a stage's model.pt or checkpoints
            if created is not None and distributed.is_main() and not kept:
                RunDir(config.out).close_logger()  # a later run there (in this process) logs to a new log.txt
                remove_made_folder(config.out, created)
            raise
        finally:
            if distributed.is_main():  # its log.txt closed however it ends (see stage_runner)
                RunDir(config.out, create=False).close_logger()


def _run_stages(config: PipelineConfig, configs: dict, fingerprints: DatasetFingerprints) -> PipelineResult:
    main = distributed.is_main()
    out = RunDir(config.out)
    log = out.logger() if main else distributed.worker_logger()
    if main:
        # What a pipeline killed while it copied the final models left (as large as those models): this process
        # holds the folder, so none is another writer's.
        remove_stale_temporaries(out.path)
        out.save_config(config)
    log.info(f"pipeline {'+'.join(config.sources)} -> {', '.join(config.targets)}: teachers "
             f"{config.teacher_arch}, student {config.student_arch}, preset {config.preset or 'none'}; "
             f"{len(configs)} stages in {Path(config.out) / 'stages'}")
    if not config.blend_baseline:
        unused = "; the `blend` section of its settings is unused" if config.blend else ""
        log.info(f"no blend baseline (blend_baseline: false): its stage and its row are left out{unused}")
    sources_keep_last = all(c.train.select == "last" for c in configs.values() if isinstance(c, source.SourceConfig))
    if sources_keep_last and any(c.train.select == "target-clusters" for c in configs.values()):
        log.info("source stages: checkpoint selection last (target-clusters scores target images, which source "
                 "training does not see)")

    finals: dict[str, dict] = {}
    ran, reused = [], []
    for name, stage_config in configs.items():
        finals[name], trained = run_stage(name, stage_config, log, fingerprints)
        (ran if trained else reused).append(name)

    targets = config.targets
    teacher_all = {
        t: evaluate_on_targets(f"teacher_{t}", configs[f"teacher_{t}"], targets, log, fingerprints) for t in targets
    }
    for arch in dict.fromkeys([config.teacher_arch, config.student_arch]):
        name = f"source_{arch}"
        finals[name] = {**finals[name], **evaluate_on_targets(name, configs[name], targets, log, fingerprints)}

    def on_targets(final: dict) -> dict:
        return {t: final[t] for t in targets if t in final}

    source_teacher = finals[f"source_{config.teacher_arch}"]
    source_student = finals[f"source_{config.student_arch}"]
    metrics = {
        "source_only": on_targets(source_teacher),
        "source_only_student": on_targets(source_student),
        "teachers": {t: teacher_all[t][t] for t in targets if t in teacher_all[t]},
        **({"blend": on_targets(finals["blend"])} if "blend" in finals else {}),
        "student": on_targets(finals["distill"]),
        "teachers_on_all_targets": teacher_all,
        "training": stage_training(configs, targets),
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
    remove_stale_copies(run_path, [f"teacher_{t}" for t in targets] +
                        [f"source_{arch}" for arch in (config.teacher_arch, config.student_arch)], log)

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

    table = results_markdown(config, table_rows(config, configs, finals, teacher_all), info, configs)
    atomic_write_text(run_path / "results.md", table)
    log.info(f"wrote {run_path / 'metrics.json'}, {run_path / 'results.md'} and the final models in {run_path}")
    return PipelineResult(str(run_path), metrics, ran, reused)
