# The registry review's pipelines are session-scoped: test_families.py counts them too.
from tests.e2e.reviewed import reviewed  # noqa: F401
