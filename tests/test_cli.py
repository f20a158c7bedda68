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
