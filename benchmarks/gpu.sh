#!/usr/bin/env bash
# The GPU figures of the README's performance section, in one call on a machine
# with one CUDA GPU and PyTorch installed (no Ray or MLflow needed):
#
#     bash benchmarks/gpu.sh [OUTDIR]
#
# Wheels under .whl/ (pydantic, which pipelines.config needs) are installed to
# /tmp/site first when present. Each part has its own time limit so that one
# slow family cannot take the others' figures with it.
set -uo pipefail
out=${1:-${OUT:-/tmp/genpipe-bench}}
mkdir -p "$out"
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"

# 1. Every family, fp32: the pipeline's loop and the DDP (nccl) loop against the bare loop.
timeout 200 python3 benchmarks/train_loop.py --device cuda --batch 256 --steps 100 --rounds 3 \
  2>&1 | tee "$out/train_loop_fp32_b256.log"
# 2. The GPU-path flags: bf16 autocast + channels_last, at the demo-like batch and at a large one.
timeout 200 python3 benchmarks/train_loop.py --device cuda --batch 256 --steps 20 --rounds 2 \
  --variant fp32 bf16_cl 2>&1 | tee "$out/train_loop.log"
timeout 60 python3 benchmarks/train_loop.py --device cuda --batch 2048 --steps 10 --rounds 2 \
  --family dcgan stylegan --variant fp32 bf16_cl 2>&1 | tee "$out/train_loop_b2048.log"
# 2b. The data path: DCGAN 64x64 RGB at batch 256 with the split read in place against the split on the device.
timeout 200 python3 benchmarks/data_path.py --device cuda --batch 256 --steps 50 --training-only \
  2>&1 | tee "$out/data_path.log"
# 3. torch.compile (bf16 + channels_last + compile) on the conv families.
timeout 140 python3 benchmarks/train_loop.py --device cuda --batch 256 --steps 20 --rounds 2 \
  --family dcgan ddpm stylegan --variant bf16_cl_compile 2>&1 | tee "$out/train_loop_compile.log"
# 4. Sampling cost per sampler.
timeout 80 python3 benchmarks/sampling.py --device cuda --n 500 2>&1 | tee "$out/sampling.log"
