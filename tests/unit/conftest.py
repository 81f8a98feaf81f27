"""Fixtures of the learning tests: real data, small enough for a CPU."""

import pytest
import torch
from sklearn.datasets import load_digits

from pipelines.metrics import Extractor, extract, fid_from_features, train_extractor
from tests.realparts import moto_s3  # noqa: F401 - the S3 server of the storage tests


@pytest.fixture(scope="session")
def digits() -> dict[str, torch.Tensor]:
    """Train / test split of the 1797 digits, images in [0, 1] from 17 grey levels; x_*_uint8 are
    the same images as the pipeline stores them, which is what an extractor is fitted on."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    as_uint8 = lambda x: (x * 255).round().to(torch.uint8)  # noqa: E731
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test],
            "x_train_uint8": as_uint8(x[train]), "x_test_uint8": as_uint8(x[test])}


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny nets on a 2-core machine: one thread avoids contention and is faster.

    Session-wide, so module fixtures see the same thread count as the tests
    (CPU float results depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_extractor(digits) -> tuple[Extractor, float]:
    """(the pipeline's FID extractor fitted to these digits, its test accuracy): fitted once a
    session, for the learning tests' judge and for test_metrics alike."""
    return train_extractor(digits["x_train_uint8"], digits["y_train"], num_classes=10, epochs=10, seed=0,
                           x_test=digits["x_test_uint8"], y_test=digits["y_test"])


class Judge:
    """Scores samples the way the pipeline's evaluate stage would: on the features of
    a classifier fitted to these digits, against the test split."""

    def __init__(self, digits: dict[str, torch.Tensor], extractor: Extractor):
        self.extractor = extractor
        self.real, _ = extract(self.extractor, digits["x_test"])

    def fid(self, images: torch.Tensor) -> float:
        return fid_from_features(extract(self.extractor, images)[0], self.real)

    def label_accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        _, logits = extract(self.extractor, images)
        return float((logits.argmax(1) == labels.numpy()).mean())


@pytest.fixture(scope="session")
def judge(digits, digits_extractor) -> Judge:
    extractor, accuracy = digits_extractor
    assert accuracy > 0.85, f"extractor accuracy {accuracy}: FID on its features would mean little"
    return Judge(digits, extractor)
