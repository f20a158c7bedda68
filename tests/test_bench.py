"""The benchmark scripts of bench/ (issue 7): what they print when torchreid's reference sources are absent, which
ratios they mark as not measured side by side, and that they name the device their figures come from."""

import importlib.util
import json
import subprocess
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def train_speed_without_torchreid(tmp_path, monkeypatch):
    module = _bench("train_speed")
    monkeypatch.setattr(module, "TORCHREID", tmp_path / "absent" / "torchreid-0.2.5")
    return module


def test_the_accuracy_check_without_torchreid_stops_in_one_line_before_any_work(train_speed_without_torchreid,
                                                                               tmp_path):
    # Found by a review: it trained the first fast run, then stopped with importlib's traceback and no JSON.
    with pytest.raises(SystemExit) as stopped:
        train_speed_without_torchreid.main(["--tiny", "--only", "none", "--accuracy", "--data", str(tmp_path / "data"),
                                            "--work", str(tmp_path / "work")])
    message = str(stopped.value.code)
    assert "\n" not in message and "torchreid 0.2.5's sources are missing (--accuracy's plain path" in message
    assert "tar -xzf" in message and not (tmp_path / "data").exists()


def test_rows_that_need_torchreid_fail_in_one_line_and_the_others_run(train_speed_without_torchreid, tmp_path,
                                                                      capsys):
    results = train_speed_without_torchreid.main(
        ["--tiny", "--only", "bare", "plain", "torchreid", "--data", str(tmp_path / "data"), "--work",
         str(tmp_path / "work"), "--steps", "1", "--warmup", "0"])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    for row in ("plain", "torchreid"):
        assert f"[run] osnet_x0_25 {row}: failed: torchreid 0.2.5's sources are missing" in captured.out
        assert "sources are missing" in results["speed"][f"osnet_x0_25 {row}"]["error"]
    assert results["speed"]["osnet_x0_25 bare step"]["images_per_s"] > 0


def test_a_reference_folder_without_its_sources_is_missing_too(train_speed_without_torchreid):
    # .cache/reference/torchreid-0.2.5/ there but empty (an extraction stopped early): one line, not importlib's error
    train_speed_without_torchreid.TORCHREID.mkdir(parents=True)
    with pytest.raises(train_speed_without_torchreid.MissingReference, match="sources are missing"):
        train_speed_without_torchreid.require_torchreid("the torchreid row")


def test_ratios_against_an_earlier_run_are_marked(tmp_path, capsys):
    module = _bench("train_speed")
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"speed": {"r torchreid": {"images_per_s": 100.0},
                                             "r plain": {"images_per_s": 200.0}}}))
    results = {"device": "CPU", "torch": "x", "speed": {"r kdreid": {"images_per_s": 300.0},
                                                        "r plain": {"images_per_s": 150.0}}}
    module.print_table(results, types.SimpleNamespace(compare=str(earlier), batch=16, height=64, width=32))
    lines = {line.split("  ")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert lines["r kdreid"].split()[-2:] == ["3.00x*", "2.00x"]  # torchreid's row is the earlier run's
    assert lines["r plain"].split()[-1] == "1.50x*"
    # the earlier run's own row, against this run's plain row: marked too
    assert lines["r torchreid [earlier run]"].split()[-1] == "0.67x*"
    assert any(line.startswith("* against a row of the earlier run") for line in lines.values())


def test_pipeline_time_names_its_device(tmp_path, monkeypatch, capsys):
    module = _bench("pipeline_time")
    monkeypatch.setattr(module, "generate", lambda *args, **kwargs: [])
    monkeypatch.setattr(module, "build_dataset", lambda name, root: types.SimpleNamespace(train=[0, 1]))
    monkeypatch.setattr(module.pipeline, "run", lambda config: None)  # the stages are not what is checked here
    result = module.main(["--tiny", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--json",
                          str(tmp_path / "out.json")])
    out = capsys.readouterr().out
    assert result["device"].startswith("CPU") and json.loads((tmp_path / "out.json").read_text())["device"]
    assert "## kdreid pipeline" in out and f"; {result['device']}, torch" in out


def test_the_gpu_script_runs_every_step_and_fails_when_one_failed(tmp_path):
    # It exited 0 whatever its steps did: a device call's rc said nothing of a step that crashed. A stand-in for
    # python fails one step (the distillation's teacher forwards) and passes the others.
    python = tmp_path / "python"
    python.write_text('#!/bin/sh\ncase "$1" in bench/teacher_forward.py) echo broken; exit 3;; esac\necho "ran $1"\n')
    python.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(python), "OUT": str(tmp_path / "out"),
           "SCRATCH": str(tmp_path / "scratch"), "TINY": "1"}
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_run.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "ran bench/pipeline_time.py" in done.stdout  # the steps after the failed one still ran
    assert done.stdout.rstrip().splitlines()[-1].endswith("FAILED: teacher_forward (exit 3)")
    python.write_text('#!/bin/sh\necho "ran $1"\n')
    assert subprocess.run(["bash", str(REPO / "bench" / "gpu_run.sh")], env=env, capture_output=True,
                          timeout=60).returncode == 0
