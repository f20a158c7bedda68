"""One folder per run: the resolved config, a log, metrics. Files are written atomically (temp file + rename),
so a run killed mid-write never leaves a half-written file behind."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from kdreid.config import dump_yaml


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


class RunDir:
    """A run's folder: `config.yaml`, `log.txt`, `metrics.json` (and whatever a stage adds)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

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
        if not log.handlers:
            log.setLevel(logging.INFO)
            log.propagate = False
            file_handler = logging.FileHandler(self.path / "log.txt")
            file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
            console = logging.StreamHandler()
            console.setFormatter(logging.Formatter("%(message)s"))
            log.addHandler(file_handler)
            log.addHandler(console)
        return log
