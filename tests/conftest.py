import os

import pytest
import torch

# Two cores are shared by pytest-xdist workers; one intra-op thread each keeps them from fighting.
torch.set_num_threads(1)
os.environ.setdefault("KDREID_TEST", "1")


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(0)
