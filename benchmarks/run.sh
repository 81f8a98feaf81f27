#!/usr/bin/env bash
# The CPU benchmark suite in one command (the GPU one is benchmarks/gpu.sh):
#
#     bash benchmarks/run.sh [OUTDIR]          # about 45 minutes on 2 cores
#
# Each benchmark prints a table and ends with one JSON line; the JSON lines are
# collected in OUTDIR/bench.jsonl. Run it on an otherwise idle machine: the
# ratios are measured side by side, the orchestration shares are wall times.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
out=${1:-benchmarks/results/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
py=.venv/bin/python
run() { local name=$1; shift; "$py" "$@" 2>&1 | tee "$out/$name.log"; tail -n 1 "$out/$name.log" >>"$out/bench.jsonl"; }
# 1. The training loop against a bare PyTorch loop, every family (heavy ones on fewer steps).
run train_loop_fast benchmarks/train_loop.py --family beta_vae cgan conv_vae dcgan gan vae wgan wgan_gp --steps 40 --rounds 3
run train_loop_heavy benchmarks/train_loop.py --family ddpm ebm pixelcnn realnvp stylegan --steps 6 --rounds 2
# 2. Sampling cost per family and sampler.
run sampling benchmarks/sampling.py --n 8
# 2b. What DDIM's cheaper chain costs in quality: a DDPM trained on 8x8 digits, each sampler's img/s and FID.
run sampling_quality benchmarks/sampling_quality.py
# 3. The data path: the split read in place against memory and Ray Data, peak RSS at 1x and 10x the images.
run data_path benchmarks/data_path.py
# 4. Orchestration overhead of the smoke and demo pipelines; 5. scaling: the demo on one worker.
run orchestration_smoke benchmarks/orchestration.py --config jobs/smoke.yaml --warm
run orchestration_demo benchmarks/orchestration.py --config jobs/demo.yaml
run orchestration_demo_1worker benchmarks/orchestration.py --config jobs/demo.yaml --set train.num_workers=1
echo "results: $out/bench.jsonl"
