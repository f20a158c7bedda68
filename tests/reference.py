"""torchreid 0.2.5 as a test-only reference: its module files are loaded straight from the PyPI sdist
(`make test` downloads it to .cache/reference/), because importing the `torchreid` package needs unrelated
dependencies. Tests that need it are skipped with a clear reason when the sdist is absent."""

from __future__ import annotations

import importlib.util
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SDIST = REPO / ".cache" / "reference" / "torchreid-0.2.5.tar.gz"
EXTRACTED = REPO / ".cache" / "reference" / "torchreid-0.2.5"


def torchreid_source() -> Path:
    """The extracted sdist folder (extracted once)."""
    if not EXTRACTED.is_dir():
        if not SDIST.is_file():
            pytest.skip(f"torchreid reference sdist missing at {SDIST}; run `make test` (it downloads it)")
        with tarfile.open(SDIST) as archive:
            archive.extractall(EXTRACTED.parent, filter="data")
    return EXTRACTED


def load_torchreid_module(relative_path: str, name: str | None = None):
    """Import one torchreid source file, e.g. `torchreid/models/osnet.py`, as a standalone module."""
    path = torchreid_source() / relative_path
    name = name or "torchreid_ref_" + relative_path.replace("/", "_").removesuffix(".py")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def randomise_batchnorm(model, seed: int = 0) -> None:
    """Random BN statistics and affine weights, so that a parity test exercises every BatchNorm (an identity BN
    would hide a wrong one)."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
