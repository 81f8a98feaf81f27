"""The pipeline's training loop against a bare PyTorch loop: same model, batch,
data and thread count, in one process, interleaved so drift hits both alike.

    .venv/bin/python benchmarks/train_loop.py [--family dcgan vae] [--steps 60] [--threads 1]

Prints a table and one JSON line; the ratio is pipeline img/s over bare img/s
(target >= 0.9 on the CPU with one worker).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from gen_models import registry
from gen_models.base import StepContext
from pipelines.train import StepBatches, run_steps


def bare(model, ctx, x, y, steps: int, batch: int) -> float:
    """What a user would write: random batch, training_step, nothing else."""
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(x), (batch,))
        ctx.step = step
        model.training_step((x[idx].float().div_(255), y[idx]), ctx)
    return batch * steps / (time.perf_counter() - t0)


def pipeline(model, ctx, x, y, steps: int, batch: int) -> float:
    batches = StepBatches(x, y, global_batch=batch, seed=0, rank=0, world=1)
    t0 = time.perf_counter()
    for _ in run_steps(model, ctx, batches, start=0, stop=steps, seed=0, device=torch.device("cpu"),
                       report_due=lambda done: done % 20 == 0):
        pass
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--family", nargs="+", default=["dcgan", "vae"])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=64, help="per-worker batch (the demo's 128 over 2 workers)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, as one worker with cpus_per_worker=1")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (10_000, 1, 28, 28), dtype=torch.uint8, generator=g)  # Fashion-MNIST's shape
    y = torch.randint(0, 10, (10_000,), generator=g)
    results = {}
    for family in a.family:
        rates = {"bare": [], "pipeline": []}
        for r in range(a.rounds + 1):  # round 0 warms up allocator and kernels
            for name, loop in (("bare", bare), ("pipeline", pipeline)) if r % 2 else (("pipeline", pipeline), ("bare", bare)):
                torch.manual_seed(0)
                model = registry.build(family, {"image_size": 28, "channels": 1, "num_classes": 10})
                ctx = StepContext(optimizers=model.configure_optimizers())
                rate = loop(model, ctx, x, y, a.steps, a.batch)
                if r:
                    rates[name].append(rate)
        bare_rate, pipe_rate = statistics.median(rates["bare"]), statistics.median(rates["pipeline"])
        results[family] = {"bare_img_per_s": round(bare_rate, 1), "pipeline_img_per_s": round(pipe_rate, 1),
                           "ratio": round(pipe_rate / bare_rate, 3)}
    print(f"{'family':10} {'bare img/s':>11} {'pipeline img/s':>15} {'ratio':>6}")
    for f, r in results.items():
        print(f"{f:10} {r['bare_img_per_s']:>11} {r['pipeline_img_per_s']:>15} {r['ratio']:>6}")
    print(json.dumps({"benchmark": "train_loop", "threads": a.threads, "batch": a.batch, "steps": a.steps,
                      "results": results}))


if __name__ == "__main__":
    main()
