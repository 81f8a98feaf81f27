"""DCGAN (Radford et al. 2015) trained with the non-saturating GAN loss
(Goodfellow et al. 2014).

    G: z -> (2g, s/4, s/4) -> (g, s/2, s/2) -> (C, s, s)    BatchNorm + ReLU, tanh out
    D: (C, s, s) -> (d, s/2, s/2) -> (2d, s/4, s/4) -> logit   LeakyReLU 0.2, BatchNorm after the first layer

D returns a logit, not a probability; the update itself is the shared
`nonsaturating_step` of gen_models.gan.adversarial.
"""

from __future__ import annotations

from pydantic import PositiveInt
from torch import nn

from gen_models.base import Batch, Metrics, StepContext, from_unit, noise
from gen_models.config import config_dataclass
from gen_models.gan.adversarial import AdversarialConfig, AdversarialModel, nonsaturating_step
from gen_models.nn.layers import dcgan_init_, downsample, upsample


@config_dataclass
class DCGANConfig(AdversarialConfig):
    z_dim: PositiveInt = 100
    """Size of the latent vector z ~ N(0, I) (DCGAN paper)."""
    g_channels: PositiveInt = 64
    """Channels of G's last hidden layer; the layer before it has twice as many."""
    d_channels: PositiveInt = 64
    """Channels of D's first layer; the layer after it has twice as many."""

    @classmethod
    def tiny(cls, **overrides) -> DCGANConfig:
        return super().tiny(**{"g_channels": 8, "d_channels": 8, **overrides})


class DCGAN(AdversarialModel):
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

    def training_step(self, batch: Batch, ctx: StepContext) -> Metrics:
        real = from_unit(batch[0])
        fake = self.generator(noise((real.shape[0], self.config.z_dim), device=real.device))
        return nonsaturating_step(ctx, self.discriminator, real, fake)
