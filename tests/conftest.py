import pytest
import torch

from tests.e2e.reviewed import PIPELINES as REVIEWED

# Session-scoped real parts (Ray head, moto S3) for tests/integration and tests/e2e, defined once here;
# `cluster` (PostgreSQL, an MLflow server, two Ray nodes) is module-scoped: tests/e2e/test_cluster.py.
from tests.realparts import cluster, end_started, home, moto_s3  # noqa: F401

REAL_PARTS = ("tests/integration/", "tests/e2e/")
FAMILIES = "tests/e2e/test_families.py::"
# test_families' cases for the families the registry review trains check the session's pipelines
REVIEWED_CASES = tuple(f"[{family}]" for family in REVIEWED)


def _scope(nodeid: str) -> str:
    """The unit of work xdist hands a worker: all of it runs there, in order."""
    if nodeid.startswith(FAMILIES) and not nodeid.endswith(REVIEWED_CASES):
        return "families"  # their own GENPIPE_HOME, head and database: nothing shared with the others
    return "real parts" if nodeid.startswith(REAL_PARTS) else nodeid


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Under xdist (scripts/test.sh runs two workers) the tests on the real parts run on one worker, in
    order: they share one Ray head, moto server and MLflow database, and on 2 cores a second head would
    only slow both. The other worker runs the unit tests beside them, in the time the real-parts tests
    leave the CPUs idle (waiting on a head, a timeout, a restart), and then the families' pipelines,
    which share nothing with the real-parts tests (their own home and head) and would otherwise leave
    that worker idle for the last third of the run. (xdist's own `--dist loadgroup` keys groups on
    rewritten node ids, which pytest 9 no longer takes.)"""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # scopes in collection order, not largest first: families last

    class RealPartsOnOneWorker(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scope(nodeid)

    return RealPartsOnOneWorker(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The families' scope last: xdist hands out scopes in collection order, so the worker that has run
    the unit tests takes it, while the other is still on the real parts."""
    items.sort(key=lambda item: _scope(item.nodeid) == "families")  # stable: every other order stays


@pytest.fixture(autouse=True)
def _end_started() -> None:
    """Whatever `genpipe` a test started and left running (it failed half-way) ends with it."""
    yield
    end_started()


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Random init and random batches, but the same ones on every run."""
    torch.manual_seed(0)
