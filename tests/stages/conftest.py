import os

import pytest

from kdreid.cli import main


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """Two tiny synthetic domains (a source and a target) at 64×32, generated once per test session."""
    root = tmp_path_factory.mktemp("synth")
    code = main(["data", "synth", "--out", str(root), "--domains", "synth_msmt", "synth_duke",
                 "--scale", "0.01", "--size", "64x32", "--seed", "0", "--workers", "1"])
    assert code == 0
    return root


@pytest.fixture(scope="session")
def three_domains(synth_root, tmp_path_factory):
    """The session's synth_msmt and synth_duke plus a third domain, synth_cuhk, generated the same way."""
    root = tmp_path_factory.mktemp("synth3")
    assert main(["data", "synth", "--out", str(root), "--domains", "synth_cuhk", "--scale", "0.01",
                 "--size", "64x32", "--seed", "0", "--workers", "1"]) == 0
    for name in ("synth_msmt", "synth_duke"):
        os.symlink(synth_root / name, root / name)
    return root


@pytest.fixture(scope="session")
def source_model(synth_root, tmp_path_factory):
    """An osnet_tiny trained one epoch on synth_msmt at 32x16: the start of the adaptation tests that need a source
    model and no accuracy."""
    out = tmp_path_factory.mktemp("source") / "source"
    assert main(["train-source", "-s", "synth_msmt", "-a", "osnet_tiny", "--root", str(synth_root), "--out",
                 str(out), "--epochs", "1", "--batch-size", "16", "--num-instances", "4", "--height", "32",
                 "--width", "16", "--device", "cpu", "--seed", "0"]) == 0
    return out / "model.pt"
