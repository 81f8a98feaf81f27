"""DDPM's samplers side by side on trained weights: images/s and FID, in one run.

    .venv/bin/python benchmarks/sampling_quality.py            # about 20 minutes on 2 idle CPU cores

Trains a small DDPM (T = 1000, cosine schedule, the 173k-parameter UNet of
tests/unit/test_learning_ddpm.py) on scikit-learn's 8x8 digits with the
pipeline's own loop (`pipelines.steps.run_steps`), then draws 2,000 samples
per seed with the ancestral sampler over all 1000 steps and with DDIM over 100
and 50 steps (eta 0, and eta 1 at 50), every sampler from the same seeds. FID
is the pipeline's: on the features of a classifier fitted to the same digits
(as prepare fits one per dataset), against the test split's 360 digits. Its
floor is the train split (1,437 digits) scored the same way.

Why 2,000 samples and several seeds: one draw of 360 samples moves FID by
+-15 % from seed to seed here, as much as the gap being measured (this
benchmark once reported DDIM-50 15 % behind the chain from such a draw).
sampling.py gives the cost of every family's sampler at 28x28 on untrained
weights; this one answers what the cheaper sampler costs in quality. Prints a
table and one JSON line.
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
# (label, config overrides, sample() arguments)
SAMPLERS = [("ddpm 1000 steps (ancestral)", {}, {"sampler": "ddpm"}),
            ("ddim 100 steps", {}, {"sampler": "ddim", "steps": 100}),
            ("ddim 50 steps", {}, {"sampler": "ddim", "steps": 50}),
            ("ddim 50 steps, eta 1", {"eta": 1.0}, {"sampler": "ddim", "steps": 50})]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=1500, help="training steps, batch 64")
    p.add_argument("--threads", type=int, default=1, help="an 8x8 UNet runs fastest on one thread")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=2000, help="samples per sampler and seed")
    p.add_argument("--sample-seeds", type=int, default=2, help="seeds each sampler draws from (1, 2, ...)")
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

    floor = fid(x_train.float() / 255)
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
    for label, overrides, kwargs in SAMPLERS:
        sampler = registry.build("ddpm", {**MODEL, **overrides}) if overrides else model
        sampler.load_state_dict(model.state_dict())
        sampler.eval()
        fids, seconds = [], 0.0
        for seed in range(1, a.sample_seeds + 1):
            with torch.no_grad():
                t0 = time.perf_counter()
                images = sampler.sample(a.samples, generator=torch.Generator().manual_seed(seed), **kwargs)
                seconds += time.perf_counter() - t0
            fids.append(round(fid(images), 2))
        results[label] = {"img_per_s": round(a.samples * a.sample_seeds / seconds, 1), "fids": fids,
                          "fid": round(sum(fids) / len(fids), 2)}
        print(json.dumps({label: results[label]}), flush=True)

    full = results[SAMPLERS[0][0]]
    print(f"\n{'sampler':30} {'img/s':>8} {'speed-up':>9} {'FID':>7} {'vs chain':>9}  per seed")
    for label, r in results.items():
        print(f"{label:30} {r['img_per_s']:>8} {r['img_per_s'] / full['img_per_s']:>8.1f}x {r['fid']:>7} "
              f"{r['fid'] / full['fid'] - 1:>+8.0%}  {r['fids']}")
    print(f"{'(train digits vs test)':30} {'':>8} {'':>9} {floor:>7.2f}")
    print(json.dumps({"benchmark": "sampling_quality", "data": "digits 8x8", "samples": a.samples,
                      "sample_seeds": a.sample_seeds, "threads": a.threads, "train_steps": a.steps,
                      "train_s": round(train_s, 1), "extractor_accuracy": round(accuracy, 4),
                      "fid_floor": round(floor, 2), "results": results}))


if __name__ == "__main__":
    main()
