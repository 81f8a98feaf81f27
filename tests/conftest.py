import pytest
import torch

# Session-scoped real parts (Ray head, moto S3) for tests/integration and tests/e2e, defined once here.
from tests.realparts import home, moto_s3  # noqa: F401


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Random init and random batches, but the same ones on every run."""
    torch.manual_seed(0)
