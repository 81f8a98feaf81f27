#!/bin/bash
# Per-process CPU of warm smoke pipelines on one local head, pipelines/ of two revisions alternated:
#   bash benchmarks/results/cpu-2026-12-06g/process_cpu_ab.sh cf60016 bd01ce0
# (run from the repository root with .venv set up; the working tree's pipelines/ is restored at the end)
set -u
A=$1; B=$2
export GENPIPE_HOME=$(mktemp -d /tmp/gph.XXXX)
saved=$(mktemp -d); cp -r pipelines "$saved/"
trap 'rm -rf pipelines; cp -r "$saved/pipelines" .; .venv/bin/genpipe head stop >/dev/null 2>&1; rm -rf $GENPIPE_HOME $saved' EXIT
use() { rm -rf pipelines; git archive "$1" pipelines | tar -x; }
use "$A"
.venv/bin/genpipe pipeline --config jobs/smoke.yaml >/dev/null 2>&1  # the head's start and the prepare
for i in 1 2; do for rev in "$A" "$B"; do
  use "$rev"
  echo "== $rev $i"
  .venv/bin/python benchmarks/process_cpu.py -- .venv/bin/genpipe pipeline --config jobs/smoke.yaml \
    --set name=p$i$rev 2>/dev/null | grep -E "stage |genpipe pipeline|total"
done; done
