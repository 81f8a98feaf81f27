"""RealNVP (Dinh et al. 2016): a normalising flow of affine coupling layers.

    x in [0, 1] from 8-bit data       (the bytes round(255 x))
    y  = (255 x + u) / 256,  u ~ U[0, 1)^D       uniform dequantisation: y in [0, 1)^D
    y' = alpha + (1 - 2 alpha) y                 keeps the logit finite at y = 0 and y -> 1
    h  = logit(y')
    z  = f(h)                                    coupling stack, z ~ N(0, I) under the model
    log p(y) = log N(z; 0, I) + log|det dz/dh| + log|det dh/dy|
    log|det dh/dy| = sum_d [log(1 - 2 alpha) - log y'_d - log(1 - y'_d)]

`log_prob(x)` is log p(y) in nats per image: a density on [0, 1]^D, so that
bits/dim = -log p(y) / (D ln 2) + 8 is the figure the literature reports.
Averaged over u, that bits/dim bounds from above the bits/dim of the discrete
model P(bytes) = integral of p over the bytes' bin (Jensen; Theis et al. 2016).
One draw of u makes log_prob stochastic: pass a `generator` to fix the draw.

The coupling stack, per scale (the paper's multi-scale order, without
factoring out half the dimensions: at 28x28 every dimension can afford every layer):

    couplings_per_mask checkerboard couplings, parity flipping every layer
    squeeze (C, H, W) -> (4C, H/2, W/2)
    couplings_per_mask channel-wise couplings, halves flipping every layer

Unconditional: `sample` ignores labels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gen_models.base import Batch, GenerativeModel, Metrics, noise
from gen_models.flow.config import RealNVPConfig
from gen_models.nn.coupling import AffineCoupling, Squeeze, channel_halves, checkerboard


class CouplingStack(nn.Module):
    """The bijection f: (N, C, H, W) -> (N, C, H, W) of the module docstring.

    `forward(h)` gives (z, log|det dz/dh|); `forward(z, reverse=True)` gives
    (h, log|det dh/dz|). One entry point for both directions, so that a DDP
    wrapper, which only forwards `forward`, serves sampling too.
    """

    def __init__(self, config: RealNVPConfig):
        super().__init__()
        c, size, n = config.channels, config.image_size, config.couplings_per_mask
        kw = {"hidden": config.hidden, "num_blocks": config.num_blocks}
        layers: list[nn.Module] = []
        for _ in range(config.num_scales):
            layers += [AffineCoupling(c, checkerboard(size, parity=i % 2), **kw) for i in range(n)]
            layers.append(Squeeze())
            c, size = 4 * c, size // 2
            layers += [AffineCoupling(c, channel_halves(c, parity=i % 2), **kw) for i in range(n)]
        self.layers = nn.ModuleList(layers)
        self.inner_shape = (c, size, size)

    def forward(self, x: Tensor, *, reverse: bool = False) -> tuple[Tensor, Tensor]:
        # z leaves in the input's shape: reshaping the squeezed tensor is a
        # fixed permutation (log|det| = 0) that the i.i.d. prior cannot tell apart.
        logdet = x.new_zeros(x.shape[0])
        if reverse:
            h = x.reshape(x.shape[0], *self.inner_shape)
            for layer in reversed(self.layers):
                h, ld = layer.inverse(h)
                logdet = logdet + ld
        else:
            h = x
            for layer in self.layers:
                h, ld = layer(h)
                logdet = logdet + ld
        return h.reshape(x.shape), logdet


class RealNVP(GenerativeModel):
    primary_metric = ("bits_per_dim", "min")

    def __init__(self, config: RealNVPConfig):
        super().__init__()
        self.config = config
        self.flow = CouplingStack(config)

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"flow": torch.optim.Adam(self.parameters(), lr=self.config.lr)}

    def forward(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """y in [0, 1)^D (dequantised) -> (z, log|det dz/dy|), logit transform included."""
        a = self.config.alpha
        p = a + (1 - 2 * a) * y
        h = p.log() - (-p).log1p()
        logdet_logit = (math.log(1 - 2 * a) - p.log() - (-p).log1p()).flatten(1).sum(1)
        z, logdet_flow = self.flow(h)
        return z, logdet_flow + logdet_logit

    def inverse(self, z: Tensor) -> Tensor:
        """z -> y, the exact inverse of `forward` (not clamped)."""
        h, _ = self.flow(z, reverse=True)
        a = self.config.alpha
        return (torch.sigmoid(h) - a) / (1 - 2 * a)

    def dequantize(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x in [0, 1] -> y = (round(255 x) + u) / 256, u ~ U[0, 1) from `generator` when given.

        Rounding reads x as the byte it stands for (a no-op on 8-bit data) so
        that every dequantised point lies in that byte's bin of width 1/256.
        """
        if generator is not None:
            u = torch.rand(x.shape, generator=generator, device=generator.device).to(x.device)
        else:
            u = torch.rand_like(x)
        return ((x * 255).round() + u) / 256

    def _log_density(self, y: Tensor) -> Tensor:
        z, logdet = self(y)
        log_prior = -0.5 * (z**2 + math.log(2 * math.pi)).flatten(1).sum(1)
        return log_prior + logdet

    def loss(self, batch: Batch, *, step: int = 0) -> tuple[Tensor, Metrics]:
        x = batch[0]
        # nats per dimension: the same learning rate suits every image size
        loss = -self._log_density(self.dequantize(x)).mean() / x[0].numel()
        return loss, {"bits_per_dim": loss.detach() / math.log(2) + 8}

    @torch.no_grad()
    def log_prob(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """log p(y) of one dequantisation y of x, in nats per image, shape (N,)."""
        return self._log_density(self.dequantize(x, generator))

    @torch.no_grad()
    def sample(self, n: int, *, labels: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """z ~ N(0, I) -> y = inverse(z), then the byte whose bin y falls in, as floor(256 y) / 255:
        the 8-bit image the dequantised model stands for."""
        c, s = self.config.channels, self.config.image_size
        z = noise((n, c, s, s), device=next(self.parameters()).device, generator=generator)
        y = self.inverse(z)
        return (y * 256).floor().clamp(0, 255) / 255
