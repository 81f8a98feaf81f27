"""Denoising diffusion probabilistic model (Ho et al. 2020), with the cosine
schedule (Nichol & Dhariwal 2021) and DDIM sampling (Song et al. 2020) as options.

    training:  x_0 in [-1, 1],  t ~ U{1..T},  eps ~ N(0, I),  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
               loss = || eps - eps_theta(x_t, t) ||^2        (Ho et al.'s L_simple, eq. 14)
    sampling:  x_T ~ N(0, I), then the reverse chain with eps_theta in place of the true noise

The network eps_theta is a UNet that sees t through a sinusoidal embedding in
every residual block. Samples come from an exponential moving average of its
weights, which are far less noisy than the last iterate (Ho et al. sample from
EMA 0.9999). The EMA copy holds its weights as buffers: it is saved and loaded
with the model's state dict, but is no parameter, so no optimizer steps it and
DDP never wraps it. Unconditional: `sample` ignores labels.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gen_models.base import Batch, GenerativeModel, Metrics, from_unit, to_unit
from gen_models.diffusion.config import DDPMConfig
from gen_models.diffusion.samplers import ddim_sample, ddpm_sample
from gen_models.diffusion.schedules import NoiseSchedule, cosine_betas, linear_betas
from gen_models.nn.ema import ema_copy, ema_decay_at, update_ema_
from gen_models.nn.unet import UNet


class DDPM(GenerativeModel):
    def __init__(self, config: DDPMConfig):
        super().__init__()
        self.config = config
        betas = (linear_betas(config.timesteps, config.beta_start, config.beta_end) if config.schedule == "linear"
                 else cosine_betas(config.timesteps))
        self.schedule = NoiseSchedule(betas)
        self.unet = UNet(channels=config.channels, base_channels=config.base_channels,
                         channel_mults=config.unet_channel_mults, num_res_blocks=config.num_res_blocks)
        self.ema = ema_copy(self.unet)

    def ddp_modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet}

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"unet": torch.optim.Adam(self.unet.parameters(), lr=self.config.lr)}

    def loss(self, batch: Batch, *, step: int = 0) -> tuple[Tensor, Metrics]:
        x0 = from_unit(batch[0])
        t = torch.randint(self.config.timesteps, (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        return F.mse_loss(self.unet(self.schedule.q_sample(x0, t, eps), t), eps), {}

    def ema_decay_at(self, step: int) -> float:
        """The EMA decay after `step` completed steps (see DDPMConfig.ema_decay)."""
        return ema_decay_at(self.config.ema_decay, step)

    def on_step_end(self, step: int) -> None:
        """ema <- d * ema + (1 - d) * theta, with d = ema_decay_at(step) (gen_models.nn.ema)."""
        update_ema_(self.ema, self.unet, self.ema_decay_at(step))

    @torch.no_grad()
    def sample(self, n: int, *, labels: Tensor | None = None, generator: torch.Generator | None = None,
               sampler: Literal["ddpm", "ddim"] | None = None, steps: int | None = None) -> Tensor:
        """n images in [0, 1] from the EMA network; `sampler` and `steps` (DDIM) override the config."""
        c = self.config
        shape = (n, c.channels, c.image_size, c.image_size)
        sampler = sampler or c.sampler
        if sampler == "ddpm":
            if steps is not None:
                raise ValueError("steps applies to the DDIM sampler only; the ancestral one takes all timesteps")
            x = ddpm_sample(self.ema, self.schedule, shape, generator=generator)
        elif sampler == "ddim":
            steps = c.sample_steps if steps is None else steps
            x = ddim_sample(self.ema, self.schedule, shape, steps=steps, eta=c.eta, generator=generator)
        else:
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
        return to_unit(x)

    def sampling_cost(self) -> tuple[str, int]:
        c = self.config
        return (c.sampler, c.sample_steps if c.sampler == "ddim" else c.timesteps)

