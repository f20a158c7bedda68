"""One folder per run: the resolved config, a log, metrics. Files are written atomically (temp file, fsync,
rename, fsync of the folder), so a run killed mid-write — or a machine that loses power — never leaves a
half-written file behind: the path holds either the old complete file or the new one."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kdreid.config import dump_yaml
from kdreid.errors import KdreidError

# Failures that are the machine's state, not a bug: (what is wrong, what to do), said in one line as a user error.
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: ("no space left on the device", "free space"),
    errno.EDQUOT: ("disk quota exceeded", "free space"),
    errno.EACCES: ("permission denied", "fix the permissions or choose another path"),
    errno.EPERM: ("operation not permitted", "fix the permissions or choose another path"),
    errno.EROFS: ("read-only file system", "choose a path on a writable file system"),
    # A file where a folder of the path should be (mkdir reports EEXIST, open ENOTDIR), or the reverse.
    errno.EEXIST: ("something stands there already (a file where a folder is needed?)",
                   "move it or choose another path"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "move that file or choose another path"),
    errno.EISDIR: ("it is a folder, not a file", "choose a file path"),
}


class WriteError(KdreidError, OSError):
    """A file could not be written for a reason outside kdreid (full disk, quota, permissions, a file where a
    folder should be). Still an OSError, so callers that handle I/O errors keep working; the CLI prints it as one
    line."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28]" prefix
        return str(self.strerror) if self.strerror else super().__str__()


def as_write_error(path: Path, error: OSError) -> OSError:
    """`error`, raised while writing `path`, as a one-line WriteError when the machine's state caused it; any other
    error as it is (a bug: its traceback is wanted)."""
    known = _ENVIRONMENT_ERRNOS.get(error.errno)
    if known is None or isinstance(error, WriteError):
        return error
    reason, fix = known
    return WriteError(
        error.errno, f"cannot write {path}: {reason}; nothing was half-written (the previous file, if any, is "
        f"intact): {fix}, then run the same command again (a training stage with --resume)"
    )


def describe_environment_error(error: OSError) -> str | None:
    """One line for an OSError of the machine's state that no caller turned into a WriteError (a folder some
    library makes), naming the path it names; None for any other error (a bug: its traceback is wanted)."""
    known = _ENVIRONMENT_ERRNOS.get(error.errno)
    if known is None or not error.filename:
        return None
    reason, fix = known
    return f"{error.filename}: {reason}; {fix}"


def fsync_directory(folder: str | Path) -> None:
    """Make a rename inside `folder` durable (POSIX: the new directory entry survives a power loss)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (and FUSE mounts) refuse fsync on a directory; the rename still happened
        pass
    finally:
        os.close(fd)


def absolute_path(path: str | Path) -> str:
    """`path` made absolute, naming the file the system opens for it. Python's own absolute paths (os.path.abspath,
    which logging and tempfile use) drop "a/.." as text, while the system follows a symlink `a` before going up: so a
    path with ".." is resolved (symlinks included) and any other is only made absolute (a symlink keeps its name)."""
    return os.path.realpath(path) if ".." in Path(path).parts else os.path.abspath(path)


def refuse_folder(path: str | Path, example: str = "") -> None:
    """One line, before any work, when a file cannot be written at `path`: a folder stands there, or one of the
    folders it goes in is a file (os.replace, or the mkdir before it, would fail after the work is done, with a
    traceback). `example`: a file name to suggest inside that folder."""
    text, path = str(path), Path(path)
    if os.path.isdir(path):
        inside = f" such as {path / example}" if example else " inside it"
        raise KdreidError(f"cannot write {path}: it is a folder, not a file; give a file path{inside}")
    if text.endswith(("/", os.sep)):  # Path() drops the slash: written as is, a *file* named like the folder
        inside = f" such as {path / example}" if example else " inside it"
        raise KdreidError(f"cannot write {text}: the trailing / names a folder, not a file; give a file path{inside}")
    for parent in reversed(path.parents):  # from the top: the first one that is not a folder is in the way
        if os.path.isdir(parent):
            continue
        if os.path.islink(parent) and not os.path.exists(parent):
            raise KdreidError(f"cannot write {path}: {parent} is a link to {os.readlink(parent)}, which does not "
                              "exist; create that folder or choose another path")
        if os.path.lexists(parent):
            raise KdreidError(f"cannot write {path}: {parent} is a file where a folder is needed; move that file "
                              "or choose another path")
        return  # missing: it and the ones below are created


def refuse_overwriting_input(out: str | Path, inputs: dict[str, str | Path | None]) -> None:
    """One line, before any work, when the file to write is one of the command's inputs ({flag: path}): writing
    it would destroy what the command reads (a checkpoint replaced by its features)."""
    for flag, path in inputs.items():
        if path is not None and os.path.exists(path) and os.path.exists(out) and os.path.samefile(out, path):
            raise KdreidError(f"--out {out} is the {flag} file: writing it would replace it; choose another --out")


def new_file_mode(path: Path) -> int:
    """The mode the file would get from a plain open(): the old file's when there is one, else 0666 & ~umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        pass
    try:  # Linux reports the umask without changing it (os.umask can only read it by setting it)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


_TEMP_SUFFIX = ".kdreid-tmp"  # the temporary files of atomic_write_bytes: `.NAME.XXXXXXXX.kdreid-tmp`


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` is never seen half-written: a temporary file in the same folder,
    flushed and fsynced, renamed over `path`, then the folder fsynced. On any failure (a full disk is often
    reported only by fsync) the temporary file is removed and `path` keeps its old content."""
    refuse_folder(path)  # as given: Path() would drop a trailing slash, which names a folder
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=absolute_path(path.parent), prefix=f".{path.name}.", suffix=_TEMP_SUFFIX)
    except OSError as error:
        raise as_write_error(path, error) from None
    try:
        os.chmod(tmp, new_file_mode(path))  # mkstemp makes 0600 files; give the usual permissions instead
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise as_write_error(path, error) from None
        raise
    fsync_directory(path.parent)


def make_folder(path: str | Path) -> Path:
    """`path` as a folder (and its parents), or one line naming what is in the way (a file where a folder should be,
    a read-only or full file system): said before the work that writes there, not after it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not path.is_dir():  # a link to nothing: mkdir(exist_ok=True) lets it pass, the first write fails
            raise FileExistsError(errno.EEXIST, "File exists", str(path))
    except OSError as error:
        known = _ENVIRONMENT_ERRNOS.get(error.errno)
        if known is None:
            raise
        if error.errno == errno.EEXIST:  # mkdir(exist_ok=True): only something that is not a folder
            known = ("a file stands where a folder is needed", "move that file or choose another path")
        raise WriteError(error.errno, f"cannot write {path}: {known[0]}; {known[1]}") from None
    return path


def remove_stale_temporaries(folder: str | Path) -> None:
    """Remove the temporary files of `atomic_write_bytes` that a killed process left in `folder` (as large as the
    file they were to become: a checkpoint's are hundreds of MB): files of its own suffix only, since --out may
    be any folder. Only for a folder this process holds (`exclusive`): another writer's would go mid-write."""
    for stale in Path(folder).glob(f".*{_TEMP_SUFFIX}"):
        if stale.is_file() and not stale.is_symlink():
            stale.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def first_missing(path: str | Path) -> Path | None:
    """The topmost of `path` and its parents that does not exist (None when `path` exists): what a command that
    writes to `path` makes, and may remove again (`remove_made_folder`)."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        return None
    while not path.parent.exists() and path.parent != path:
        path = path.parent
    return path


def remove_made_folder(folder: str | Path, made: Path) -> None:
    """Remove `folder` and, while they are empty, its parents up to `made` (`first_missing(folder)` before the
    command made them): a command that failed or was stopped leaves nothing of its own behind."""
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    for parent in folder.parents:
        if not parent.is_relative_to(made):
            break
        with contextlib.suppress(OSError):
            parent.rmdir()


def remove_made_folder_if_unused(folder: str | Path, made: Path | None) -> None:
    """`remove_made_folder` when this command made `folder` (`made`, from `first_missing`) and it holds nothing but
    its lock file: a command stopped or failed before it wrote anything there."""
    folder = Path(folder)
    if made is not None and folder.is_dir() and {p.name for p in folder.iterdir()} <= {LOCK_FILE}:
        remove_made_folder(folder, made)  # a lock still held goes with its folder


def json_safe(data: Any) -> Any:
    """`data` with every NaN or infinite float as None (null): JSON has neither, and the `NaN` Python's json writes
    by default makes the file unreadable to strict readers (jq, JavaScript, other languages' parsers)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: json_safe(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(value) for value in data]
    return data


def write_json(path: str | Path, data: Any) -> None:
    """Strict JSON: a value that could not be measured (NaN) is written null, as readers of our files expect."""
    atomic_write_text(path, json.dumps(json_safe(data), indent=2, sort_keys=False, allow_nan=False) + "\n")


# A hidden file in a run folder: the process that trains (or runs a pipeline) there holds an exclusive lock on it.
LOCK_FILE = ".kdreid.lock"
# Another hidden lock, for `kdreid report` alone: it writes only its own files there, and reads a run that another
# command still writes (a pipeline between stages), so it holds the folder against other reports only.
REPORT_LOCK_FILE = ".kdreid-report.lock"
_HELD: set[Path] = set()  # the lock files this process holds


class FolderInUse(KdreidError):
    """Another process is writing the same run folder."""


@contextlib.contextmanager
def exclusive(folder: str | Path, fix: str = "wait for it to end or choose another --out", lock: str = LOCK_FILE):
    """Hold `folder` (a run folder, created if need be) for this process while the block runs. A second kdreid
    writing there at the same time — the same command started twice, a `--resume` while the first still trains,
    a pipeline that would remove a stage folder another process trains in — is refused in one line naming the
    process that holds it. The lock is the kernel's (flock): it goes with its process, even a killed one, so a
    crashed run never leaves the folder locked. Where the file system has no locks (some network mounts) or the
    platform has no fcntl, the folder is used unlocked. Re-entrant: a block inside another holding the same folder
    in this process (a seed script wrapping a stage) goes on. `fix`: what the refusal tells the user to do; `lock`:
    the lock file's name (REPORT_LOCK_FILE: held against other reports only)."""
    folder = RunDir(folder).path
    key = folder.resolve() / lock
    try:
        import fcntl
    except ImportError:  # not POSIX
        fcntl = None
    if fcntl is None or key in _HELD:
        yield
        return
    fd = _lock(folder, fcntl, fix, lock)
    _HELD.add(key)
    try:
        yield
    finally:
        _HELD.discard(key)
        if fd is not None:
            os.close(fd)  # releases the lock


def _lock(folder: Path, fcntl, fix: str, lock: str) -> int | None:
    """The locked descriptor of folder's `lock` file (None where the file system has no locks)."""
    path = folder / lock
    for _ in range(10):
        try:  # 0o666 & ~umask, as the run's other files: a group sharing a run folder can lock it too
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError as denied:  # another member's lock file, not writable by us: a read descriptor
            try:                           # locks as well
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # no lock file, and the folder is not writable: that is what to say
                raise as_write_error(folder, denied) from None
            except OSError as error:
                raise as_write_error(path, error) from None
        except OSError as error:
            raise as_write_error(path, error) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderInUse(
                f"{folder} is in use by another kdreid process ({_holder(path)}); {fix}") from None
        except OSError:  # ENOLCK, EOPNOTSUPP: a file system without locks
            os.close(fd)
            return None
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        held = os.fstat(fd)
        if current is not None and (current.st_ino, current.st_dev) == (held.st_ino, held.st_dev):
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, _holder_line().encode("utf-8", "replace"), 0)
            except OSError:  # a read-only descriptor: the lock holds, the holder's name is not written
                pass
            return fd
        # The folder was removed (or its lock file replaced) between our open and our lock, by the process that
        # held it: this lock is on a file nobody else will see. Take the folder's current one.
        os.close(fd)
        folder.mkdir(parents=True, exist_ok=True)
    raise FolderInUse(f"{folder} keeps being removed and re-created by another process; {fix}")


def held_by(folder: str | Path) -> str | None:
    """Who holds `folder` now (its lock file's line: pid, host, start, command) when another process does; None when
    nobody does, or it cannot be told (no lock file, a file system without locks). Only looks: creates nothing."""
    try:
        import fcntl
    except ImportError:
        return None
    path = Path(folder) / LOCK_FILE
    if Path(folder).resolve() / LOCK_FILE in _HELD:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(path)
    except OSError:
        return None
    finally:
        os.close(fd)  # releases the shared lock, if it was taken
    return None


def _holder_line() -> str:
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200] if sys.argv and sys.argv[0] else "python"
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    return f"pid {os.getpid()} on {socket.gethostname()}, started {started}: {command}\n"


def _holder(path: Path) -> str:
    try:
        line = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        line = ""
    return line or "its pid is not recorded"


class RunDir:
    """A run's folder: `config.yaml`, `log.txt`, `metrics.json` (and whatever a stage adds)."""

    def __init__(self, path: str | Path, create: bool = True):
        """`create`: make the folder (False: a process that only reads it, one of torchrun's other processes)."""
        self.path = Path(path)
        if not create:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            if self.path.is_symlink() and not self.path.exists():
                raise KdreidError(f"--out {self.path} is a link to {os.readlink(self.path)}, which does not exist; "
                                  "create that folder or choose another --out") from None
            raise KdreidError(f"--out {self.path} is a file, not a folder; choose another --out") from None
        except OSError as error:
            raise as_write_error(self.path, error) from None

    def save_config(self, config: Any) -> Path:
        target = self.path / "config.yaml"
        atomic_write_text(target, dump_yaml(config))
        return target

    def save_metrics(self, metrics: dict) -> Path:
        target = self.path / "metrics.json"
        write_json(target, metrics)
        return target

    def logger(self, name: str = "kdreid") -> logging.Logger:
        """A logger that writes to `log.txt` in this run and to stderr."""
        log = logging.getLogger(f"{name}.{self.path.resolve()}")
        # Its own handlers, not any: one another party attached (a caller's, a test runner's log capture) left the
        # run with no log.txt once close_logger had closed the file.
        if not any(getattr(handler, "kdreid_run_log", False) for handler in log.handlers):
            log.setLevel(logging.INFO)
            log.propagate = False
            try:
                file_handler = logging.FileHandler(absolute_path(self.path / "log.txt"))
            except OSError as error:
                raise as_write_error(self.path / "log.txt", error) from None
            file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
            console = logging.StreamHandler()
            console.setFormatter(logging.Formatter("%(message)s"))
            for handler in (file_handler, console):
                handler.kdreid_run_log = True
                log.addHandler(handler)
        return log

    def close_logger(self, name: str = "kdreid") -> None:
        """Close `logger(name)`'s handlers (its log.txt), so that the folder can go and a later run there logs anew."""
        log = logging.getLogger(f"{name}.{self.path.resolve()}")
        for handler in [h for h in log.handlers if getattr(h, "kdreid_run_log", False)]:
            handler.close()
            log.removeHandler(handler)
