"""DDPM's samplers side by side on trained weights: images/s and FID, in one run.

    .venv/bin/python benchmarks/sampling_quality.py            # about 4 minutes on 2 CPU cores

Trains a small DDPM (T = 1000, cosine schedule, the 173k-parameter UNet of
tests/unit/test_learning_ddpm.py) on scikit-learn's 8x8 digits with the
pipeline's own loop (`pipelines.steps.run_steps`), then draws as many samples
as the test split holds with the ancestral sampler over all 1000 steps and with
DDIM over 100 and 50, each from the same seed. FID is the pipeline's: on the
features of a classifier fitted to the same digits (as prepare fits one per
dataset), against the test split. Its floor is the train split scored the same
way. sampling.py gives the cost of every family's sampler at 28x28 on
untrained weights; this one answers what the cheaper sampler costs in quality.
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from gen_models import registry
from gen_models.base import StepContext
from pipelines import metrics
from pipelines.data import load_source
from pipelines.steps import StepBatches, run_steps

MODEL = {"image_size": 8, "channels": 1, "timesteps": 1000, "schedule": "cosine", "base_channels": 16,
         "channel_mults": (1, 2), "num_res_blocks": 1, "lr": 2e-3, "ema_decay": 0.995}
SAMPLERS = [("ddpm 1000 steps (ancestral)", {"sampler": "ddpm"}),
            ("ddim 100 steps", {"sampler": "ddim", "steps": 100}),
            ("ddim 50 steps", {"sampler": "ddim", "steps": 50})]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=1500, help="training steps, batch 64")
    p.add_argument("--threads", type=int, default=1, help="an 8x8 UNet runs fastest on one thread")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    raw = load_source("digits", None)
    x_train, y_train = torch.from_numpy(raw.x_train), torch.from_numpy(raw.y_train)
    x_test = torch.from_numpy(raw.x_test).float() / 255

    extractor, accuracy = metrics.train_extractor(raw.x_train, raw.y_train, num_classes=10, epochs=10, seed=0,
                                                  x_test=raw.x_test, y_test=raw.y_test)
    real = metrics.extract(extractor, x_test)[0]

    def fid(images: torch.Tensor) -> float:
        return metrics.fid_from_features(metrics.extract(extractor, images)[0], real)

    floor = fid(x_train.float()[:len(x_test)] / 255)
    print(f"extractor test accuracy {accuracy:.3f}; FID floor (train digits vs test) {floor:.2f}", flush=True)

    torch.manual_seed(a.seed)
    model = registry.build("ddpm", MODEL)
    ctx = StepContext(optimizers=model.configure_optimizers())
    batches = StepBatches(x_train, y_train, global_batch=64, seed=a.seed, rank=0, world=1)
    t0 = time.perf_counter()
    for step, m in run_steps(model, ctx, batches, start=0, stop=a.steps, seed=a.seed, device=torch.device("cpu"),
                             report_due=lambda s: s % 250 == 0 or s == a.steps):
        print(f"step {step}/{a.steps} loss {m['loss']:.4f} img/s {m['img_per_s']:.0f}", flush=True)
    train_s = time.perf_counter() - t0

    model.eval()
    results = {}
    for label, kwargs in SAMPLERS:
        with torch.no_grad():
            t0 = time.perf_counter()
            images = model.sample(len(x_test), generator=torch.Generator().manual_seed(1), **kwargs)
            seconds = time.perf_counter() - t0
        results[label] = {"img_per_s": round(len(images) / seconds, 1), "seconds": round(seconds, 2),
                          "fid": round(fid(images), 2)}
        print(json.dumps({label: results[label]}), flush=True)

    full = results[SAMPLERS[0][0]]
    print(f"\n{'sampler':30} {'img/s':>8} {'speed-up':>9} {'FID':>7}")
    for label, r in results.items():
        print(f"{label:30} {r['img_per_s']:>8} {r['img_per_s'] / full['img_per_s']:>8.1f}x {r['fid']:>7}")
    print(f"{'(train digits vs test)':30} {'':>8} {'':>9} {floor:>7.2f}")
    print(json.dumps({"benchmark": "sampling_quality", "data": "digits 8x8", "n": len(x_test), "threads": a.threads,
                      "train_steps": a.steps, "train_s": round(train_s, 1), "extractor_accuracy": round(accuracy, 4),
                      "fid_floor": round(floor, 2), "results": results}))


if __name__ == "__main__":
    main()
