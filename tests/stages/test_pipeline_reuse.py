"""`kdreid pipeline` without training: which finished stages are reused when settings change, what is said
before one is trained again, datasets checked before any stage, the results table's per-row grouping and
selection, and the precedence of presets, --config sections and CLI flags."""

import json
import logging
import re
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from kdreid.cli import main
from kdreid.config import dump_yaml
from kdreid.errors import ConfigError, DatasetError
from kdreid.stages import pipeline
from kdreid.stages.data import DATASETS_FILE, dataset_fingerprint, load_datasets
from kdreid.stages.loop import results_table
from kdreid.stages.presets import PRESETS

TARGETS = ["synth_duke", "synth_cuhk"]


def _every_stage_runs(monkeypatch, runner) -> None:
    """Every stage kind of the pipeline runs `runner(config, resume)` instead of training."""
    for kind in list(pipeline.RUNNERS):
        monkeypatch.setitem(pipeline.RUNNERS, kind, runner)


def _config(tmp_path, **settings) -> pipeline.PipelineConfig:
    return pipeline.PipelineConfig(sources=["synth_msmt"], targets=TARGETS, teacher_arch="resnet_tiny",
                                   student_arch="osnet_tiny", root=str(tmp_path), out=str(tmp_path / "run"),
                                   preset="quick", **settings)


def _finish(configs: dict) -> None:
    """Make every stage look finished (model.pt, metrics.json, its config.yaml), each after its inputs."""
    for stage_config in configs.values():
        folder = Path(stage_config.out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text(dump_yaml(stage_config))
        torch.save({}, folder / "model.pt")  # loads: a finished stage's model must
        (folder / "metrics.json").write_text(json.dumps({"final": {}}))


def _actions(config) -> dict[str, str]:
    return {name: pipeline.stage_state(c).action for name, c in pipeline.stage_configs(config).items()}


def test_settings_that_do_not_change_the_weights_keep_finished_stages(tmp_path):
    _finish(pipeline.stage_configs(_config(tmp_path)))
    run_only = {"train.device": "cuda", "train.compile": "off", "train.log_freq": 5, "train.eval_freq": 1,
                "train.deterministic": True, "eval.batch_size": 7}
    assert set(_actions(_config(tmp_path, overrides=run_only, adapt={"histogram_images": 10})).values()) == {"done"}
    state = pipeline.stage_state(pipeline.stage_configs(_config(tmp_path, overrides={"train.device": "cuda"}))["blend"])
    assert "ignoring train.device auto -> cuda" in state.reason
    # How the numbers are measured changes no weights either, but the stages' numbers: each is measured again,
    # resumed from its checkpoint (no epoch left); without one only a new run can measure them.
    cosine = pipeline.stage_configs(_config(tmp_path, overrides={"eval.metric": "cosine"}))
    state = pipeline.stage_state(cosine["blend"])
    assert state.action == "fresh" and state.reason == ("its numbers were measured otherwise (eval.metric 'euclidean' "
                                                        "-> 'cosine'), and it has no training checkpoint")
    (Path(cosine["blend"].out) / "checkpoints").mkdir()
    (Path(cosine["blend"].out) / "checkpoints" / "last.pt").write_bytes(b"state")
    state = pipeline.stage_state(cosine["blend"])
    assert state.action == "resume" and state.reason.endswith("-> 'cosine'); same weights, evaluated again")

    # What does change the weights: the number of epochs, the seed, a loss weight, the selection rule.
    assert set(_actions(_config(tmp_path, overrides={"train.epochs": 9})).values()) == {"fresh"}
    assert set(_actions(_config(tmp_path, common={"train.seed": 4})).values()) == {"fresh"}
    assert [n for n, a in _actions(_config(tmp_path, blend={"dmmd_weight": 0.5})).items() if a != "done"] == ["blend"]
    fresh = pipeline.stage_state(pipeline.stage_configs(_config(tmp_path, overrides={"train.epochs": 9}))["distill"])
    quick_epochs = PRESETS["quick"]["distill"]["train"]["epochs"]
    assert fresh.reason == f"settings that change its weights differ: train.epochs {quick_epochs} -> 9"


def test_a_stage_finished_by_an_older_kdreid_is_reused_across_settings_it_predates(tmp_path):
    # A setting added since (here data.cuhk03_split_id) counts at its default, which is what kdreid did before.
    configs = pipeline.stage_configs(_config(tmp_path))
    _finish(configs)
    for stage_config in configs.values():
        saved = Path(stage_config.out) / "config.yaml"
        older = yaml.safe_load(saved.read_text())
        del older["data"]["cuhk03_split_id"]
        saved.write_text(yaml.safe_dump(older))
    assert set(_actions(_config(tmp_path)).values()) == {"done"}
    assert set(_actions(_config(tmp_path, common={"data.cuhk03_split_id": 2})).values()) == {"fresh"}


@pytest.mark.parametrize("select", ["source-val", "target-clusters"])  # a review: the second went untested
def test_evaluation_settings_matter_when_a_score_picks_the_epoch(tmp_path, select):
    by_score = {"train.select": select}
    _finish(pipeline.stage_configs(_config(tmp_path, adapt=by_score)))
    assert _actions(_config(tmp_path, adapt=by_score))["teacher_synth_duke"] == "done"
    changed = _actions(_config(tmp_path, adapt={**by_score, "train.eval_freq": 1}))
    assert [name for name, action in changed.items() if action != "done"] == [
        "teacher_synth_duke", "teacher_synth_cuhk", "blend"]


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _logger():
    log = logging.getLogger("test_pipeline_reuse")
    log.handlers = [_Lines()]
    log.setLevel(logging.INFO)
    return log, log.handlers[0].lines


def test_a_finished_stage_is_only_removed_after_a_line_naming_what_changed(tmp_path, monkeypatch):
    _finish(pipeline.stage_configs(_config(tmp_path)))
    trained = []

    def fake_run(stage_config, resume):
        trained.append(stage_config.out)
        assert not (Path(stage_config.out) / "model.pt").exists()  # the old model was removed first
        return SimpleNamespace(final={})

    monkeypatch.setitem(pipeline.RUNNERS, pipeline.distill.DistillConfig, fake_run)
    log, lines = _logger()
    changed = pipeline.stage_configs(_config(tmp_path, distill={"lkdt_weight": 2.0}))["distill"]
    pipeline.run_stage("distill", changed, log)
    assert trained == [changed.out]
    assert any(line.startswith("stage distill: removing") and "finished model" in line
               and "lkdt_weight 1.0 -> 2.0" in line for line in lines)

    lines.clear()
    same_weights = pipeline.stage_configs(_config(tmp_path, overrides={"train.compile": "off"}))["blend"]
    assert pipeline.run_stage("blend", same_weights, log) == ({}, False)
    assert lines == [f"stage blend: reusing {Path(same_weights.out) / 'model.pt'} (same weight settings, newer "
                     "than its inputs; ignoring train.compile auto -> off)"]


def test_a_stage_folder_another_process_trains_in_is_not_removed(tmp_path, monkeypatch):
    from kdreid.rundir import FolderInUse
    from tests.test_rundir import hold_in_another_process

    _finish(pipeline.stage_configs(_config(tmp_path)))
    monkeypatch.setitem(pipeline.RUNNERS, pipeline.distill.DistillConfig, lambda config, resume: pytest.fail())
    changed = pipeline.stage_configs(_config(tmp_path, distill={"lkdt_weight": 2.0}))["distill"]
    holder = hold_in_another_process(changed.out)  # e.g. `kdreid distill --out RUN/stages/distill --resume`
    try:
        with pytest.raises(FolderInUse, match=f"pid {holder.pid} "):
            pipeline.run_stage("distill", changed, _logger()[0])
    finally:
        holder.kill()
        holder.wait()
    assert (Path(changed.out) / "model.pt").exists()


def test_a_pipeline_refused_a_folder_another_took_as_it_started_leaves_that_folder(synth_root, tmp_path, monkeypatch):
    # Two pipelines started together on one new --out: both see no folder, the other one takes it first. The refused
    # one must not remove it as "a folder this call made" (its config.yaml, its log, the stage it trains).
    from kdreid.rundir import LOCK_FILE, FolderInUse
    from tests.test_rundir import hold_in_another_process

    _every_stage_runs(monkeypatch, lambda config, resume: pytest.fail("a stage ran"))
    real_exclusive, holders = pipeline.exclusive, []

    def taken_meanwhile(folder, *args, **kwargs):
        holders.append(hold_in_another_process(folder))
        (Path(folder) / "config.yaml").write_text("the other pipeline's")
        return real_exclusive(folder, *args, **kwargs)

    monkeypatch.setattr(pipeline, "exclusive", taken_meanwhile)
    config = pipeline.PipelineConfig(sources=["synth_msmt"], targets=["synth_duke"], teacher_arch="resnet_tiny",
                                     student_arch="osnet_tiny", root=str(synth_root), out=str(tmp_path / "run"),
                                     preset="quick")
    try:
        with pytest.raises(FolderInUse, match="is in use by another kdreid process"):
            pipeline.run(config)
        assert (tmp_path / "run" / "config.yaml").read_text() == "the other pipeline's"
        assert f"pid {holders[0].pid} " in (tmp_path / "run" / LOCK_FILE).read_text()
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()


def test_a_copy_a_killed_pipeline_left_half_written_goes_when_it_runs_again(synth_root, tmp_path, monkeypatch):
    # Killed while it copied a stage's model to RUN/student.pt: the temporary file (as large as the model) is removed
    # by the next run in that folder, as a training stage removes its own; another program's hidden files stay.
    def stop(config, resume):
        raise ConfigError("stopped at the first stage")

    _every_stage_runs(monkeypatch, stop)
    run = tmp_path / "run"
    run.mkdir()
    (run / ".student.pt.k2j4x9a1.kdreid-tmp").write_bytes(b"half a model")
    (run / ".notes").write_text("a user's")
    config = pipeline.PipelineConfig(sources=["synth_msmt"], targets=["synth_duke"], teacher_arch="resnet_tiny",
                                     student_arch="osnet_tiny", root=str(synth_root), out=str(run), preset="quick")
    with pytest.raises(ConfigError, match="stopped at the first stage"):
        pipeline.run(config)
    assert not (run / ".student.pt.k2j4x9a1.kdreid-tmp").exists() and (run / ".notes").read_text() == "a user's"


def test_a_pipeline_run_again_in_this_process_after_its_folder_went_writes_its_log(synth_root, tmp_path,
                                                                                    monkeypatch):
    # The first call fails before any stage keeps a model and removes the folder it made; the second (a notebook,
    # a seed script) must log to a log.txt of its own, not to the first's removed file.
    def stop(config, resume):
        raise ConfigError("stopped at the first stage")

    _every_stage_runs(monkeypatch, stop)
    config = pipeline.PipelineConfig(sources=["synth_msmt"], targets=["synth_duke"], teacher_arch="resnet_tiny",
                                     student_arch="osnet_tiny", root=str(synth_root), out=str(tmp_path / "run"),
                                     preset="quick")
    with pytest.raises(ConfigError):
        pipeline.run(config)
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()  # kept this time: a folder the call did not make
    with pytest.raises(ConfigError):
        pipeline.run(config)
    assert "pipeline synth_msmt -> synth_duke" in (tmp_path / "run" / "log.txt").read_text()


def test_a_pipeline_stopped_after_a_stage_kept_its_model_keeps_the_folder_it_made(synth_root, tmp_path,
                                                                                    monkeypatch):
    # Ctrl-C after the first stage of a new --out kept its model: that model (and the folder holding it) stays, to be
    # reused when the pipeline runs again. One stopped before any stage kept one removes what it made, parents too.
    def trained_then_stopped(config, resume):
        Path(config.out).mkdir(parents=True, exist_ok=True)
        torch.save({}, Path(config.out) / "model.pt")
        raise KeyboardInterrupt

    def stopped(config, resume):
        raise KeyboardInterrupt

    for runner, out in ((trained_then_stopped, tmp_path / "kept" / "run"), (stopped, tmp_path / "gone" / "run")):
        _every_stage_runs(monkeypatch, runner)
        config = pipeline.PipelineConfig(sources=["synth_msmt"], targets=["synth_duke"], teacher_arch="resnet_tiny",
                                         student_arch="osnet_tiny", root=str(synth_root), out=str(out),
                                         preset="quick")
        with pytest.raises(KeyboardInterrupt):
            pipeline.run(config)
    assert len(list((tmp_path / "kept" / "run" / "stages").rglob("model.pt"))) == 1
    assert (tmp_path / "kept" / "run" / "config.yaml").is_file()
    assert not (tmp_path / "gone").exists()


def test_a_missing_target_stops_the_pipeline_before_any_stage(synth_root, tmp_path, monkeypatch):
    calls = []
    _every_stage_runs(monkeypatch, lambda config, resume: calls.append(config.out))
    config = pipeline.PipelineConfig(sources=["synth_msmt"], targets=["synth_duke", "market1501"],
                                     root=str(synth_root), out=str(tmp_path / "run"), preset="quick")
    with pytest.raises(DatasetError, match="no market1501 data under"):
        pipeline.run(config)
    assert calls == [] and not (tmp_path / "run").exists()


def _table(tmp_path, **settings) -> tuple[list[str], dict]:
    config = _config(tmp_path, **settings)
    configs = pipeline.stage_configs(config)
    numbers = {t: {"mAP": 10.0, "rank1": 20.0} for t in TARGETS}
    finals = {name: numbers for name in configs}
    info = {"arch": "osnet_tiny", "parameters": 1e5, "macs": 1e6, "height": 64, "width": 32,
            "images_per_second": 100.0, "batch_size": 32, "device": "cpu"}
    rows = pipeline.table_rows(config, configs, finals, {t: numbers for t in TARGETS})
    table = pipeline.results_markdown(config, rows, info)
    return table.splitlines(), configs


def test_a_value_a_stage_could_not_measure_is_n_a_in_the_tables(tmp_path):
    # No valid query on a target: NaN in memory, null in a reused stage's metrics.json; neither is a number to print
    # ("nan") or to average, nor a crash formatting None.
    config = _config(tmp_path)
    configs = pipeline.stage_configs(config)
    unmeasured = {TARGETS[0]: {"mAP": None, "rank1": float("nan")}, **{t: {"mAP": 10.0, "rank1": 20.0}
                                                                      for t in TARGETS[1:]}}
    numbers = {t: {"mAP": 10.0, "rank1": 20.0} for t in TARGETS}
    info = {"arch": "osnet_tiny", "parameters": 1e5, "macs": 1e6, "height": 64, "width": 32,
            "images_per_second": 100.0, "batch_size": 32, "device": "cpu"}
    finals = {name: numbers for name in configs} | {"distill": unmeasured}
    rows = pipeline.table_rows(config, configs, finals, {t: numbers for t in TARGETS})
    student = [line for line in pipeline.results_markdown(config, rows, info).splitlines()
               if line.startswith("| KD-ReID student")][0].split(" | ")
    assert student[-2 * len(TARGETS) - 1:] == ["n/a", "n/a"] + ["10.0", "20.0"] * (len(TARGETS) - 1) + ["— |"]
    stage_table = results_table([{"model": "m", "dataset": TARGETS[0], "metrics": {"mAP": float("nan")}}], "last")
    assert "| m | " + TARGETS[0] + " | — | n/a | — |" in stage_table


def test_the_results_table_says_how_its_numbers_were_measured(tmp_path):
    # The pipeline's table is what a user quotes: its distance, protocol and CUHK03 boxes and split go with it, as
    # under each stage's own results.md.
    config = pipeline.PipelineConfig(sources=["synth_msmt"], targets=["synth_duke", "cuhk03"],
                                     teacher_arch="resnet_tiny", student_arch="osnet_tiny", root=str(tmp_path),
                                     out=str(tmp_path / "run"), preset="quick",
                                     common={"eval": {"metric": "cosine"}, "data": {"cuhk03_labeled": True}})
    configs = pipeline.stage_configs(config)
    numbers = {t: {"mAP": 10.0, "rank1": 20.0} for t in config.targets}
    info = {"arch": "osnet_tiny", "parameters": 1e5, "macs": 1e6, "height": 64, "width": 32,
            "images_per_second": 100.0, "batch_size": 32, "device": "cpu"}
    rows = pipeline.table_rows(config, configs, {name: numbers for name in configs},
                               {t: numbers for t in config.targets})
    lines = pipeline.results_markdown(config, rows, info, configs).splitlines()
    assert lines[-1] == ("Measured with cosine distances between embeddings; the market protocol for synth_duke, "
                         "cuhk03 (a query's gallery images of its identity in its camera left out; mAP and CMC as "
                         "torchreid computes them); cuhk03 labeled boxes, the 767/700 protocol.")


def test_each_results_row_names_its_own_grouping_and_selection(tmp_path):
    lines, configs = _table(tmp_path, adapt={"grouping": "oracle", "train": {"select": "target-clusters"}},
                            blend={"grouping": "tracklet", "train": {"select": "last"}})
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:3] for line in lines if line.startswith("| ")}
    assert rows["source only (resnet_tiny)"] == ["—", "last"]
    for target in TARGETS:
        assert rows[f"teacher {target} (D-MMD, resnet_tiny)"] == [pipeline.ORACLE_MARK, "target-clusters"]
    assert rows["blend (D-MMD on all targets, osnet_tiny)"] == ["tracklet", "last"]
    assert rows["KD-ReID student (osnet_tiny)"] == [f"tracklet; teachers {pipeline.ORACLE_MARK}", "last"]
    legend = lines[-1]
    assert "oracle: the targets' identity labels, an ablation" in legend
    assert "target-clusters: best label-free" in legend
    # metrics.json says it too: its student entry said "tracklet" alone, an oracle-taught student unmarked.
    training = pipeline.stage_training(configs, TARGETS)
    assert training["distill"] == {"grouping": "tracklet", "select": "last", "teacher_groupings": ["oracle"] * 2}
    assert training[f"teacher_{TARGETS[0]}"] == {"grouping": "oracle", "select": "target-clusters"}


def test_select_target_clusters_leaves_the_source_stages_their_last_epoch(tmp_path):
    configs = pipeline.stage_configs(_config(tmp_path, common={"train.select": "target-clusters"}))
    assert {name: c.train.select for name, c in configs.items()} == {
        "source_resnet_tiny": "last", "source_osnet_tiny": "last", "teacher_synth_duke": "target-clusters",
        "teacher_synth_cuhk": "target-clusters", "blend": "target-clusters", "distill": "target-clusters"}


def _resolved_by_cli(tmp_path, pipeline_config_of, yaml_settings: dict, *flags) -> pipeline.PipelineConfig:
    """The PipelineConfig `kdreid pipeline` hands to pipeline.run for these --config settings and flags."""
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(yaml.safe_dump(yaml_settings))
    return pipeline_config_of(["pipeline", "-s", "synth_msmt", "-t", *TARGETS, "--out", str(tmp_path / "run"),
                               "--config", str(config_file), *flags])


def test_cli_flags_win_over_the_config_file_in_every_stage(tmp_path, pipeline_config_of):
    settings = {"source": {"train": {"epochs": 5}}, "adapt": {"train": {"epochs": 6}},
                "blend": {"train": {"epochs": 7}}, "distill": {"train.epochs": 8, "train.seed": 3}}
    config = _resolved_by_cli(tmp_path, pipeline_config_of, settings, "--epochs", "1")
    configs = pipeline.stage_configs(config)
    assert {name: c.train.epochs for name, c in configs.items()} == dict.fromkeys(configs, 1)
    assert configs["distill"].train.seed == 3  # what no flag names still comes from the file
    # Without the flag the file's sections apply.
    configs = pipeline.stage_configs(_resolved_by_cli(tmp_path, pipeline_config_of, settings))
    assert [configs[n].train.epochs for n in ("source_resnet50", "teacher_synth_duke", "blend", "distill")] == [
        5, 6, 7, 8]


def test_a_preset_named_in_the_config_file_applies_its_pipeline_section(tmp_path, pipeline_config_of):
    config = _resolved_by_cli(tmp_path, pipeline_config_of, {"preset": "quick"})
    assert config.preset == "quick" and config.teacher_arch == PRESETS["quick"]["pipeline"]["teacher_arch"]
    overridden = _resolved_by_cli(tmp_path, pipeline_config_of, {"preset": "quick", "teacher_arch": "resnet34"})
    assert overridden.teacher_arch == "resnet34"
    # --preset wins over the file's.
    config = _resolved_by_cli(tmp_path, pipeline_config_of, {"preset": "quick"}, "--preset", "paper")
    assert config.preset == "paper" and config.teacher_arch == "resnet50"


def test_a_stage_whose_datasets_changed_is_trained_again_but_not_one_whose_data_moved(three_domains, tmp_path):
    """Data regenerated or re-extracted under the same names used to keep every finished stage (and its old
    numbers); each stage now records its datasets' files (datasets.json), and only content counts, not place."""
    shutil.copytree(three_domains, tmp_path / "data")  # a private copy (the fixture's links followed)

    def config(root):
        return pipeline.PipelineConfig(sources=["synth_msmt"], targets=TARGETS, teacher_arch="resnet_tiny",
                                       student_arch="osnet_tiny", root=str(root), out=str(tmp_path / "run"),
                                       preset="quick")

    configs = pipeline.stage_configs(config(tmp_path / "data"))
    _finish(configs)
    for stage_config in configs.values():  # what begin_stage records
        names = [*stage_config.sources, *stage_config.targets]
        datasets = load_datasets(names, stage_config.data.root)
        (Path(stage_config.out) / DATASETS_FILE).write_text(json.dumps(
            {d.name: dataset_fingerprint(d, stage_config.data.root) for d in datasets}))
    assert set(_actions(config(tmp_path / "data")).values()) == {"done"}

    (tmp_path / "data").rename(tmp_path / "moved")
    assert set(_actions(config(tmp_path / "moved")).values()) == {"done"}

    image = next((tmp_path / "moved" / "synth_cuhk" / "bounding_box_train").glob("*.jpg"))
    image.write_bytes(image.read_bytes() + b"\0")  # re-extracted: other bytes under the same name
    actions = _actions(config(tmp_path / "moved"))
    assert [name for name, action in actions.items() if action == "fresh"] == [
        "teacher_synth_cuhk", "blend", "distill"]
    state = pipeline.stage_state(pipeline.stage_configs(config(tmp_path / "moved"))["blend"])
    assert state.reason == (f"dataset synth_cuhk under {tmp_path / 'moved'} holds other files than it was trained "
                            "on (regenerated or re-extracted)")


def test_a_stage_whose_query_or_gallery_changed_is_evaluated_again_not_trained_again(three_domains, tmp_path):
    """A failed evaluation (an undecodable gallery image) tells to replace the image and resume: the pipeline then
    took the stage for one trained on other data and removed it, checkpoint and all."""
    shutil.copytree(three_domains, tmp_path / "data")
    configs = pipeline.stage_configs(pipeline.PipelineConfig(
        sources=["synth_msmt"], targets=TARGETS, teacher_arch="resnet_tiny", student_arch="osnet_tiny",
        root=str(tmp_path / "data"), out=str(tmp_path / "run"), preset="quick"))
    blend = configs["blend"]
    folder = Path(blend.out)
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.yaml").write_text(dump_yaml(blend))
    (folder / "checkpoints" / "last.pt").write_bytes(b"state")  # trained, its evaluation pending
    datasets = load_datasets([*blend.sources, *blend.targets], blend.data.root)
    (folder / DATASETS_FILE).write_text(json.dumps({d.name: dataset_fingerprint(d, blend.data.root)
                                                    for d in datasets}))
    image = next((tmp_path / "data" / "synth_cuhk" / "bounding_box_test").glob("*.jpg"))
    image.write_bytes(image.read_bytes() + b"\0")  # the undecodable image, replaced
    state = pipeline.stage_state(blend)
    assert state.action == "resume" and state.reason == (
        f"the query/gallery of dataset synth_cuhk under {tmp_path / 'data'} hold other files than it was evaluated "
        "on; same weights, evaluated again")
    # Finished, its numbers are the old files': resumed too (no epoch left), it measures them again; without its
    # checkpoint only a new run can.
    torch.save({}, folder / "model.pt")
    (folder / "metrics.json").write_text(json.dumps({"final": {}}))
    assert pipeline.stage_state(blend).action == "resume"
    (folder / "checkpoints" / "last.pt").rename(folder / "checkpoints" / "kept.pt")
    assert pipeline.stage_state(blend).reason.endswith("evaluated on, and it has no training checkpoint")
    (folder / "checkpoints" / "kept.pt").rename(folder / "checkpoints" / "last.pt")
    # A record of an earlier kdreid holds one digest of every split: any change counts as new training images.
    record = json.loads((folder / DATASETS_FILE).read_text())
    (folder / DATASETS_FILE).write_text(json.dumps({name: value.split("/")[0] for name, value in record.items()}))
    (folder / "model.pt").unlink()
    assert "holds other files than it was trained on" in pipeline.stage_state(blend).reason
    # ...and its digest is still the whole part of today's: an upgrade retrains nothing.
    now = {d.name: dataset_fingerprint(d, blend.data.root).split("/")[0]
           for d in load_datasets([*blend.sources, *blend.targets], blend.data.root)}
    (folder / DATASETS_FILE).write_text(json.dumps(now))
    assert pipeline.stage_state(blend).reason == "interrupted, same weight settings and inputs"


def test_the_cached_evaluation_on_every_target_is_redone_when_a_target_changed(three_domains, tmp_path, monkeypatch):
    """teacher_synth_duke is reused when synth_cuhk changes, but its synth_cuhk numbers must not be the old data's."""
    shutil.copytree(three_domains, tmp_path / "data")
    configs = pipeline.stage_configs(pipeline.PipelineConfig(
        sources=["synth_msmt"], targets=TARGETS, teacher_arch="resnet_tiny", student_arch="osnet_tiny",
        root=str(tmp_path / "data"), out=str(tmp_path / "run"), preset="quick"))
    _finish(configs)
    evaluated = []
    monkeypatch.setattr(pipeline, "load_checkpoint", lambda path: torch.nn.Identity())
    monkeypatch.setattr(pipeline, "evaluate_datasets", lambda model, datasets, *rest: evaluated.append(
        [d.name for d in datasets]) or {d.name: {"mAP": float(len(evaluated))} for d in datasets})
    log, _ = _logger()

    def evaluate():
        return pipeline.evaluate_on_targets("teacher_synth_duke", configs["teacher_synth_duke"], TARGETS, log,
                                            pipeline.DatasetFingerprints())

    assert evaluate()["synth_cuhk"] == {"mAP": 1.0}
    assert evaluate()["synth_cuhk"] == {"mAP": 1.0} and len(evaluated) == 1  # cached
    image = next((tmp_path / "data" / "synth_cuhk" / "bounding_box_test").glob("*.jpg"))
    image.write_bytes(image.read_bytes() + b"\0")
    assert evaluate()["synth_cuhk"] == {"mAP": 2.0} and len(evaluated) == 2
    cache = Path(configs["teacher_synth_duke"].out) / "all_targets.json"
    cache.write_bytes(cache.read_bytes()[:10])  # damaged: computed again (it was a JSONDecodeError traceback)
    assert evaluate()["synth_cuhk"] == {"mAP": 3.0} and len(evaluated) == 3


def test_a_finished_stage_with_damaged_files_is_not_reused(tmp_path):
    # A truncated copy: metrics.json or model.pt of a finished stage made every pipeline run stop (a traceback, or
    # "copy it again" with nothing to copy); datasets.json damaged made the data check pass silently.
    configs = pipeline.stage_configs(_config(tmp_path))
    _finish(configs)
    folder = Path(configs["blend"].out)
    (folder / "metrics.json").write_text('{"final": {"synth_d')
    state = pipeline.stage_state(configs["blend"])
    assert state.action == "fresh" and state.reason.startswith(f"{folder / 'metrics.json'} is damaged")
    # With its training checkpoint it only writes them again: a resume with no epoch left.
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "last.pt").write_bytes(b"state")
    state = pipeline.stage_state(configs["blend"])
    assert state.action == "resume" and state.reason.endswith("; its checkpoint writes them again")
    (folder / "metrics.json").write_text(json.dumps({"final": {}}))
    (folder / "model.pt").write_bytes(b"PK\x03\x04 cut")
    assert pipeline.stage_state(configs["blend"]).action == "resume"
    torch.save({}, folder / "model.pt")
    assert pipeline.stage_state(configs["blend"]).action == "done"
    (folder / DATASETS_FILE).write_text('{"synth_ms')
    state = pipeline.stage_state(configs["blend"])
    assert state.action == "fresh"
    assert state.reason == f"its {DATASETS_FILE} is damaged: the data it trained on are unknown"


def test_a_fingerprint_does_not_depend_on_how_the_root_is_spelled(three_domains, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(three_domains.parent))
    spelled = f"~/{three_domains.name}"
    expected = dataset_fingerprint(load_datasets(["synth_cuhk"], str(three_domains))[0], str(three_domains))
    for cwd in (tmp_path, three_domains):
        monkeypatch.chdir(cwd)
        assert dataset_fingerprint(load_datasets(["synth_cuhk"], spelled)[0], spelled) == expected


def test_a_bad_stage_setting_names_the_sections_it_can_come_from(tmp_path):
    with pytest.raises(ConfigError, match=r"^adapt\.grouping: 'psuedo' is not one of .* \(set in the --config "
                                          r"file's `common` or `adapt` section, or by a flag\)$"):
        pipeline.stage_configs(_config(tmp_path, adapt={"grouping": "psuedo"}))
    with pytest.raises(ConfigError, match=r"^blend\.dmmd_weight: expected a number, got 'x' \(set in the --config "
                                          r"file's `common`, `adapt` or `blend` section"):
        pipeline.stage_configs(_config(tmp_path, blend={"dmmd_weight": "x"}))
    # A value the stage would refuse when it starts (after the earlier stages trained) is refused here.
    with pytest.raises(ConfigError, match=r"^train\.augment\.flip is a probability, from 0 to 1; got 2\.0 \(set in "
                                          r"the --config file's `common` or `distill` section"):
        pipeline.stage_configs(_config(tmp_path, distill={"train": {"augment": {"flip": 2.0}}}))


def test_a_misspelt_preset_in_the_config_file_is_refused_even_when_the_flag_names_one(tmp_path):
    (tmp_path / "c.yaml").write_text("preset: quik\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown preset 'quik'; known: paper, quick"):
        pipeline.resolve_pipeline_config(preset="quick", config_file=str(tmp_path / "c.yaml"))


def test_paths_are_compared_as_the_files_they_name():
    from kdreid.stages.loop import absolute_path_setting

    assert absolute_path_setting(["None", "ImageNet", ""]) == ["None", "ImageNet", ""]  # names, in any case


def test_a_teacher_named_through_a_link_is_the_same_setting(tmp_path, monkeypatch):
    from kdreid.stages.distill import DistillConfig
    from kdreid.stages.loop import changed_settings

    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "t.pt").write_bytes(b"")
    (tmp_path / "runs").symlink_to(tmp_path / "store")
    monkeypatch.chdir(tmp_path)
    saved = yaml.safe_load(dump_yaml(DistillConfig(teachers=[str(tmp_path / "store" / "t.pt")], out="run")))
    assert changed_settings(saved, DistillConfig(teachers=["runs/t.pt"], out=str(tmp_path / "run"))) == {}
    assert set(changed_settings(saved, DistillConfig(teachers=["other.pt"], out="run"))) == {"teachers"}


def test_split_id_without_cuhk03_is_refused_before_any_work(synth_root, tmp_path, capsys):
    for command in (["train-source", "-s", "synth_msmt"], ["pipeline", "-s", "synth_msmt", "-t", "synth_duke"]):
        assert main([*command, "--root", str(synth_root), "--out", str(tmp_path / "run"), "--split-id", "3"]) == 2
        assert "kdreid: error: --split-id 3 applies only to -s/-t cuhk03; leave it out" in capsys.readouterr().err
        assert not (tmp_path / "run").exists()


def test_the_pipeline_saves_its_data_root_absolute(synth_root, tmp_path, monkeypatch):
    class Stop(Exception):
        pass

    def stop(config, resume):
        raise Stop

    _every_stage_runs(monkeypatch, stop)
    monkeypatch.chdir(synth_root.parent)
    config = pipeline.PipelineConfig(sources=["synth_msmt"], targets=["synth_duke"], root=synth_root.name,
                                     out=str(tmp_path / "run"), preset="quick")
    with pytest.raises(Stop):
        pipeline.run(config)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["root"] == str(synth_root)


@pytest.mark.parametrize("section, message", [
    ({"adapt": {"dmmd_weight": -1.0}}, "--dmmd-weight must be 0 (a control run) or positive, got -1.0"),
    ({"distill": {"lkdt_weight": float("nan")}}, "--lkdt-weight must be 0 or positive, got nan"),
    ({"adapt": {"histogram_images": -5}}, "histogram_images is a number of images per domain, 0 or more; got -5"),
    ({"distill": {"histogram_images": -5}}, "histogram_images is a number of images per target, 0 or more; got -5"),
    # The source stages' own settings, and those every stage shares, are checked before the first stage too.
    ({"source": {"label_smoothing": 1.5}}, "label_smoothing must be in [0, 1), got 1.5 (set in the --config file's "
                                           "`common` or `source` section, or by a flag)"),
    ({"source": {"triplet_margin": float("inf")}}, "triplet_margin must be a finite number, got inf"),
    ({"common": {"train": {"optim": {"scheduler": "multistep", "gamma": -1.0}}}},
     "train.optim.gamma must be positive (the factor of each decay), got -1.0"),
    ({"common": {"eval": {"batch_size": 0}}}, "eval.batch_size must be at least 1 (images), got 0"),
    ({"adapt": {"pseudo": {"eps": -0.6}}}, "pseudo.eps must be a positive distance, got -0.6"),
    ({"distill": {"train.optim.warmup_epochs": -5}}, "train.optim.warmup_epochs must be 0 (no warm-up) or more, "
                                                     "got -5 (set in the --config file's `common` or `distill`"),
])
def test_a_stage_setting_no_run_can_use_stops_the_pipeline_before_the_first_stage(tmp_path, section, message):
    # Checked when the stage began, after the earlier stages had trained (hours).
    with pytest.raises(ConfigError, match=re.escape(message)):
        pipeline.stage_configs(_config(tmp_path, **section))


def test_the_pipeline_command_refuses_a_stage_setting_no_run_can_use_before_its_run_folder(synth_root, tmp_path,
                                                                                        capsys):
    (tmp_path / "c.yaml").write_text("source: {label_smoothing: 1.5}\n")
    assert main(["pipeline", "-s", "synth_msmt", "-t", "synth_duke", "--root", str(synth_root), "--out",
                 str(tmp_path / "run"), "--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert err == ("kdreid: error: label_smoothing must be in [0, 1), got 1.5 (set in the --config file's `common` or "
                   "`source` section, or by a flag)\n")
    assert not (tmp_path / "run").exists()


def test_pipeline_pretrained_starts_both_source_trainings_from_imagenet(tmp_path, monkeypatch):
    class Resolved(Exception):
        pass

    looked_up = []
    monkeypatch.setattr("kdreid.models.weights.resolve_imagenet", lambda spec, **_: looked_up.append(spec.name))
    def run(config):
        raise Resolved(pipeline.stage_configs(config))

    monkeypatch.setattr(pipeline, "run", run)
    config_file = tmp_path / "c.yaml"
    config_file.write_text("source: {pretrained: none, train: {epochs: 2}}\n")
    with pytest.raises(Resolved) as resolved:
        main(["pipeline", "-s", "synth_msmt", "-t", "synth_duke", "--root", str(tmp_path), "--out",
              str(tmp_path / "r"), "--teacher-arch", "resnet_tiny", "--student-arch", "osnet_tiny", "--config",
              str(config_file), "--pretrained", "imagenet"])
    configs = resolved.value.args[0]
    assert [configs[f"source_{arch}"].pretrained for arch in ("resnet_tiny", "osnet_tiny")] == ["imagenet"] * 2
    assert looked_up == ["resnet_tiny", "osnet_tiny"]  # each file found before the first stage trains
    assert configs["source_resnet_tiny"].train.epochs == 2 and configs["distill"].pretrained == "none"


def test_without_the_blend_baseline_no_blend_stage_runs_and_no_row_shows_it(three_domains, tmp_path, monkeypatch):
    """--no-blend-baseline: the stages train as before but the blend, and the table, metrics.json and bars say
    nothing of it. The stages are stand-ins that write a real tiny model: the pipeline evaluates each one."""
    from kdreid.models import build_model, save_checkpoint

    trained = []

    def stand_in(config, resume):
        folder = Path(config.out)
        folder.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        save_checkpoint(folder / "model.pt", build_model(config.arch, num_classes=0).eval(),
                        extra={"input_size": [64, 32]})
        trained.append(folder.name)
        return SimpleNamespace(final={t: {"mAP": 1.0, "rank1": 2.0} for t in config.targets})

    _every_stage_runs(monkeypatch, stand_in)
    config = _config(three_domains, blend_baseline=False, blend={"train.epochs": 3})
    config.out = str(tmp_path / "run")
    result = pipeline.run(config)
    assert trained == ["source_resnet_tiny", "source_osnet_tiny", "teacher_synth_duke", "teacher_synth_cuhk",
                       "distill"]
    assert "blend" not in result.metrics and set(result.metrics["student"]) == set(TARGETS)
    # How each stage trained, in metrics.json: no target grouping for the source stages (None, not the table's dash).
    assert result.metrics["training"] == {
        **{f"source_{arch}": {"grouping": None, "select": "last"} for arch in ("resnet_tiny", "osnet_tiny")},
        **{f"teacher_{t}": {"grouping": "tracklet", "select": "last"} for t in TARGETS},
        "distill": {"grouping": "tracklet", "select": "last", "teacher_groupings": ["tracklet"] * len(TARGETS)}}
    table = (tmp_path / "run" / "results.md").read_text()
    assert "blend" not in table and "KD-ReID student (osnet_tiny)" in table
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "no blend baseline (blend_baseline: false)" in log and "the `blend` section of its settings is unused" in log
    # The flag and the --config key set it; the default keeps the blend.
    assert "blend" in pipeline.stage_configs(_config(tmp_path))


def test_the_blend_baseline_flag_and_config_key(tmp_path, pipeline_config_of):
    assert _resolved_by_cli(tmp_path, pipeline_config_of, {}).blend_baseline is True
    assert _resolved_by_cli(tmp_path, pipeline_config_of, {}, "--no-blend-baseline").blend_baseline is False
    assert _resolved_by_cli(tmp_path, pipeline_config_of, {"blend_baseline": False}).blend_baseline is False
    assert _resolved_by_cli(tmp_path, pipeline_config_of, {"blend_baseline": False}, "--blend-baseline").blend_baseline


def test_an_architecture_that_cannot_run_stops_the_pipeline_before_the_first_stage(synth_root, tmp_path, capsys,
                                                                                   monkeypatch):
    """Found by a review: an unknown --student-arch failed after the teachers' source stage had trained, and a
    first stage that failed left the pipeline's folder (config.yaml, log.txt) behind."""
    calls = []
    _every_stage_runs(monkeypatch, lambda config, resume: calls.append(config.out))
    common = ["pipeline", "-s", "synth_msmt", "-t", "synth_duke", "--root", str(synth_root), "--preset", "quick",
              "--teacher-arch", "resnet_tiny", "--out", str(tmp_path / "run")]
    assert main([*common, "--student-arch", "osnet_huge"]) == 2
    assert "unknown model 'osnet_huge'" in capsys.readouterr().err
    assert main([*common, "--student-arch", "osnet_tiny", "--height", "8", "--width", "4"]) == 2
    assert "cannot take 8x4 images" in capsys.readouterr().err
    assert calls == [] and not (tmp_path / "run").exists()

    def failing(config, resume):
        raise DatasetError("a bad input in the first stage")

    _every_stage_runs(monkeypatch, failing)
    assert main([*common, "--student-arch", "osnet_tiny"]) == 2
    assert not (tmp_path / "run").exists()

    def terminated(config, resume):  # SIGTERM before the first stage's training handles signals
        signal.raise_signal(signal.SIGTERM)

    _every_stage_runs(monkeypatch, terminated)
    assert main([*common, "--student-arch", "osnet_tiny"]) == 143
    assert not (tmp_path / "run").exists()


def test_a_folder_another_process_made_after_joining_is_still_one_this_pipeline_made(synth_root, tmp_path,
                                                                                        monkeypatch):
    # Under torchrun the other processes make the pipeline's folder (RunDir) once every process has joined: the main
    # one looked at it after joining, found it there, and kept the config.yaml and log.txt of a pipeline whose first
    # stage failed, as if the folder had been there before.
    from kdreid import distributed

    out = tmp_path / "run"

    def joined(device):
        out.mkdir()  # another process, faster past the join than the main one
        return False

    monkeypatch.setattr(distributed, "init", joined)

    def failing(config, resume):
        raise DatasetError("a bad input in the first stage")

    _every_stage_runs(monkeypatch, failing)
    assert main(["pipeline", "-s", "synth_msmt", "-t", "synth_duke", "--root", str(synth_root), "--preset", "quick",
                 "--teacher-arch", "resnet_tiny", "--student-arch", "osnet_tiny", "--out", str(out)]) == 2
    assert not out.exists()


def test_stage_settings_the_pipeline_decides_are_named_not_silently_dropped(tmp_path, capsys):
    config = _config(tmp_path, distill={"teachers": ["a.pt", "b.pt"]}, common={"out": "/tmp/elsewhere"},
                     blend={"targets": ["synth_duke"]})
    configs = pipeline.stage_configs(config)
    err = capsys.readouterr().err
    assert configs["distill"].teachers[0].endswith("teacher_synth_duke/model.pt")
    for key in ("teachers", "out", "targets"):
        assert err.count(f"kdreid: warning: the pipeline sets {key} of its stages itself") == 1, err


def test_a_pipeline_section_in_a_pipeline_config_says_where_its_keys_go(tmp_path):
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text("pipeline: {teacher_arch: resnet18}\n")
    with pytest.raises(ConfigError, match=r"a `pipeline:` section is how presets are written; in a pipeline's "
                                          r"--config its keys \(teacher_arch\) go at the top level"):
        pipeline.resolve_pipeline_config(config_file=str(config_file))


def test_the_top_level_copies_of_stages_no_longer_run_are_removed(tmp_path, caplog):
    """Found by a review: after a target was left out of -t, its teacher_T.pt stayed beside the new run's models,
    to be deployed as one of them. A copy goes only while its stage still holds the model; a file the stages do
    not hold is named, not removed."""
    run = tmp_path / "run"
    for stage in ("teacher_a", "teacher_b", "source_resnet50", "source_resnet18"):
        (run / "stages" / stage).mkdir(parents=True)
        (run / "stages" / stage / "model.pt").write_bytes(stage.encode())
        (run / f"{stage}.pt").write_bytes(stage.encode())
    (run / "teacher_c.pt").write_bytes(b"no stage holds this one")
    with caplog.at_level(logging.INFO):
        pipeline.remove_stale_copies(run, ["teacher_a", "source_resnet50"], logging.getLogger("test"))
    assert sorted(p.name for p in run.glob("*.pt")) == ["source_resnet50.pt", "teacher_a.pt", "teacher_c.pt"]
    assert (run / "stages" / "teacher_b" / "model.pt").is_file()
    assert any("teacher_c.pt is not a model of this command's stages" in m for m in caplog.messages)


def test_missing_imagenet_weights_name_a_way_out_each_command_takes(synth_root, tmp_path, monkeypatch, capsys):
    """Found by a review: the pipeline's message said to pass --pretrained PATH, which the pipeline refuses (its
    --pretrained is none or imagenet)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    common = ["-s", "synth_msmt", "--root", str(synth_root), "--pretrained", "imagenet", "--out"]
    assert main(["pipeline", *common, str(tmp_path / "p"), "-t", "synth_duke", "--preset", "quick"]) == 2
    err = capsys.readouterr().err
    assert "ImageNet weights for resnet18 not found" in err and err.rstrip().endswith(
        "or pass --pretrained none (both source stages then start from random weights)")
    assert main(["train-source", *common, str(tmp_path / "s"), "-a", "resnet18"]) == 2
    assert "or pass --pretrained PATH (a state dict in its layout" in capsys.readouterr().err
    assert not (tmp_path / "p").exists() and not (tmp_path / "s").exists()


def test_a_section_cannot_move_a_stage_off_the_pipelines_data_root(tmp_path, capsys):
    """A review: `data.root` in a stage section, said to be unused, would have won over --root had the pipeline
    only filled it in when missing."""
    configs = pipeline.stage_configs(_config(tmp_path, common={"data.root": "/elsewhere"},
                                             distill={"data": {"root": "/nowhere"}}))
    assert {c.data.root for c in configs.values()} == {str(tmp_path)}
    assert capsys.readouterr().err.count("the pipeline sets data.root of its stages itself") == 1


def test_a_copied_run_folder_reuses_its_stages(tmp_path):
    """The input models' paths (init, student_init, teachers) are the pipeline's wiring: a run folder copied or moved
    elsewhere names other paths in every stage, and keeps every stage."""
    _finish(pipeline.stage_configs(_config(tmp_path)))
    shutil.copytree(tmp_path / "run", tmp_path / "moved", copy_function=shutil.copy2)  # times kept
    moved = _config(tmp_path)
    moved.out = str(tmp_path / "moved")
    assert set(_actions(moved).values()) == {"done"}


def _counting_evaluation(monkeypatch):
    evaluated = []
    monkeypatch.setattr(pipeline, "load_checkpoint", lambda path: torch.nn.Identity())
    monkeypatch.setattr(pipeline, "evaluate_datasets", lambda model, datasets, *rest: evaluated.append(
        [d.name for d in datasets]) or {d.name: {"mAP": float(len(evaluated))} for d in datasets})
    return evaluated


def test_the_cached_evaluation_on_every_target_is_redone_for_a_newer_model_or_another_flip(three_domains, tmp_path,
                                                                                          monkeypatch):
    """A review: a teacher retrained (its model.pt newer than the cache) kept the old model's numbers on every
    target, and so did a changed `eval.flip`, had either been left out of the cache's check."""
    import os

    def configs_of(**settings):
        config = _config(three_domains, **settings)
        config.out = str(tmp_path / "run")
        return pipeline.stage_configs(config)

    configs = configs_of()
    _finish(configs)
    evaluated = _counting_evaluation(monkeypatch)
    log, _ = _logger()

    def evaluate(stage_config):
        return pipeline.evaluate_on_targets("teacher_synth_duke", stage_config, TARGETS, log,
                                            pipeline.DatasetFingerprints())

    teacher = configs["teacher_synth_duke"]
    assert evaluate(teacher)["synth_cuhk"] == {"mAP": 1.0}
    assert evaluate(teacher)["synth_cuhk"] == {"mAP": 1.0} and len(evaluated) == 1  # cached
    cache = Path(teacher.out) / "all_targets.json"
    older = (Path(teacher.out) / "model.pt").stat().st_mtime_ns - 10**10
    os.utime(cache, ns=(older, older))  # the model trained again after the cache was written
    assert evaluate(teacher)["synth_cuhk"] == {"mAP": 2.0} and len(evaluated) == 2
    flipped = configs_of(common={"eval.flip": not teacher.eval.flip})["teacher_synth_duke"]
    assert evaluate(flipped)["synth_cuhk"] == {"mAP": 3.0} and len(evaluated) == 3
    assert evaluate(flipped)["synth_cuhk"] == {"mAP": 3.0} and len(evaluated) == 3


def test_each_results_cell_is_its_rows_own_number(tmp_path):
    """A review: the table's cells were only checked for their grouping and selection; a rank-1 cell showing mAP,
    a mean over rank-1, or a teacher row showing its own target only went unnoticed. Every number differs here,
    and the cells are compared with the mappings they come from."""
    config = _config(tmp_path)
    configs = pipeline.stage_configs(config)

    def numbers(seed):
        return {t: {"mAP": seed + 1.3 * i, "rank1": seed + 50.5 + i} for i, t in enumerate(TARGETS)}

    finals = {name: numbers(3.0 * k) for k, name in enumerate(configs)}
    teacher_all = {t: numbers(20.0 + 2.0 * i) for i, t in enumerate(TARGETS)}
    finals.update({f"teacher_{t}": {t: teacher_all[t][t]} for t in TARGETS})  # a teacher's own stage: its target
    info = {"arch": "osnet_tiny", "parameters": 1e5, "macs": 1e6, "height": 64, "width": 32,
            "images_per_second": 100.0, "batch_size": 32, "device": "cpu"}
    table = pipeline.results_markdown(config, pipeline.table_rows(config, configs, finals, teacher_all), info)
    lines = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == ["model", "grouping", "selection", *[f"{t} {m}" for t in TARGETS for m in ("mAP", "R1")],
                      "mean mAP"]
    expected = {"source only (resnet_tiny)": finals["source_resnet_tiny"],
                "source only (osnet_tiny)": finals["source_osnet_tiny"],
                **{f"teacher {t} (D-MMD, resnet_tiny)": teacher_all[t] for t in TARGETS},
                "blend (D-MMD on all targets, osnet_tiny)": finals["blend"],
                "KD-ReID student (osnet_tiny)": finals["distill"]}
    rows = {cells[0]: cells[3:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])}
    assert list(rows) == list(expected)
    for label, per_target in expected.items():
        want = [f"{per_target[t][m]:.1f}" for t in TARGETS for m in ("mAP", "rank1")]
        want.append(f"{sum(per_target[t]['mAP'] for t in TARGETS) / len(TARGETS):.1f}")
        assert rows[label] == want, label


def test_images_per_second_counts_images_over_the_time_they_took(monkeypatch):
    calls = []

    class Counting(torch.nn.Module):
        def forward(self, images):
            calls.append(images.shape)
            return images

    clock = iter([10.0, 10.25, 10.5, 10.75, 11.0, 11.25])  # a quarter second per timed batch
    monkeypatch.setattr(pipeline, "time", SimpleNamespace(perf_counter=lambda: next(clock)))  # pipeline's clock only
    speed = pipeline.images_per_second(Counting(), 8, 4, torch.device("cpu"), batch_size=3, seconds=1.0)
    # One warm-up batch, then four timed ones of 3 images in 1.0 s.
    assert len(calls) == 5 and calls[0] == (3, 3, 8, 4) and speed == pytest.approx(12.0)


def test_a_pipeline_that_fails_in_a_folder_it_did_not_make_leaves_that_folder(synth_root, tmp_path, monkeypatch):
    """A failed first stage removes the pipeline folder only when this call made it: an existing --out (a user's
    folder, an earlier call's config.yaml and log) stays."""
    def failing(config, resume):
        raise DatasetError("a bad input in the first stage")

    _every_stage_runs(monkeypatch, failing)
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    config = pipeline.PipelineConfig(sources=["synth_msmt"], targets=["synth_duke"], teacher_arch="resnet_tiny",
                                     student_arch="osnet_tiny", root=str(synth_root), out=str(out), preset="quick")
    with pytest.raises(DatasetError, match="a bad input"):
        pipeline.run(config)
    assert (out / "notes.txt").read_text() == "mine"


def test_a_top_level_copy_whose_stage_holds_another_model_is_kept(tmp_path, caplog):
    """remove_stale_copies removes a copy only while its stage folder holds the same model: a stage trained again
    since leaves the copy, the only file of that model, where it is, and names it — also when the retrained model
    has the same size, as a checkpoint of the same architecture has (found by a review: sizes were compared)."""
    run = tmp_path / "run"
    (run / "stages" / "teacher_b").mkdir(parents=True)
    (run / "stages" / "teacher_c").mkdir(parents=True)
    (run / "stages" / "teacher_b" / "model.pt").write_bytes(b"retrained since, a longer file")
    (run / "teacher_b.pt").write_bytes(b"the model copied")
    (run / "stages" / "teacher_c" / "model.pt").write_bytes(b"weights after --resume")
    (run / "teacher_c.pt").write_bytes(b"weights of the copy!!!")
    with caplog.at_level(logging.INFO):
        pipeline.remove_stale_copies(run, ["teacher_a"], logging.getLogger("test"))
    assert (run / "teacher_b.pt").read_bytes() == b"the model copied"
    assert (run / "teacher_c.pt").read_bytes() == b"weights of the copy!!!"
    for name in ("teacher_b", "teacher_c"):
        assert any(f"{name}.pt is not a model of this command's stages" in m for m in caplog.messages)


def test_a_stage_section_wins_over_common_and_the_blend_over_adapt(tmp_path):
    """A review: `common` applied after the stage sections (it is the lower layer) went unnoticed, every test
    setting a key in one of them only."""
    configs = pipeline.stage_configs(_config(tmp_path, common={"train.epochs": 4, "train.seed": 1},
                                             source={"train": {"epochs": 5}}, adapt={"train.epochs": 6},
                                             blend={"train": {"epochs": 7}}, distill={"train.epochs": 8}))
    assert {name: c.train.epochs for name, c in configs.items()} == {
        "source_resnet_tiny": 5, "source_osnet_tiny": 5, "teacher_synth_duke": 6, "teacher_synth_cuhk": 6,
        "blend": 7, "distill": 8}
    assert {c.train.seed for c in configs.values()} == {1}  # what no section names comes from `common`


def test_the_student_is_counted_without_any_of_its_classifiers():
    """metrics.json's parameters of the deployed student: a multi-head student's per-target classifiers go with
    the single head's classifier (a review: only `classifier` was left out of the count in a mutant)."""
    from kdreid.models import build_model, count_parameters

    retrieval = count_parameters(build_model("osnet_tiny", 0))
    assert pipeline.deployed_parameters(build_model("osnet_tiny", 7)) == retrieval
    assert pipeline.deployed_parameters(build_model("osnet_tiny", [7, 9, 11])) == retrieval


@pytest.mark.parametrize("section", ["common", "source", "adapt", "blend", "distill", "overrides"])
def test_a_stage_section_that_is_not_a_mapping_is_one_config_error(tmp_path, section):
    with pytest.raises(ConfigError, match=f"pipeline setting '{section}' must be a mapping of stage settings"):
        _config(tmp_path, **{section: ["train.epochs", 3]}).validate()


def test_a_metrics_file_whose_final_entry_is_not_a_table_is_damaged(tmp_path):
    """Read as the stage's numbers, a list there stopped the pipeline later with a traceback."""
    configs = pipeline.stage_configs(_config(tmp_path))
    _finish(configs)
    folder = Path(configs["blend"].out)
    (folder / "metrics.json").write_text('{"final": [1, 2]}')
    state = pipeline.stage_state(configs["blend"])
    assert state.action == "fresh" and state.reason.startswith(f"{folder / 'metrics.json'} is damaged (TypeError)")


def test_a_stage_stopped_before_its_after_picture_data_resumes_to_write_it(tmp_path):
    """Found by a review: adapt and distill write their 'after' picture data (distances_after.npz,
    kd_distances_after.npz) after model.pt and metrics.json; a pipeline stopped in between reused the stage as
    finished for ever, and `kdreid report` called it unfinished. Resumed from its checkpoint, it trains nothing."""
    configs = pipeline.stage_configs(_config(tmp_path))
    _finish(configs)
    for name, prefix in (("teacher_synth_duke", "distances"), ("blend", "distances"), ("distill", "kd_distances")):
        folder = Path(configs[name].out)
        (folder / f"{prefix}_before.npz").write_bytes(b"")
        assert pipeline.stage_state(configs[name]).action == "done"  # no checkpoint to write it from: kept as is
        (folder / "checkpoints").mkdir()
        (folder / "checkpoints" / "last.pt").write_bytes(b"state")
        state = pipeline.stage_state(configs[name])
        assert state.action == "resume" and f"{folder / prefix}_after.npz is missing" in state.reason
        (folder / f"{prefix}_after.npz").write_bytes(b"")
        assert pipeline.stage_state(configs[name]).action == "done"
