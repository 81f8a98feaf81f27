#!/usr/bin/env bash
# Idempotent set-up: Fashion-MNIST and PostgreSQL from Debian's packages (when apt is there),
# a virtualenv in .venv with genpipe and its pinned dependencies. Re-runs
# install again only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "setup: installing Debian's dataset-fashion-mnist" >&2
  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 ||
   { apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null; }) ||
    echo "setup: could not install dataset-fashion-mnist; prepare will look in data.root or download" >&2
fi

# PostgreSQL for the cluster tests' MLflow server (tests/realparts.py also looks in
# /usr/lib/postgresql/*/bin, which Debian's package does not put on PATH).
if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 &&
   command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "setup: installing Debian's postgresql" >&2
  export DEBIAN_FRONTEND=noninteractive
  (apt-get install -y -qq postgresql >/dev/null 2>&1 ||
   { apt-get update -qq >/dev/null && apt-get install -y -qq postgresql >/dev/null; }) ||
    echo "setup: could not install postgresql; the cluster tests will be skipped" >&2
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat .venv/.genpipe-stamp 2>/dev/null)" != "$stamp" ]; then
  echo "setup: installing into .venv (first time: about 3 minutes)" >&2
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[dev]'
  echo "$stamp" > .venv/.genpipe-stamp
fi
