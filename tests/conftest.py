import pytest
import torch

# Session-scoped real parts (Ray head, moto S3) for tests/integration and tests/e2e, defined once here;
# `cluster` (PostgreSQL, an MLflow server, two Ray nodes) is module-scoped: tests/e2e/test_cluster.py.
from tests.realparts import cluster, home, moto_s3  # noqa: F401
from tests.realparts import end_started


REAL_PARTS = ("tests/integration/", "tests/e2e/")
# Real parts of its own (a GENPIPE_HOME, head and database nobody else uses): not bound to the others' worker.
OWN_HEAD = "tests/e2e/test_families.py"
# Real-parts tests that go together to whichever worker frees first, and start a head there: the `home`
# fixture is per worker (xdist gives each its own session).
SECOND_HEAD = ("tests/integration/test_image_folder.py", "tests/integration/test_train.py",
               "tests/integration/test_tune.py")


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Under xdist (scripts/test.sh runs two workers) the tests on the real parts run in three groups
    (scopes), each in order on one worker with a head of its own; the unit tests, each a scope of one,
    fill the time the groups leave.

    xdist hands out the largest scope first and gives a worker its next one when it has two tests left:
    the real parts take one worker and the nine family pipelines (tests/e2e/test_families.py) the other;
    the worker that is through the family pipelines takes the Train runs and searches of SECOND_HEAD
    (about 6 minutes), and the unit tests go to whichever worker frees first. With one group for all the
    real parts, their worker ran for 20 minutes while the other had finished the family pipelines and
    every unit test in 10.5. (xdist's own `--dist loadgroup` keys groups on rewritten node ids, which
    pytest 9 no longer takes.)"""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class RealPartsInGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.startswith(OWN_HEAD):
                return "families"
            if nodeid.startswith(SECOND_HEAD):
                return "real parts, second head"
            return "real parts" if nodeid.startswith(REAL_PARTS) else nodeid

    return RealPartsInGroups(config, log)


@pytest.fixture(autouse=True)
def _end_started() -> None:
    """Whatever `genpipe` a test started and left running (it failed half-way) ends with it."""
    yield
    end_started()


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Random init and random batches, but the same ones on every run."""
    torch.manual_seed(0)
