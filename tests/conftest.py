import pytest
import torch

# Session-scoped real parts (Ray head, moto S3) for tests/integration and tests/e2e, defined once here;
# `cluster` (PostgreSQL, an MLflow server, two Ray nodes) is module-scoped: tests/e2e/test_cluster.py.
from tests.realparts import cluster, home, moto_s3  # noqa: F401
from tests.realparts import end_started


REAL_PARTS = ("tests/integration/", "tests/e2e/")
# Real parts of its own (a GENPIPE_HOME, head and database nobody else uses): not bound to the others' worker.
OWN_HEAD = "tests/e2e/test_families.py"


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Under xdist (scripts/test.sh runs two workers) the tests on the real parts run on one worker, in
    order: they share one Ray head, moto server and MLflow database, and on 2 cores a second head would
    only slow both. The other worker runs the unit tests beside them, in the time the real-parts tests
    leave the CPUs idle (waiting on a head, a timeout, a restart), and, first, tests/e2e/test_families.py,
    whose nine pipelines have a home and head of their own: the scopes go out largest first, so the real
    parts take one worker and the families the other. Without that, the real-parts worker ran for 22
    minutes while the other was done after 9. (xdist's own `--dist loadgroup` keys groups on rewritten
    node ids, which pytest 9 no longer takes.)"""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class RealPartsOnOneWorker(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.startswith(OWN_HEAD):
                return "families"
            return "real parts" if nodeid.startswith(REAL_PARTS) else nodeid

    return RealPartsOnOneWorker(config, log)


@pytest.fixture(autouse=True)
def _end_started() -> None:
    """Whatever `genpipe` a test started and left running (it failed half-way) ends with it."""
    yield
    end_started()


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Random init and random batches, but the same ones on every run."""
    torch.manual_seed(0)
