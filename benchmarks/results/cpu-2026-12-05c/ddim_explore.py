"""What closes DDIM-50's gap to the ancestral chain (digits, FID)? An exploration on the weights of
benchmarks/sampling_quality.py's DDPM, kept with its logs:

    python ddim_explore.py 1    # ddim_explore.log: trains the DDPM (saved to /tmp), 1,000 samples, 3 seeds
    python ddim_explore.py 2    # ddim_explore2.log: 2,000 samples, 4 seeds (the chain 2)
    python ddim_explore.py 3    # ddim_explore3.log: 2,000 samples, 2 seeds: raw weights, 200 steps
"""
import json, sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from gen_models import registry
from gen_models.base import StepContext, noise
from gen_models.diffusion.samplers import ddpm_sample, ddim_sigma
from pipelines import metrics
from pipelines.data import load_source
from pipelines.steps import StepBatches, run_steps
from benchmarks.sampling_quality import MODEL

torch.set_num_threads(1)
raw = load_source("digits", None)
x_train, y_train = torch.from_numpy(raw.x_train), torch.from_numpy(raw.y_train)
x_test = torch.from_numpy(raw.x_test).float() / 255
extractor, acc = metrics.train_extractor(raw.x_train, raw.y_train, num_classes=10, epochs=10, seed=0,
                                         x_test=raw.x_test, y_test=raw.y_test)
real = metrics.extract(extractor, x_test)[0]
fid = lambda im: metrics.fid_from_features(metrics.extract(extractor, im)[0], real)
PART = int(sys.argv[1])
N = 1000 if PART == 1 else 2000
ckpt = Path("/tmp/ddpm_digits.pt")
torch.manual_seed(0)
model = registry.build("ddpm", MODEL)
if ckpt.exists():
    model.load_state_dict(torch.load(ckpt, weights_only=True))
else:
    ctx = StepContext(optimizers=model.configure_optimizers())
    b = StepBatches(x_train, y_train, global_batch=64, seed=0, rank=0, world=1)
    for step, m in run_steps(model, ctx, b, start=0, stop=1500, seed=0, device=torch.device("cpu"),
                             report_due=lambda s: s % 500 == 0):
        print("step", step, flush=True)
    torch.save(model.state_dict(), ckpt)
model.eval()
sched = model.schedule
T = sched.num_timesteps
eps_fn = model.ema

def spacing(kind, steps):
    if kind == "trailing":
        return [round(T * (i + 1) / steps) - 1 for i in range(steps)]
    if kind == "leading":  # DDIM paper / diffusers "leading": 0, T/s, 2T/s, ...
        return [i * (T // steps) for i in range(steps)]
    if kind == "linspace":
        return [round(x) for x in torch.linspace(0, T - 1, steps).tolist()]

@torch.no_grad()
def ddim(steps, eta, kind="trailing", clip=True, gen=None):
    abar = sched.alphas_cumprod
    taus = spacing(kind, steps)
    shape = (N, 1, 8, 8)
    x = noise(shape, generator=gen)
    for i in reversed(range(len(taus))):
        t = torch.full((N,), taus[i], dtype=torch.long)
        abar_t = abar[taus[i]]
        abar_s = abar[taus[i - 1]] if i > 0 else abar.new_ones(())
        x0 = sched.predict_x0(x, t, eps_fn(x, t))
        if clip:
            x0 = x0.clamp(-1, 1)
        eps = sched.predict_eps(x, t, x0)
        sigma = ddim_sigma(abar_t, abar_s, eta)
        x = abar_s.sqrt() * x0 + (1 - abar_s - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and i > 0:
            x = x + sigma * noise(shape, generator=gen)
    return ((x + 1) / 2).clamp(0, 1)


def row(label, f, seeds=(1, 2, 3)):
    vals = [fid(f(torch.Generator().manual_seed(seed))) for seed in seeds]
    print(json.dumps({"label": label, "fids": [round(v, 2) for v in vals], "mean": round(sum(vals) / len(vals), 2)}),
          flush=True)


def ancestral(g):
    return ((ddpm_sample(eps_fn, sched, (N, 1, 8, 8), generator=g) + 1) / 2).clamp(0, 1)


if PART == 1:
    row("ancestral 1000", ancestral)
    for eta in (0.0, 0.3, 0.5, 1.0):
        row(f"ddim50 trailing eta={eta}", lambda g, eta=eta: ddim(50, eta, gen=g))
    row("ddim50 leading eta=0", lambda g: ddim(50, 0.0, "leading", gen=g))
    row("ddim50 linspace eta=0", lambda g: ddim(50, 0.0, "linspace", gen=g))
    row("ddim50 trailing eta=0 noclip", lambda g: ddim(50, 0.0, clip=False, gen=g))
elif PART == 2:
    print("floor (train digits vs test)", round(fid(x_train.float() / 255), 2), len(x_train), flush=True)
    for steps in (50, 100):
        for eta in (0.0, 0.5, 1.0):
            row(f"ddim{steps} eta={eta}", lambda g, eta=eta, steps=steps: ddim(steps, eta, gen=g), (1, 2, 3, 4))
    row("ancestral 1000", ancestral, (1, 2))
else:
    eps_fn = model.unet
    row("raw weights ddim50 eta=0", lambda g: ddim(50, 0.0, gen=g), (1, 2))
    eps_fn = model.ema
    row("ddim200 eta=0", lambda g: ddim(200, 0.0, gen=g), (1, 2))
    row("ddim200 eta=1", lambda g: ddim(200, 1.0, gen=g), (1, 2))
