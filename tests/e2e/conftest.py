# Every family's pipeline, the registry review's among them, on a home of their own: tests/e2e/family_runs.py.
from tests.e2e.family_runs import fresh_home, pipelines, reviewed  # noqa: F401
