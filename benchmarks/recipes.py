"""The field's standard GAN training practice, measured on the demo: an ablation in one run.

    .venv/bin/python benchmarks/recipes.py        # about 25 minutes on 2 CPU cores

The demo's DCGAN (jobs/demo.yaml: Fashion-MNIST 28x28, g_channels = d_channels = 32,
global batch 128, 1,500 steps) trained in this one process with the pipeline's own loop
(`pipelines.steps.run_steps` on the prepared train split, 1 worker x 128 takes the same
batches as the demo's 2 x 64), then scored as the evaluate stage scores it: FID on 5,000
samples (batches of 500 from a generator seeded with the seed) against the test split's
statistics, in the features of the classifier prepare fits (2 epochs, seed 0).

Each row adds one change to the best recipe so far, from the same seed and so the same
initial weights and data order: a change that does not lower FID is reported and left out
of the rows after it. Rows with an EMA also give the live G's FID, from the same run. The
EMA row also scores other decays (tracked beside the model in the same run, no extra
training) and the EMA G with BatchNorm statistics re-estimated from its own batches instead
of copied from the live G. Finally the baseline and the winning recipe are trained again
from other seeds (`--repeat-seeds`): the spread of one recipe over seeds is the noise that
a difference between rows must beat. Prints a table and one JSON line.

`--sweep KEY=V,V,...` trains the demo's recipe as it is now (`DEMO_NOW`) with each value of
one model field instead, from `--seed` and each of `--repeat-seeds`: two invocations with
different seeds run side by side on two cores, one thread each, and fit the same extractor.

    .venv/bin/python benchmarks/recipes.py --sweep lr=2e-4,4e-4,8e-4 --seed 0 --repeat-seeds
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from gen_models import registry
from gen_models.base import GenerativeModel, StepContext
from gen_models.gan.adversarial import sample_generator
from gen_models.nn.ema import copy_buffers_, ema_copy, ema_decay_at, update_ema_
from pipelines import metrics
from pipelines.data import load_source
from pipelines.steps import StepBatches, run_steps

DEMO = {"g_channels": 32, "d_channels": 32}  # jobs/demo.yaml's model section before this ablation
# jobs/demo.yaml's model section as it is now, read rather than copied, so that a sweep starts from the demo
DEMO_NOW = {k: tuple(v) if isinstance(v, list) else v for k, v in
            yaml.safe_load((Path(__file__).resolve().parents[1] / "jobs" / "demo.yaml").read_text())["model"].items()
            if k != "family"}
BATCH, STEPS, SAMPLES, SAMPLE_BATCH, VAL_FRACTION, EXTRACTOR_EPOCHS = 128, 1500, 5000, 500, 0.1, 2
AUGMENT = ("color", "translation", "cutout")
# (label, what the row adds to the recipe so far, its steps)
ROWS = [
    ("baseline (demo)", {}, STEPS),
    ("+ EMA of G, 0.999", {"ema_decay": 0.999}, STEPS),
    ("+ hinge loss + spectral norm on D", {"loss": "hinge", "spectral_norm": True}, STEPS),
    ("+ TTUR: lr G 1e-4, D 4e-4", {"lr": 1e-4, "d_lr": 4e-4}, STEPS),
    ("+ Adam beta1 = 0", {"betas": (0.0, 0.999)}, STEPS),
    ("+ DiffAugment color,translation,cutout", {"augment": AUGMENT}, STEPS),
    # 40 channels cost about 20 % more a step on this VM: 1,250 steps hold the wall time.
    ("+ wider G: 40 channels, 1250 steps", {"g_channels": 40}, 1250),
]
EXTRA_DECAYS = (0.99, 0.995, 0.9999)  # scored beside the EMA row's own 0.999


def fashion_mnist(seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """The prepared train split (as pipelines.data.split_and_shard cuts it) and the test split."""
    raw = load_source("fashion_mnist", None)
    perm = np.random.default_rng(seed).permutation(len(raw.x_train))
    train = perm[round(VAL_FRACTION * len(perm)):]
    return (torch.from_numpy(raw.x_train[train]), torch.from_numpy(raw.y_train[train]).long(),
            raw.x_test, raw.y_test)


class Judge:
    """FID as the evaluate stage computes it, with the extractor prepare fits."""

    def __init__(self, x_train: torch.Tensor, y_train: torch.Tensor, x_test: np.ndarray, y_test: np.ndarray):
        t0 = time.perf_counter()
        self.extractor, self.accuracy = metrics.train_extractor(x_train, y_train, num_classes=10,
                                                                epochs=EXTRACTOR_EPOCHS, seed=0,
                                                                x_test=x_test, y_test=y_test)
        self.ref = metrics.reference_stats(metrics.extract_uint8(self.extractor, torch.from_numpy(x_test))[0])
        self.seconds = time.perf_counter() - t0

    def fid(self, model: GenerativeModel, seed: int, net: torch.nn.Module | None = None) -> float:
        """FID of `model.sample`, or of images drawn from the generator network `net` when given."""
        g = torch.Generator().manual_seed(seed)
        draw = model.sample if net is None else (
            lambda n, generator: sample_generator(net, n, model.config.z_dim, generator=generator))
        samples = torch.cat([draw(min(SAMPLE_BATCH, SAMPLES - i), generator=g)
                             for i in range(0, SAMPLES, SAMPLE_BATCH)])
        f = metrics.extract(self.extractor, samples)[0]
        return metrics.fid(f.mean(0), np.cov(f, rowvar=False), self.ref.mu, self.ref.sigma)


@torch.no_grad()
def reestimate_bn(generator: torch.nn.Module, z_dim: int, batches: int = 50) -> torch.nn.Module:
    """A copy of `generator` whose BatchNorm statistics are the average over `batches` of its own
    batches of 128 (momentum None: a cumulative average), not the live G's."""
    g = copy.deepcopy(generator)
    for m in g.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    g.train()
    gen = torch.Generator().manual_seed(123)
    for _ in range(batches):
        g(torch.randn(BATCH, z_dim, generator=gen))
    return g.eval()


def train_row(recipe: dict, steps: int, seed: int, data, judge: Judge) -> dict:
    torch.manual_seed(seed)  # as the train stage seeds before building: same initial weights for every row
    model = registry.build("dcgan", {"image_size": 28, "channels": 1, "num_classes": 10, **recipe})
    ctx = StepContext(optimizers=model.configure_optimizers())
    batches = StepBatches(data[0], data[1], global_batch=BATCH, seed=seed, rank=0, world=1)
    last = {}
    t0, c0 = time.perf_counter(), time.process_time()
    for step, m in run_steps(model, ctx, batches, start=0, stop=steps, seed=seed, device=torch.device("cpu"),
                             report_due=lambda s: s % 500 == 0 or s == steps):
        last = m
        print(f"  step {step}/{steps} loss_d {m['loss_d']:.3f} loss_g {m['loss_g']:.3f} "
              f"img/s {m['img_per_s']:.0f}", flush=True)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {"steps": steps, "train_s": round(seconds, 1), "cpu_s": round(cpu, 1), "step_ms": round(1000 * seconds / steps, 1),
           "loss_d": round(last["loss_d"], 4), "loss_g": round(last["loss_g"], 4),
           "fid": round(judge.fid(model, seed), 2)}
    if model.config.ema_decay is not None:
        out["fid_live_g"] = round(judge.fid(model, seed, model.generator), 2)
    return out


def train_ema_row(recipe: dict, steps: int, seed: int, data, judge: Judge) -> dict:
    """train_row, with EMAs at EXTRA_DECAYS tracked beside the model's own (not timed: they are
    updated between steps, out of run_steps' clock) and the BatchNorm re-estimate."""
    torch.manual_seed(seed)
    model = registry.build("dcgan", {"image_size": 28, "channels": 1, "num_classes": 10, **recipe})
    ctx = StepContext(optimizers=model.configure_optimizers())
    batches = StepBatches(data[0], data[1], global_batch=BATCH, seed=seed, rank=0, world=1)
    side = {d: ema_copy(model.generator) for d in EXTRA_DECAYS}
    seconds, cpu, last = 0.0, 0.0, {}
    t0, c0 = time.perf_counter(), time.process_time()
    for s in range(steps):  # run_steps one step at a time, the side EMAs updated after each
        for _, m in run_steps(model, ctx, batches, start=s, stop=s + 1, seed=seed, device=torch.device("cpu"),
                              report_due=lambda _: True):
            last = m
        seconds, cpu = seconds + time.perf_counter() - t0, cpu + time.process_time() - c0
        for d, g in side.items():  # not counted
            update_ema_(g, model.generator, ema_decay_at(d, s + 1))
        if (s + 1) % 500 == 0:
            print(f"  step {s + 1}/{steps} loss_d {m['loss_d']:.3f} loss_g {m['loss_g']:.3f}", flush=True)
        t0, c0 = time.perf_counter(), time.process_time()
    out = {"steps": steps, "train_s": round(seconds, 1), "cpu_s": round(cpu, 1), "step_ms": round(1000 * seconds / steps, 1),
           "loss_d": round(last["loss_d"], 4), "loss_g": round(last["loss_g"], 4),
           "fid": round(judge.fid(model, seed), 2),
           "fid_live_g": round(judge.fid(model, seed, model.generator), 2)}
    # Each side EMA with the live G's BatchNorm statistics, as the model's own EMA is sampled.
    out["fid_by_decay"] = {str(d): round(judge.fid(model, seed, copy_buffers_(g, model.generator)), 2)
                           for d, g in side.items()}
    out["fid_bn_reestimated"] = round(judge.fid(model, seed, reestimate_bn(model.generator_ema,
                                                                            model.config.z_dim)), 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat-seeds", type=int, nargs="*", default=[1],
                   help="seeds the baseline and the winning recipe are trained again from")
    p.add_argument("--steps-scale", type=float, default=1.0, help="fraction of each row's steps (a quick look)")
    p.add_argument("--threads", type=int, default=1, help="one, as each of the demo's 2 workers (cpus_per_worker 1)")
    p.add_argument("--sweep", metavar="KEY=V,V,...", help="DEMO_NOW with each value of one model field, not the ablation")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    data = fashion_mnist(0)  # the demo's spec seed 0 cuts the split
    judge = Judge(*data)
    print(f"extractor test accuracy {judge.accuracy:.4f}, fitted with reference statistics in {judge.seconds:.0f}s",
          flush=True)
    if a.sweep:
        sweep(a, data, judge)
        return

    recipe, best, rows = dict(DEMO), None, []
    for label, change, steps in ROWS:
        steps = max(1, round(steps * a.steps_scale))
        trial = {**recipe, **change}
        run = train_ema_row if "ema_decay" in change else train_row
        r = run(trial, steps, a.seed, data, judge)
        kept = best is None or r["fid"] < best
        if kept:
            recipe, best = trial, r["fid"]
        rows.append({"row": label, "change": change, "kept": kept, **r})
        print(json.dumps(rows[-1], default=list), flush=True)

    repeats = []
    for seed in a.repeat_seeds:
        for label, config in (("baseline (demo)", DEMO), ("winning recipe", recipe)):
            r = train_row(config, max(1, round(STEPS * a.steps_scale)), seed, data, judge)
            repeats.append({"row": label, "seed": seed, **r})
            print(json.dumps(repeats[-1]), flush=True)

    print(f"\n{'row':42} {'kept':>4} {'steps':>5} {'train s':>7} {'CPU s':>7} {'ms/step':>7} {'FID':>7} "
          f"{'FID live G':>10}")
    for r in rows:
        print(f"{r['row']:42} {'yes' if r['kept'] else 'no':>4} {r['steps']:>5} {r['train_s']:>7} {r['cpu_s']:>7} "
              f"{r['step_ms']:>7} {r['fid']:>7} {r.get('fid_live_g', ''):>10}")
    for r in repeats:
        print(f"{r['row'] + ', seed ' + str(r['seed']):42} {'':>4} {r['steps']:>5} {r['train_s']:>7} {r['cpu_s']:>7} "
              f"{r['step_ms']:>7} {r['fid']:>7} {r.get('fid_live_g', ''):>10}")
    print(f"winning recipe: {json.dumps(recipe, default=list)}")
    print(json.dumps({"benchmark": "recipes", "device": f"cpu x{a.threads} threads", "torch": torch.__version__,
                      "seed": a.seed, "batch": BATCH, "samples": SAMPLES, "extractor_accuracy": judge.accuracy,
                      "rows": rows, "repeats": repeats, "recipe": recipe}, default=list))


def sweep(a: argparse.Namespace, data, judge: Judge) -> None:
    key, values = a.sweep.split("=", 1)
    rows = []
    for seed in (a.seed, *a.repeat_seeds):
        for value in (json.loads(v) for v in values.split(",")):
            r = train_row({**DEMO_NOW, key: value}, max(1, round(STEPS * a.steps_scale)), seed, data, judge)
            rows.append({key: value, "seed": seed, **r})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{key:>10} {'seed':>4} {'steps':>5} {'train s':>7} {'CPU s':>7} {'ms/step':>7} {'FID':>7}")
    for r in rows:
        print(f"{r[key]:>10} {r['seed']:>4} {r['steps']:>5} {r['train_s']:>7} {r['cpu_s']:>7} {r['step_ms']:>7} {r['fid']:>7}")
    print(json.dumps({"benchmark": "recipes_sweep", "device": f"cpu x{a.threads} threads", "torch": torch.__version__,
                      "recipe": DEMO_NOW, "key": key, "samples": SAMPLES, "extractor_accuracy": judge.accuracy,
                      "rows": rows}, default=list))


if __name__ == "__main__":
    main()
