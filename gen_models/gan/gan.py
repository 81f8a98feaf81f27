"""GAN (Goodfellow et al. 2014): MLP generator and discriminator trained with
the non-saturating loss.

    G: z -> hidden x depth -> (C, s, s)   BatchNorm + LeakyReLU 0.2, tanh out
    D: (C, s, s) -> hidden x depth -> logit   LeakyReLU 0.2

    D: max  E_x log D(x) + E_z log(1 - D(G(z)))
    G: max  E_z log D(G(z))    (non-saturating: the paper's fix for a G that D rejects easily)

Both nets see the image flattened, so any image_size and channel count work.
The update is the shared `adversarial_step` of gen_models.gan.adversarial.
"""

from __future__ import annotations

from torch import nn

from gen_models.base import Batch, Metrics, StepContext, from_unit, noise
from gen_models.gan.adversarial import AdversarialModel
from gen_models.gan.config import GANConfig
from gen_models.nn.mlp import mlp_features, mlp_generator


class GAN(AdversarialModel):
    """Unconditional: `sample` ignores labels."""

    def __init__(self, config: GANConfig):
        super().__init__()
        self.config = config
        c, s, h, depth = config.channels, config.image_size, config.hidden, config.depth
        self.generator = mlp_generator(config.z_dim, h, depth, c, s)
        self.discriminator = nn.Sequential(mlp_features(c, s, h, depth), nn.Linear(h, 1), nn.Flatten(0))
        self.apply_recipe()

    def training_step(self, batch: Batch, ctx: StepContext) -> Metrics:
        real = from_unit(batch[0])
        fake = self.generator(noise((real.shape[0], self.config.z_dim), device=real.device))
        return self.gan_step(ctx, self.discriminator, real, fake)
