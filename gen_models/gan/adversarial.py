"""What the adversarial families share: the config fields of a latent
generator and its Adam optimizers, the model plumbing around a generator and
a discriminator, the non-saturating GAN update (Goodfellow et al. 2014; dcgan,
gan, cgan) and drawing images from a tanh generator (every GAN family).

D returns a logit, not a probability: the losses are binary cross-entropy with
logits, written as softplus, which stays finite where sigmoid saturates:
softplus(-l) = -log sigmoid(l) and softplus(l) = -log(1 - sigmoid(l)).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from pydantic import PositiveFloat, PositiveInt
from torch import Tensor, nn

from gen_models.base import GenerativeModel, Metrics, StepContext, noise, to_unit
from gen_models.config import AdamBetas, ModelConfig, config_dataclass


@config_dataclass
class AdversarialConfig(ModelConfig):
    z_dim: PositiveInt = 64
    """Size of the latent vector z ~ N(0, I)."""
    lr: PositiveFloat = 2e-4
    """Adam learning rate of both networks (DCGAN paper)."""
    betas: AdamBetas = (0.5, 0.999)
    """Adam betas of both networks; beta1 = 0.5 instead of 0.9 damps oscillation (DCGAN paper)."""

    @classmethod
    def tiny(cls, **overrides) -> AdversarialConfig:
        return super().tiny(**{"z_dim": 8, **overrides})


class AdversarialModel(GenerativeModel):
    """A generator G(z) trained against a discriminator, each with its own
    optimizer. Unconditional unless a family overrides `sample`."""

    config: AdversarialConfig
    generator: nn.Module
    discriminator: nn.Module

    def ddp_modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "discriminator": self.discriminator}

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {name: self.build_optimizer(m) for name, m in self.ddp_modules().items()}

    def build_optimizer(self, module: nn.Module) -> torch.optim.Optimizer:
        """The optimizer of one of `ddp_modules()`: Adam(lr, betas) for every one."""
        return torch.optim.Adam(module.parameters(), lr=self.config.lr, betas=self.config.betas)

    def sample(self, n: int, *, labels: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        return sample_generator(self.generator, n, self.config.z_dim, generator=generator)


def nonsaturating_step(ctx: StepContext, discriminator: Callable[[Tensor], Tensor],
                       real: Tensor, fake: Tensor) -> Metrics:
    """One D update, then one G update, through the optimizers named
    "discriminator" and "generator".

    `discriminator` maps images to logits (N,); a conditional family passes a
    closure that fixes the labels. `fake` = G(z) with its graph, so that G's
    update can differentiate through it.
    """
    # D ascends log D(x) + log(1 - D(G(z))). G(z) is detached so D's loss stops at D.
    ctx.zero_grad("discriminator")
    logit_real = discriminator(real)
    logit_fake = discriminator(fake.detach())
    loss_d = F.softplus(-logit_real).mean() + F.softplus(logit_fake).mean()
    ctx.backward(loss_d)
    ctx.step_optimizer("discriminator")

    # G ascends log D(G(z)) (non-saturating) rather than descending
    # log(1 - D(G(z))), whose gradient vanishes while D still wins easily.
    # This pass also leaves gradients on D; its next zero_grad discards them.
    ctx.zero_grad("generator")
    loss_g = F.softplus(-discriminator(fake)).mean()
    ctx.backward(loss_g)
    ctx.step_optimizer("generator")

    return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach(),
            "d_real": torch.sigmoid(logit_real).mean().detach(),
            "d_fake": torch.sigmoid(logit_fake).mean().detach()}


@torch.no_grad()
def sample_generator(net: nn.Module, n: int, z_dim: int, *, labels: Tensor | None = None,
                     generator: torch.Generator | None = None) -> Tensor:
    """n images in [0, 1] from a tanh generator: net(z), or net(z, labels) when labels are given.

    z ~ N(0, I) comes from `generator` when given, so the images do not depend
    on the global RNG. The net runs in eval mode (running BatchNorm statistics:
    an image does not depend on the rest of its batch) and its mode is restored.
    """
    # Bypass a DDP wrapper: its forward may broadcast buffers from rank 0, a
    # collective that hangs when only one rank draws samples.
    g = getattr(net, "module", net)
    was_training = g.training
    g.eval()
    try:
        device = next(g.parameters()).device
        z = noise((n, z_dim), device=device, generator=generator)
        return to_unit(g(z) if labels is None else g(z, labels.to(device)))
    finally:
        g.train(was_training)
