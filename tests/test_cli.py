import subprocess
import sys

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
