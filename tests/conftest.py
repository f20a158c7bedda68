import os
import signal

import pytest
import torch

# Two cores are shared by pytest-xdist workers; one intra-op thread each keeps them from fighting.
torch.set_num_threads(1)
os.environ.setdefault("KDREID_TEST", "1")


@pytest.fixture(autouse=True)
def sigint_as_python_sets_it():
    """SIGINT raises KeyboardInterrupt in every test, however pytest was started: one started in the background by
    a script inherits SIGINT ignored (and so would the commands it runs), where a test that raises it, or sends it to
    a child, would test nothing."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def drawn_figures(monkeypatch):
    """drawn_figures(module) -> the list that collects each Figure the module's picture functions hand to save_png
    (the PNG is still written): what a picture shows, read back from the figure."""
    def capture(module):
        figures, real_save = [], module.save_png
        monkeypatch.setattr(module, "save_png", lambda figure, path: figures.append(figure) or real_save(figure, path))
        return figures

    return capture


@pytest.fixture
def pipeline_config_of(tmp_path, monkeypatch):
    """pipeline_config_of(argv) -> the PipelineConfig `kdreid <argv>` hands to pipeline.run (which is not run)."""
    from kdreid.cli import main
    from kdreid.stages import pipeline

    def resolve(argv):
        seen = []

        def fake_run(config):
            seen.append(config)
            (tmp_path / "results.md").write_text("")
            return pipeline.PipelineResult(str(tmp_path), {}, [], [])

        monkeypatch.setattr(pipeline, "run", fake_run)
        assert main(argv) == 0
        return seen[0]

    return resolve


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(0)
