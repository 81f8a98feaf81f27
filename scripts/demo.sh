#!/usr/bin/env bash
# Set up, then run the demo pipeline (DCGAN on Fashion-MNIST, CPU, local Ray
# head, MLflow in .genpipe/mlflow.db). Extra arguments go to `genpipe pipeline`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/genpipe pipeline --config jobs/demo.yaml "$@"
