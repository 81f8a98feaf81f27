"""Fixtures of the learning tests: real data, small enough for a CPU."""

import pytest
import torch
from sklearn.datasets import load_digits


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    """Train / test split of the 1797 digits, images in [0, 1] from 17 grey levels."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny nets on a 2-core machine: one thread avoids contention and is faster.

    Session-wide, so module fixtures see the same thread count as the tests
    (CPU float results depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
