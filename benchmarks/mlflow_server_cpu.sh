#!/usr/bin/env bash
# The CPU an `mlflow server` takes to start and sit idle for 30 s, by process, with MLflow's job execution
# on (its default) and off (what genpipe sets: `genpipe ui`, the tests' servers, infra/k8s/mlflow.yaml):
#
#     bash benchmarks/mlflow_server_cpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
serve() {  # a server on a fresh sqlite database; prints the seconds to /health; stops it 30 s later
  local d port t0 pid
  d=$(mktemp -d); port=$((20000 + RANDOM % 10000)); t0=$(date +%s.%N)
  setsid .venv/bin/mlflow server --host 127.0.0.1 --port "$port" --workers 1 --backend-store-uri "sqlite:///$d/db.sqlite" \
    --artifacts-destination "$d/a" > "$d/log" 2>&1 &
  pid=$!
  until curl -sf "127.0.0.1:$port/health" > /dev/null; do
    kill -0 "$pid" 2> /dev/null || { echo "mlflow server exited:"; tail -20 "$d/log"; return 1; }
    sleep 0.2
  done
  echo "health after $(echo "$(date +%s.%N) - $t0" | bc) s"
  sleep 30; kill -TERM -- -"$pid"; sleep 3; kill -KILL -- -"$pid" 2> /dev/null; rm -rf "$d"
}
export -f serve
for on in true false; do
  echo "== MLFLOW_SERVER_ENABLE_JOB_EXECUTION=$on"
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=$on .venv/bin/python benchmarks/process_cpu.py -- bash -c serve
done
