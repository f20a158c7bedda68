"""`kdreid aggregate`: mean ± standard deviation over runs of one command, the settings in which they differ,
and its one-line refusals. Run folders are written as the stages and the pipeline write them."""

import json

import numpy as np
import pytest
import yaml

from kdreid.aggregate import aggregate_runs
from kdreid.cli import main

TARGETS = ("synth_duke", "synth_cuhk")


def _pipeline(folder, seed, maps, **config):
    """A finished pipeline run whose student scores maps[i] mAP on TARGETS[i] (its other rows: 10 less)."""
    (folder / "stages").mkdir(parents=True)
    row = {t: {"mAP": m, "rank1": m + 5, "rank5": m + 9, "mINP": m / 2} for t, m in zip(TARGETS, maps)}
    lower = {t: {key: value - 10 for key, value in v.items()} for t, v in row.items()}
    (folder / "metrics.json").write_text(json.dumps({"source_only": lower, "source_only_student": lower,
                                                     "teachers": lower, "blend": lower, "student": row}))
    settings = {"sources": ["synth_msmt"], "targets": list(TARGETS), "teacher_arch": "resnet18",
                "student_arch": "osnet_x0_25", "out": str(folder), "root": f"/data{seed}",
                "overrides": {"train.seed": seed}, **config}
    (folder / "config.yaml").write_text(yaml.safe_dump(settings))
    return folder


def _with_stage(run, epochs):
    """A pipeline run's stage folder with the complete config a stage writes."""
    (run / "stages" / "distill").mkdir(parents=True, exist_ok=True)
    (run / "stages" / "distill" / "config.yaml").write_text(yaml.safe_dump(
        {"out": str(run / "stages" / "distill"), "train": {"epochs": epochs, "seed": 0, "device": "cpu"}}))
    return run


def _stage(folder, seed, maps, epochs=5):
    folder.mkdir(parents=True)
    final = {t: {"mAP": m, "rank1": m + 1} for t, m in zip(TARGETS, maps)}
    (folder / "metrics.json").write_text(json.dumps({"final": final, "epochs": [{"epoch": 1}]}))
    (folder / "config.yaml").write_text(yaml.safe_dump({"arch": "resnet18", "out": str(folder),
                                                        "train": {"seed": seed, "epochs": epochs, "device": "cpu"}}))
    return folder


def test_mean_and_sample_std_of_every_row_and_target(tmp_path, capsys):
    maps = [(20.0, 8.0), (22.0, 9.0), (27.0, 13.0)]
    runs = [_pipeline(tmp_path / f"s{seed}", seed, m) for seed, m in enumerate(maps)]
    result = aggregate_runs(runs)
    assert result.kind == "pipeline" and result.seeds == [0, 1, 2] and result.differing == {}
    student = next(row for row in result.rows if row.key == "student")
    assert student.label == "KD-ReID student (osnet_x0_25)"
    assert student.values["synth_duke"]["mAP"] == [20.0, 22.0, 27.0]
    assert [row.key for row in result.rows] == ["source_only", "source_only_student", "teachers", "blend", "student"]
    duke = np.array([20.0, 22.0, 27.0])
    means = (duke + np.array([8.0, 9.0, 13.0])) / 2
    line = next(line for line in result.markdown().splitlines() if line.startswith("| KD-ReID student"))
    assert line.split(" | ")[1] == f"{duke.mean():.1f} ± {duke.std(ddof=1):.1f}"  # 23.0 ± 3.6
    assert line.split(" | ")[-1].rstrip(" |") == f"{means.mean():.1f} ± {means.std(ddof=1):.1f}"
    assert main(["aggregate", *map(str, runs), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    cell = printed["rows"][-1]["datasets"]["synth_cuhk"]["mAP"]
    assert cell["values"] == [8.0, 9.0, 13.0] and cell["std"] == pytest.approx(np.std([8, 9, 13], ddof=1))


def test_stage_runs_and_the_settings_they_differ_in(tmp_path, capsys):
    runs = [_stage(tmp_path / "a", 0, (10.0, 5.0)), _stage(tmp_path / "b", 1, (12.0, 7.0), epochs=9)]
    out = tmp_path / "summary.md"
    assert main(["aggregate", *map(str, runs), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "warning: the runs differ in train.epochs (5, 9)" in captured.err
    assert "seed" not in captured.err.split("warning: the runs differ in")[1].split(":")[0]  # the seed may differ
    assert out.read_text() == captured.out
    assert "| final model (resnet18) | 11.0 ± 1.4 | 12.0 ± 1.4 | 6.0 ± 1.4 | 7.0 ± 1.4 | 8.5 ± 1.4 |" in captured.out
    assert "differ in `train.epochs` (5, 9)" in captured.out
    # A setting one run does not record (written by an older kdreid) is not a difference.
    config = yaml.safe_load((runs[1] / "config.yaml").read_text())
    config["train"].update(epochs=5, new_setting=True)
    (runs[1] / "config.yaml").write_text(yaml.safe_dump(config))
    assert aggregate_runs(runs).differing == {}


def test_repeated_seeds_are_named(tmp_path, capsys):
    runs = [_stage(tmp_path / "a", 3, (10.0, 5.0)), _stage(tmp_path / "b", 3, (12.0, 7.0))]
    assert main(["aggregate", *map(str, runs)]) == 0
    assert "seeds 3, 3 repeat" in capsys.readouterr().err


@pytest.mark.parametrize("make, message", [
    (lambda p: [_stage(p / "a", 0, (1.0, 2.0))], "needs at least two runs"),
    (lambda p: [_stage(p / "a", 0, (1.0, 2.0)), p / "a"], "a run is named twice"),
    (lambda p: [_stage(p / "a", 0, (1.0, 2.0)), _pipeline(p / "b", 1, (1.0, 2.0))], "of different kinds"),
    (lambda p: [_pipeline(p / "a", 0, (1.0, 2.0)), _pipeline(p / "b", 1, (1.0,))], "has no mAP of synth_cuhk"),
    (lambda p: [_stage(p / "a", 0, (1.0,)), _stage(p / "b", 1, (1.0, 2.0))], "a has no mAP of synth_cuhk"),
    (lambda p: [_stage(p / "a", 0, (1.0, 2.0)), p / "missing"], "does not exist"),
])
def test_runs_that_cannot_be_aggregated_are_one_line(make, message, tmp_path, capsys):
    runs = make(tmp_path)
    assert main(["aggregate", *map(str, runs)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_evaluation_folders_of_one_model_setting(tmp_path):
    runs = []
    for seed, value in enumerate((30.0, 34.0)):
        folder = tmp_path / f"e{seed}"
        folder.mkdir()
        (folder / "metrics.json").write_text(json.dumps({
            "final": {"synth_duke": {"mAP": value, "rank1": value}},
            "evaluated_with": {"synth_duke": {"model": f"/runs/s{seed}/model.pt", "metric": "euclidean"}}}))
        runs.append(folder)
    result = aggregate_runs(runs)
    assert result.kind == "evaluation" and result.differing == {} and result.seeds == [None, None]
    assert "| evaluation | 32.0 ± 2.8 | 32.0 ± 2.8 | 32.0 ± 2.8 |" in result.markdown()
    recorded = json.loads((runs[1] / "metrics.json").read_text())
    recorded["evaluated_with"]["synth_duke"]["metric"] = "cosine"
    (runs[1] / "metrics.json").write_text(json.dumps(recorded))
    assert aggregate_runs(runs).differing == {"synth_duke.metric": ["euclidean", "cosine"]}


def test_runs_are_compared_on_their_stages_and_whole_evaluation_settings(tmp_path, capsys):
    """A pipeline whose command gave one run other settings (its own config.yaml records only the flags given) is
    compared on its stages' complete configs; evaluation settings are compared whole (aqe off vs on)."""
    runs = [_with_stage(_pipeline(tmp_path / f"s{seed}", seed, (20.0 + seed, 8.0)), epochs)
            for seed, epochs in ((0, 7), (1, 7), (2, 9))]
    assert aggregate_runs(runs).differing == {"distill.train.epochs": [7, 7, 9]}
    evaluations = []
    for index, aqe in enumerate((False, {"k": 5, "alpha": 3.0})):
        folder = tmp_path / f"e{index}"
        folder.mkdir()
        (folder / "metrics.json").write_text(json.dumps({"final": {"synth_duke": {"mAP": 30.0 + index}},
                                                         "evaluated_with": {"synth_duke": {"aqe": aqe}}}))
        evaluations.append(folder)
    assert aggregate_runs(evaluations).differing == {"synth_duke.aqe": [False, {"k": 5, "alpha": 3.0}]}


def test_a_value_a_run_could_not_measure_or_a_damaged_one_is_named_in_any_order(tmp_path, capsys):
    runs = [_pipeline(tmp_path / f"s{seed}", seed, (20.0, 8.0)) for seed in range(3)]
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    metrics["student"]["synth_cuhk"]["mAP"] = None
    (runs[0] / "metrics.json").write_text(json.dumps(metrics))
    for order in (runs, runs[::-1]):
        assert main(["aggregate", *map(str, order)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert f"{runs[0]} has no mAP of synth_cuhk in its 'KD-ReID student (osnet_x0_25)' row (null" in err
    metrics["student"]["synth_cuhk"]["mAP"] = "high"
    (runs[0] / "metrics.json").write_text(json.dumps(metrics))
    assert main(["aggregate", *map(str, runs)]) == 2
    assert "is damaged: student.synth_cuhk.mAP is 'high', not a number" in capsys.readouterr().err
    stage = _stage(tmp_path / "a", 0, (1.0, 2.0))
    (stage / "metrics.json").write_text(json.dumps({"final": [1], "epochs": [{"epoch": 1}]}))
    assert main(["aggregate", str(stage), str(_stage(tmp_path / "b", 1, (1.0, 2.0)))]) == 2
    assert "is damaged: its 'final' entry is not a table of datasets" in capsys.readouterr().err


def test_out_never_overwrites_a_file_of_the_runs_or_names_a_folder(tmp_path, capsys):
    runs = [_stage(tmp_path / "a", 0, (1.0, 2.0)), _stage(tmp_path / "b", 1, (3.0, 4.0))]
    before = (runs[0] / "metrics.json").read_bytes()
    assert main(["aggregate", *map(str, runs), "--out", str(runs[0] / "metrics.json")]) == 2
    assert "is a file of the RUN" in capsys.readouterr().err and (runs[0] / "metrics.json").read_bytes() == before
    # Found by a review: any other file of a run was overwritten (a model.pt replaced by the table, exit 0).
    (runs[1] / "model.pt").write_bytes(b"weights")
    assert main(["aggregate", *map(str, runs), "--out", str(runs[1] / "model.pt")]) == 2
    assert "is a file of the RUN" in capsys.readouterr().err and (runs[1] / "model.pt").read_bytes() == b"weights"
    assert main(["aggregate", *map(str, runs), "--out", str(runs[1] / "seeds.md")]) == 0  # a new file there: fine
    assert main(["aggregate", *map(str, runs), "--out", f"{tmp_path / 'new'}/"]) == 2
    assert "the trailing / names a folder" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_a_stage_runs_mean_is_over_its_targets(tmp_path):
    runs = [_stage(tmp_path / "a", 0, (10.0, 2.0)), _stage(tmp_path / "b", 1, (14.0, 4.0))]
    for run in runs:  # synth_cuhk is the stage's source here: scored, not in the mean
        config = yaml.safe_load((run / "config.yaml").read_text())
        (run / "config.yaml").write_text(yaml.safe_dump({**config, "targets": ["synth_duke"],
                                                         "sources": ["synth_cuhk"]}))
    line = next(line for line in aggregate_runs(runs).markdown().splitlines() if line.startswith("| final"))
    assert line.endswith("| 12.0 ± 2.8 |")


def test_seeds_are_read_wherever_a_pipeline_sets_them(tmp_path, capsys):
    # Found by a review: a seed in the config file's `common` section read as none (a false "repeat" warning),
    # and a pipeline without any seed, which ran with the default 0, as unknown.
    runs = [_pipeline(tmp_path / f"c{seed}", seed, (20.0 + seed, 8.0), overrides={}, common={"train": {"seed": seed}})
            for seed in range(3)]
    assert aggregate_runs(runs).seeds == [0, 1, 2]
    assert main(["aggregate", *map(str, runs)]) == 0 and "repeat" not in capsys.readouterr().err
    unseeded = [_pipeline(tmp_path / f"u{i}", 0, (20.0 + i, 8.0), overrides={}) for i in range(2)]
    assert aggregate_runs(unseeded).seeds == [0, 0]
    assert main(["aggregate", *map(str, unseeded)]) == 0 and "repeat" in capsys.readouterr().err


def test_a_null_metric_is_shown_as_na_and_rows_name_their_architecture(tmp_path):
    # Found by a review: a null shown as 0.0, and the student's source-only row named after the teachers'
    # architecture, passed.
    from kdreid.report import metrics_table, pipeline_row_labels

    table = metrics_table({"d": {"mAP": None, "rank1": 50.0}}, tmp_path / "metrics.json", "fix it")
    assert "<td>n/a</td>" in table and "<td>50.0</td>" in table
    labels = pipeline_row_labels({"teacher_arch": "resnet50", "student_arch": "osnet_x0_25"})
    assert labels["source_only_student"] == "source only (osnet_x0_25)"
    assert labels["source_only"] == "source only (resnet50)"


def test_runs_on_other_files_under_the_same_dataset_names_are_named(tmp_path, capsys):
    # Found by a review: runs trained on data regenerated under the same names (another --scale or seed of `kdreid
    # data synth`, read from another --root) were averaged without a word: the data root is not compared, and the
    # datasets.json digests that tell the files apart were not read.
    runs = [_stage(tmp_path / "a", 0, (10.0, 5.0)), _stage(tmp_path / "b", 1, (12.0, 7.0))]
    for run, digest in zip(runs, ("1111/aaaa", "2222/bbbb")):
        (run / "datasets.json").write_text(json.dumps({"synth_duke": digest, "synth_cuhk": "3333/cccc"}))
    assert main(["aggregate", *map(str, runs)]) == 0
    assert "differ in datasets.synth_duke (1111/aaaa, 2222/bbbb)" in capsys.readouterr().err
    (runs[1] / "datasets.json").write_text(json.dumps({"synth_duke": "1111/aaaa", "synth_cuhk": "3333/cccc"}))
    assert aggregate_runs(runs).differing == {}  # the same files, wherever they lay
    (runs[1] / "datasets.json").write_text('{"synth_duke": ')  # damaged: no digests to compare, not a traceback
    assert aggregate_runs(runs).differing == {}
    pipelines = [_with_stage(_pipeline(tmp_path / f"p{seed}", seed, (20.0 + seed, 8.0)), 7) for seed in range(2)]
    for run, digest in zip(pipelines, ("1111/aaaa", "2222/bbbb")):
        (run / "stages" / "distill" / "datasets.json").write_text(json.dumps({"synth_duke": digest}))
    assert aggregate_runs(pipelines).differing == {"distill.datasets.synth_duke": ["1111/aaaa", "2222/bbbb"]}


def test_one_model_evaluated_in_several_folders_is_named(tmp_path, capsys):
    # Found by a review: `kdreid evaluate --model runs/s0/model.pt` written into two folders (a slip in a loop over
    # seeds) gave a "± 0.0" table without a word.
    runs = []
    for index, model in enumerate(("/runs/s0/model.pt", "/runs/s0/model.pt", "/runs/s2/model.pt")):
        folder = tmp_path / f"e{index}"
        folder.mkdir()
        (folder / "metrics.json").write_text(json.dumps({
            "final": {"synth_duke": {"mAP": 30.0 + (index == 2)}},
            "evaluated_with": {"synth_duke": {"model": model, "metric": "euclidean"}}}))
        runs.append(folder)
    assert main(["aggregate", *map(str, runs)]) == 0
    err = capsys.readouterr().err
    assert f"{runs[0]}, {runs[1]} evaluated the same model file /runs/s0/model.pt" in err and "/runs/s2" not in err
    assert main(["aggregate", str(runs[0]), str(runs[2])]) == 0
    assert "same model file" not in capsys.readouterr().err


def test_one_model_on_several_targets_of_one_folder_is_not_a_repeat(tmp_path, capsys):
    # Each folder evaluated its own model on two targets: no repeat. Two folders of one model on two targets: each
    # folder named once, in one warning.
    def evaluation(name, model):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "metrics.json").write_text(json.dumps({
            "final": {t: {"mAP": 30.0 + len(name)} for t in TARGETS},
            "evaluated_with": {t: {"model": model, "metric": "euclidean"} for t in TARGETS}}))
        return str(folder)

    seeds = [evaluation("s0", "/runs/s0/model.pt"), evaluation("s1", "/runs/s1/model.pt")]
    assert main(["aggregate", *seeds]) == 0
    assert "warning" not in capsys.readouterr().err
    slips = [evaluation("e0", "/runs/s0/model.pt"), evaluation("e1", "/runs/s0/model.pt")]
    assert main(["aggregate", *slips]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "same model file" in line]
    assert warnings == [f"kdreid: warning: {slips[0]}, {slips[1]} evaluated the same model file /runs/s0/model.pt: "
                        "the spread over them is not the seed's; evaluate each seed's model"]


def test_an_unfinished_run_names_aggregate_as_what_comes_after(tmp_path, capsys):
    # Found by a review: the refusal of a stopped stage (no metrics.json yet) ended "then report it".
    done = _stage(tmp_path / "a", 0, (1.0, 2.0))
    stopped = tmp_path / "b"
    stopped.mkdir()
    (stopped / "config.yaml").write_text((done / "config.yaml").read_text())
    assert main(["aggregate", str(done), str(stopped)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("continue it with the same command and --resume, then aggregate")


def test_json_holds_the_tables_mean_map_column(tmp_path, capsys):
    # Found by a review: --json had every metric but not the mean mAP over datasets, the table's last column.
    runs = [_stage(tmp_path / "a", 0, (10.0, 2.0)), _stage(tmp_path / "b", 1, (14.0, 4.0))]
    assert main(["aggregate", *map(str, runs), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["averaged"] == list(TARGETS) and row["mean_mAP"]["values"] == [6.0, 9.0]
    assert row["mean_mAP"]["std"] == pytest.approx(np.std([6.0, 9.0], ddof=1))
    assert json.loads(json.dumps(aggregate_runs(runs).as_json()))["std"] == "sample (n - 1)"
    # A stage scores its sources too; its mean mAP is the targets' alone, as the table's last column.
    for run in runs:
        config = yaml.safe_load((run / "config.yaml").read_text())
        (run / "config.yaml").write_text(yaml.safe_dump({**config, "targets": ["synth_cuhk"]}))
    assert main(["aggregate", *map(str, runs), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["averaged"] == ["synth_cuhk"] and row["mean_mAP"]["values"] == [2.0, 4.0]
    assert list(row["datasets"]) == list(TARGETS)
