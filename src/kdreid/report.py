"""`kdreid report RUN`: one static page, RUN/report.html, with the tables and pictures of a run.

The pictures are written beside the page in RUN/report/ and referenced by relative paths, so the folder can be
copied or zipped and opened in any browser without a server. What the page holds depends on the run:

- a pipeline run (RUN/stages/ and a metrics.json with the final rows): the results table and its bar chart per
  target, ranked results of the student on each target, where each target's teacher and the student look
  (activation maps on the same images), then one section per stage (its table, training
  curves, and for the D-MMD stages the distance histograms before and after adaptation);
- a single-stage run (train-source, adapt, distill): its table, curves, histograms when it has them, ranked
  results and activation maps of its model.pt on its targets (a distillation's under its teachers');
- an evaluation folder (`kdreid evaluate --out`): its metrics and the `--visrank`, `--visactmap` and
  `--verification` pictures it holds.

Ranked results and activation maps need the datasets: they are read from the data root recorded in the run's
config (or --root); when a dataset cannot be read the page says so and the rest of the report is still written.
So with a damaged file of the run (not text, not JSON or YAML, a value of another type than kdreid writes): the
part of the page that reads it becomes a note naming the file and the fix (a damaged config.yaml: no ranked
results or activation maps, as the settings they need are unknown), and the rest of the page is written.

    path = build_report("runs/all")                  # -> runs/all/report.html
"""

from __future__ import annotations

import html
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import yaml

import kdreid
from kdreid.errors import KdreidError
from kdreid.evaluation.ranking import METRIC_COLUMNS
from kdreid.rundir import REPORT_LOCK_FILE, atomic_write_text, exclusive, held_by, make_folder

REPORT_PAGE = "report.html"
PICTURES = "report"  # RUN/report/: the pictures the page shows
_BUILDING = f".{PICTURES}.new"  # RUN/.report.new/: the pictures of the page being built
_REPLACED = f".{PICTURES}.old"  # the pictures of the page it replaces, for the moment of the swap
# Stage folders of a pipeline run in the order they ran (kdreid.stages.pipeline); others follow by name.
STAGE_ORDER = ("source_", "teacher_", "blend", "distill")
# How to repair each damaged file the page reads, for its note.
CONFIG_FIX = "restore the config.yaml the run wrote"
STAGE_FIX = "run that stage again"
PIPELINE_FIX = "run the pipeline's command again (it reuses the finished stages)"
EVALUATE_FIX = "run kdreid evaluate again"
NUMBER = (int, float)
OPTIONAL_NUMBER = (int, float, type(None))  # metrics.json writes null for a value it could not measure (NaN)
_KIND_NAMES = {dict: "a mapping", list: "a list", str: "a string", bool: "true or false", int: "a whole number",
               NUMBER: "a number", OPTIONAL_NUMBER: "a number or null"}


@dataclass
class Section:
    title: str
    blocks: list[str] = field(default_factory=list)  # HTML fragments, in order


# ------------------------------------------------------------------------------------------------ reading
def read_run_json(path: Path) -> dict | None:
    """A run's JSON file (metrics.json) as a dict, None when it is absent; one line when it is damaged."""
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise KdreidError(f"{path} is not valid JSON; the run that wrote it was interrupted or the file was "
                          "edited: run that stage again") from None
    if not isinstance(content, dict):
        raise KdreidError(f"{path} holds {type(content).__name__}, not the object a kdreid run writes")
    return content


def read_run_yaml(path: Path) -> dict:
    """A run's config.yaml as a dict, {} when it is absent or unreadable (what it adds to a page is optional)."""
    return RunConfig.read(path).values


def _expect(value, kind: type | tuple[type, ...], what: str, path: Path, fix: str, *, items: type | None = None):
    """`value` when it is of `kind` (a list or mapping: with every item, or value, of `items`), else one line naming
    `what` in `path` and the `fix`. A kdreid run writes these types; another one is damage (an edit, a bad copy),
    which must cost the part of the page that reads it, not the page."""
    if not isinstance(value, kind):
        found = type(value).__name__
    elif items is not None and not all(isinstance(item, items) for item in
                                       (value.values() if isinstance(value, dict) else value)):
        found = f"{_KIND_NAMES[kind]} holding " + ", ".join(sorted({type(item).__name__ for item in (
            value.values() if isinstance(value, dict) else value) if not isinstance(item, items)}))
    else:
        return value
    wanted = _KIND_NAMES[kind] + (f" of {_KIND_NAMES[items].removeprefix('a ')}s" if items is not None else "")
    raise KdreidError(f"{path} is damaged: {what} is {found}, not {wanted}; {fix}")


@dataclass
class RunConfig:
    """A run's config.yaml, read once: its settings of the types the run wrote, or the one line that says why they
    are unknown. A damaged file (not YAML text, not a mapping, a value of another type) costs the parts of the page
    that need its settings (a note each: ranked results, activation maps), not the page."""
    path: Path
    values: dict = field(default_factory=dict)  # {} when the file is absent or damaged
    damage: str = ""  # why the file cannot be read; "" when it was read or is absent

    @classmethod
    def read(cls, path: Path) -> RunConfig:
        if not path.is_file():
            return cls(path)
        try:
            content = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError):
            return cls(path, damage=f"{path} is damaged: it is not YAML text; {CONFIG_FIX}")
        if content is not None and not isinstance(content, dict):
            return cls(path, damage=f"{path} is damaged: it holds {type(content).__name__}, not the mapping a kdreid "
                                    f"run writes; {CONFIG_FIX}")
        return cls(path, content or {})

    def setting(self, key: str, kind: type | tuple[type, ...], default=None, *, items: type | None = None):
        """config[key] ("data.root": `root` of the `data` section) when it is of `kind` (see `_expect`), `default`
        when it is absent or null; KdreidError (one line naming the file) when the file or the value is damaged."""
        if self.damage:
            raise KdreidError(self.damage)
        *sections, name = key.split(".")
        values = self.values
        for depth in range(len(sections)):
            values = _expect(values.get(sections[depth]) or {}, dict, ".".join(sections[:depth + 1]), self.path,
                             CONFIG_FIX)
        value = values.get(name)
        return default if value is None else _expect(value, kind, key, self.path, CONFIG_FIX, items=items)


def _read_text(path: Path, fix: str) -> str:
    """A text file of a run (results.md); one line naming it when it is not UTF-8 text (damaged)."""
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise KdreidError(f"{path} is damaged: it is not UTF-8 text; {fix}") from None


def run_kind(run: Path, then: str = "report it") -> str:
    """"pipeline", "stage" or "evaluation"; KdreidError (one line) when `run` is not a kdreid run folder. `then`:
    what the command that asks does with a finished run (said after the fix of an unfinished one)."""
    if not run.exists():
        raise KdreidError(f"run folder {run} does not exist; pass the --out folder of a kdreid command")
    if not run.is_dir():
        raise KdreidError(f"{run} is a file, not a run folder; pass the --out folder of a kdreid command")
    metrics = read_run_json(run / "metrics.json")
    if (run / "stages").is_dir() and (metrics is None or "student" in metrics or "source_only" in metrics):
        return "pipeline"
    if metrics is not None and "epochs" in metrics:  # an `epochs` of another type is damage, noted on a stage's page
        return "stage"
    if metrics is not None and isinstance(metrics.get("final"), dict):
        return "evaluation"
    if metrics is None and (run / "config.yaml").is_file():  # a stage that has not finished (or was stopped)
        if (holder := held_by(run)) is not None:  # still training: a --resume now would be refused
            raise KdreidError(f"{run} holds a run that has not finished (no metrics.json yet): another kdreid process "
                              f"is training it ({holder}); wait for it to end, then {then}")
        raise KdreidError(f"{run} holds a run that has not finished (no metrics.json yet); continue it with the same "
                          f"command and --resume, then {then}")
    raise KdreidError(f"{run} is not a kdreid run folder (no metrics.json of a stage, a pipeline or `kdreid "
                      "evaluate --out`); pass the --out folder of a finished run")


# ------------------------------------------------------------------------------------------------ HTML pieces
def markdown_to_html(text: str) -> str:
    """The small Markdown subset results.md uses: '#' headings, '|' tables (first row the header, the '---'
    row skipped), paragraphs, and `code` spans."""
    out: list[str] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index].strip()
        if not line:
            index += 1
        elif line.startswith("#"):
            level = min(6, len(line) - len(line.lstrip("#")) + 2)  # the page's own h1/h2 come first
            out.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
            index += 1
        elif line.startswith("|"):
            rows = []
            while index < len(lines) and lines[index].strip().startswith("|"):
                cells = [c.strip() for c in lines[index].strip().strip("|").split("|")]
                if not all(re.fullmatch(r":?-{3,}:?", c) for c in cells):
                    rows.append(cells)
                index += 1
            out.append(_table(rows[0], rows[1:]) if rows else "")
        else:
            paragraph = []
            while index < len(lines) and lines[index].strip() and not lines[index].strip().startswith(("#", "|")):
                paragraph.append(lines[index].strip())
                index += 1
            out.append(f"<p>{_inline(' '.join(paragraph))}</p>")
    return "\n".join(out)


def _inline(text: str) -> str:
    escaped = html.escape(text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_inline(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def metrics_table(final, path: Path, fix: str) -> str:
    """{dataset: {mAP, rank1, ...}} in percent (the `final` of `path`, a metrics.json) -> an HTML table; one line
    naming the file and the `fix` when it is damaged."""
    check = partial(_expect, path=path, fix=fix)
    rows = []
    for dataset, values in check(final, dict, "final", items=dict).items():
        numbers = [check(values.get(key), OPTIONAL_NUMBER, f"final.{dataset}.{key}") for _, key in METRIC_COLUMNS]
        rows.append([dataset, *("n/a" if number is None else f"{number:.1f}" for number in numbers)])
    return _table(["dataset", *(title for title, _ in METRIC_COLUMNS)], rows)


def verification_table(verification, path: Path, fix: str) -> str:
    """{dataset: VerificationResult.summary()} (the `verification` of `path`, a metrics.json) -> an HTML table: TPR
    at each FPR with its threshold, and the AUC; one line naming the file and the `fix` when it is damaged."""
    from kdreid.evaluation.verification import threshold_text

    check = partial(_expect, path=path, fix=fix)
    levels = {dataset: check(summary.get("at_fpr") or [], list, f"verification.{dataset}.at_fpr", items=dict)
              for dataset, summary in check(verification, dict, "verification", items=dict).items()}
    levels = {dataset: at_fpr for dataset, at_fpr in levels.items() if at_fpr}
    if not levels:
        return ""

    def cell(where: str, level: dict) -> str:
        tpr = check(level.get("tpr"), OPTIONAL_NUMBER, f"{where}.tpr")
        threshold = check(level.get("threshold"), OPTIONAL_NUMBER, f"{where}.threshold")
        if tpr is None:
            return "n/a"
        return f"{tpr:.1f}" + ("" if threshold is None else f" (d < {threshold_text(threshold)})")

    first = next(iter(levels))
    fprs = [check(level.get("fpr"), NUMBER, f"verification.{first}.at_fpr[{index}].fpr")
            for index, level in enumerate(levels[first])]
    rows = []
    for dataset, at_fpr in levels.items():
        auc = check(verification[dataset].get("auc"), OPTIONAL_NUMBER, f"verification.{dataset}.auc")
        rows.append([dataset, *(cell(f"verification.{dataset}.at_fpr[{index}]", level)
                                for index, level in enumerate(at_fpr)), "n/a" if auc is None else f"{auc:.4f}"])
    return _table(["dataset", *(f"TPR % at FPR {fpr:g}" for fpr in fprs), "ROC AUC"], rows)


def evaluated_with_notes(recorded, path: Path, fix: str) -> list[str]:
    """A note per target of the `evaluated_with` of `path` (an evaluation's metrics.json): the model and settings it
    was evaluated with; one line naming the file and the `fix` when it is damaged."""
    if recorded is None:
        return []
    if isinstance(recorded, dict) and "model" in recorded:  # a file from before: one set for every target
        recorded = {"every target": recorded}
    notes = []
    for target, settings in _expect(recorded, dict, "evaluated_with", path, fix, items=dict).items():
        described = ", ".join(f"{key} {_setting(value)}" for key, value in settings.items())
        notes.append(_note(f"{target} evaluated with {described}"))
    return notes


def _figure(run: Path, picture: Path, caption: str) -> str:
    relative = picture.relative_to(run)
    if relative.parts[0] == _BUILDING:  # drawn there; shown from RUN/report/ once the whole page is built
        relative = Path(PICTURES, *relative.parts[1:])
    relative = relative.as_posix()
    return (f'<figure><a href="{html.escape(relative)}"><img src="{html.escape(relative)}" '
            f'alt="{html.escape(caption)}"></a><figcaption>{html.escape(caption)}</figcaption></figure>')


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _config_block(path: Path) -> str:
    if not path.is_file():
        return ""
    text = path.read_text(errors="replace")  # shown as it is, damaged or not: its bytes that are not text as �
    return f"<details><summary>{html.escape(path.name)}</summary><pre>{html.escape(text)}</pre></details>"


# ------------------------------------------------------------------------------------------------ pictures
def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def stage_section(run: Path, folder: Path, pictures: Path, title: str) -> Section:
    """A stage's table, training curves, (adapt stages) D-MMD histograms and (distill) teacher-vs-student
    distances."""
    from kdreid.viz import (dmmd_histograms, kd_distance_picture, load_distances, load_kd_distances,
                            training_curves)
    from kdreid.viz.common import count_non_finite
    from kdreid.viz.curves import curve_series

    section = Section(title)
    name = _safe_name(folder.relative_to(run).as_posix() if folder != run else "run")
    source, results = folder / "metrics.json", folder / "results.md"
    try:
        metrics = read_run_json(source)
    except KdreidError as error:  # a damaged file costs the curves (and the table, without results.md), not the page
        lost = "training curves" if results.is_file() else "results table or training curves"
        section.blocks.append(_note(f"{title}: no {lost} ({error})"))
        metrics = {}
    try:
        if results.is_file():
            section.blocks.append(markdown_to_html(_read_text(results, STAGE_FIX)))
        elif metrics and "final" in metrics:
            section.blocks.append(metrics_table(metrics["final"], source, STAGE_FIX))
    except KdreidError as error:  # a damaged file costs the table, not the page
        section.blocks.append(_note(f"{title}: no results table ({error})"))
    if metrics is None:
        section.blocks.append(_note(f"{folder.name}: no metrics.json (the stage has not finished)"))
    elif "epochs" in metrics and (not isinstance(metrics["epochs"], list) or metrics["epochs"]):
        # Read before drawing: a damaged file costs the curves (an `epochs` that is not a list too, said in a note,
        # not a section silently without its curves); a failure to write the picture is the page's.
        try:
            curve_series(metrics)
        except KdreidError as error:
            section.blocks.append(_note(f"{title}: no training curves ({source} is damaged: {error}; {STAGE_FIX})"))
        else:
            picture = training_curves(metrics, pictures / f"curves_{name}.png", title=f"{title}: training")
            section.blocks.append(_figure(run, picture, f"{title}: losses and mAP per dataset over epochs"))
    # The distance pictures a stage saved the data of (adapt: D-MMD histograms; distill: student against teachers):
    # (file prefix, its reader, picture, its name, its title, what it shows, the moment after).
    for prefix, load, draw, kind, heading, shows, moment in (
            ("distances", load_distances, dmmd_histograms, "dmmd", "within- and between-identity distances",
             "D-MMD distance histograms, source and target", "adaptation"),
            ("kd_distances", load_kd_distances, kd_distance_picture, "kd",
             "the student's distances against its teachers'",
             "pairwise distances of each target's teacher and the student", "distillation")):
        before, after = folder / f"{prefix}_before.npz", folder / f"{prefix}_after.npz"
        if not before.is_file():
            continue
        try:
            distances = {path: load(path) for path in (before, after) if path.is_file()}
            picture = draw(distances[before], distances.get(after), pictures / f"{kind}_{name}.png",
                           title=f"{title}: {heading}")
        except KdreidError as error:  # a damaged file costs its picture, not the page
            section.blocks.append(_note(f"{title}: no {kind} picture ({error})"))
            continue
        caption = (f"{title}: {shows}, before"
                   + (f" and after {moment}" if after.is_file() else f" {moment} (no 'after' file: unfinished)"))
        section.blocks.append(_figure(run, picture, caption))
        for path, loaded in distances.items():  # a diverged model's distances are NaN: the picture leaves them out
            non_finite, total = count_non_finite(loaded)
            if non_finite:
                section.blocks.append(_note(f"{title}: {non_finite} of the {total} distances in {path.name} are not "
                                            "finite (NaN or infinite: the model had diverged); the picture leaves "
                                            "them out"))
    section.blocks.append(_config_block(folder / "config.yaml"))
    return section


def ranked_results_section(run: Path, model_path: Path, targets: list[str], root: str | None, pictures: Path,
                           *, num_queries: int, topk: int, data_options: dict | None = None,
                           device: str | None = None, eval_options: dict | None = None) -> Section:
    """Ranked results of `model_path` on each target's query/gallery (features extracted here), with the
    distance and flip-averaging the run evaluated with (`eval_options`, its config's `eval` section), so that the
    pictures rank as the numbers beside them were measured."""
    from kdreid.data.datasets.base import build_dataset
    from kdreid.evaluation.features import extract_features, load_model
    from kdreid.viz import visualize_ranked_results

    section = Section(f"Ranked results: {model_path.name}")
    if not model_path.is_file():
        section.blocks.append(_note(f"no ranked results: {model_path} does not exist"))
        return section
    if not root:
        section.blocks.append(_note("no ranked results: the run records no data root; pass --root DATA"))
        return section
    metric = (eval_options or {}).get("metric", "euclidean")
    flip = bool((eval_options or {}).get("flip", False))
    model = None
    for target in targets:
        try:
            options = (data_options or {}).get(target, {})
            dataset = build_dataset(target, root, **options)
            model = model or load_model(model_path)
            features = {split: extract_features(model, getattr(dataset, split), device=device, batch_size=64,
                                                flip=flip)
                        for split in ("query", "gallery")}
            pages = visualize_ranked_results(
                features["query"], features["gallery"], pictures / "visrank", prefix=_safe_name(target),
                num_queries=num_queries, topk=topk, metric=metric,
                title=f"{target}: {model_path.name}, {metric}{', flip-averaged' if flip else ''}")
        except KdreidError as error:
            section.blocks.append(_note(f"{target}: no ranked results ({error})"))
            continue
        for page in pages:
            section.blocks.append(_figure(
                run, page, f"{target}: query (grey frame) and its top-{topk} gallery images, nearest first; "
                "green = same identity, red = another; distance under each (same-camera matches of the "
                "query's identity are left out, as the market protocol scores)"))
    return section


def activation_section(run: Path, models: dict[str, list[tuple[str, Path, str | None]]], root: str | None,
                       pictures: Path, *, num_images: int, data_options: dict | None = None,
                       device: str | None = None) -> Section:
    """Where the models look: per target, the activation maps of its (label, model file, architecture of a plain
    state dict or None) on the same query images, a row per model (a pipeline's: the target's teacher above the
    student, with the correlation of the two maps)."""
    from kdreid.data.datasets.base import build_dataset
    from kdreid.evaluation.features import load_model
    from kdreid.viz.actmap import visualize_activation_maps

    section = Section("Where the models look: activation maps")
    if not root:
        section.blocks.append(_note("no activation maps: the run records no data root; pass --root DATA"))
        return section
    loaded: dict[Path, object] = {}  # a model drawn for several targets is read once
    for target, rows in models.items():
        try:
            chosen = []
            for label, path, arch in rows:
                if path not in loaded:
                    loaded[path] = load_model(path, arch)
                chosen.append((label, loaded[path]))
            dataset = build_dataset(target, root, **(data_options or {}).get(target, {}))
            pages = visualize_activation_maps(chosen, dataset.query, pictures / "actmap", prefix=_safe_name(target),
                                              num_images=num_images, device=device, title=f"{target}: where the "
                                              f"models look")
        except KdreidError as error:
            section.blocks.append(_note(f"{target}: no activation maps ({error})"))
            continue
        compared = f"; r: the correlation of each map with the {rows[0][0]}'s" if len(rows) > 1 else ""
        for page in pages:
            section.blocks.append(_figure(
                run, page, f"{target}: query images and, below, the attention of each model's final feature map "
                f"(sum of squared activations; red = most, blue = least){compared}"))
    return section


# The pictures `kdreid evaluate --out RUN` draws into folders of RUN: (folder, section title).
EVALUATION_PICTURES = (("visrank", "Ranked results (kdreid evaluate --visrank)"),
                       ("actmap", "Activation maps (kdreid evaluate --visactmap)"),
                       ("verification", "Same person or not: distance histograms and ROC (kdreid evaluate "
                                        "--verification)"))


def existing_evaluation_sections(run: Path) -> list[Section]:
    """A section per kind of picture `kdreid evaluate --out RUN` left in RUN (its --visrank pages, its
    --verification pictures)."""
    sections = []
    for folder, title in EVALUATION_PICTURES:
        pictures = sorted((run / folder).glob("*.png"))
        if pictures:
            sections.append(Section(title, blocks=[_figure(run, picture, picture.stem) for picture in pictures]))
    return sections


def _stage_folders(run: Path) -> list[Path]:
    """The stage folders in the order the pipeline ran them: the teachers' source model before the student's,
    the teachers in target order (from the run's config.yaml), then by name."""
    folders = [p for p in (run / "stages").iterdir() if p.is_dir()]
    config = RunConfig.read(run / "config.yaml")
    try:
        targets = _stage_targets(config)
    except KdreidError:  # only the order of the teachers: the page notes the damage where the settings are needed
        targets = []
    ran = [f"source_{config.values.get('teacher_arch')}", f"source_{config.values.get('student_arch')}",
           *(f"teacher_{target}" for target in targets)]

    def order(folder: Path) -> tuple[int, int, str]:
        rank = next((i for i, prefix in enumerate(STAGE_ORDER) if folder.name.startswith(prefix)), len(STAGE_ORDER))
        return rank, ran.index(folder.name) if folder.name in ran else len(ran), folder.name

    return sorted(folders, key=order)


def _current_stages(config: RunConfig) -> set[str] | None:
    """The stage folders a pipeline's last command ran (kdreid.stages.pipeline), from its config.yaml; None when the
    file does not say (damaged, or from before these settings): then every folder is shown."""
    try:
        targets = _stage_targets(config)
        teacher, student = config.setting("teacher_arch", str), config.setting("student_arch", str)
        blend = config.setting("blend_baseline", bool, True)
    except KdreidError:
        return None
    if not (targets and teacher and student):
        return None
    return {f"source_{teacher}", f"source_{student}", *(f"teacher_{t}" for t in targets), "distill",
            *(["blend"] if blend else [])}


def _stage_targets(config: RunConfig) -> list[str]:
    """The datasets a run's models are shown on: its targets, or (a source model) its sources. A single name where
    a list belongs is damage like any other value of the wrong type: kdreid writes a list."""
    return config.setting("targets", list, items=str) or config.setting("sources", list, [], items=str)


def _data_options(config: RunConfig) -> dict:
    """The dataset options of the run's config.yaml ({dataset: build_dataset keyword arguments})."""
    return {"cuhk03": {"labeled": config.setting("data.cuhk03_labeled", bool, False),
                       "classic_split": config.setting("data.cuhk03_classic_split", bool, False),
                       "split_id": config.setting("data.cuhk03_split_id", int, 0)}}


def _eval_options(config: RunConfig) -> dict:
    """The distance and flip-averaging the run's config.yaml evaluated with."""
    return {"metric": config.setting("eval.metric", str, "euclidean"),
            "flip": config.setting("eval.flip", bool, False)}


def _unknown_settings(error: KdreidError, visrank: int, actmap: int) -> Section:
    """What the page shows instead of the ranked results and activation maps when a damaged config file makes the
    settings they need (targets, data root, dataset and evaluation options) unknown."""
    wanted = " or ".join(what for count, what in ((visrank, "ranked results"), (actmap, "activation maps")) if count)
    return Section("Ranked results and activation maps", [_note(f"no {wanted}: {error}")])


# ------------------------------------------------------------------------------------------------ the page
DEFAULT_VISRANK, DEFAULT_TOPK, DEFAULT_ACTMAP = 4, 8, 8  # `kdreid report`'s --visrank, --visrank-topk, --actmap


def build_report(run: str | Path, *, visrank: int = DEFAULT_VISRANK, topk: int = DEFAULT_TOPK,
                 actmap: int = DEFAULT_ACTMAP, root: str | None = None,
                 device: str | None = None) -> Path:
    """Write RUN/report.html and its pictures in RUN/report/; -> the page's path. `visrank` queries per target
    in the ranked results, `actmap` query images per target in the activation maps (0: none), `root` overrides
    the data root the run recorded.

    A report is rebuilt whole (no picture of an older one lingers), but the older one stays until the new one is
    complete: the new pictures are drawn in RUN/.report.new/ and swapped in with the page at the end, so a build
    that fails, or is killed, leaves the page on disk with all its pictures. The page is built under the run's report
    lock (`rundir.exclusive`, REPORT_LOCK_FILE): a second report of the run at the same time is refused in one line
    naming the first, rather than both building in RUN/.report.new/ and swapping each other's pictures out from under
    the page. A command training there (a pipeline between stages) does not hold that lock: its run can be
    reported meanwhile."""
    run = Path(run)
    kind = run_kind(run)
    with exclusive(run, fix="wait for it to end, then report the run again", lock=REPORT_LOCK_FILE):
        return _build_report(run, kind, visrank=visrank, topk=topk, actmap=actmap, root=root, device=device)


def _build_report(run: Path, kind: str, *, visrank: int, topk: int, actmap: int, root: str | None,
                  device: str | None) -> Path:
    page, pictures, building, replaced = run / REPORT_PAGE, run / PICTURES, run / _BUILDING, run / _REPLACED
    # Said before any picture is drawn: where the report writes, something else stands. These paths are the
    # report's own (the user chose none of them), so the fix is to move that thing, not to choose another path.
    if page.is_dir():
        raise KdreidError(f"cannot write {page}: a folder stands where the report's page goes; move or remove it")
    for folder in (pictures, building, replaced):
        if (folder.exists() or folder.is_symlink()) and not folder.is_dir():
            raise KdreidError(f"cannot write {folder}: a file stands where the report's pictures go; move or remove "
                              "it")
    # A build killed in the swap left the page's pictures in `replaced`; one killed before it, a partial `building`.
    if replaced.is_dir() and not pictures.is_dir():
        replaced.rename(pictures)
    for leftover in (building, replaced):
        shutil.rmtree(leftover, ignore_errors=True)
    make_folder(building)
    try:
        text = _write_report(run, kind, building, visrank=visrank, topk=topk, actmap=actmap, root=root,
                             device=device)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    if pictures.is_dir():
        pictures.rename(replaced)
    building.rename(pictures)
    try:
        atomic_write_text(page, text)
    except BaseException:  # the page on disk is the old one: give it back its pictures
        shutil.rmtree(pictures, ignore_errors=True)
        if replaced.is_dir():
            replaced.rename(pictures)
        raise
    shutil.rmtree(replaced, ignore_errors=True)
    return page


def _write_report(run: Path, kind: str, pictures: Path, *, visrank: int, topk: int, actmap: int,
                  root: str | None, device: str | None) -> str:
    """Draw the run's pictures into `pictures`; -> the page's HTML."""
    from kdreid.viz import pipeline_bars
    from kdreid.viz.bars import pipeline_rows

    config = RunConfig.read(run / "config.yaml")
    metrics = read_run_json(run / "metrics.json") or {}
    sections: list[Section] = []
    title = f"kdreid run {run.resolve().name}"

    if kind == "pipeline":
        overview = Section("Results")
        results = run / "results.md"
        try:
            text = _read_text(results, PIPELINE_FIX) if results.is_file() else ""
        except KdreidError as error:  # a damaged file costs its table, not the page
            overview.blocks.append(_note(f"no results table ({error})"))
            text = ""
        if text:
            first = text.splitlines()[0]
            if first.startswith("#"):
                title = f"{title}: {first.lstrip('#').strip()}"
                text = "\n".join(text.splitlines()[1:])
            overview.blocks.append(markdown_to_html(text))
        if any(key in metrics for key in ("student", "source_only")):
            labels = pipeline_row_labels(config.values)
            for metric in ("mAP", "rank1"):
                # Read before drawing: a damaged file costs the chart; a failure to write the picture is the page's.
                try:
                    pipeline_rows(metrics, metric)
                except KdreidError as error:
                    overview.blocks.append(_note(f"no {metric} bar chart ({run / 'metrics.json'} is damaged: {error}; "
                                                 f"{PIPELINE_FIX})"))
                    continue
                picture = pipeline_bars(metrics, pictures / f"pipeline_{metric}.png", metric=metric, labels=labels,
                                        title=f"{metric} per target")
                overview.blocks.append(_figure(run, picture, f"{metric} (%) per target of every model of the run"))
        else:
            overview.blocks.append(_note("the pipeline has not finished: no final metrics.json yet"))
        overview.blocks.append(_config_block(run / "config.yaml"))
        sections.append(overview)
        if visrank > 0 or actmap > 0:
            try:  # what the student's pictures need from the run's config files
                targets, data_root = _stage_targets(config), root or config.setting("root", str)
                data_options = _data_options(_first_stage_config(run))
                # the student's numbers are the distill stage's: rank as it evaluated
                eval_options = _eval_options(RunConfig.read(run / "stages" / "distill" / "config.yaml")) \
                    if visrank > 0 else {}
            except KdreidError as error:  # a damaged file: those settings are unknown
                sections.append(_unknown_settings(error, visrank, actmap))
            else:
                if visrank > 0:
                    sections.append(ranked_results_section(
                        run, run / "student.pt", targets, data_root, pictures, num_queries=visrank, topk=topk,
                        data_options=data_options, device=device, eval_options=eval_options))
                if actmap > 0:
                    student = ("student", run / "student.pt", None)
                    sections.append(activation_section(
                        run, {target: [(f"teacher of {target}", run / "stages" / f"teacher_{target}" / "model.pt",
                                        None), student] for target in targets},
                        data_root, pictures, num_images=actmap, data_options=data_options, device=device))
        current = _current_stages(config)
        folders = _stage_folders(run)
        stale = [f"stages/{folder.name}" for folder in folders if current is not None and folder.name not in current]
        if stale:  # e.g. the blend after --no-blend-baseline, a teacher of a target no longer named
            overview.blocks.append(_note(f"not shown: {', '.join(stale)}, left by an earlier command in this run "
                                         "folder and not part of its results"))
        for folder in folders:
            if f"stages/{folder.name}" not in stale:
                sections.append(stage_section(run, folder, pictures, f"Stage {folder.name}"))
    elif kind == "stage":
        sections.append(stage_section(run, run, pictures, "Results"))
        model = run / "model.pt"
        if (visrank > 0 or actmap > 0) and model.is_file():
            try:  # what the model's pictures need from the run's config.yaml
                targets, data_root = _stage_targets(config), root or config.setting("data.root", str)
                data_options, models = _data_options(config), _stage_models(run, config)
                eval_options = _eval_options(config) if visrank > 0 else {}
            except KdreidError as error:  # a damaged file: those settings are unknown
                sections.append(_unknown_settings(error, visrank, actmap))
            else:
                if visrank > 0:
                    sections.append(ranked_results_section(
                        run, model, targets, data_root, pictures, num_queries=visrank, topk=topk,
                        data_options=data_options, device=device, eval_options=eval_options))
                if actmap > 0:
                    sections.append(activation_section(run, models, data_root, pictures, num_images=actmap,
                                                       data_options=data_options, device=device))
    else:
        sections.append(evaluation_section(run, metrics))
    sections += existing_evaluation_sections(run)

    return render_page(title, run, kind, sections)


def pipeline_row_labels(config: dict) -> dict[str, str]:
    """{metrics.json key: row label} of a pipeline's final rows, with the architectures its config.yaml names."""
    return {"source_only": f"source only ({config.get('teacher_arch', 'teacher arch.')})",
            "source_only_student": f"source only ({config.get('student_arch', 'student arch.')})",
            "teachers": f"teacher (D-MMD, {config.get('teacher_arch', '')}) on its target",
            "blend": f"blend (D-MMD on all targets, {config.get('student_arch', '')})",
            "student": f"KD-ReID student ({config.get('student_arch', '')})"}


def evaluation_section(run: Path, metrics: dict) -> Section:
    """An evaluation folder's metrics: its table, its verification table and the settings each target was evaluated
    with; a damaged part of its metrics.json is a note in place of that part."""
    source = run / "metrics.json"
    evaluation = Section("Evaluation")
    try:
        evaluation.blocks.append(metrics_table(metrics["final"], source, EVALUATE_FIX))
    except KdreidError as error:
        evaluation.blocks.append(_note(f"no results table ({error})"))
    try:
        if table := verification_table(metrics.get("verification") or {}, source, EVALUATE_FIX):
            evaluation.blocks += [_note("Same person or not, by distance alone (kdreid evaluate --verification): "
                                        "the true-positive rate at each false-positive rate, and the threshold "
                                        "that gives it"), table]
    except KdreidError as error:
        evaluation.blocks.append(_note(f"no verification table ({error})"))
    try:
        evaluation.blocks += evaluated_with_notes(metrics.get("evaluated_with"), source, EVALUATE_FIX)
    except KdreidError as error:
        evaluation.blocks.append(_note(f"the settings it was evaluated with are unknown ({error})"))
    return evaluation


def _setting(value) -> str:
    """A setting of `evaluated_with` (a file from before recorded the protocol as {target: protocol})."""
    if isinstance(value, dict):
        return "(" + "; ".join(f"{key}: {item}" for key, item in value.items()) + ")"
    return str(value)


def _stage_models(run: Path, config: RunConfig) -> dict[str, list[tuple[str, Path, str | None]]]:
    """Per target, the models of a stage run to draw activation maps of: its model.pt, under the target's teacher
    for a distillation (when that file is still where the run found it)."""
    teachers = config.setting("teachers", list, [], items=str)
    models = {}
    for position, target in enumerate(_stage_targets(config)):
        rows = [("model.pt", run / "model.pt", None)]
        if position < len(teachers) and Path(teachers[position]).is_file():
            rows = [(f"teacher of {target}", Path(teachers[position]), config.setting("teacher_arch", str) or None),
                    ("student (model.pt)", run / "model.pt", None)]
        models[target] = rows
    return models


def _first_stage_config(run: Path) -> RunConfig:
    """The config.yaml of the pipeline's first stage that has one (the stages share the pipeline's data settings)."""
    for folder in _stage_folders(run):
        config = RunConfig.read(folder / "config.yaml")
        if config.values or config.damage:
            return config
    return RunConfig(run / "config.yaml")  # none: every setting at its default


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead { background: #f2f2f2; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; }
.note { color: #8a5a00; } pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
nav a { margin-right: 1em; }
"""


def render_page(title: str, run: Path, kind: str, sections: list[Section]) -> str:
    anchors = [f"s{i}" for i in range(len(sections))]
    nav = " ".join(f'<a href="#{a}">{html.escape(s.title)}</a>' for a, s in zip(anchors, sections))
    body = "\n".join(f'<section id="{a}"><h2>{html.escape(s.title)}</h2>\n' + "\n".join(b for b in s.blocks if b)
                     + "</section>" for a, s in zip(anchors, sections))
    generated = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{STYLE}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(kind)} run <code>{html.escape(str(run.resolve()))}</code>; written by kdreid {kdreid.__version__}
on {html.escape(generated)}.</p>
<nav>{nav}</nav>
{body}
</body>
</html>
"""


# ------------------------------------------------------------------------------------------------ command
def report_command(args) -> int:
    from kdreid.evaluation.features import pick_device

    given = [flag for flag, value in (("--visrank", args.visrank), ("--visrank-topk", args.visrank_topk),
                                      ("--actmap", args.actmap), ("--root", args.root), ("--device", args.device))
             if value is not None]
    visrank = DEFAULT_VISRANK if args.visrank is None else args.visrank
    topk = DEFAULT_TOPK if args.visrank_topk is None else args.visrank_topk
    actmap = DEFAULT_ACTMAP if args.actmap is None else args.actmap
    if visrank < 0 or topk < 1:  # before any feature is extracted, as `kdreid evaluate` does
        raise KdreidError(f"--visrank {visrank} --visrank-topk {topk}: --visrank must be 0 or more "
                          "and --visrank-topk at least 1")
    if actmap < 0:
        raise KdreidError(f"--actmap {actmap}: the number of images must be 0 or more")
    pick_device(args.device)  # a bad --device is the command's error, not a note per target
    if args.root is not None and not Path(args.root).is_dir():  # a flag given is the command's error too
        raise KdreidError(f"--root {args.root} is not a folder; pass the data root the run read (or leave --root out "
                          "to use the one it recorded)")
    if given and run_kind(Path(args.run_dir)) == "evaluation":  # its page draws nothing: say so, not ignore them
        print(f"kdreid: warning: {', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect on an "
              f"evaluation folder, whose page shows the pictures `kdreid evaluate` drew there; draw others with "
              f"`kdreid evaluate ... --out {args.run_dir}` and its --visrank N --visrank-topk K --visactmap N",
              file=sys.stderr)
    page = build_report(args.run_dir, visrank=visrank, topk=topk, actmap=actmap, root=args.root, device=args.device)
    # Counted on the page: an evaluation folder's pictures are shown from RUN/visrank/ and RUN/verification/, not
    # RUN/report/.
    images = len(re.findall(r"<img ", page.read_text()))
    print(f"wrote {page} ({images} picture{'' if images == 1 else 's'})", file=sys.stderr)
    print(page)
    return 0
