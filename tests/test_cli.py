import subprocess
import sys

from kdreid import __version__
from kdreid.cli import main


def test_version_from_console_script():
    result = subprocess.run([sys.executable, "-m", "kdreid.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"kdreid {__version__}"


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2
    assert main(["data"]) == 2


def test_user_error_is_one_line_without_traceback(tmp_path, capsys):
    code = main(["data", "check", "--root", str(tmp_path / "nowhere"), "-d", "market1501"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("kdreid: error: ") and err.count("\n") == 1 and "Traceback" not in err
