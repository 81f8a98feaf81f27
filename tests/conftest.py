import pytest
import torch

# Session-scoped real parts (Ray head, moto S3) for tests/integration and tests/e2e, defined once here;
# `cluster` (PostgreSQL, an MLflow server, two Ray nodes) is module-scoped: tests/e2e/test_cluster.py.
from tests.realparts import cluster, home, moto_s3  # noqa: F401
from tests.realparts import end_started


REAL_PARTS = ("tests/integration/", "tests/e2e/")
# Real parts of their own (a head, database or cluster nobody else uses), or none (DDP in processes of its
# own, no Ray): not bound to the others' worker.
OWN_PARTS = {"tests/e2e/test_families.py": "families", "tests/e2e/test_registry.py": "families",
             "tests/e2e/test_cluster.py": "cluster", "tests/integration/test_ddp_equivalence.py": "ddp"}


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Under xdist (scripts/test.sh runs two workers) the tests on the real parts run on one worker, in
    order: they share one Ray head, moto server and MLflow database, and on 2 cores a second head would
    only slow both (tried: the suite took as long, on 300 more CPU-seconds). The other worker runs what
    has real parts of its own, then the unit tests, in the time the real-parts tests leave the CPUs idle
    (waiting on a head, a timeout, a restart).

    xdist hands out the largest scope first and gives a worker its next one when it has two tests left:
    the real parts take one worker, every family's pipeline (tests/e2e/test_families.py, and the registry
    review of three of them, tests/e2e/test_registry.py: a head of their own) the other, which then takes
    the two-node cluster (tests/e2e/test_cluster.py), DDP equivalence (no Ray at all) and the unit tests.
    With the cluster at the head of the real-parts worker's queue, that worker ran 21 minutes while the
    other was done after 11. (xdist's own `--dist loadgroup` keys groups on rewritten node ids, which
    pytest 9 no longer takes.)"""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class RealPartsOnOneWorker(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            for prefix, scope in OWN_PARTS.items():
                if nodeid.startswith(prefix):
                    return scope
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
