#!/usr/bin/env bash
# Set up, then run the whole test suite. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
# Two xdist workers: the real-parts tests in order on one; on the other the family pipelines and the two-node
# cluster, which have real parts of their own, then the unit tests (tests/conftest.py).
.venv/bin/python -m pytest -q -ra --durations=15 -n 2 "$@"
rc=$?
if [ "$rc" = 5 ]; then
  echo "test.sh: pytest collected no tests: the set-up is broken" >&2
  exit 1
fi
exit "$rc"
