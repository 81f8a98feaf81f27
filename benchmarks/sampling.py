"""Sampling cost per family and sampler, in images/s, on the default (full-size) configs.

    .venv/bin/python benchmarks/sampling.py --n 16                 # CPU
    python benchmarks/sampling.py --device cuda --n 1000

Weights are untrained: cost does not depend on them. How close DDIM's samples
come to the full DDPM chain is a quality question, answered on trained weights
by tests/unit/test_learning_ddpm.py and by the evaluate stage's FID. Prints a
table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from gen_models import registry

# (family, sample kwargs, label): the samplers worth comparing; one-pass families for scale.
CASES = [
    ("dcgan", {}, "generator"),
    ("stylegan", {}, "generator"),
    ("vae", {}, "decoder"),
    ("conv_vae", {}, "decoder"),
    ("realnvp", {}, "inverse flow"),
    ("ddpm", {"sampler": "ddpm"}, "ddpm 1000 steps"),
    ("ddpm", {"sampler": "ddim", "steps": 100}, "ddim 100 steps"),
    ("ddpm", {"sampler": "ddim", "steps": 50}, "ddim 50 steps"),
    ("pixelcnn", {}, "autoregressive, 784 passes"),
    ("ebm", {}, "langevin"),
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=16, help="images per timed call")
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--family", nargs="+", help="only these families")
    p.add_argument("--bf16", action="store_true", help="sample under bf16 autocast")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    results = {}
    for family, kwargs, label in CASES:
        if a.family and family not in a.family:
            continue
        torch.manual_seed(0)
        model = registry.build(family, {"image_size": a.size, "channels": 1, "num_classes": 10}).to(device).eval()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.bf16):
            model.sample(2, **kwargs)  # warm-up: kernels, allocator
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            x = model.sample(a.n, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        assert x.shape[0] == a.n and torch.isfinite(x).all(), family
        results[f"{family}:{label}"] = {"img_per_s": round(a.n / seconds, 2), "seconds": round(seconds, 3)}
        print(json.dumps({f"{family}:{label}": results[f"{family}:{label}"]}), flush=True)
    print(f"{'family:sampler':40} {'img/s':>10} {'s per call':>10}")
    for k, r in results.items():
        print(f"{k:40} {r['img_per_s']:>10} {r['seconds']:>10}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{a.threads} threads"
    print(json.dumps({"benchmark": "sampling", "device": name, "n": a.n, "bf16": a.bf16, "results": results}))


if __name__ == "__main__":
    main()
