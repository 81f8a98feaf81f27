"""Energy-based model trained by contrastive divergence with short-run
Langevin sampling and a replay buffer (Du & Mordatch 2019).

p(x) is proportional to exp(-E(x)). The gradient of the log-likelihood is
-dE(x+)/dtheta + E_{x- ~ p}[dE(x-)/dtheta], so each step pushes the energy of
data x+ down and that of model samples x- up:

    loss = E(x+) - E(x-) + alpha (E(x+)^2 + E(x-)^2)

x- comes from `langevin` (gen_models/ebm/langevin.py), started from a replay
buffer of past chains (95 %) or fresh uniform noise (5 %): persistent chains
mix far better than K steps from noise, and the fresh 5 % keep the buffer from
collapsing onto a few modes. The alpha term keeps the energies near 0; without
it E(x+) and E(x-) drift apart without bound and the gradient the chain
follows grows with them.

Images stay in [0, 1] (no rescaling to [-1, 1]): the paper's step size 10 and
noise 0.005 are tuned for that range, and the chain clamps to it.

    E: (C, s, s) -> (h, s/2, s/2) -> (2h, s/4, s/4) -> ... -> (2^(n-1) h, k, k) -> 3x3 conv, same shape -> scalar
       SiLU throughout; n = resolution_steps(s) stride-2 steps, k = s / 2^n (2 at 8, 7 at 28, 4 at 32 and 64)

The steps follow the image, as a DCGAN discriminator's do: the linear read-out
adds up the features of the k x k map, each of which sees one patch of the
image, 18x18 pixels after two steps. At 64x64 that is under a third of the
image, and E could relate its far corners only additively.

SiLU rather than ReLU: Langevin follows dE/dx, and a smooth E has a gradient
that changes smoothly with x instead of jumping at every ReLU kink.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import Tensor, nn

from gen_models.base import Batch, GenerativeModel, Metrics, StepContext
from gen_models.config import resolution_steps
from gen_models.ebm.config import EBMConfig
from gen_models.ebm.langevin import langevin
from gen_models.nn.layers import downsample


class EBM(GenerativeModel):
    """Unconditional: `sample` ignores labels. No likelihood: the normaliser of exp(-E) is unknown."""

    def __init__(self, config: EBMConfig):
        super().__init__()
        self.config = config
        c, n = config.channels, resolution_steps(config.image_size)
        k = config.image_size // 2**n
        widths = [c] + [config.hidden * 2**i for i in range(n)]
        w = widths[-1]
        self.energy = nn.Sequential(
            *[m for a, b in pairwise(widths) for m in (downsample(a, b), nn.SiLU())],
            nn.Conv2d(w, w, kernel_size=3, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Linear(w * k * k, 1), nn.Flatten(0),
        )
        # The buffer is state, not a parameter: it is checkpointed with the
        # weights, so a resumed run keeps its chains.
        shape = (config.buffer_size, c, config.image_size, config.image_size)
        self.register_buffer("replay", torch.rand(shape))

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"energy": torch.optim.Adam(self.energy.parameters(), lr=self.config.lr, betas=self.config.betas)}

    def chain(self, x: Tensor, steps: int, generator: torch.Generator | None = None) -> Tensor:
        """Langevin from x on the bare energy net (never its DDP wrapper; see `langevin`)."""
        c = self.config
        return langevin(getattr(self.energy, "module", self.energy), x, steps=steps, step_size=c.step_size,
                        noise_scale=c.noise_scale, grad_clip=c.grad_clip, generator=generator)

    def draw_from_buffer(self, n: int) -> tuple[Tensor, Tensor]:
        """(chain starts, their buffer indices): each start is a buffer image with
        probability 1 - reinit_prob, else fresh uniform noise."""
        idx = torch.randint(self.config.buffer_size, (n,), device=self.replay.device)
        start = self.replay[idx]
        fresh = torch.rand(n, device=start.device) < self.config.reinit_prob
        return torch.where(fresh[:, None, None, None], torch.rand_like(start), start), idx

    def training_step(self, batch: Batch, ctx: StepContext) -> Metrics:
        c = self.config
        real = (batch[0] + c.data_noise * torch.randn_like(batch[0])).clamp(0, 1)
        start, idx = self.draw_from_buffer(real.shape[0])
        fake = self.chain(start, c.langevin_steps)
        # Duplicate indices keep one of their chains: the buffer is a sample, not a ledger.
        self.replay[idx] = fake

        ctx.zero_grad("energy")
        # One forward through the (possibly DDP-wrapped) net for both halves, so
        # the reducer sees exactly one forward per backward.
        e_real, e_fake = self.energy(torch.cat([real, fake])).chunk(2)
        cd = e_real.mean() - e_fake.mean()
        reg = c.alpha * (e_real.pow(2).mean() + e_fake.pow(2).mean())
        ctx.backward(cd + reg)
        ctx.step_optimizer("energy")
        return {"loss": (cd + reg).detach(), "cd": cd.detach(), "reg": reg.detach(),
                "e_real": e_real.mean().detach(), "e_fake": e_fake.mean().detach()}

    def sample(self, n: int, *, labels: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        c = self.config
        device = self.replay.device
        shape = (n, c.channels, c.image_size, c.image_size)
        if generator is None:
            start = torch.rand(shape, device=device)
        else:
            start = torch.rand(shape, generator=generator, device=generator.device).to(device)
        return self.chain(start, c.sample_steps, generator=generator)

    def sampling_cost(self) -> tuple[str, int]:
        return "langevin", self.config.sample_steps
