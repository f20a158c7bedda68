"""Errors meant for people: each names the offending path or value and the fix.

The CLI prints a `KdreidError` as one line and exits non-zero without a traceback; anything else is a bug.
"""

import contextlib
import signal
import threading


class KdreidError(Exception):
    """A user mistake (bad path, layout, value); the message says what and how to fix it."""


class DatasetError(KdreidError):
    """A dataset folder is missing, has the wrong layout, or holds unreadable images."""


class ConfigError(KdreidError):
    """A config file or flag has an unknown key or a value of the wrong type."""


class ModelError(KdreidError):
    """An unknown architecture or weights that do not fit it."""


class CheckpointError(KdreidError):
    """A checkpoint is missing, truncated, of another architecture, or unsafe to load."""


class TrainingError(KdreidError):
    """Training cannot go on (a non-finite loss, a run folder that already holds a run)."""


class EvaluationError(KdreidError):
    """Inputs to an evaluation do not fit together (lengths, NaNs, empty sets)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM while no training loop handles it (reading the datasets, building the models): it stops the command
    as Ctrl-C does, so that what the command made is cleaned up, and the CLI exits 128 + 15."""

    exit_code = 143


@contextlib.contextmanager
def sigterm_interrupts():
    """SIGTERM raises `Terminated` (a KeyboardInterrupt) while inside, where it would otherwise kill the process
    with no clean-up; only when nothing else handles SIGTERM, and from the main thread. Training's own handlers
    (`loop.fit`) take over while it runs and give this one back."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        yield
        return

    def terminate(signum, frame):
        raise Terminated

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def why_not_a_file(path, model: bool = True) -> str:
    """Why `path` cannot be read as a file, for a message: "does not exist", or "is a folder, not a file" — for a
    `model` file with the model.pt inside it to pass instead when the folder is a run's (a common slip:
    --model RUN)."""
    from pathlib import Path

    path = Path(path)
    if not path.is_dir():
        return "does not exist"
    inside = path / "model.pt"
    return "is a folder, not a file" + (f"; its model is {inside}" if model and inside.is_file() else "")
