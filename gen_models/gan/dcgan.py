"""DCGAN (Radford et al. 2015) trained with the non-saturating GAN loss
(Goodfellow et al. 2014) by default; see AdversarialConfig for the recipe options.

    n = resolution_steps(s) stride-2 steps between the image and a k x k map, k = s / 2^n
    G: z -> (2^(n-1) g, k, k) -> ... -> (2g, s/4, s/4) -> (g, s/2, s/2) -> (C, s, s)   BatchNorm + ReLU, tanh out
    D: (C, s, s) -> (d, s/2, s/2) -> (2d, s/4, s/4) -> ... -> (2^(n-1) d, k, k) -> logit
       LeakyReLU 0.2, BatchNorm on every stride-2 layer but the first

The paper's 64x64 nets are n = 4 from a 4x4 map, and so are these at 64; 32
starts from 4x4 too (n = 3). 28 cannot halve below 7x7 and 8 starts from 2x2:
both take n = 2, the nets the digits and Fashion-MNIST were tuned with.

D returns a logit, not a probability; the update itself is the shared
`adversarial_step` of gen_models.gan.adversarial, non-saturating unless
the config's `loss` says hinge.
"""

from __future__ import annotations

from itertools import pairwise

from torch import nn

from gen_models.base import Batch, Metrics, StepContext, from_unit, noise
from gen_models.config import resolution_steps
from gen_models.gan.adversarial import AdversarialModel
from gen_models.gan.config import DCGANConfig
from gen_models.nn.layers import dcgan_init_, downsample, upsample


def dcgan_discriminator(channels: int, d: int, image_size: int) -> nn.Sequential:
    """D of the module docstring: images (N, channels, s, s) -> logits (N,). StyleGAN's D as well."""
    n = resolution_steps(image_size)
    widths = [d * 2**i for i in range(n)]
    # No BatchNorm on the first layer: the paper found it destabilises
    # training when applied to D's input (and G's output).
    layers = [downsample(channels, d), nn.LeakyReLU(0.2)]
    for w_in, w_out in pairwise(widths):
        layers += [downsample(w_in, w_out, bias=False), nn.BatchNorm2d(w_out), nn.LeakyReLU(0.2)]
    # A k x k kernel over the k x k map: one logit per image.
    layers += [nn.Conv2d(widths[-1], 1, kernel_size=image_size // 2**n), nn.Flatten(0)]
    return nn.Sequential(*layers)


class DCGAN(AdversarialModel):
    """Unconditional: `sample` ignores labels."""

    def __init__(self, config: DCGANConfig):
        super().__init__()
        self.config = config
        c, g, z = config.channels, config.g_channels, config.z_dim
        n = resolution_steps(config.image_size)
        widths = [g * 2**i for i in reversed(range(n))]
        layers = [
            # z as a 1x1 map: a k x k transpose conv is the paper's "project and reshape".
            nn.Unflatten(1, (z, 1, 1)),
            nn.ConvTranspose2d(z, widths[0], kernel_size=config.image_size // 2**n, bias=False),
            nn.BatchNorm2d(widths[0]), nn.ReLU(),
        ]
        for w_in, w_out in pairwise(widths):
            layers += [upsample(w_in, w_out, bias=False), nn.BatchNorm2d(w_out), nn.ReLU()]
        layers += [upsample(g, c), nn.Tanh()]
        self.generator = nn.Sequential(*layers)
        self.discriminator = dcgan_discriminator(c, config.d_channels, config.image_size)
        dcgan_init_(self)
        self.apply_recipe()

    def training_step(self, batch: Batch, ctx: StepContext) -> Metrics:
        real = from_unit(batch[0])
        fake = self.generator(noise((real.shape[0], self.config.z_dim), device=real.device))
        return self.gan_step(ctx, self.discriminator, real, fake)
