#!/usr/bin/env bash
# The GPU figures of benchmarks/README.md, in one call on a machine with one CUDA GPU
# and PyTorch installed (no Ray or MLflow needed), in about 9 minutes:
#
#     bash benchmarks/gpu.sh [OUTDIR] [FASHION_MNIST_DIR]
#
# Wheels under .whl/ (pydantic and its needs, for pipelines.config) are installed to
# /tmp/site first when present. FASHION_MNIST_DIR holds the four idx files (default: the
# Debian package's directory); a fitted extractor in .gpu/extractor/ is used as it is
# (benchmarks/full_recipes.py fits and saves one there on any machine). Each part has its
# own time limit, so that one slow part cannot take the others' figures with it. The
# bf16 / channels_last / torch.compile rows and the sampling table were measured by an
# earlier version of this script (results/h200-2026-11-29/) and are not re-run here.
set -uo pipefail
out=${1:-${OUT:-/tmp/genpipe-bench}}
fmnist=${2:-/usr/share/datasets/fashion-mnist}
mkdir -p "$out"
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$out/gpu.txt"

# 1. Every family, fp32, batch 256: the pipeline's loop and the DDP (nccl) loop against the bare loop.
timeout 130 python3 benchmarks/train_loop.py --device cuda --batch 256 --steps 30 --rounds 2 \
  2>&1 | tee "$out/train_loop.log"
# 2. The data path: DCGAN 64x64 RGB at batch 256, the split read in place against the split on the device.
timeout 80 python3 benchmarks/data_path.py --device cuda --batch 256 --steps 50 --training-only \
  2>&1 | tee "$out/data_path.log"
# 3. Full recipes: the spec's whole run, then the evaluate stage's scores, each family capped at 110 s of training.
timeout 330 python3 benchmarks/full_recipes.py --device cuda --work /tmp/genpipe-full --extractor .gpu/extractor \
  --data-root "$fmnist" --max-train-s 110 --out "$out" \
  --specs jobs/dcgan.yaml jobs/vae.yaml jobs/conv_vae.yaml jobs/beta_vae.yaml \
  2>&1 | tee "$out/full_recipes.log"
