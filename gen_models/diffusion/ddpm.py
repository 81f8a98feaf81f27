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

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, model_validator
from torch import Tensor, nn

from gen_models.base import Batch, GenerativeModel, Metrics, from_unit, to_unit
from gen_models.config import Decay, ModelConfig, config_dataclass
from gen_models.diffusion.samplers import ddim_sample, ddpm_sample
from gen_models.diffusion.schedules import NoiseSchedule, cosine_betas, linear_betas
from gen_models.nn.ema import ema_copy, ema_decay_at, update_ema_
from gen_models.nn.layers import resolution_steps
from gen_models.nn.unet import NORM_GROUPS, UNet


@config_dataclass
class DDPMConfig(ModelConfig):
    timesteps: int = Field(1000, ge=2)
    """Length T of the diffusion chain."""
    schedule: Literal["linear", "cosine"] = "linear"
    """Noise schedule: Ho et al.'s linear betas, or Nichol & Dhariwal's cosine abar
    (better at low resolution, where the linear one wastes its last steps on pure noise)."""
    beta_start: PositiveFloat = 1e-4
    """First beta of the linear schedule, as for T = 1000; scaled by 1000 / timesteps."""
    beta_end: PositiveFloat = 0.02
    """Last beta of the linear schedule, as for T = 1000; scaled by 1000 / timesteps."""
    base_channels: int = Field(64, ge=NORM_GROUPS, multiple_of=NORM_GROUPS)
    """UNet width at full resolution; a multiple of 8 (the GroupNorm groups)."""
    channel_mults: Annotated[tuple[PositiveInt, ...], Field(min_length=1)] | None = None
    """UNet width of each level as a multiple of base_channels. The image is halved
    between levels, len - 1 times, so image_size must be divisible by 2^(len - 1).
    None: (1, 2, ..., 2), one halving per resolution step (gen_models.nn.layers):
    (1, 2, 2) at 8 and 28 (28 -> 14 -> 7), Ho et al.'s (1, 2, 2, 2) at 32 (down to
    4x4), (1, 2, 2, 2, 2) at 64. See `unet_channel_mults`."""
    num_res_blocks: PositiveInt = 2
    """Residual blocks per UNet level on the way down (one more on the way up)."""
    lr: PositiveFloat = 2e-4
    """Adam learning rate (Ho et al.)."""
    ema_decay: Decay = 0.9999
    """Decay of the EMA weights used for sampling. Step n uses min(ema_decay, (1 + n) / (10 + n)),
    so the average forgets the random init early on; beyond ~90k steps it is ema_decay."""
    sampler: Literal["ddpm", "ddim"] = "ddpm"
    """Sampler of `sample`: ancestral over all timesteps, or DDIM over sample_steps."""
    sample_steps: PositiveInt = 100
    """Steps of the DDIM sampler, at most timesteps; 50-100 come close to the full chain (Song et al.)."""
    eta: NonNegativeFloat = 0.0
    """DDIM noise: 0 is deterministic given x_T, 1 is ancestral-like."""

    @model_validator(mode="after")
    def _fields_agree(self) -> DDPMConfig:
        if self.beta_start > self.beta_end:
            raise ValueError(f"beta_start must be <= beta_end ({self.beta_end}), got {self.beta_start}")
        scale = 1000 / self.timesteps
        if self.schedule == "linear" and not self.beta_end * scale < 1:
            raise ValueError(f"beta_end * 1000 / timesteps must be < 1, got {self.beta_end} * {scale:g}")
        halvings = len(self.unet_channel_mults) - 1
        if self.image_size % 2**halvings:
            raise ValueError(f"channel_mults {self.channel_mults} halve image_size {self.image_size} "
                             f"{halvings} times; it must be divisible by {2**halvings}")
        if self.sample_steps > self.timesteps:
            raise ValueError(f"sample_steps must be <= timesteps ({self.timesteps}), got {self.sample_steps}")
        return self

    @property
    def unet_channel_mults(self) -> tuple[int, ...]:
        """The UNet's channel_mults: as given, or derived from image_size when None."""
        if self.channel_mults is not None:
            return self.channel_mults
        return (1,) + (2,) * resolution_steps(self.image_size)

    @classmethod
    def tiny(cls, **overrides) -> DDPMConfig:
        return cls(**{"timesteps": 32, "base_channels": 8, "channel_mults": (1, 2), "num_res_blocks": 1,
                      "ema_decay": 0.9, "sample_steps": 10, **overrides})


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

