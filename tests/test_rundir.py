import json
from dataclasses import dataclass

import pytest
import yaml

from kdreid import rundir
from kdreid.rundir import RunDir, atomic_write_text


@dataclass
class Tiny:
    epochs: int = 3


def test_run_folder_holds_config_log_metrics(tmp_path):
    run = RunDir(tmp_path / "run")
    run.save_config(Tiny())
    run.logger().info("hello")
    run.save_metrics({"final": {"synth_duke": {"mAP": 12.5}}})
    assert yaml.safe_load((run.path / "config.yaml").read_text()) == {"epochs": 3}
    assert "hello" in (run.path / "log.txt").read_text()
    assert json.loads((run.path / "metrics.json").read_text())["final"]["synth_duke"]["mAP"] == 12.5


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "m.json"
    atomic_write_text(target, "old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(rundir.os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temp file left behind
