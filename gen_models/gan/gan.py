"""GAN (Goodfellow et al. 2014): MLP generator and discriminator trained with
the non-saturating loss.

    G: z -> hidden x depth -> (C, s, s)   BatchNorm + LeakyReLU 0.2, tanh out
    D: (C, s, s) -> hidden x depth -> logit   LeakyReLU 0.2

    D: max  E_x log D(x) + E_z log(1 - D(G(z)))
    G: max  E_z log D(G(z))    (non-saturating: the paper's fix for a G that D rejects easily)

Both nets see the image flattened, so any image_size and channel count work.
The update is the shared `nonsaturating_step` of gen_models.nn.adversarial.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gen_models.base import Batch, GenerativeModel, Metrics, StepContext, from_unit, noise
from gen_models.config import ModelConfig
from gen_models.nn.adversarial import nonsaturating_step, sample_generator
from gen_models.nn.mlp import mlp_features, mlp_generator


@dataclass(kw_only=True)
class GANConfig(ModelConfig):
    z_dim: int = 64
    """Size of the latent vector z ~ N(0, I)."""
    hidden: int = 256
    """Width of every hidden layer of G and D."""
    depth: int = 2
    """Hidden layers in G and in D."""
    lr: float = 2e-4
    """Adam learning rate of both networks (DCGAN paper)."""
    betas: tuple[float, float] = (0.5, 0.999)
    """Adam betas of both networks; beta1 = 0.5 instead of 0.9 damps oscillation (DCGAN paper)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("z_dim", "hidden", "depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        self.betas = tuple(self.betas)  # a YAML or JSON round trip gives a list
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")

    @classmethod
    def tiny(cls, **overrides) -> GANConfig:
        return cls(**{"z_dim": 8, "hidden": 16, "depth": 1, **overrides})


class GAN(GenerativeModel):
    """Unconditional: `sample` ignores labels."""

    def __init__(self, config: GANConfig):
        super().__init__()
        self.config = config
        c, s, h, depth = config.channels, config.image_size, config.hidden, config.depth
        self.generator = mlp_generator(config.z_dim, h, depth, c, s)
        self.discriminator = nn.Sequential(mlp_features(c, s, h, depth), nn.Linear(h, 1), nn.Flatten(0))

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
