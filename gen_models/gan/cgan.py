"""Conditional GAN (Mirza & Osindero 2014) with a projection discriminator
(Miyato & Koyama 2018), trained with the non-saturating loss.

    G(z, y) = MLP([z, e_G(y)])                      the label's embedding concatenated to z
    D(x, y) = psi(phi(x)) + <e_D(y), phi(x)>         phi: MLP features, psi: linear, e_D: embedding

Why projection rather than concatenating y to D's input: the optimal D's logit
is log p(x, y) / q(x, y) = log p(y|x) / q(y|x) + log p(x) / q(x). If p(y|x)
and q(y|x) are softmaxes over features phi(x), the first term is the label's
row of a matrix dotted with phi(x) (the normalisers only depend on x and fold
into psi): the projection is that form built in. A D that sees y
concatenated to x must learn the x-y interaction by itself and can get far by
ignoring y; Miyato & Koyama measured clearly better class-conditional samples
with the projection.

Training uses each batch's labels for its real and its fake images, so G sees
labels at their frequency in the data. The update is the shared
`adversarial_step` of gen_models.gan.adversarial.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gen_models.base import Batch, Metrics, StepContext, from_unit, noise
from gen_models.gan.adversarial import AdversarialModel, sample_generator
from gen_models.gan.config import CGANConfig
from gen_models.nn.mlp import mlp_features, mlp_generator


class ConditionalGenerator(nn.Module):
    def __init__(self, config: CGANConfig):
        super().__init__()
        self.embed = nn.Embedding(config.num_classes, config.embed_dim)
        self.net = mlp_generator(config.z_dim + config.embed_dim, config.hidden, config.depth,
                                 config.channels, config.image_size)

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        return self.net(torch.cat([z, self.embed(y)], dim=1))


class ProjectionDiscriminator(nn.Module):
    def __init__(self, config: CGANConfig):
        super().__init__()
        self.features = mlp_features(config.channels, config.image_size, config.hidden, config.depth)
        self.linear = nn.Linear(config.hidden, 1)
        self.embed = nn.Embedding(config.num_classes, config.hidden)
        # nn.Embedding starts at N(0, 1): summed over `hidden` features, the
        # projection would start ~sqrt(hidden) times larger than psi(phi(x)).
        # Start it at psi's scale, so that neither term drowns the other at first.
        nn.init.normal_(self.embed.weight, std=config.hidden**-0.5)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h = self.features(x)
        return self.linear(h).squeeze(1) + (self.embed(y) * h).sum(1)


class CGAN(AdversarialModel):
    """Conditional: `sample(n, labels=...)` draws images of the given labels."""

    # Tells the pipeline that labels matter to `sample` (GenerativeModel has no such flag yet).
    conditional = True

    def __init__(self, config: CGANConfig):
        super().__init__()
        self.config = config
        self.generator = ConditionalGenerator(config)
        self.discriminator = ProjectionDiscriminator(config)
        self.apply_recipe()

    def training_step(self, batch: Batch, ctx: StepContext) -> Metrics:
        x, y = batch
        real = from_unit(x)
        fake = self.generator(noise((real.shape[0], self.config.z_dim), device=real.device), y)
        return self.gan_step(ctx, lambda images: self.discriminator(images, y), real, fake)

    def sample(self, n: int, *, labels: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """n images of `labels` (shape (n,)), or of labels drawn uniformly from `generator` when None."""
        k = self.config.num_classes
        if labels is None:
            device = generator.device if generator is not None else None
            labels = torch.randint(k, (n,), generator=generator, device=device)
        elif labels.shape != (n,) or labels.is_floating_point() or bool(((labels < 0) | (labels >= k)).any()):
            raise ValueError(f"labels must be n = {n} integers in [0, {k}), got {labels}")
        return sample_generator(self.sampling_generator, n, self.config.z_dim, labels=labels, generator=generator)
