"""Shared by tests/viz and tests/test_report.py: one tiny synthetic domain and a tiny random model, made once per
test session (per xdist worker)."""

import pytest
import torch

from kdreid.cli import main
from kdreid.models import build_model, save_checkpoint


@pytest.fixture(scope="session")
def tiny_domain(tmp_path_factory):
    """DATA/synth_duke at 64x32: 22 queries, 177 gallery images (scale 0.01)."""
    root = tmp_path_factory.mktemp("viz_data")
    assert main(["data", "synth", "--out", str(root), "--domains", "synth_duke", "--scale", "0.01",
                 "--size", "64x32", "--seed", "0", "--workers", "1"]) == 0
    return root


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random osnet_tiny checkpoint that records its 64x32 input size."""
    torch.manual_seed(0)
    model = build_model("osnet_tiny", num_classes=0).eval()
    path = tmp_path_factory.mktemp("viz_model") / "model.pt"
    save_checkpoint(path, model, extra={"input_size": [64, 32]})
    return path
