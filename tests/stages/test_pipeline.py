"""`kdreid pipeline`: a tiny end-to-end run on CPU (two targets, one epoch per stage), its files, and stage reuse
(finished stages are skipped, an interrupted one resumes, a changed config or a retrained input reruns)."""

import json
import logging
import os
from pathlib import Path

import pytest
import torch
import yaml

from kdreid.cli import main
from kdreid.data.datasets import build_dataset
from kdreid.evaluation.features import evaluate_model
from kdreid.config import dump_yaml
from kdreid.models import build_model, count_macs, count_parameters, load_checkpoint
from kdreid.stages import pipeline
from kdreid.stages.presets import PRESETS

TARGETS = ["synth_duke", "synth_cuhk"]
STAGES = ["source_resnet_tiny", "source_osnet_tiny", "teacher_synth_duke", "teacher_synth_cuhk", "blend", "distill"]
TINY = ["--epochs", "1", "--batch-size", "16", "--num-instances", "4", "--height", "64", "--width", "32",
        "--device", "cpu", "--seed", "0"]



def _args(root, out, config_file, *extra):
    return ["pipeline", "-s", "synth_msmt", "-t", *TARGETS, "--root", str(root), "--teacher-arch", "resnet_tiny",
            "--student-arch", "osnet_tiny", "--out", str(out), "--config", str(config_file), *TINY, *extra]


def _config_file(folder: Path, distill: dict) -> Path:
    # D-MMD from the first epoch, so that the one-epoch teachers and blend really train with it.
    path = folder / f"pipeline_{len(list(folder.glob('pipeline_*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump({"adapt": {"dmmd_start": 0}, "distill": distill}))
    return path


def _model_mtimes(out: Path) -> dict[str, int]:
    return {name: (out / "stages" / name / "model.pt").stat().st_mtime_ns for name in STAGES}


def test_pipeline_end_to_end_then_stage_reuse(three_domains, tmp_path, capsys):
    # One test (not several sharing a fixture) so that `pytest -n 2` never trains the pipeline twice.
    out = tmp_path / "run"
    config_file = _config_file(tmp_path, {"target_order": "fixed"})
    assert main(_args(three_domains, out, config_file)) == 0
    _check_outputs(out)
    # Its log.txt and every stage's are closed as the call returns (a long-lived process keeps none open).
    held = [h for path in [out, *(out / "stages").iterdir()]
            for h in logging.getLogger(f"kdreid.{path.resolve()}").handlers if isinstance(h, logging.FileHandler)]
    assert not held

    # The same command again: every stage is reused, no model is rewritten.
    before = _model_mtimes(out)
    capsys.readouterr()
    assert main(_args(three_domains, out, config_file)) == 0
    err = capsys.readouterr().err
    assert all(f"stage {name}: reusing" in err for name in STAGES)
    assert _model_mtimes(out) == before

    # Flags that do not change the weights (under `select: last`) keep every stage too.
    assert main(_args(three_domains, out, config_file, "--compile", "off", "--eval-freq", "1")) == 0
    err = capsys.readouterr().err
    assert all(f"stage {name}: reusing" in err for name in STAGES) and "train.eval_freq 0 -> 1" in err
    assert _model_mtimes(out) == before

    # Another distillation setting: only the student trains again, after a line that names the setting.
    changed = _config_file(tmp_path, {"target_order": "fixed", "lkdt_weight": 2.0})
    assert main(_args(three_domains, out, changed)) == 0
    assert any("stage distill: removing" in line and "lkdt_weight 1.0 -> 2.0" in line
               for line in capsys.readouterr().err.splitlines())
    after = _model_mtimes(out)
    assert {name for name in STAGES if after[name] != before[name]} == {"distill"}
    assert yaml.safe_load((out / "stages" / "distill" / "config.yaml").read_text())["lkdt_weight"] == 2.0

    # Killed after the blend's last checkpoint, before its model.pt: the next run resumes it (no more epochs).
    (out / "stages" / "blend" / "model.pt").unlink()
    capsys.readouterr()
    assert main(_args(three_domains, out, changed)) == 0
    err = capsys.readouterr().err
    assert "stage blend: resuming" in err and "stage teacher_synth_duke: reusing" in err
    assert "stage distill: reusing" in err  # the student does not start from the blend
    assert (out / "stages" / "blend" / "model.pt").is_file()

    # Another distance: no stage trains again, each measures its numbers again. Every row was of the old distance
    # (the stages' own numbers and the cached ones on all targets) under a table that named the new one.
    cosine = tmp_path / "cosine.yaml"
    cosine.write_text(yaml.safe_dump({**yaml.safe_load(changed.read_text()), "common": {"eval": {"metric": "cosine"}}}))
    assert main(_args(three_domains, out, cosine)) == 0
    err = capsys.readouterr().err
    assert all(f"stage {name}: resuming" in err for name in STAGES) and "training in" not in err
    assert "eval.metric 'euclidean' -> 'cosine'" in err
    metrics = json.loads((out / "metrics.json").read_text())
    distill_final = json.loads((out / "stages" / "distill" / "metrics.json").read_text())["final"]
    assert metrics["student"] == {t: distill_final[t] for t in TARGETS}
    teacher = load_checkpoint(out / "teacher_synth_duke.pt")
    duke = build_dataset("synth_duke", three_domains)
    assert metrics["teachers_on_all_targets"]["synth_duke"]["synth_duke"]["mAP"] == pytest.approx(evaluate_model(
        teacher, duke, metric="cosine", height=64, width=32, device="cpu").summary()["mAP"], abs=1e-4)


def _check_outputs(out: Path) -> None:
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("source_only", "source_only_student", "teachers", "blend", "student"):
        assert list(metrics[key]) == TARGETS, key
        for values in metrics[key].values():
            assert 0 <= values["rank1"] <= 100 and 0 < values["mAP"] <= 100
    # teachers[T]: the teacher of T on T, the same number its own stage measured before it was saved and reloaded.
    for target in TARGETS:
        own = json.loads((out / "stages" / f"teacher_{target}" / "metrics.json").read_text())["final"][target]
        assert metrics["teachers"][target]["mAP"] == pytest.approx(own["mAP"], abs=1e-4)
        assert set(metrics["teachers_on_all_targets"][target]) == set(TARGETS)
    stage_final = json.loads((out / "stages" / "distill" / "metrics.json").read_text())["final"]
    assert metrics["student"] == {t: stage_final[t] for t in TARGETS}

    # The wiring: teachers start from the teacher-arch source model, the blend and the student from the
    # student-arch one, the teachers are distilled in target order, the blend adapts to every target.
    configs = {name: yaml.safe_load((out / "stages" / name / "config.yaml").read_text()) for name in STAGES}
    stages = str(out / "stages")
    assert configs["teacher_synth_duke"]["init"] == f"{stages}/source_resnet_tiny/model.pt"
    assert configs["teacher_synth_cuhk"]["targets"] == ["synth_cuhk"]
    # Source models do not depend on the targets (evaluated on them afterwards): adding one reuses them.
    assert configs["source_resnet_tiny"]["targets"] == [] and configs["source_osnet_tiny"]["arch"] == "osnet_tiny"
    for name in ("source_resnet_tiny", "source_osnet_tiny"):
        cached = json.loads((out / "stages" / name / "all_targets.json").read_text())
        assert {t: cached["metrics"][t] for t in TARGETS} == metrics["source_only" if "resnet" in name
                                                                     else "source_only_student"]
    assert configs["blend"]["blend"] and configs["blend"]["targets"] == TARGETS
    assert configs["blend"]["init"] == f"{stages}/source_osnet_tiny/model.pt"
    assert configs["blend"]["dmmd_start"] == 0 and configs["distill"]["target_order"] == "fixed"
    assert configs["distill"]["teachers"] == [f"{stages}/teacher_{t}/model.pt" for t in TARGETS]
    assert configs["distill"]["student_init"] == f"{stages}/source_osnet_tiny/model.pt"
    assert all(c["train"]["epochs"] == 1 and c["train"]["height"] == 64 for c in configs.values())

    # Final models at the top: byte copies of the stages' models, loadable kdreid checkpoints.
    copies = {"student.pt": "distill", "source_resnet_tiny.pt": "source_resnet_tiny",
              "source_osnet_tiny.pt": "source_osnet_tiny",
              **{f"teacher_{t}.pt": f"teacher_{t}" for t in TARGETS}}
    for name, stage in copies.items():
        assert (out / name).read_bytes() == (out / "stages" / stage / "model.pt").read_bytes()
    student = load_checkpoint(out / "student.pt")
    assert student.arch == "osnet_tiny" and load_checkpoint(out / "teacher_synth_duke.pt").arch == "resnet_tiny"
    info = metrics["student_model"]
    # Parameters as `kdreid models` counts them: the model without its identity classifier.
    assert info["parameters"] == count_parameters(build_model("osnet_tiny", 0)) < count_parameters(student)
    assert info["macs"] == count_macs(student, 64, 32)
    assert info["images_per_second"] > 0

    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 6  # header + source ×2, teacher ×2, blend, student
    assert rows[0].count("mAP") == len(TARGETS) + 1 and "M parameters" in table and "images/s" in table
    assert "| teacher synth_duke (D-MMD, resnet_tiny) | tracklet | last |" in table
    assert metrics["training"]["teacher_synth_cuhk"] == {"grouping": "tracklet", "select": "last"}
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["targets"] == TARGETS and saved["overrides"]["train.epochs"] == 1


def _touch(path: Path, seconds: int) -> None:
    """A file that loads (an empty state dict: a finished stage's model.pt must), written at `seconds`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({}, path)
    os.utime(path, ns=(seconds * 10**9, seconds * 10**9))


def test_stage_state_follows_config_inputs_and_crashes(tmp_path):
    config = pipeline.PipelineConfig(sources=["synth_msmt"], targets=TARGETS, teacher_arch="resnet_tiny",
                                     student_arch="osnet_tiny", root=str(tmp_path), out=str(tmp_path / "run"),
                                     preset="quick")
    configs = pipeline.stage_configs(config)
    assert list(configs) == STAGES
    assert all(pipeline.stage_state(c).action == "fresh" for c in configs.values())  # nothing there yet
    for when, stage_config in enumerate(configs.values(), start=100):  # each stage finished after its inputs
        folder = Path(stage_config.out)
        _touch(folder / "model.pt", when)
        (folder / "config.yaml").write_text(dump_yaml(stage_config))
    # Killed between model.pt and metrics.json (finish_stage's order): not finished yet.
    assert all(pipeline.stage_state(c).action == "fresh" for c in configs.values())
    for stage_config in configs.values():
        (Path(stage_config.out) / "metrics.json").write_text('{"final": {}}')
    assert all(pipeline.stage_state(c).action == "done" for c in configs.values())

    # Another setting of one stage makes only that stage stale.
    other = pipeline.stage_configs(pipeline.PipelineConfig(**{**vars(config), "distill": {"lkds_weight": 0.5}}))
    assert [name for name, c in other.items() if pipeline.stage_state(c).action != "done"] == ["distill"]

    # The teachers' source model retrained (newer): the teachers and the student are stale, the blend is not.
    _touch(Path(configs["source_resnet_tiny"].out) / "model.pt", 1000)
    stale = [name for name, c in configs.items() if pipeline.stage_state(c).action != "done"]
    assert stale == ["teacher_synth_duke", "teacher_synth_cuhk"]  # distill's teachers are still older...
    _touch(Path(configs["teacher_synth_duke"].out) / "model.pt", 1001)  # ...until they are retrained
    assert pipeline.stage_state(configs["distill"]).action == "fresh"

    # A crash: a training checkpoint but no model.pt, same config and inputs -> resume; older inputs only.
    blend = Path(configs["blend"].out)
    (blend / "model.pt").unlink()
    _touch(blend / "checkpoints" / "last.pt", 500)
    assert pipeline.stage_state(configs["blend"]).action == "resume"
    _touch(Path(configs["source_osnet_tiny"].out) / "model.pt", 600)
    assert pipeline.stage_state(configs["blend"]).action == "fresh"


def test_stage_settings_layer_over_the_preset():
    quick = PRESETS["quick"]
    config = pipeline.PipelineConfig(targets=["market1501", "cuhk03"], preset="quick",
                                     common={"train": {"seed": 3}}, adapt={"train.epochs": 5},
                                     blend={"dmmd_weight": 0.5}, distill={"train": {"optim": {"lr": 0.1}}})
    configs = pipeline.stage_configs(config)
    source = configs["source_resnet50"].train
    assert source.epochs == quick["source"]["train"]["epochs"] and source.seed == 3
    assert configs["teacher_cuhk03"].train.epochs == 5 and configs["teacher_cuhk03"].dmmd_weight == 1.0
    assert configs["blend"].train.epochs == 5 and configs["blend"].dmmd_weight == 0.5
    distill_train = configs["distill"].train
    assert distill_train.optim.lr == 0.1 and distill_train.epochs == quick["distill"]["train"]["epochs"]
    # What the pipeline wires cannot be overridden by a stage setting.
    wired = pipeline.stage_configs(pipeline.PipelineConfig(distill={"teachers": ["x.pt"], "out": "elsewhere"}))
    assert len(wired["distill"].teachers) == 3 and wired["distill"].out == "runs/pipeline/stages/distill"


@pytest.mark.parametrize("flags, message", [
    (["-s", "synth_msmt", "-t", "synth_duke", "synth_duke"], "-t names synth_duke twice; name each dataset once"),
    (["-s", "synth_msmt", "synth_msmt", "-t", "synth_duke"], "-s names synth_msmt twice"),
    (["-s", "synth_msmt", "-t", "synth_duke", "synth_msmt"], "-s and -t both name synth_msmt: a target is a dataset "
                                                             "other than the source (the source is evaluated too); "
                                                             "leave it out of -t"),
    (["-s", "synth_msmt", "-t", "synth_duke", "--preset", "fast"], "unknown preset"),
])
def test_pipeline_config_errors_are_one_line(flags, message, tmp_path, capsys):
    code = main(["pipeline", "--root", str(tmp_path), "--out", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "stages").exists()


def test_quick_preset_picks_resnet18_teachers_unless_told_otherwise():
    from kdreid.stages.presets import resolve_config

    assert resolve_config(pipeline.PipelineConfig, "pipeline", preset="quick").teacher_arch == "resnet18"
    assert resolve_config(pipeline.PipelineConfig, "pipeline", preset="paper").teacher_arch == "resnet50"
    chosen = resolve_config(pipeline.PipelineConfig, "pipeline", preset="quick", overrides={"teacher_arch": "resnet34"})
    assert chosen.teacher_arch == "resnet34"
