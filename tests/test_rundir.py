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


def test_a_full_disk_is_one_line_and_leaves_the_old_file(tmp_path, monkeypatch):
    import errno

    from kdreid.errors import KdreidError

    target = tmp_path / "m.json"
    atomic_write_text(target, "old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir.os, "fsync", full)
    with pytest.raises(KdreidError) as caught:
        atomic_write_text(target, "new")
    assert isinstance(caught.value, OSError) and caught.value.errno == errno.ENOSPC
    assert str(caught.value).startswith(f"cannot write {target}: no space left on the device;")
    assert "\n" not in str(caught.value)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_atomic_write_fsyncs_the_file_and_its_folder_and_keeps_usual_permissions(tmp_path, monkeypatch):
    import os
    import stat

    synced = []
    real_fsync = os.fsync

    def record(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(rundir.os, "fsync", record)
    atomic_write_text(tmp_path / "a.txt", "x")
    assert synced == [False, True]  # the data, then the rename
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
