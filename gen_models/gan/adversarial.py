"""What the adversarial families share: the model plumbing around a generator
and a discriminator (their shared config fields are `AdversarialConfig`, in
gen_models/gan/config.py), the GAN update of dcgan, gan, cgan and stylegan
(`adversarial_step`) and drawing images from a tanh generator (every GAN family).

The training recipe is config, shared by every family (benchmarks/recipes.py
measures each piece on the demo):
  loss           "nonsaturating" (Goodfellow et al. 2014) or "hinge" (Lim & Ye 2017; Miyato et al. 2018)
  spectral_norm  every weight of D divided by its largest singular value (Miyato et al. 2018)
  d_lr           D's own learning rate: two time-scales (TTUR, Heusel et al. 2017)
  betas          Adam's; beta1 = 0 as in SNGAN, BigGAN and StyleGAN
  augment        DiffAugment on everything D sees (Zhao et al. 2020), gen_models.nn.diffaugment
  ema_decay      samples from an EMA of G's weights (Karras et al. 2018; Brock et al. 2019), gen_models.nn.ema

D returns a logit, not a probability. The non-saturating losses are binary
cross-entropy with logits, written as softplus, which stays finite where sigmoid
saturates: softplus(-l) = -log sigmoid(l) and softplus(l) = -log(1 - sigmoid(l)).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gen_models.base import GenerativeModel, Metrics, StepContext, noise, to_unit
from gen_models.gan.config import AdversarialConfig, Loss
from gen_models.nn.diffaugment import diff_augment
from gen_models.nn.ema import copy_buffers_, ema_copy, ema_decay_at, update_ema_


class AdversarialModel(GenerativeModel):
    """A generator G(z) trained against a discriminator, each with its own
    optimizer. Unconditional unless a family overrides `sample`."""

    config: AdversarialConfig
    generator: nn.Module
    discriminator: nn.Module

    # The attribute holding D: "critic" in the Wasserstein families.
    discriminator_name = "discriminator"

    def apply_recipe(self) -> None:
        """Called at the end of a family's `__init__`, once G and D exist and are initialised:
        spectral norm on D, and the EMA copy of G (`generator_ema`, part of the state dict)."""
        if self.config.spectral_norm:
            spectral_norm_(getattr(self, self.discriminator_name))
        if self.config.ema_decay is not None:
            self.generator_ema = ema_copy(self.generator)

    @property
    def sampling_generator(self) -> nn.Module:
        """The G that `sample` draws from: the EMA copy when there is one, else the live G.

        The EMA copy gets the live G's buffers (BatchNorm statistics) first: copied at use, not
        at each step, it also gets them after the trainer has averaged them over the ranks."""
        if self.config.ema_decay is None:
            return self.generator
        return copy_buffers_(self.generator_ema, self.generator)

    def on_step_end(self, step: int) -> None:
        """generator_ema <- d * generator_ema + (1 - d) * generator, weights only (gen_models.nn.ema)."""
        if self.config.ema_decay is not None:
            update_ema_(self.generator_ema, self.generator, ema_decay_at(self.config.ema_decay, step))

    def ddp_modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "discriminator": self.discriminator}

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {name: self.build_optimizer(m, lr=self.lr_of(name)) for name, m in self.ddp_modules().items()}

    def lr_of(self, name: str) -> float:
        """The learning rate of `ddp_modules()[name]`: d_lr (when set) for D, lr for the rest."""
        c = self.config
        return c.d_lr if name == self.discriminator_name and c.d_lr is not None else c.lr

    def build_optimizer(self, module: nn.Module, *, lr: float | None = None) -> torch.optim.Optimizer:
        """The optimizer of one of `ddp_modules()`: Adam(lr, betas) for every one."""
        return torch.optim.Adam(module.parameters(), lr=self.config.lr if lr is None else lr,
                                betas=self.config.betas)

    def gan_step(self, ctx: StepContext, discriminator: Callable[[Tensor], Tensor], real: Tensor,
                 fake: Tensor) -> Metrics:
        """`adversarial_step` with this config's loss and augmentation."""
        policy = self.config.augment
        return adversarial_step(ctx, discriminator, real, fake, loss=self.config.loss,
                                augment=(lambda x: diff_augment(x, policy)) if policy else None)

    def sample(self, n: int, *, labels: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        return sample_generator(self.sampling_generator, n, self.config.z_dim, generator=generator)


def spectral_norm_(module: nn.Module) -> nn.Module:
    """Spectral normalisation on every conv and linear weight of `module`, and its BatchNorm
    layers replaced by identities, in place (see AdversarialConfig.spectral_norm).

    W is used as W / sigma(W), sigma estimated by one power iteration per training-mode
    forward (u, v kept as buffers): torch.nn.utils.parametrizations.spectral_norm.
    """
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(parent, name, nn.Identity())
            elif isinstance(child, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.utils.parametrizations.spectral_norm(child)
    return module


def d_loss(logit_real: Tensor, logit_fake: Tensor, kind: Loss) -> Tensor:
    """D's loss, to descend, on its logits for real and for fake images."""
    if kind == "hinge":
        # Only images on the wrong side of the margin (l(x) < 1, l(G(z)) > -1) push D.
        return F.relu(1 - logit_real).mean() + F.relu(1 + logit_fake).mean()
    # Non-saturating: D ascends log D(x) + log(1 - D(G(z))).
    return F.softplus(-logit_real).mean() + F.softplus(logit_fake).mean()


def g_loss(logit_fake: Tensor, kind: Loss) -> Tensor:
    """G's loss, to descend, on D's logits for its images."""
    if kind == "hinge":
        return -logit_fake.mean()
    # G ascends log D(G(z)) (non-saturating) rather than descending
    # log(1 - D(G(z))), whose gradient vanishes while D still wins easily.
    return F.softplus(-logit_fake).mean()


def adversarial_step(ctx: StepContext, discriminator: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor,
                     *, loss: Loss = "nonsaturating", augment: Callable[[Tensor], Tensor] | None = None) -> Metrics:
    """One D update, then one G update, through the optimizers named
    "discriminator" and "generator".

    `discriminator` maps images to logits (N,); a conditional family passes a
    closure that fixes the labels. `fake` = G(z) with its graph, so that G's
    update can differentiate through it. `augment`, when given, goes on every
    image D sees, real and fake, in both updates (DiffAugment).
    """
    if augment is not None:
        plain = discriminator

        def discriminator(images: Tensor) -> Tensor:
            return plain(augment(images))
    # G(z) is detached so D's loss stops at D.
    ctx.zero_grad("discriminator")
    logit_real = discriminator(real)
    logit_fake = discriminator(fake.detach())
    loss_d = d_loss(logit_real, logit_fake, loss)
    ctx.backward(loss_d)
    ctx.step_optimizer("discriminator")

    # This pass also leaves gradients on D; its next zero_grad discards them.
    ctx.zero_grad("generator")
    loss_g = g_loss(discriminator(fake), loss)
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
        # An EMA copy holds its weights as buffers: it has no parameters.
        device = next(itertools.chain(g.parameters(), g.buffers())).device
        z = noise((n, z_dim), device=device, generator=generator)
        return to_unit(g(z) if labels is None else g(z, labels.to(device)))
    finally:
        g.train(was_training)
