"""DCGAN (Radford et al. 2015) trained with the non-saturating GAN loss
(Goodfellow et al. 2014).

    G: z -> (2g, s/4, s/4) -> (g, s/2, s/2) -> (C, s, s)    BatchNorm + ReLU, tanh out
    D: (C, s, s) -> (d, s/2, s/2) -> (2d, s/4, s/4) -> logit   LeakyReLU 0.2, BatchNorm after the first layer

D returns a logit, not a probability; the update itself is the shared
`nonsaturating_step` of gen_models.nn.adversarial.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gen_models.base import Batch, GenerativeModel, Metrics, StepContext, from_unit, noise
from gen_models.config import ModelConfig
from gen_models.nn.adversarial import nonsaturating_step, sample_generator
from gen_models.nn.layers import dcgan_init_, downsample, upsample


@dataclass(kw_only=True)
class DCGANConfig(ModelConfig):
    z_dim: int = 100
    """Size of the latent vector z ~ N(0, I)."""
    g_channels: int = 64
    """Channels of G's last hidden layer; the layer before it has twice as many."""
    d_channels: int = 64
    """Channels of D's first layer; the layer after it has twice as many."""
    lr: float = 2e-4
    """Adam learning rate of both networks (DCGAN paper)."""
    betas: tuple[float, float] = (0.5, 0.999)
    """Adam betas of both networks; beta1 = 0.5 instead of 0.9 damps oscillation (DCGAN paper)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("z_dim", "g_channels", "d_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        self.betas = tuple(self.betas)  # a YAML or JSON round trip gives a list
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")

    @classmethod
    def tiny(cls, **overrides) -> DCGANConfig:
        return cls(**{"z_dim": 8, "g_channels": 8, "d_channels": 8, **overrides})


class DCGAN(GenerativeModel):
    """Unconditional: `sample` ignores labels."""

    def __init__(self, config: DCGANConfig):
        super().__init__()
        self.config = config
        c, g, d = config.channels, config.g_channels, config.d_channels
        k = config.image_size // 4
        self.generator = nn.Sequential(
            # z as a 1x1 map: a k x k transpose conv is the paper's "project and reshape".
            nn.Unflatten(1, (config.z_dim, 1, 1)),
            nn.ConvTranspose2d(config.z_dim, 2 * g, kernel_size=k, bias=False),
            nn.BatchNorm2d(2 * g), nn.ReLU(),
            upsample(2 * g, g, bias=False), nn.BatchNorm2d(g), nn.ReLU(),
            upsample(g, c), nn.Tanh(),
        )
        self.discriminator = nn.Sequential(
            # No BatchNorm on the first layer: the paper found it destabilises
            # training when applied to D's input (and G's output).
            downsample(c, d), nn.LeakyReLU(0.2),
            downsample(d, 2 * d, bias=False), nn.BatchNorm2d(2 * d), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * d, 1, kernel_size=k),
            nn.Flatten(0),
        )
        dcgan_init_(self)

    def ddp_modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "discriminator": self.discriminator}

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {name: torch.optim.Adam(m.parameters(), lr=self.config.lr, betas=self.config.betas)
                for name, m in self.ddp_modules().items()}

    def training_step(self, batch: Batch, ctx: StepContext) -> Metrics:
        real = from_unit(batch[0])
        fake = self.generator(noise((real.shape[0], self.config.z_dim), device=real.device))
        return nonsaturating_step(ctx, self.discriminator, real, fake)

    def sample(self, n: int, *, labels: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        return sample_generator(self.generator, n, self.config.z_dim, generator=generator)
