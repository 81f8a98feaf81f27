"""Exploration for issue 16 part 3: what closes DDIM-50's gap to the ancestral chain (digits, FID)."""
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
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from sampling_quality import MODEL

torch.set_num_threads(1)
raw = load_source("digits", None)
x_train, y_train = torch.from_numpy(raw.x_train), torch.from_numpy(raw.y_train)
x_test = torch.from_numpy(raw.x_test).float() / 255
extractor, acc = metrics.train_extractor(raw.x_train, raw.y_train, num_classes=10, epochs=10, seed=0,
                                         x_test=raw.x_test, y_test=raw.y_test)
real = metrics.extract(extractor, x_test)[0]
fid = lambda im: metrics.fid_from_features(metrics.extract(extractor, im)[0], real)
N = 2000
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

rows = []
def row(label, f, seeds):
    vals = []
    for seed in seeds:
        vals.append(fid(f(torch.Generator().manual_seed(seed))))
    r = {"label": label, "fids": [round(v, 2) for v in vals], "mean": round(sum(vals) / len(vals), 2)}
    print(json.dumps(r), flush=True)

print("floor (train digits vs test)", round(fid(x_train.float() / 255), 2), len(x_train), flush=True)
S = (1, 2, 3, 4)
for steps in (50, 100):
    for eta in (0.0, 0.5, 1.0):
        row(f"ddim{steps} eta={eta}", lambda g, eta=eta, steps=steps: ddim(steps, eta, gen=g), S)
row("ancestral 1000", lambda g: ((ddpm_sample(eps_fn, sched, (N, 1, 8, 8), generator=g) + 1) / 2).clamp(0, 1), (1, 2))
