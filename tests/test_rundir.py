import json
import os
from dataclasses import dataclass

import pytest
import torch
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


def test_a_value_that_could_not_be_measured_is_written_null_in_strict_json(tmp_path):
    # A target with no valid query has NaN metrics; Python's json would write NaN, which jq, JavaScript and other
    # strict readers refuse: the whole metrics.json would be unreadable to them.
    run = RunDir(tmp_path / "run")
    nan, inf = float("nan"), float("inf")
    run.save_metrics({"final": {"a": {"mAP": nan, "rank1": 50.0}}, "epochs": [{"loss": inf, "m": [nan, 1.0]}],
                      "pair": (-inf, 2.0)})

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    loaded = json.loads((run.path / "metrics.json").read_text(), parse_constant=refuse)
    assert loaded == {"final": {"a": {"mAP": None, "rank1": 50.0}}, "epochs": [{"loss": None, "m": [None, 1.0]}],
                      "pair": [None, 2.0]}


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


def test_atomic_write_follows_the_umask_and_keeps_an_old_files_mode(tmp_path):
    import stat

    umask = os.umask(0o027)  # not the usual 022: a fixed 0644 would pass with that one
    try:
        atomic_write_text(tmp_path / "new.txt", "x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o640
    (tmp_path / "old.txt").write_text("old")
    (tmp_path / "old.txt").chmod(0o600)  # a file the user made private stays private when rewritten
    atomic_write_text(tmp_path / "old.txt", "new")
    assert stat.S_IMODE((tmp_path / "old.txt").stat().st_mode) == 0o600 and (tmp_path / "old.txt").read_text() == "new"


def hold_in_another_process(folder, lock=rundir.LOCK_FILE):
    """A process that holds `folder` (rundir.exclusive, with the lock file `lock`) until killed; returns it once the
    lock is taken."""
    import subprocess
    import sys

    code = ("import sys, time; from kdreid.rundir import exclusive\n"
            "with exclusive(sys.argv[1], lock=sys.argv[2]):\n    print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder), lock], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_run_folder_is_held_by_one_process_and_freed_when_it_dies(tmp_path):
    folder = tmp_path / "run"
    holder = hold_in_another_process(folder)
    try:
        with pytest.raises(rundir.FolderInUse) as caught:
            with rundir.exclusive(folder):
                pass
        message = str(caught.value)
        assert message.startswith(f"{folder} is in use by another kdreid process (pid {holder.pid} on ")
        assert message.endswith("wait for it to end or choose another --out") and "\n" not in message
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the kernel drops the lock with the process
        holder.wait()
    with rundir.exclusive(folder):  # free again, and held by this process now
        assert f"pid {os.getpid()} " in (folder / rundir.LOCK_FILE).read_text()
    with rundir.exclusive(folder):  # released at the end of the block
        pass


def test_a_folder_this_process_let_go_is_locked_again_when_held_again(tmp_path):
    # Leaving the block must forget the folder as well as unlock it: else a later block in this process would take
    # it for a re-entrant one and write there unlocked, beside another process that holds it by then.
    folder = tmp_path / "run"
    with rundir.exclusive(folder):
        pass
    holder = hold_in_another_process(folder)
    try:
        with pytest.raises(rundir.FolderInUse):
            with rundir.exclusive(folder):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_a_folder_held_by_this_process_can_be_held_again_inside(tmp_path):
    # A seed script's stage wrapper around a stage that holds its folder too: the inner block goes on.
    with rundir.exclusive(tmp_path / "run"):
        with rundir.exclusive(tmp_path / "run"):
            pass
        holder = hold_in_another_process(tmp_path / "other")  # and another folder is still another's
        try:
            with pytest.raises(rundir.FolderInUse):
                with rundir.exclusive(tmp_path / "other"):
                    pass
        finally:
            holder.kill()
            holder.wait()


def test_held_by_names_another_training_process_only_and_creates_nothing(tmp_path):
    # `kdreid report`/`aggregate` of an unfinished run: who trains it. Only looks (a run folder the user only reads
    # gets no lock file), and this process's own hold, or another process's report lock, is nobody training it.
    folder = tmp_path / "run"
    folder.mkdir()
    assert rundir.held_by(folder) is None and list(folder.iterdir()) == []
    with rundir.exclusive(folder):
        assert rundir.held_by(folder) is None
    assert rundir.held_by(folder) is None  # its lock file stays, held by nobody
    for lock in (rundir.REPORT_LOCK_FILE, rundir.LOCK_FILE):
        holder = hold_in_another_process(folder, lock)
        try:
            line = (folder / rundir.LOCK_FILE).read_text().strip()
            assert rundir.held_by(folder) == (line if lock == rundir.LOCK_FILE else None)
            assert lock != rundir.LOCK_FILE or f"pid {holder.pid} " in line
        finally:
            holder.kill()
            holder.wait()


def test_the_report_lock_is_taken_inside_this_processs_hold_of_the_run(tmp_path):
    # A script that reports a run while it holds it (a pipeline's folder) still keeps other reports out: the report
    # lock is another lock, not a re-entry into the one held.
    import fcntl

    folder = tmp_path / "run"
    with rundir.exclusive(folder):
        with rundir.exclusive(folder, lock=rundir.REPORT_LOCK_FILE):
            fd = os.open(folder / rundir.REPORT_LOCK_FILE, os.O_RDONLY)
            try:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)


def test_a_command_removes_the_folders_it_made_and_no_other(tmp_path):
    # A failed or stopped command into --out runs/a/b, where the user had made an empty runs/: runs/a and runs/a/b
    # go, runs/ (and what holds it) stays; a made parent another command wrote into meanwhile stays too.
    (tmp_path / "runs").mkdir()
    out = tmp_path / "runs" / "a" / "b"
    assert rundir.first_missing(tmp_path / "runs") is None
    made = rundir.first_missing(out)
    assert made == tmp_path / "runs" / "a"
    out.mkdir(parents=True)
    (out / "log.txt").write_text("x")
    rundir.remove_made_folder(out, made)
    assert [p.name for p in tmp_path.iterdir()] == ["runs"] and list((tmp_path / "runs").iterdir()) == []
    out.mkdir(parents=True)
    (tmp_path / "runs" / "a" / "c").mkdir()  # another command's, made after this one looked
    rundir.remove_made_folder(out, made)
    assert [p.name for p in (tmp_path / "runs" / "a").iterdir()] == ["c"]


def test_a_path_going_up_from_a_symlink_writes_where_the_system_opens_it(tmp_path):
    # `link/..` is the parent of the link's target for the system, but Python's abspath (used by logging and
    # tempfile) drops it as text: files must land where the system opens the path.
    (tmp_path / "deep" / "a" / "b").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "deep" / "a" / "b")
    run = RunDir(tmp_path / "link" / ".." / "run")
    run.logger("test_updir").info("hello")
    run.close_logger("test_updir")
    run.save_metrics({"final": {}})
    folder = tmp_path / "deep" / "a" / "run"
    assert sorted(p.name for p in folder.iterdir()) == ["log.txt", "metrics.json"]
    assert "hello" in (folder / "log.txt").read_text() and not (tmp_path / "run").exists()
    assert rundir.absolute_path(tmp_path / "link" / "x") == str(tmp_path / "link" / "x")  # other links keep names


def test_an_out_folder_that_is_a_dangling_link_is_named_as_such(tmp_path):
    from kdreid.errors import KdreidError

    (tmp_path / "run").symlink_to(tmp_path / "gone")
    with pytest.raises(KdreidError, match=f"--out {tmp_path / 'run'} is a link to {tmp_path / 'gone'}, which does "
                                          "not exist; create that folder or choose another --out"):
        RunDir(tmp_path / "run")


def test_the_lock_file_follows_the_umask_as_the_run_files_do(tmp_path):
    import stat

    umask = os.umask(0o002)  # a group sharing run folders
    try:
        with rundir.exclusive(tmp_path / "run"):
            pass
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "run" / rundir.LOCK_FILE).stat().st_mode) == 0o664


@pytest.mark.parametrize("recreated", [False, True])
def test_a_lock_file_removed_between_open_and_lock_is_not_held(tmp_path, monkeypatch, recreated):
    # The process that held the folder removed it (a pipeline retraining a stage) just after this one opened the old
    # lock file: locking that file would hold nothing anyone else sees, so the folder's new lock file is taken.
    # `recreated`: the folder (and a new lock file in it) is back by the time this one looks.
    import fcntl

    real_flock = fcntl.flock
    removed = []

    def flock(fd, operation):
        if not removed:
            removed.append(True)
            import shutil

            shutil.rmtree(tmp_path / "run")
            if recreated:
                (tmp_path / "run").mkdir()
                (tmp_path / "run" / rundir.LOCK_FILE).write_text("")
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    with rundir.exclusive(tmp_path / "run"):
        assert f"pid {os.getpid()} " in (tmp_path / "run" / rundir.LOCK_FILE).read_text()
    assert removed


def test_the_lock_file_names_only_the_process_that_holds_it_now(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / rundir.LOCK_FILE).write_text("pid 1 on a-host-with-a-long-name, started long ago: " + "x" * 300)
    with rundir.exclusive(tmp_path / "run"):
        line = (tmp_path / "run" / rundir.LOCK_FILE).read_text()
    assert line.startswith(f"pid {os.getpid()} ") and line.count("\n") == 1 and line.endswith("\n")


def test_a_file_where_a_run_folder_goes_is_one_line(tmp_path):
    (tmp_path / "runs").write_text("notes")
    for path in (tmp_path / "runs", tmp_path / "runs" / "checkpoints"):
        with pytest.raises(rundir.WriteError, match=rf"cannot write {path}: .*; move that file or choose another path"):
            rundir.make_folder(path)
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(rundir.WriteError, match="a file stands where a folder is needed"):
        rundir.make_folder(tmp_path / "link")
    assert rundir.make_folder(tmp_path / "a" / "b").is_dir()


def test_a_checkpoint_write_a_killed_run_left_is_removed_when_the_run_goes_on(tmp_path):
    from kdreid.stages.loop import TrainConfig, fit

    stale = tmp_path / "run" / "checkpoints" / ".last.pt.k2j4x9a1.kdreid-tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a checkpoint")
    kept = tmp_path / "run" / "checkpoints" / "notes.txt"
    kept.write_text("mine")
    # --out may be any folder: another program's temporary files, and a folder of that name, are not kdreid's.
    (tmp_path / "run" / ".draft.tmp").write_text("a user's")
    (tmp_path / "run" / ".cache.kdreid-tmp").mkdir()
    model = torch.nn.Linear(2, 1)
    config = TrainConfig(epochs=1, device="cpu")

    def step(context):
        return {"loss": model(torch.ones(4, 2)).pow(2).mean()}

    fit(run=RunDir(tmp_path / "run"), config=config, stage_config=config, modules={"model": model},
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1), batches_per_epoch=2, train_step=step,
        evaluate=lambda epoch: {})
    assert not stale.exists() and kept.read_text() == "mine"
    assert (tmp_path / "run" / ".draft.tmp").is_file() and (tmp_path / "run" / ".cache.kdreid-tmp").is_dir()
    assert sorted(p.name for p in stale.parent.iterdir()) == ["last.pt", "notes.txt"]


def test_a_file_where_the_checkpoints_go_is_one_line_before_any_training(tmp_path):
    from kdreid.stages.loop import TrainConfig, fit

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("not a folder")
    steps = []
    config = TrainConfig(epochs=1, device="cpu")
    model = torch.nn.Linear(2, 1)
    with pytest.raises(rundir.WriteError, match=r"cannot write .*checkpoints: a file stands where a folder is needed"):
        fit(run=RunDir(tmp_path / "run"), config=config, stage_config=config, modules={"model": model},
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1), batches_per_epoch=2,
            train_step=lambda context: steps.append(1), evaluate=lambda epoch: {})
    assert steps == []


def test_a_path_through_a_file_is_one_line_before_writing(tmp_path):
    from kdreid.errors import KdreidError

    (tmp_path / "afile").write_text("")
    for target in (tmp_path / "afile" / "m.json", tmp_path / "afile" / "sub" / "m.json"):
        with pytest.raises(KdreidError) as caught:
            atomic_write_text(target, "x")
        assert str(caught.value) == (f"cannot write {target}: {tmp_path / 'afile'} is a file where a folder is "
                                     "needed; move that file or choose another path")
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]
    (tmp_path / "link").symlink_to(tmp_path / "gone")  # a folder that was moved: not "a file"
    with pytest.raises(KdreidError) as caught:
        atomic_write_text(tmp_path / "link" / "m.json", "x")
    assert str(caught.value) == (f"cannot write {tmp_path / 'link' / 'm.json'}: {tmp_path / 'link'} is a link to "
                                 f"{tmp_path / 'gone'}, which does not exist; create that folder or choose another path")


def test_a_run_folder_logger_asked_for_twice_writes_each_line_once(tmp_path):
    run = RunDir(tmp_path / "run")
    run.logger("test_twice")
    run.logger("test_twice").info("once")
    run.close_logger("test_twice")
    assert (run.path / "log.txt").read_text().count("once") == 1


def test_a_run_logger_writes_its_log_when_another_handler_is_on_its_logger(tmp_path):
    # A caller's (or a test runner's log capture) handler on the run's logger used to stand for the run's own:
    # no log.txt was opened, and close_logger removed the caller's handler.
    import logging

    run = RunDir(tmp_path / "run")
    theirs = logging.NullHandler()
    logging.getLogger(f"test_theirs.{run.path.resolve()}").addHandler(theirs)
    run.logger("test_theirs").info("hello")
    run.close_logger("test_theirs")
    assert "hello" in (run.path / "log.txt").read_text()
    assert logging.getLogger(f"test_theirs.{run.path.resolve()}").handlers == [theirs]


def test_an_error_that_names_no_path_is_left_to_its_traceback():
    import errno

    assert rundir.describe_environment_error(OSError(errno.ENOSPC, "No space left on device")) is None
    assert rundir.describe_environment_error(OSError(errno.ENOSPC, "No space left on device", "/x/y")) == (
        "/x/y: no space left on the device; free space")
