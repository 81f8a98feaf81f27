"""The config of DDPM: its chain, noise schedule, UNet and sampler."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, model_validator

from gen_models.config import NORM_GROUPS, Decay, ModelConfig, config_dataclass, resolution_steps


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

