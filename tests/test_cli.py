import subprocess
import sys

import pytest

from kdreid import __version__
from kdreid.cli import main


def test_version_from_console_script():
    for module in ("kdreid.cli", "kdreid"):  # `python -m kdreid` is the command too
        result = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True)
        assert result.returncode == 0 and result.stdout.strip() == f"kdreid {__version__}", module
    result = subprocess.run([sys.executable, "-m", "kdreid", "evaluate"], capture_output=True, text=True)
    assert result.returncode == 2 and "required" in result.stderr  # its exit code reaches the shell


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2
    assert main(["data"]) == 2


def test_user_error_is_one_line_without_traceback(tmp_path, capsys):
    code = main(["data", "check", "--root", str(tmp_path / "nowhere"), "-d", "market1501"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("kdreid: error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_the_traceback_of_a_one_line_error_on_request(tmp_path, capsys, monkeypatch):
    # For a bug report: the same error, and above it where it was raised.
    monkeypatch.setenv("KDREID_TRACEBACK", "1")
    assert main(["data", "check", "--root", str(tmp_path / "nowhere"), "-d", "market1501"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "in build_dataset" in err
    assert err.splitlines()[-1] == f"kdreid: error: dataset root {tmp_path / 'nowhere'} does not exist; pass the " \
                                   "parent folder of the datasets with --root"


def _model_and_gallery(tmp_path):
    """A tiny checkpoint, one image and a features file of it: every flag below is refused before they matter."""
    import numpy as np
    from PIL import Image

    from kdreid.models import build_model, save_checkpoint

    model = save_checkpoint(tmp_path / "m.pt", build_model("osnet_tiny", 0), extra={"input_size": [64, 32]})
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((64, 32, 3), np.uint8)).save(images / "0001_c1s1_000001_00.jpg")
    gallery = tmp_path / "g.npz"
    assert main(["extract", "--model", str(model), "--images", str(images), "--out", str(gallery)]) == 0
    return model, images, gallery


def test_sizes_and_counts_below_one_are_one_line_errors(tmp_path, capsys):
    model, images, gallery = _model_and_gallery(tmp_path)
    evaluate = ["evaluate", "--model", str(model), "-t", "market1501", "--root", str(tmp_path)]
    extract = ["extract", "--model", str(model), "--images", str(images), "--out", str(tmp_path / "x.npz")]
    search = ["search", "--gallery", str(gallery), "--query", str(images)]
    export = ["export", "--model", str(model), "--format", "torchscript", "--out", str(tmp_path / "x.ts")]
    cases = [(evaluate, "--batch-size", "0"), (evaluate, "--height", "0"), (evaluate, "--width", "-4"),
             (extract, "--batch-size", "0"), (extract, "--height", "0"), (search, "--topk", "-1"),
             (search, "--topk", "0"), (search, "--width", "0"), (export, "--height", "0")]
    capsys.readouterr()
    for argv, flag, value in cases:
        extra = ["--rerank"] if argv is search else []
        assert main([*argv, flag, value, *extra]) == 2, (argv[0], flag)
        err = capsys.readouterr().err
        assert err == f"kdreid: error: {flag} must be at least 1, got {value}\n", (argv[0], flag, err)
    assert not (tmp_path / "x.npz").exists() and not (tmp_path / "x.ts").exists()


def test_a_reader_that_stops_early_ends_the_command_quietly():
    # `kdreid models | head -1`: a BrokenPipeError traceback before. Here the reader is gone before the first
    # write (a pipe with no reading end), so the write always fails, whatever the timing.
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)
    result = subprocess.run([sys.executable, "-m", "kdreid", "models"], stdout=write_end, stderr=subprocess.PIPE,
                            text=True, timeout=120)
    os.close(write_end)
    assert result.returncode == 141 and result.stderr == ""


def test_an_error_of_the_machine_state_no_command_named_is_one_line(tmp_path, capsys, monkeypatch):
    # A folder a library makes (tensorboard's, a picture's) where a file stands: one line naming it, not a traceback.
    import errno

    import kdreid.cli

    def failing(args):
        raise FileExistsError(errno.EEXIST, "File exists", str(tmp_path / "runs" / "tensorboard"))

    parser = kdreid.cli.build_parser()
    monkeypatch.setattr(kdreid.cli, "build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_args", lambda argv: type("Args", (), {"run": staticmethod(failing)})())
    assert main(["models"]) == 2
    assert capsys.readouterr().err == (f"kdreid: error: {tmp_path / 'runs' / 'tensorboard'}: something stands there "
                                       "already (a file where a folder is needed?); move it or choose another path\n")


def test_an_empty_path_is_refused_not_taken_for_the_current_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # before: `--out ''` wrote config.yaml, model.pt, checkpoints/ here
    for argv in (["train-source", "-s", "market1501", "--out", ""], ["search", "--gallery", "g.npz", "--query", ""]):
        try:
            main(argv)
        except SystemExit as stop:
            assert stop.code == 2
        assert "an empty path; name a file or folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_flags_a_command_cannot_use_are_named(tmp_path, capsys):
    model, images, gallery = _model_and_gallery(tmp_path)
    capsys.readouterr()
    assert main(["search", "--gallery", str(gallery), "--query", str(gallery), "--model", str(model), "--no-flip",
                 "--topk", "1"]) == 0
    assert (f"kdreid: warning: --model, --flip have no effect: {gallery} holds features already"
            in capsys.readouterr().err)
    assert main(["search", "--gallery", str(gallery), "--query", str(gallery), "--rerank", "--faiss"]) == 0
    assert "--faiss has no effect: re-ranking computes" in capsys.readouterr().err


def test_a_yes_no_stage_flag_can_turn_off_what_a_preset_turned_on():
    from kdreid.cli import build_parser

    parser = build_parser()
    common = ["adapt", "-s", "synth_msmt", "-t", "synth_duke", "--init", "m.pt", "--preset", "quick"]
    assert parser.parse_args(common).dmmd_normalize is None  # not given: the preset decides (on, in quick)
    assert parser.parse_args([*common, "--no-dmmd-normalize"]).dmmd_normalize is False
    assert parser.parse_args([*common, "--combineall"]).combineall is True


# Every stage flag, each at a value that no default or preset holds: a flag that is parsed but does not reach the
# config (a key missing from the overrides, or the wrong key) leaves the default, and the comparison names it.
STAGE_FLAGS = ["--root", "R", "--out", "O", "--epochs", "3", "--batch-size", "24", "--num-instances", "3",
               "--height", "96", "--width", "48", "--lr", "0.02", "--optimizer", "amsgrad", "--seed", "7",
               "--deterministic", "--device", "cpu", "--eval-freq", "2", "--compile", "off", "--select", "source-val",
               "--cuhk03-labeled", "--cuhk03-classic-split", "--split-id", "4"]
STAGE_SETTINGS = {"data.cuhk03_labeled": True, "data.cuhk03_classic_split": True, "data.cuhk03_split_id": 4,
                  "train.epochs": 3, "train.batch_size": 24, "train.num_instances": 3, "train.height": 96,
                  "train.width": 48, "train.optim.lr": 0.02, "train.optim.optimizer": "amsgrad", "train.seed": 7,
                  "train.deterministic": True, "train.device": "cpu", "train.eval_freq": 2, "train.compile": "off",
                  "train.select": "source-val"}


def _setting(config, dotted: str):
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def _config_a_stage_runs_with(monkeypatch, module, argv):
    """(config, resume) that `kdreid <stage> argv` hands to the stage's run."""
    seen = []
    monkeypatch.setattr(module, "run", lambda config, resume=False: seen.append((config, resume)))
    assert main(argv) == 0
    return seen[0]


@pytest.mark.parametrize("stage, argv, own", [
    ("source", ["train-source", "-s", "cuhk03", "-t", "market1501", "dukemtmcreid", "-a", "resnet_tiny",
                "--pretrained", "imagenet", "--combineall"],
     {"sources": ["cuhk03"], "targets": ["market1501", "dukemtmcreid"], "arch": "resnet_tiny",
      "pretrained": "imagenet", "data.combineall": True}),
    ("adapt", ["adapt", "-s", "cuhk03", "-t", "market1501", "dukemtmcreid", "-a", "resnet_tiny", "--init", "i.pt",
               "--grouping", "pseudo", "--dmmd-start", "2", "--dmmd-weight", "0.5", "--dmmd-terms", "within",
               "between", "--dmmd-source-groups", "tracklet", "--dmmd-normalize", "--dmmd-copies", "exclude",
               "--blend", "--combineall"],
     {"sources": ["cuhk03"], "targets": ["market1501", "dukemtmcreid"], "arch": "resnet_tiny", "init": "i.pt",
      "grouping": "pseudo", "dmmd_start": 2, "dmmd_weight": 0.5, "dmmd_terms": ["within", "between"],
      "dmmd_source_groups": "tracklet", "dmmd_normalize": True, "dmmd_copies": "exclude", "blend": True,
      "data.combineall": True}),
    ("distill", ["distill", "-s", "cuhk03", "-t", "market1501", "dukemtmcreid", "-a", "osnet_tiny", "--teachers",
                 "a.pt", "b.pt", "--teacher-arch", "resnet_tiny", "--teacher-last-stride", "2", "--teacher-mode",
                 "train", "--student-init", "s.pt", "--pretrained", "imagenet", "--target-alt", "full",
                 "--target-order", "shift", "--kd-style", "all", "--kd-feature", "neck", "--lkdt-weight", "0.3",
                 "--lkds-weight", "0.2", "--lda-weight", "0.1", "--multi-head", "--combineall"],
     {"sources": ["cuhk03"], "targets": ["market1501", "dukemtmcreid"], "arch": "osnet_tiny",
      "teachers": ["a.pt", "b.pt"], "teacher_arch": "resnet_tiny", "teacher_last_stride": 2, "teacher_mode": "train",
      "student_init": "s.pt", "pretrained": "imagenet", "target_alt": "full", "target_order": "shift",
      "kd_style": "all", "kd_feature": "neck", "lkdt_weight": 0.3, "lkds_weight": 0.2, "lda_weight": 0.1,
      "multi_head": True, "data.combineall": True}),
])
def test_every_flag_of_a_stage_reaches_its_config(stage, argv, own, monkeypatch):
    import importlib

    module = importlib.import_module(f"kdreid.stages.{stage}")
    config, resume = _config_a_stage_runs_with(monkeypatch, module, [*argv, *STAGE_FLAGS, "--resume"])
    expected = {"out": "O", "data.root": "R", **STAGE_SETTINGS, **own}
    assert {key: _setting(config, key) for key in expected} == expected
    assert resume is True
    default = module.__dict__[{"source": "SourceConfig", "adapt": "AdaptConfig", "distill": "DistillConfig"}[stage]]()
    assert all(_setting(default, key) != value for key, value in expected.items()), "a value the flag cannot show"
    _, resume = _config_a_stage_runs_with(monkeypatch, module, argv)
    assert resume is False


@pytest.mark.parametrize("argv, given", [
    (["data", "synth", "--out", "D", "--domains", "synth_duke", "--domains", "synth_cuhk"],
     "--domains: given twice (synth_duke; synth_cuhk): name all of them after one --domains"),
    (["train-source", "-s", "a", "-s", "b", "c"], "-s/--sources: given twice (a; b c): name all of them after one -s"),
    (["train-source", "-s", "a", "-t", "x", "--targets", "y"],
     "given twice (x; y): name all of them after one --targets"),
    (["evaluate", "--model", "m.pt", "--root", "R", "-t", "x", "-t", "y"], "-t/--targets: given twice (x; y)"),
    (["adapt", "-s", "a", "-t", "x", "--init", "i.pt", "--dmmd-terms", "within", "--dmmd-terms", "between"],
     "--dmmd-terms: given twice (within; between)"),
    (["distill", "-s", "a", "-t", "x", "y", "--teachers", "t1.pt", "--teachers", "t2.pt"],
     "--teachers: given twice (t1.pt; t2.pt)"),
    (["pipeline", "-s", "a", "-t", "x", "-t", "y", "z"], "-t/--targets: given twice (x; y z)"),
    (["pipeline", "-s", "a", "-s", "b", "-t", "x"], "-s/--sources: given twice (a; b)"),
    (["adapt", "-s", "a", "-s", "b", "-t", "x", "--init", "i.pt"], "-s/--sources: given twice (a; b)"),
    (["adapt", "-s", "a", "-t", "x", "--init", "i.pt", "-t", "y"], "-t/--targets: given twice (x; y)"),
    (["distill", "-s", "a", "-t", "x", "--teachers", "t.pt", "-s", "b"], "-s/--sources: given twice (a; b)"),
    (["distill", "-s", "a", "-t", "x", "--teachers", "t.pt", "-t", "y"], "-t/--targets: given twice (x; y)"),
    (["train-source", "-s", "a", "-t", "-t", "x"], "-t/--targets: given twice (; x)"),
])
def test_a_list_flag_given_twice_is_refused(argv, given, capsys):
    # argparse kept the last one: `-t market1501 -t cuhk03` evaluated, adapted to or distilled cuhk03 alone. Adding
    # them up instead would train on both where a flag appended to a command meant to replace the first.
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2 and given in capsys.readouterr().err.splitlines()[-1]


def test_train_source_takes_no_targets_after_a_bare_t():
    from kdreid.cli import build_parser

    assert build_parser().parse_args(["train-source", "-s", "a", "-t"]).targets == []
    assert build_parser().parse_args(["train-source", "-s", "a"]).targets is None


def test_a_flag_wins_over_the_config_file_which_wins_over_the_preset(tmp_path, monkeypatch):
    # Lowest first: preset < --config < flags, a --no-X flag included (it must not read as "not given").
    from kdreid.stages import adapt
    from kdreid.stages.presets import PRESETS

    quick = PRESETS["quick"]["adapt"]
    settings = tmp_path / "settings.yaml"
    settings.write_text("dmmd_start: 3\ntrain: {epochs: 9, deterministic: true}\ndata: {combineall: true}\n")
    base = ["adapt", "-s", "synth_msmt", "-t", "synth_duke", "--init", "i.pt", "--preset", "quick"]
    config, _ = _config_a_stage_runs_with(monkeypatch, adapt, [*base, "--config", str(settings)])
    assert (config.dmmd_start, config.train.epochs, config.train.deterministic, config.data.combineall) == (
        3, 9, True, True)  # the file over the preset
    assert config.train.height == quick["train"]["height"] and config.dmmd_normalize is quick["dmmd_normalize"]
    config, _ = _config_a_stage_runs_with(monkeypatch, adapt, [
        *base, "--config", str(settings), "--dmmd-start", "0", "--epochs", "1", "--no-deterministic",
        "--no-combineall", "--no-dmmd-normalize", "--height", "32"])
    assert (config.dmmd_start, config.train.epochs, config.train.deterministic, config.data.combineall,
            config.dmmd_normalize, config.train.height) == (0, 1, False, False, False, 32)  # the flags over both


def test_an_empty_section_of_the_config_file_keeps_the_preset(tmp_path, monkeypatch, capsys):
    # `train:` with its lines commented out is YAML null: it changes nothing, where it used to rebuild the whole
    # section from the defaults (quick's 64x32 cosine run became a 256x128 multistep one, without a word).
    from kdreid.stages import source
    from kdreid.stages.presets import PRESETS

    quick = PRESETS["quick"]["source"]["train"]
    base = ["train-source", "-s", "synth_msmt", "--preset", "quick", "--config"]
    for text in ("train:\n#  epochs: 3\n", "train:\n  optim:\n#    lr: 0.1\n"):
        settings = tmp_path / "settings.yaml"
        settings.write_text(text)
        config, _ = _config_a_stage_runs_with(monkeypatch, source, [*base, str(settings)])
        assert (config.train.epochs, config.train.height, config.train.optim.scheduler, config.train.optim.lr) == (
            quick["epochs"], quick["height"], quick["optim"]["scheduler"], quick["optim"]["lr"]), text
    # Only a section: a setting left blank (`epochs:` with no value) is refused, not silently left at the preset's.
    settings.write_text("train:\n  epochs:\n")
    assert main([*base, str(settings)]) == 2
    assert f"{settings}.train.epochs: expected an integer, got None" in capsys.readouterr().err


def test_a_home_folder_in_the_config_file_is_expanded_as_in_the_flags(tmp_path, monkeypatch, pipeline_config_of):
    # `out: ~/runs/x` in a --config file made a folder named `~` in the current one (`--out ~/runs/x` did not).
    from kdreid.stages import adapt, distill
    from kdreid.stages.pipeline import stage_configs
    from kdreid.stages.presets import resolve_config

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = tmp_path / "home"
    settings = tmp_path / "settings.yaml"
    settings.write_text("out: ~/runs/student\ndata: {root: ~/data}\nteachers: [~/t1.pt, ~/t2.pt]\n"
                        "student_init: ~/student.pt\ntargets: ['~/market']\n")
    config = resolve_config(distill.DistillConfig, "distill", preset="quick", config_file=str(settings))
    assert (config.out, config.data.root, config.teachers, config.student_init) == (
        str(home / "runs/student"), str(home / "data"), [str(home / "t1.pt"), str(home / "t2.pt")],
        str(home / "student.pt"))
    assert config.targets == ["~/market"]  # a name, not a path
    settings.write_text("init: ~/source/model.pt\n")
    config = resolve_config(adapt.AdaptConfig, "adapt", preset="quick", config_file=str(settings))
    assert config.init == str(home / "source/model.pt")
    # A pipeline's file: its own folders, and a stage's section.
    settings.write_text("root: ~/data\nout: ~/runs/p\nsource: {pretrained: ~/r50.pth}\n"
                        "blend: {train.optim.lr: 0.1}\n")
    config = pipeline_config_of(["pipeline", "-s", "synth_msmt", "-t", "synth_duke", "--config", str(settings)])
    assert (config.root, config.out) == (str(home / "data"), str(home / "runs/p"))
    stages = stage_configs(config)
    assert stages["source_resnet50"].pretrained == str(home / "r50.pth")


def test_every_flag_of_the_pipeline_reaches_its_stages(tmp_path, pipeline_config_of):
    flags = [flag if flag not in ("R", "O") else str(tmp_path / flag) for flag in STAGE_FLAGS]
    config = pipeline_config_of(["pipeline", "-s", "cuhk03", "-t", "market1501", "dukemtmcreid", "--teacher-arch",
                                 "resnet_tiny", "--student-arch", "osnet_tiny", "--pretrained", "imagenet",
                                 "--no-blend-baseline", "--preset", "quick", *flags])
    assert (config.sources, config.targets, config.teacher_arch, config.student_arch, config.root, config.out,
            config.preset, config.blend_baseline) == (
        ["cuhk03"], ["market1501", "dukemtmcreid"], "resnet_tiny", "osnet_tiny", str(tmp_path / "R"),
        str(tmp_path / "O"), "quick", False)
    assert config.source == {"pretrained": "imagenet"}
    assert config.overrides == STAGE_SETTINGS  # --out and --root are the pipeline's own, not a stage's


def _help_of(argv, capsys) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse's line wrapping undone


def test_the_stage_help_names_the_defaults_the_configs_hold(capsys):
    from kdreid.stages import adapt, distill, pipeline, source
    from kdreid.stages.presets import PRESETS

    for command, config in (("train-source", source.SourceConfig()), ("adapt", adapt.AdaptConfig()),
                            ("distill", distill.DistillConfig())):
        text = _help_of([command], capsys)
        assert f"default: {config.out})" in text and f"default: {config.data.root})" in text, command
    text = _help_of(["pipeline"], capsys)
    defaults = pipeline.PipelineConfig()
    assert f"default: {defaults.out})" in text and f"default: {defaults.root})" in text
    # a pipeline folder holds the final models and the stages' run folders, not a model.pt or checkpoints/
    out_help = text.split("--out OUT run folder", 1)[1].split("--config CONFIG", 1)[0]
    assert "student.pt" in out_help and "stages/" in out_help
    assert "model.pt" not in out_help and "checkpoints/" not in out_help
    # --teacher-arch's default is the preset's: the demo (--preset quick) trains ResNet-18 teachers
    assert (f"(default: the preset's: {defaults.teacher_arch}, {PRESETS['quick']['pipeline']['teacher_arch']} under "
            "--preset quick)") in text
    text = _help_of(["data", "synth"], capsys)
    assert "1.0 (default)" in text and "default 0" in text and "1 = full preset (default)" in text
    assert "(default 10)" in _help_of(["search"], capsys)


def test_sigterm_stops_a_command_as_ctrl_c_does_and_leaves_nothing_half_written(tmp_path):
    """`timeout`, `kill` or a batch system's time limit during `kdreid evaluate --out NEW`: before, the process
    died at once (no message) and left NEW/.evaluate.new/ with the pictures drawn so far. Now, as for Ctrl-C:
    `kdreid: interrupted`, exit 143, and the folder the call made is gone."""
    from kdreid.data.synthetic import generate

    model, _, _ = _model_and_gallery(tmp_path)
    generate(tmp_path / "data", ["synth_market"], scale=0.01, seed=0, size=(32, 16))
    out = tmp_path / "new" / "eval"
    argv = ["evaluate", "--model", str(model), "-t", "synth_market", "--root", str(tmp_path / "data"), "--out",
            str(out), "--visrank", "1", "--device", "cpu", "--workers", "1"]
    code = (
        "import os, signal, sys\n"
        "from kdreid.cli import main\n"
        "import kdreid.viz.ranking as ranking\n"
        "real = ranking.visualize_ranked_results\n"
        "def drawn_then_stopped(*args, **kwargs):\n"
        "    pages = real(*args, **kwargs)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return pages\n"
        "ranking.visualize_ranked_results = drawn_then_stopped\n"
        f"sys.exit(main({argv!r}))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 128 + 15, (run.returncode, run.stderr)
    assert run.stderr.strip().splitlines()[-1] == "kdreid: interrupted" and "Traceback" not in run.stderr
    assert run.stdout == ""
    assert not out.exists()


@pytest.mark.parametrize("signal_name, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_ctrl_c_while_a_library_loads_is_an_interruption_not_a_missing_package(tmp_path, capsys, monkeypatch,
                                                                               signal_name, code):
    """A Ctrl-C that lands while onnxruntime's compiled module initialises reaches Python as pybind11's
    ImportError("initialization failed") raised from the KeyboardInterrupt: before, `kdreid export` said to
    `pip install onnx onnxruntime` (exit 2) — a package that is installed. SIGTERM (errors.Terminated) there exits
    143, as everywhere else."""
    import builtins

    from kdreid.errors import Terminated

    stop_class = KeyboardInterrupt if signal_name == "SIGINT" else Terminated

    model, _, _ = _model_and_gallery(tmp_path)
    real_import = builtins.__import__

    def interrupted_import(name, *args, **kwargs):
        if name == "onnxruntime":
            try:
                raise stop_class
            except KeyboardInterrupt as stop:
                raise ImportError("initialization failed") from stop
        return real_import(name, *args, **kwargs)

    capsys.readouterr()
    monkeypatch.setattr(builtins, "__import__", interrupted_import)
    out = tmp_path / "m.onnx"
    assert main(["export", "--model", str(model), "--format", "onnx", "--out", str(out)]) == code
    assert capsys.readouterr().err == "kdreid: interrupted\n"
    assert not out.exists()


def test_a_tilde_in_a_path_flag_is_the_home_folder_as_in_root(tmp_path, capsys, monkeypatch):
    """`--out=~/x.npz` (or a quoted "~/x") reaches kdreid unexpanded: --root expanded it, --model refused it and
    --out wrote into a folder named `~` in the current one."""
    model, images, _ = _model_and_gallery(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    capsys.readouterr()
    assert main(["extract", f"--model=~/{model.name}", "--images", "~/images", "--out=~/x.npz"]) == 0, \
        capsys.readouterr().err
    assert (tmp_path / "x.npz").is_file() and list(work.iterdir()) == []
