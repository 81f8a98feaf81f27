# The registry review's pipelines are session-scoped: test_registry.py reviews them and checks those three families.
from tests.e2e.reviewed import reviewed  # noqa: F401
