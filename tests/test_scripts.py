"""The seed's three scripts (scripts/source_training.py, DMMD.py, KD-REID.py and its alias KD_REID.py) run with
their original flags on tiny synthetic data and produce the same runs as the `kdreid` stage commands."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kdreid.cli import main as kdreid_main
from kdreid.models import load_checkpoint

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
TINY = ["--epochs", "1", "-b", "16", "--num-instances", "4", "--height", "64", "--width", "32", "--device", "cpu",
        "--seed", "0"]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"seed_script_{name.replace('-', '_')}", SCRIPTS / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("seed_data")
    assert kdreid_main(["data", "synth", "--out", str(root), "--domains", "synth_msmt", "synth_duke", "synth_cuhk",
                        "--scale", "0.01", "--size", "64x32", "--seed", "0", "--workers", "1"]) == 0
    return root


def test_the_three_scripts_chain_with_the_original_flags(data, tmp_path, capsys):
    # One test for the chain (source -> teachers -> KD), so that `pytest -n 2` never trains it twice.
    source_training, dmmd, kd_reid = _script("source_training.py"), _script("DMMD.py"), _script("KD-REID.py")
    runs = {}
    for arch in ("resnet_tiny", "osnet_tiny"):
        runs[arch] = tmp_path / f"source_{arch}"
        # `-data-dir` (the README's spelling), an ignored original flag, evaluation-only targets.
        assert source_training.main(["-ds", "synth_msmt", "-dt", "synth_duke", "-a", arch, "-data-dir", str(data),
                                     "--out", str(runs[arch]), "--features", "512", "--pretrained", "none",
                                     *TINY]) == 0
    out = capsys.readouterr()
    assert f"run folder: {runs['osnet_tiny']}" in out.out and "--features is accepted" in out.err
    config = _config(runs["resnet_tiny"])
    assert config["arch"] == "resnet_tiny" and config["sources"] == ["synth_msmt"] and config["data"]["root"] == str(data)
    assert config["train"]["batch_size"] == 16 and config["data"]["cuhk03_classic_split"]  # the seed's CUHK03 default

    teachers = []
    for target in ("synth_duke", "synth_cuhk"):
        run = tmp_path / f"teacher_{target}"
        # `--data-dir` (the code's spelling) works as well.
        assert dmmd.main(["-ds", "synth_msmt", "-dt", target, "-a", "resnet_tiny", "--data-dir", str(data),
                          "-mp", str(runs["resnet_tiny"] / "model.pt"), "--out", str(run), "--dmmd-start", "0",
                          *TINY]) == 0
        assert not _config(run)["blend"] and _config(run)["targets"] == [target]
        teachers.append(run / "model.pt")

    # Several targets: one blended model, as the seed; a plain state dict (the seed's model-best.pth.tar) as -mp.
    plain = tmp_path / "model-best.pth.tar"
    torch.save({"state_dict": load_checkpoint(runs["osnet_tiny"] / "model.pt").state_dict(), "epoch": 1}, plain)
    blend = tmp_path / "blend"
    assert dmmd.main(["-ds", "synth_msmt", "-dt", "synth_duke", "synth_cuhk", "-a", "osnet_tiny",
                      "-data-dir", str(data), "-mp", str(plain), "--out", str(blend), *TINY]) == 0
    assert _config(blend)["blend"] and _config(blend)["init"] == str(blend / "init.pt")
    assert load_checkpoint(blend / "model.pt").arch == "osnet_tiny"

    student = tmp_path / "student"
    capsys.readouterr()
    assert kd_reid.main(["-ds", "synth_msmt", "-dt", "synth_duke", "synth_cuhk", "-as", "osnet_tiny",
                         "-at", "resnet_tiny", "-data-dir", str(data), "-mps", str(runs["osnet_tiny"] / "model.pt"),
                         "-mpt", *map(str, teachers), "--out", str(student), "--kd-style", "only_feats",
                         "--target-order", "fixed", "--target-alt", "full", "--lkds_weight", "0.5",
                         "--lda-weight", "0.1", "--multi-head", "--lr", "0.001", *TINY]) == 0
    assert f"run folder: {student}" in capsys.readouterr().out
    config = _config(student)
    assert config["kd_style"] == "feats" and config["target_order"] == "fixed" and config["target_alt"] == "full"
    assert config["lkds_weight"] == 0.5 and config["lda_weight"] == 0.1 and config["lkdt_weight"] == 1.0
    assert config["multi_head"] and config["train"]["optim"]["lr"] == 0.001
    assert config["teachers"] == list(map(str, teachers)) and config["teacher_arch"] == ""
    assert config["student_init"] == str(runs["osnet_tiny"] / "model.pt")
    assert load_checkpoint(student / "model.pt").arch == "osnet_tiny"


def test_kd_reid_flags_map_onto_the_distill_config(monkeypatch, tmp_path):
    # Without training: capture the config the script hands to the distill stage.
    from kdreid.stages import distill

    seen = {}

    def fake_run(config, *, resume=False):
        seen["config"] = config
        path = tmp_path / "out" / "model.pt"
        return distill.StageResult(str(path), {}, None)

    monkeypatch.setattr(distill, "run", fake_run)
    plain = tmp_path / "teacher.pth"
    torch.save({"state_dict": {}}, plain)
    kd_reid = _script("KD-REID.py")
    assert kd_reid.main(["-dt", "market1501", "-mpt", str(plain), "--kd-style", "all", "--lkdt_weight", "2",
                         "--lkds-weight", "0.3", "-data-dir", str(tmp_path), "--new-cuhk"]) == 0
    config = seen["config"]
    assert config.kd_style == "all" and config.lkdt_weight == 2.0 and config.lkds_weight == 0.3
    # A plain state dict as teacher loads as -at (resnet50, the seed's default); the seed's CUHK03 settings.
    assert config.teacher_arch == "resnet50" and config.arch == "resnet50"
    assert config.data.cuhk03_labeled and not config.data.cuhk03_classic_split
    assert config.out == str(Path("runs") / "KD_ReID_D-MMD" / "msmt172market1501_new_cuhk" / "resnet50_t_resnet50_s"
                             / "target_alt_batch_kd_style_outs_feats_lkds_0.3")
    for style, expected in (("only_outputs", "outputs"), ("outputs", "outputs"), ("feats", "feats")):
        assert kd_reid.main(["-dt", "market1501", "-mpt", str(plain), "--kd-style", style]) == 0
        assert seen["config"].kd_style == expected


@pytest.mark.parametrize("script", ["KD-REID.py", "KD_REID.py"])
def test_teacher_count_mismatch_is_one_line(script, tmp_path):
    # A real process, as users run it: the alias behaves the same, and nothing is trained or written.
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / script), "-ds", "synth_msmt", "-dt", "market1501", "dukemtmcreid",
         "-as", "osnet_x0_25", "-at", "resnet50", "-data-dir", str(tmp_path), "-mpt", str(tmp_path / "t1.pt"),
         "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "1 teacher(s) in -mpt for 2 target(s)" in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


def test_a_missing_data_dir_is_named_by_the_scripts_own_flag(tmp_path, capsys):
    code = _script("source_training.py").main(["-ds", "synth_msmt", "-a", "osnet_tiny", "-data-dir",
                                                str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"), *TINY])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert lines[0].endswith("does not exist; pass the parent folder of the datasets with -data-dir"), lines[0]


def test_scripts_answer_help_with_the_original_flags():
    for name, flags in (("source_training.py", ["-ds", "-a", "-data-dir", "--new-cuhk"]),
                        ("DMMD.py", ["-dt", "-mp"]),
                        ("KD-REID.py", ["-as", "-at", "-mps", "-mpt", "--lkds_weight", "--target-alt"])):
        parser = _script(name).build_parser()
        text = parser.format_help()
        assert all(flag in text for flag in flags), name


def test_dmmd_checks_its_run_folder_before_converting_and_leaves_nothing_on_bad_input(data, tmp_path, capsys):
    from kdreid.models import build_model

    dmmd = _script("DMMD.py")
    plain = tmp_path / "model-best.pth.tar"
    torch.save({"state_dict": build_model("osnet_tiny", 5).state_dict()}, plain)
    flags = ["-ds", "synth_msmt", "-a", "osnet_tiny", "-data-dir", str(data), "-mp", str(plain), *TINY]
    bad = tmp_path / "bad"
    assert dmmd.main([*flags, "-dt", "synth_nowhere", "--out", str(bad)]) == 2
    assert "synth_nowhere" in capsys.readouterr().err and not bad.exists()  # not even the converted init.pt
    # An occupied run folder is refused before the conversion could replace the start weights its config names.
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"a run's state")
    (run / "init.pt").write_bytes(b"the run's start weights")
    assert dmmd.main([*flags, "-dt", "synth_duke", "--out", str(run)]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert (run / "init.pt").read_bytes() == b"the run's start weights"


def test_a_script_stopped_by_a_signal_exits_as_kdreid_does(capsys):
    """Found by a review: the scripts answered 2 to SIGINT/SIGTERM where `kdreid` answers 130/143."""
    import argparse
    import signal

    sys.path.insert(0, str(SCRIPTS))
    try:
        from _seed_args import run_main
    finally:
        sys.path.remove(str(SCRIPTS))
    from kdreid.stages.loop import TrainingInterrupted

    def stopped(args):
        raise TrainingInterrupted("stopped by SIGTERM at epoch 1; run the same command with --resume",
                                  signal.SIGTERM)

    assert run_main(stopped, argparse.ArgumentParser(prog="source_training.py"), []) == 143
    assert "stopped by SIGTERM" in capsys.readouterr().err


def _captured(monkeypatch, module, tmp_path):
    """Replace `module.run` (a stage's run) by one that keeps the config and resume flag it was handed."""
    from kdreid.stages.common import StageResult

    seen = {}

    def fake_run(config, *, resume=False):
        seen.update(config=config, resume=resume)
        return StageResult(str(tmp_path / "out" / "model.pt"), {}, None)

    monkeypatch.setattr(module, "run", fake_run)
    return seen


# Flags shared by the three scripts, each to a value unlike both presets' and the defaults' (the CUHK03 settings
# checked beside them are the scripts' own defaults: the seed read the labelled boxes on the classic split).
COMMON_FLAGS = ["--preset", "quick", "--resume", "-b", "24", "--num-instances", "6", "--height", "96", "--width",
                "48", "--epochs", "3", "--lr", "0.02", "--optimizer", "amsgrad", "--eval-freq", "2", "--device", "cpu",
                "--seed", "11"]


def _check_common_flags(config, seen, data_dir):
    from kdreid.stages.presets import PRESETS

    train = config.train
    assert (train.batch_size, train.num_instances, train.height, train.width, train.epochs) == (24, 6, 96, 48, 3)
    assert (train.optim.lr, train.optim.optimizer, train.eval_freq, train.device, train.seed) == (
        0.02, "amsgrad", 2, "cpu", 11)
    assert config.data.root == str(data_dir) and config.data.cuhk03_labeled and config.data.cuhk03_classic_split
    # --preset quick: what no flag sets comes from it (paper's scheduler is multistep), and --resume reaches run.
    assert train.optim.scheduler == PRESETS["quick"]["source"]["train"]["optim"]["scheduler"] == "cosine"
    assert seen["resume"] is True


def test_source_training_flags_map_onto_the_source_config(monkeypatch, tmp_path):
    """A review: -dt, --preset and --resume of the scripts were each dropped without any test failing."""
    from kdreid.stages import source

    seen = _captured(monkeypatch, source, tmp_path)
    assert _script("source_training.py").main(["-ds", "synth_msmt", "synth_cuhk", "-dt", "synth_duke", "market1501",
                                               "-a", "osnet_tiny", "-data-dir", str(tmp_path), "--out",
                                               str(tmp_path / "run"), *COMMON_FLAGS]) == 0
    config = seen["config"]
    assert config.sources == ["synth_msmt", "synth_cuhk"] and config.targets == ["synth_duke", "market1501"]
    assert config.arch == "osnet_tiny" and config.out == str(tmp_path / "run")
    _check_common_flags(config, seen, tmp_path)


def test_dmmd_flags_map_onto_the_adapt_config(monkeypatch, tmp_path):
    from kdreid.models import build_model, save_checkpoint
    from kdreid.stages import adapt

    seen = _captured(monkeypatch, adapt, tmp_path)
    model = save_checkpoint(tmp_path / "source.pt", build_model("osnet_tiny", 5))  # a kdreid checkpoint: as it is
    dmmd = _script("DMMD.py")
    assert dmmd.main(["-ds", "synth_cuhk", "-dt", "synth_duke", "-a", "osnet_tiny", "-data-dir", str(tmp_path),
                      "-mp", str(model), "--out", str(tmp_path / "run"), "--grouping", "oracle", "--dmmd-start", "7",
                      *COMMON_FLAGS]) == 0
    config = seen["config"]
    assert config.sources == ["synth_cuhk"] and config.targets == ["synth_duke"] and not config.blend
    assert config.arch == "osnet_tiny" and config.init == str(model)
    assert config.grouping == "oracle" and config.dmmd_start == 7
    _check_common_flags(config, seen, tmp_path)
    assert dmmd.main(["-dt", "synth_duke", "synth_cuhk", "-mp", str(model), "--out", str(tmp_path / "blend")]) == 0
    assert seen["config"].blend and seen["config"].grouping == "tracklet" and seen["resume"] is False


def test_kd_reid_student_teacher_and_run_flags_map_onto_the_distill_config(monkeypatch, tmp_path, capsys):
    from kdreid.models import build_model, save_checkpoint
    from kdreid.stages import distill

    seen = _captured(monkeypatch, distill, tmp_path)
    kd_reid = _script("KD-REID.py")
    teacher = str(save_checkpoint(tmp_path / "teacher.pt", build_model("resnet_tiny", 5)))
    plain = tmp_path / "student.pth.tar"
    torch.save({"state_dict": build_model("osnet_tiny", 5).state_dict()}, plain)
    assert kd_reid.main(["-ds", "synth_cuhk", "-dt", "synth_duke", "-as", "osnet_tiny", "-at", "resnet_tiny",
                         "-data-dir", str(tmp_path), "-mps", str(plain), "-mpt", teacher, "--teacher-mode", "train",
                         "--target-order", "shift", "--log-loss", "--out", str(tmp_path / "run"),
                         *COMMON_FLAGS]) == 0
    config = seen["config"]
    assert config.sources == ["synth_cuhk"] and config.targets == ["synth_duke"] and config.arch == "osnet_tiny"
    assert config.teacher_mode == "train" and config.target_order == "shift"
    # A plain state dict as -mps starts the student's weights; a kdreid checkpoint as -mpt carries its arch.
    assert config.pretrained == str(plain) and config.student_init == "" and config.teacher_arch == ""
    _check_common_flags(config, seen, tmp_path)
    assert "--log-loss is accepted for compatibility" in capsys.readouterr().err
    # --stda SPCL: the teachers are SpCL state dicts of -at, whatever their file looks like.
    assert kd_reid.main(["-dt", "synth_duke", "-at", "resnet_tiny", "-mpt", teacher, "--stda", "SPCL",
                         "-mps", teacher]) == 0
    assert seen["config"].teacher_arch == "resnet_tiny" and seen["config"].student_init == teacher


def test_the_originals_scheduler_flags_set_its_schedule(monkeypatch, tmp_path, capsys):
    """Found by a review: --scheduler and --step-size, which set the original's StepLR, were accepted as flags
    without effect (and the note said they had none there either)."""
    from kdreid.models import build_model, save_checkpoint
    from kdreid.stages import distill, source
    from kdreid.stages.optim import learning_rate

    seen = _captured(monkeypatch, source, tmp_path)
    script = _script("source_training.py")
    common = ["-ds", "synth_msmt", "-data-dir", str(tmp_path), "--out", str(tmp_path / "run"), "--lr", "0.1"]
    assert script.main([*common, "--scheduler", "single_step", "--step-size", "3", "--epochs", "8"]) == 0
    optim = seen["config"].train.optim
    assert (optim.scheduler, optim.step_size, optim.gamma, optim.warmup_epochs) == ("step", 3, 0.1, 0)
    assert [learning_rate(optim, epoch, 8) for epoch in range(8)] == pytest.approx([0.1] * 3 + [0.01] * 3 + [0.001] * 2)
    assert script.main([*common, "--step-size", "4"]) == 0  # the original's default scheduler is single_step
    assert (seen["config"].train.optim.scheduler, seen["config"].train.optim.step_size) == ("step", 4)
    assert script.main([*common, "--scheduler", "single_step"]) == 0  # the original's step size: 50
    assert seen["config"].train.optim.step_size == 50
    assert script.main([*common, "--scheduler", "cosine"]) == 0
    optim = seen["config"].train.optim
    assert (optim.scheduler, optim.min_lr_factor, optim.warmup_epochs) == ("cosine", 0.0, 0)
    assert script.main(common) == 0  # neither flag: the paper preset's schedule
    assert seen["config"].train.optim.scheduler == "multistep" and seen["config"].train.optim.warmup_epochs == 10
    capsys.readouterr()
    assert script.main([*common, "--scheduler", "multi_step"]) == 2
    assert "--scheduler multi_step needs a list of epochs" in capsys.readouterr().err
    assert script.main([*common, "--scheduler", "cosine", "--step-size", "5"]) == 2
    assert "--step-size 5 belongs to --scheduler single_step, not cosine" in capsys.readouterr().err
    # KD-REID.py's own default step size, 5
    seen = _captured(monkeypatch, distill, tmp_path)
    teacher = str(save_checkpoint(tmp_path / "teacher.pt", build_model("resnet_tiny", 5)))
    assert _script("KD-REID.py").main(["-dt", "synth_duke", "-mpt", teacher, "-data-dir", str(tmp_path), "--out",
                                       str(tmp_path / "kd"), "--scheduler", "single_step"]) == 0
    assert (seen["config"].train.optim.scheduler, seen["config"].train.optim.step_size) == ("step", 5)


def test_flags_without_a_kdreid_counterpart_say_why(monkeypatch, tmp_path, capsys):
    from kdreid.stages import source

    _captured(monkeypatch, source, tmp_path)
    assert _script("source_training.py").main(["-data-dir", str(tmp_path), "--out", str(tmp_path / "run"), "-j", "8",
                                               "--features", "512", "--dropout", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "note: --workers is accepted for compatibility with the original scripts and has no effect: kdreid " \
           "decodes every image once" in err
    assert "--features is accepted" in err and "--dropout is accepted" in err and "--scheduler" not in err


@pytest.fixture
def osnet_checkpoint(tmp_path):
    """An untrained osnet_tiny kdreid checkpoint with synth_msmt's 10 training identities (scale 0.01)."""
    from kdreid.models import build_model, save_checkpoint

    return str(save_checkpoint(tmp_path / "osnet.pt", build_model("osnet_tiny", 10), datasets=["synth_msmt"]))


@pytest.fixture
def osnet_teacher(tmp_path):
    """An untrained osnet_tiny kdreid checkpoint that records an adaptation to synth_duke."""
    from kdreid.models import build_model, save_checkpoint

    return str(save_checkpoint(tmp_path / "teacher.pt", build_model("osnet_tiny", 10),
                               datasets=["synth_msmt", "synth_duke"]))


def _capture_runs(monkeypatch, tmp_path) -> dict:
    """Replace the three stages' run functions: each records the config a script hands it and trains nothing."""
    from kdreid.stages import adapt, distill, source

    seen = {}
    for module in (source, adapt, distill):
        def fake_run(config, *, resume=False, name=module.__name__.rsplit(".", 1)[-1]):
            seen[name] = config
            return distill.StageResult(str(tmp_path / "out" / "model.pt"), {}, None)

        monkeypatch.setattr(module, "run", fake_run)
    return seen


def test_architectures_default_to_what_a_kdreid_checkpoint_records(data, osnet_checkpoint, osnet_teacher, tmp_path,
                                                                     monkeypatch):
    # The seed's -a/-as/-at default (resnet50) holds for plain state dicts; a kdreid checkpoint names its own, so
    # `DMMD.py -mp model.pt` needs no -a (it used to fail, naming kdreid's --init and saying to leave -a out).
    seen = _capture_runs(monkeypatch, tmp_path)
    args = ["-ds", "synth_msmt", "-dt", "synth_duke", "-data-dir", str(data), *TINY]
    assert _script("DMMD.py").main([*args, "-mp", osnet_checkpoint, "--out", str(tmp_path / "t")]) == 0
    assert seen["adapt"].arch == "osnet_tiny"
    assert _script("KD-REID.py").main([*args, "-mps", osnet_checkpoint, "-mpt", osnet_teacher]) == 0
    config = seen["distill"]
    assert config.arch == "osnet_tiny" and config.teacher_arch == "" and config.student_init == osnet_checkpoint
    assert Path(config.out).parent.name == "osnet_tiny_t_osnet_tiny_s"


def test_a_contradicting_architecture_is_named_by_the_scripts_flags(data, osnet_checkpoint, osnet_teacher, tmp_path,
                                                                    capsys):
    # One line naming the script's flags (-mp, -mps, -mpt, -at, -ds/-dt), not kdreid's (--init, --student-init, -s/-t),
    # and nothing written.
    dmmd, kd_reid = _script("DMMD.py"), _script("KD-REID.py")
    args = ["-ds", "synth_msmt", "-dt", "synth_duke", "-data-dir", str(data), *TINY]
    for run, expected in (
        (lambda: dmmd.main([*args, "-a", "resnet_tiny", "-mp", osnet_checkpoint, "--out", str(tmp_path / "t")]),
         f"-mp {osnet_checkpoint}: holds a osnet_tiny model, not the resnet_tiny"),
        (lambda: kd_reid.main([*args, "-as", "resnet_tiny", "-mps", osnet_checkpoint, "-mpt", osnet_teacher,
                               "--out", str(tmp_path / "s")]),
         f"-mps {osnet_checkpoint}: holds a osnet_tiny model, not the resnet_tiny"),
        # -at used to be silently ignored for kdreid teachers
        (lambda: kd_reid.main([*args, "-at", "resnet50", "-mps", osnet_checkpoint, "-mpt", osnet_teacher,
                               "--out", str(tmp_path / "s")]),
         f"-mpt {osnet_teacher}: holds a osnet_tiny model, not the resnet50 that -at names"),
        (lambda: dmmd.main(["-ds", "synth_msmt", "-dt", "synth_msmt", "-data-dir", str(data), "-mp", osnet_checkpoint,
                            "--out", str(tmp_path / "t"), *TINY]),
         "-ds and -dt both name synth_msmt"),
    ):
        capsys.readouterr()
        code = run()
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1, lines
        assert f": error: {expected}" in lines[0], lines[0]
        assert "--init" not in lines[0] and "--student-init" not in lines[0]
    assert not (tmp_path / "t").exists() and not (tmp_path / "s").exists()


def test_source_training_and_a_student_without_mps_start_from_imagenet_as_the_seed(tmp_path, monkeypatch, capsys):
    # The original built its models with pretrained=True; kdreid's stages default to random weights.
    seen = _capture_runs(monkeypatch, tmp_path)
    source_training, kd_reid = _script("source_training.py"), _script("KD-REID.py")
    assert source_training.main(["-ds", "market1501", "-data-dir", str(tmp_path)]) == 0
    assert seen["source"].pretrained == "imagenet" and seen["source"].arch == "resnet50"
    assert source_training.main(["-ds", "market1501", "--pretrained", "none"]) == 0
    assert seen["source"].pretrained == "none"
    plain = tmp_path / "teacher.pth"
    torch.save({"state_dict": {}}, plain)
    assert kd_reid.main(["-dt", "market1501", "-mpt", str(plain)]) == 0
    assert seen["distill"].pretrained == "imagenet" and seen["distill"].arch == "resnet50"
    assert seen["distill"].teacher_arch == "resnet50"
    capsys.readouterr()
    assert kd_reid.main(["-dt", "market1501", "-mpt", str(plain), "-mps", str(plain), "--pretrained", "none"]) == 2
    assert "--pretrained none has no effect with -mps" in capsys.readouterr().err


@pytest.mark.parametrize("signal_exception, code", [("KeyboardInterrupt", 130), ("Terminated", 143)])
def test_a_script_stopped_before_training_exits_as_kdreid_does(signal_exception, code, tmp_path, monkeypatch,
                                                                 capsys):
    # Ctrl-C or SIGTERM while the datasets are read: one line and 128 + signal, not a traceback and exit code 1.
    from kdreid import errors
    from kdreid.stages import source

    def stopped(config, *, resume=False):
        raise getattr(errors, signal_exception, KeyboardInterrupt)()

    monkeypatch.setattr(source, "run", stopped)
    try:
        returned = _script("source_training.py").main(["-ds", "market1501", "-data-dir", str(tmp_path)])
    except KeyboardInterrupt:
        pytest.fail(f"{signal_exception} escaped the script (a traceback and exit code 1)")
    assert returned == code
    assert capsys.readouterr().err.strip().splitlines() == [f"{Path(sys.argv[0]).name}: interrupted"]


def test_a_kdreid_teacher_among_plain_ones_keeps_its_own_architecture(data, osnet_teacher, tmp_path, monkeypatch):
    # Plain state dicts load as -at (default resnet50); the kdreid checkpoint among them records its own (the stage
    # keeps it): not a join of the recorded architectures with a plain file's none, nor a refusal of -at.
    seen = _capture_runs(monkeypatch, tmp_path)
    plain = tmp_path / "teacher.pth"
    torch.save({"state_dict": {}}, plain)
    kd_reid = _script("KD-REID.py")
    args = ["-ds", "synth_msmt", "-dt", "synth_duke", "synth_cuhk", "-data-dir", str(data), *TINY]
    assert kd_reid.main([*args, "-mpt", osnet_teacher, str(plain)]) == 0
    assert seen["distill"].teacher_arch == "resnet50"
    assert kd_reid.main([*args, "-mpt", str(plain), osnet_teacher, "-at", "resnet_tiny"]) == 0
    assert seen["distill"].teacher_arch == "resnet_tiny"


def test_flags_inside_a_quoted_kdreid_command_keep_kdreids_names():
    # The command a message quotes is run as written: `kdreid ... --root` keeps --root; the rest names the script's.
    seed_args = _script("_seed_args.py")
    message = "no data under X: pass --root, or run `kdreid data synth --out X` (kdreid evaluate -t market1501)"
    assert seed_args.script_message(message, {"--init": "-mp"}) == (
        "no data under X: pass -data-dir, or run `kdreid data synth --out X` (kdreid evaluate -t market1501)")
    assert seed_args.script_message("-t synth_duke: see `kdreid check --root R -t synth_duke`", {}) == \
        "-dt synth_duke: see `kdreid check --root R -t synth_duke`"
