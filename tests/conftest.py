import pytest
import torch

from tests.e2e.reviewed import PIPELINES as REVIEWED

# Session-scoped real parts (Ray head, moto S3) for tests/integration and tests/e2e, defined once here;
# `cluster` (PostgreSQL, an MLflow server, two Ray nodes) is module-scoped: tests/e2e/test_cluster.py.
from tests.realparts import cluster, end_started, home, moto_s3  # noqa: F401

REAL_PARTS = ("tests/integration/", "tests/e2e/")
# Real-parts modules that bring their own GENPIPE_HOME and head (and the cluster its own servers), sharing
# nothing with the others: a scope each, in this order at the end of the run (pytest_collection_modifyitems).
OWN_PARTS = {"tests/e2e/test_families.py::": "families", "tests/e2e/test_cluster.py::": "cluster"}
# test_families' cases for the families the registry review trains check the session's pipelines
REVIEWED_CASES = tuple(f"[{family}]" for family in REVIEWED)


def _scope(nodeid: str) -> str:
    """The unit of work xdist hands a worker: all of it runs there, in order."""
    for prefix, scope in OWN_PARTS.items():
        if nodeid.startswith(prefix) and not (scope == "families" and nodeid.endswith(REVIEWED_CASES)):
            return scope
    return "real parts" if nodeid.startswith(REAL_PARTS) else nodeid


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Under xdist (scripts/test.sh runs two workers) the tests on the real parts run on one worker, in
    order: they share one Ray head, moto server and MLflow database, and on 2 cores a second head would
    only slow both. The other worker runs the unit tests beside them, in the time the real-parts tests
    leave the CPUs idle (waiting on a head, a timeout, a restart), then the OWN_PARTS modules, which
    share nothing with the real-parts tests and would otherwise wait for them on the first worker while
    the second one idles. (xdist's own `--dist loadgroup` keys groups on rewritten node ids, which
    pytest 9 no longer takes.)"""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # scopes in collection order, not largest first

    class RealPartsOnOneWorker(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scope(nodeid)

    return RealPartsOnOneWorker(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """OWN_PARTS last, in its order: xdist hands out scopes in collection order, so the worker that has
    run the unit tests takes them while the other is still on the real parts."""
    last = list(OWN_PARTS.values())
    items.sort(key=lambda item: 1 + last.index(s) if (s := _scope(item.nodeid)) in last else 0)  # stable


@pytest.fixture(autouse=True)
def _end_started() -> None:
    """Whatever `genpipe` a test started and left running (it failed half-way) ends with it."""
    yield
    end_started()


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Random init and random batches, but the same ones on every run."""
    torch.manual_seed(0)
