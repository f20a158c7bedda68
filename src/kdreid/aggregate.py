"""`kdreid aggregate RUN RUN ...`: mean ± standard deviation of each model's numbers over runs that differ only in
their seed — how a re-ID result is stated honestly, since one run's mAP moves by points from seed to seed on test
sets of a few hundred identities.

Every RUN is a finished pipeline (the rows of its results table), a stage run (its final numbers per dataset) or
a `kdreid evaluate --out` folder; all of one kind, with the same rows and datasets. Settings in which the runs
differ, other than the seed and what only says where or how a run executed (folders, data root, device,
compilation, logging), are named in a warning: their spread is not the seed's alone.

    result = aggregate_runs(["runs/seed0", "runs/seed1", "runs/seed2"])
    print(result.markdown())
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from kdreid.config import flatten
from kdreid.errors import KdreidError
from kdreid.report import pipeline_row_labels, read_run_json, read_run_yaml, run_kind

METRICS = ("mAP", "rank1", "rank5", "rank10", "rank20", "mINP")
PIPELINE_ROWS = ("source_only", "source_only_student", "teachers", "blend", "student")
# Settings that say where or how a run executed, not what it trained: they may differ between the runs.
EXECUTION_SETTINGS = {"seed", "out", "root", "device", "compile", "log_freq", "workers", "deterministic", "model",
                      "init", "student_init", "teachers"}


@dataclass
class Row:
    key: str
    label: str
    values: dict[str, dict[str, list[float]]]  # {dataset: {metric: one value per run}}
    averaged: list[str] = field(default_factory=list)  # the datasets its mean mAP averages


@dataclass
class Aggregate:
    runs: list[str]
    kind: str
    seeds: list[object]  # each run's seed (None where its config does not say)
    rows: list[Row]
    differing: dict[str, list[object]] = field(default_factory=dict)  # setting -> its value in each run
    repeated_models: dict[str, list[str]] = field(default_factory=dict)  # evaluations: model file -> its runs

    def datasets(self) -> list[str]:
        return list(dict.fromkeys(d for row in self.rows for d in row.values))

    def markdown(self) -> str:
        """A results table of `mean ± std` cells (mAP and rank-1 per dataset, and the mean mAP over datasets)."""
        datasets = self.datasets()
        header = ["model", *(f"{d} {m}" for d in datasets for m in ("mAP", "R1")), "mean mAP"]
        lines = [f"# {self.kind} over {len(self.runs)} runs (seeds {', '.join(map(str, self.seeds))})", "",
                 "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in self.rows:
            cells = [row.label]
            for dataset in datasets:
                for metric in ("mAP", "rank1"):
                    values = row.values.get(dataset, {}).get(metric)
                    cells.append(_cell(values) if values else "—")
            per_run = _mean_over_datasets(row)
            cells.append(_cell(per_run) if per_run else "—")
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"Mean ± sample standard deviation (n − 1) over {len(self.runs)} runs, in percent: "
                      + ", ".join(f"`{run}`" for run in self.runs) + "."]
        if self.differing:
            lines.append("The runs also differ in " + "; ".join(
                f"`{key}` ({', '.join(map(str, values))})" for key, values in self.differing.items())
                + ": the spread is not the seed's alone.")
        return "\n".join(lines) + "\n"

    def as_json(self) -> dict:
        def stats(values):
            return {"mean": _mean(values), "std": _std(values), "values": values} if values else None

        return {"kind": self.kind, "runs": self.runs, "seeds": self.seeds, "differing_settings": self.differing,
                "std": "sample (n - 1)",
                "rows": [{"key": row.key, "label": row.label,
                          "datasets": {d: {m: stats(v) for m, v in per.items()} for d, per in row.values.items()},
                          # the table's last column: each run's mAP averaged over `averaged`
                          "mean_mAP": stats(_mean_over_datasets(row)), "averaged": row.averaged}
                         for row in self.rows]}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _std(values: Sequence[float]) -> float | None:
    if len(values) < 2:
        return None
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _cell(values: Sequence[float]) -> str:
    std = _std(values)
    return f"{_mean(values):.1f}" + ("" if std is None else f" ± {std:.1f}")


def _mean_over_datasets(row: Row) -> list[float] | None:
    """Each run's mAP averaged over the row's targets (`Row.averaged`; the results table's last column)."""
    columns = [row.values[d]["mAP"] for d in row.averaged if "mAP" in row.values.get(d, {})]
    if not columns or len(columns) != len(row.averaged):
        return None
    return [_mean(run_values) for run_values in zip(*columns)]


@dataclass
class _Run:
    """One run folder's files, each read once."""
    path: Path
    kind: str
    metrics: dict  # its metrics.json
    config: dict  # its config.yaml ({} when absent or unreadable)

    @classmethod
    def read(cls, path: Path, kind: str) -> _Run:
        return cls(path, kind, read_run_json(path / "metrics.json") or {}, read_run_yaml(path / "config.yaml"))


def _rows_of(run: _Run) -> dict[str, tuple[str, dict[str, dict[str, float | None]]]]:
    """{row key: (label, {dataset: {metric: value, None where the run could not measure it}})} of one run; one
    line naming the file when a row is not what kdreid writes (damaged)."""
    source, kind, metrics = run.path / "metrics.json", run.kind, run.metrics
    if kind == "pipeline":
        labels = pipeline_row_labels(run.config)
        found = {key: (labels[key], metrics[key]) for key in PIPELINE_ROWS if key in metrics}
        if not found:
            raise KdreidError(f"{run.path} is a pipeline that has not finished (no final rows in its metrics.json); "
                              "finish it (run the same command again), then aggregate")
    else:
        arch = run.config.get("arch") if kind == "stage" else None
        found = {"final": (f"final model ({arch})" if arch else kind, metrics.get("final"))}
    rows = {}
    for key, (label, per_dataset) in found.items():
        if not isinstance(per_dataset, dict) or not all(isinstance(v, dict) for v in per_dataset.values()):
            raise KdreidError(f"{source} is damaged: its {key!r} entry is not a table of datasets; run it again")
        values = {}
        for dataset, measured in per_dataset.items():
            for metric in METRICS:
                value = measured.get(metric)
                if metric in measured and not (value is None or isinstance(value, (int, float))):
                    raise KdreidError(f"{source} is damaged: {key}.{dataset}.{metric} is {value!r}, not a number; "
                                      "run it again")
                if metric in measured:
                    values.setdefault(dataset, {})[metric] = None if value is None else float(value)
        rows[key] = (label, values)
    return rows


def _averaged(run: _Run, datasets: Sequence[str]) -> list[str]:
    """The datasets a row's mean mAP averages: a stage's targets (its sources are scored too, but the column is
    the targets' mean, as in a pipeline's table), else all of them."""
    targets = run.config.get("targets") if run.kind == "stage" else None
    chosen = [d for d in datasets if isinstance(targets, list) and d in targets]
    return chosen or list(datasets)


def _settings_of(run: _Run) -> dict[str, object]:
    """The run's settings, flattened, without those that only say where or how it executed. A pipeline's are its
    stages' (`stage.key`): each stage's config.yaml is complete, where the pipeline's own holds only what its
    command gave (a setting one run was given would be absent from the others). An evaluation's are per target
    (`target.key`), each value whole (`aqe: false` against `aqe: {k, alpha}`)."""
    if run.kind == "evaluation":
        recorded = run.metrics.get("evaluated_with") or {}
        settings = {f"{target}.{key}": value for target, values in recorded.items() if isinstance(values, dict)
                    for key, value in values.items()} if isinstance(recorded, dict) else {}
    elif run.kind == "pipeline":
        folder = run.path / "stages"
        stages = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        settings = {f"{stage.name}.{key}": value for stage in stages
                    for key, value in {**flatten(read_run_yaml(stage / "config.yaml")), **_datasets_of(stage)}.items()}
    else:
        settings = {**flatten(run.config), **_datasets_of(run.path)}
    return {key: value for key, value in settings.items()
            if key.rsplit(".", 1)[-1] not in EXECUTION_SETTINGS}


def _datasets_of(folder: Path) -> dict[str, str]:
    """{`datasets.NAME`: the content digest of dataset NAME} of a stage's datasets.json (paths relative to the data
    root, labels, sizes): runs on other files under the same names (regenerated data, another --scale or seed of
    `kdreid data synth`) differ there, whatever --root they were read from; {} when absent or unreadable."""
    try:
        recorded = json.loads((folder / "datasets.json").read_bytes())
    except (OSError, ValueError):
        return {}
    return {f"datasets.{name}": value for name, value in recorded.items()} if isinstance(recorded, dict) else {}


def _repeated_models(read: Sequence[_Run]) -> dict[str, list[str]]:
    """{model file: the runs that evaluated it} of evaluation folders where one model file was evaluated in
    several of them (on the same target): their spread is nothing's, not the seed's."""
    found: dict[tuple[str, str], list[str]] = {}
    for run in read if read and read[0].kind == "evaluation" else []:
        recorded = run.metrics.get("evaluated_with")
        for target, values in (recorded.items() if isinstance(recorded, dict) else []):
            model = values.get("model") if isinstance(values, dict) else None
            if isinstance(model, str):
                found.setdefault((model, target), []).append(str(run.path))
    repeated: dict[str, list[str]] = {}
    for (model, _), runs in found.items():
        if len(runs) > 1:
            repeated.setdefault(model, [])
            repeated[model] += [r for r in runs if r not in repeated[model]]
    return repeated


def _seed_of(run: _Run) -> object:
    """The seed the run's config records (a pipeline: from its flags, its `common` section, else the default)."""
    settings = flatten(run.config)
    for key in ("train.seed", "overrides.train.seed", "common.train.seed"):
        if key in settings:
            return settings[key]
    return 0 if settings and run.kind != "evaluation" else None


def aggregate_runs(runs: Sequence[str | Path]) -> Aggregate:
    """Mean ± std of every row over `runs` (see the module docstring); one-line KdreidError when they cannot be
    aggregated (fewer than two, of different kinds, with other rows or datasets)."""
    paths = [Path(run) for run in runs]
    if len(paths) < 2:
        raise KdreidError("aggregate needs at least two runs (the same command with other --seed values)")
    if len({p.resolve() for p in paths}) != len(paths):
        raise KdreidError("a run is named twice: each run must count once")
    kinds = {path: run_kind(path, then="aggregate") for path in paths}
    if len(set(kinds.values())) > 1:
        described = ", ".join(f"{path} ({kind})" for path, kind in kinds.items())
        raise KdreidError(f"the runs are of different kinds: {described}; aggregate runs of one command")
    kind = kinds[paths[0]]
    read = [_Run.read(path, kind) for path in paths]
    per_run = [_rows_of(run) for run in read]
    rows = []
    # Every row, dataset and metric any run holds, in the order they first appear: each must be in every run, and a
    # number there (one a run could not measure, null, cannot be averaged with the others).
    for key in dict.fromkeys(key for held in per_run for key in held):
        label = next(held[key][0] for held in per_run if key in held)
        tables = [held.get(key, ("", {}))[1] for held in per_run]  # {dataset: {metric: value}} of each run
        datasets = list(dict.fromkeys(d for table in tables for d in table))
        values: dict[str, dict[str, list[float]]] = {}
        for dataset in datasets:
            for metric in dict.fromkeys(m for table in tables for m in table.get(dataset, {})):
                for run, table in zip(read, tables):
                    measured = table.get(dataset, {})
                    if measured.get(metric) is None:
                        why = "null: the run could not measure it" if metric in measured else "absent"
                        raise KdreidError(f"{run.path} has no {metric} of {dataset} in its {label!r} row ({why}), "
                                          "which another run has: aggregate runs of the same command, each finished")
                values.setdefault(dataset, {})[metric] = [table[dataset][metric] for table in tables]
        rows.append(Row(key, label, values, _averaged(read[0], datasets)))
    settings = [_settings_of(run) for run in read]
    # Only settings every run records: one a run lacks is newer than the kdreid that wrote it (its default then).
    recorded = [key for key in settings[0] if all(key in s for s in settings[1:])]
    differing = {key: [s[key] for s in settings] for key in recorded
                 if len({json.dumps(s[key], sort_keys=True, default=str) for s in settings}) > 1}
    return Aggregate([str(p) for p in paths], kind, [_seed_of(run) for run in read], rows, differing,
                     _repeated_models(read))


def _refuse_run_file(out: str, runs: Sequence[str]) -> None:
    """--out must not replace a file of the runs it reads: any file already inside one of them (its metrics.json,
    but also its model.pt, a checkpoint, its log) is refused in one line; a new file there is written."""
    target = Path(out)
    if not target.exists():
        return
    for run in runs:
        if Path(run).is_dir() and target.resolve().is_relative_to(Path(run).resolve()):
            raise KdreidError(f"--out {out} is a file of the RUN {run}: writing it would replace it; choose another "
                              "--out")


def aggregate_command(args) -> int:
    from kdreid.rundir import atomic_write_text, refuse_folder

    if args.out:  # before any work, and never over a file of the runs it reads
        refuse_folder(args.out, "seeds.md")
        _refuse_run_file(args.out, args.runs)
    result = aggregate_runs(args.runs)
    if result.differing:
        named = "; ".join(f"{k} ({', '.join(map(str, v))})" for k, v in result.differing.items())
        print(f"kdreid: warning: the runs differ in {named}: the spread is not the seed's alone", file=sys.stderr)
    known = [seed for seed in result.seeds if seed is not None]
    if known and len(set(map(str, known))) < len(known):
        print(f"kdreid: warning: seeds {', '.join(map(str, result.seeds))} repeat: repeated seeds measure the "
              "run-to-run noise of one seed, not the spread over seeds", file=sys.stderr)
    for model, runs in result.repeated_models.items():
        print(f"kdreid: warning: {', '.join(runs)} evaluated the same model file {model}: the spread over them is "
              "not the seed's; evaluate each seed's model", file=sys.stderr)
    text = json.dumps(result.as_json(), indent=2) + "\n" if args.json else result.markdown()
    if args.out:
        atomic_write_text(args.out, text)
        print(f"wrote {args.out}", file=sys.stderr)
    print(text, end="")
    return 0
