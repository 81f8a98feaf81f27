"""StyleGAN-style generator (Karras et al. 2019) trained with the non-saturating
GAN loss against a DCGAN discriminator.

    z -> mapping (pixel norm, MLP) -> w -> one style per layer
    const (g, k, k) -> conv, noise, AdaIN
      -> n x (up x2 -> [conv, noise, AdaIN] x 2) -> 1x1 conv, tanh       1 + 2n layers
    D: DCGAN's, (C, s, s) -> ... -> (2^(n-1) d, k, k) -> logit

n = resolution_steps(s) doublings from a k x k constant, k = s / 2^n: the
paper's 4x4 at 32 and 64 (3 and 4 doublings); 28 cannot halve below 7x7 and 8
starts from 2x2, both with two doublings.

The mapping network learns at lr x 0.01 (its own param group): it feeds every
layer, so large steps there move the whole image at once. During training, with
probability `mixing_prob` an image takes its styles from w1 below a random
crossover layer and from w2 above it, so no layer can rely on its neighbours
sharing its style. `sample` truncates w towards the running mean w by psi,
trading variety for typical images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gen_models.base import Batch, Metrics, StepContext, from_unit, noise, to_unit
from gen_models.config import resolution_steps
from gen_models.gan.adversarial import AdversarialModel
from gen_models.gan.config import StyleGANConfig
from gen_models.gan.dcgan import dcgan_discriminator
from gen_models.nn.layers import dcgan_init_
from gen_models.nn.style import AdaIN, MappingNetwork, NoiseInput


class StyleGenerator(nn.Module):
    """z -> images in [-1, 1]; the mean w it tracks while training is a buffer, so it is checkpointed."""

    def __init__(self, config: StyleGANConfig):
        super().__init__()
        self.config = config
        g, n = config.g_channels, resolution_steps(config.image_size)
        k = config.image_size // 2**n
        self.num_layers = 1 + 2 * n
        self.mapping = MappingNetwork(config.z_dim, config.z_dim, config.mapping_depth)
        # N(0, 1), not the paper's ones: AdaIN normalises over the k x k pixels,
        # and a constant map would have zero variance there.
        self.const = nn.Parameter(torch.randn(1, g, k, k))
        self.convs = nn.ModuleList(nn.Conv2d(g, g, kernel_size=3, padding=1) for _ in range(self.num_layers))
        self.noises = nn.ModuleList(NoiseInput(g) for _ in range(self.num_layers))
        self.adains = nn.ModuleList(AdaIN(g, config.z_dim) for _ in range(self.num_layers))
        self.to_rgb = nn.Conv2d(g, config.channels, kernel_size=1)
        self.register_buffer("w_avg", torch.zeros(config.z_dim))

    def styles(self, z: Tensor, *, psi: float = 1.0) -> Tensor:
        """One w per layer, (N, num_layers, w_dim). In training mode this also
        moves the mean w and mixes styles; in eval mode it does neither."""
        c = self.config
        w = self.mapping(z)
        layers = self.num_layers
        ws = w[:, None].expand(-1, layers, -1)
        if self.training:
            self.w_avg.lerp_(w.detach().mean(0).to(self.w_avg.dtype), 1 - c.w_avg_beta)  # w is bf16 under autocast
            # Per image: mix with prob p; layers from a crossover in [1, L-1] on take w2,
            # so a mixed image has w1 at the first layer and w2 at the last.
            w2 = self.mapping(torch.randn_like(z))
            mixed = torch.rand(z.shape[0], device=z.device) < c.mixing_prob
            crossover = torch.randint(1, layers, (z.shape[0],), device=z.device)
            use_w2 = mixed[:, None] & (torch.arange(layers, device=z.device)[None] >= crossover[:, None])
            ws = torch.where(use_w2[:, :, None], w2[:, None], ws)
        if psi != 1:
            ws = self.w_avg + psi * (ws - self.w_avg)
        return ws

    def forward(self, z: Tensor, *, psi: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        ws = self.styles(z, psi=psi)
        x = self.const.expand(z.shape[0], -1, -1, -1)
        for i, (conv, noise_input, adain) in enumerate(zip(self.convs, self.noises, self.adains)):
            if i % 2:  # after the constant's own conv, two convs per resolution, the first on the doubled map
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = adain(F.leaky_relu(noise_input(conv(x), generator), 0.2), ws[:, i])
        return torch.tanh(self.to_rgb(x))


class StyleGAN(AdversarialModel):
    """Unconditional: `sample` ignores labels."""

    def __init__(self, config: StyleGANConfig):
        super().__init__()
        self.config = config
        self.generator = StyleGenerator(config)
        self.discriminator = dcgan_discriminator(config.channels, config.d_channels, config.image_size)
        dcgan_init_(self.discriminator)
        self.apply_recipe()

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        c = self.config
        g = self.generator
        mapping = list(g.mapping.parameters())
        synthesis = [p for name, p in g.named_parameters() if not name.startswith("mapping.")]
        return {"generator": torch.optim.Adam([{"params": synthesis},
                                               {"params": mapping, "lr": c.lr * c.mapping_lr_mult}],
                                              lr=c.lr, betas=c.betas),
                "discriminator": self.build_optimizer(self.discriminator, lr=self.lr_of("discriminator"))}

    def training_step(self, batch: Batch, ctx: StepContext) -> Metrics:
        real = from_unit(batch[0])
        fake = self.generator(noise((real.shape[0], self.config.z_dim), device=real.device))
        return self.gan_step(ctx, self.discriminator, real, fake)

    @torch.no_grad()
    def sample(self, n: int, *, labels: Tensor | None = None, generator: torch.Generator | None = None,
               truncation: float | None = None) -> Tensor:
        """n images in [0, 1] at psi = `truncation` (default: the config's); z
        and the noise maps come from `generator` when given."""
        # Bypass a DDP wrapper (see sample_generator); eval mode neither mixes styles nor moves the mean w.
        g = self.sampling_generator
        g = getattr(g, "module", g)
        was_training = g.training
        g.eval()
        try:
            z = noise((n, self.config.z_dim), device=g.const.device, generator=generator)
            psi = self.config.truncation if truncation is None else truncation
            return to_unit(g(z, psi=psi, generator=generator))
        finally:
            g.train(was_training)
