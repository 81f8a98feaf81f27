"""StyleGAN's generator blocks (Karras et al. 2019): the mapping network,
adaptive instance normalisation and per-pixel noise inputs.

    z -> pixel norm -> (Linear, LeakyReLU 0.2) x depth -> w               MappingNetwork
    AdaIN(x, w) = y_s * (x - mu(x)) / sigma(x) + y_b,  (y_s, y_b) = A w     per channel, per image
    x + b * n,  n ~ N(0, 1) per pixel, one map shared by all channels     NoiseInput, b learned per channel
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gen_models.base import noise
from gen_models.nn.mlp import dense_layers

EPS = 1e-8


def pixel_norm(x: Tensor) -> Tensor:
    """x / sqrt(mean over features of x^2): z on the sphere of radius sqrt(dim), whatever its draw."""
    return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + EPS)


class MappingNetwork(nn.Module):
    """z -> w: an MLP that unwarps the Gaussian z into a space w whose
    directions need not follow the data's density (the paper's disentanglement argument)."""

    def __init__(self, z_dim: int, w_dim: int, depth: int):
        super().__init__()
        self.net = nn.Sequential(*dense_layers(z_dim, w_dim, depth))
        # He init for LeakyReLU(0.2), so w keeps z's scale through every layer.
        # PyTorch's default shrinks the variance about threefold per layer: after
        # 8 layers w hardly depends on z, and at lr x 0.01 the mapping cannot
        # grow out of it (the paper gets the same from its equalised learning rate).
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, a=0.2)
                nn.init.zeros_(m.bias)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(pixel_norm(z))


class AdaIN(nn.Module):
    """Each channel of each image is normalised to mean 0, std 1 over its
    pixels, then given the mean y_b and std y_s that the style w asks for:
    the style, not the previous layer's statistics, sets the channel's scale."""

    def __init__(self, channels: int, w_dim: int):
        super().__init__()
        self.affine = nn.Linear(w_dim, 2 * channels)
        # Start at the identity style y_s = 1, y_b = 0 (the paper's bias init of A).
        nn.init.ones_(self.affine.bias[:channels])
        nn.init.zeros_(self.affine.bias[channels:])

    def style(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """(y_s, y_b), each (N, channels)."""
        return self.affine(w).chunk(2, dim=1)

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        y_s, y_b = self.style(w)
        mu = x.mean((2, 3), keepdim=True)
        var = x.var((2, 3), keepdim=True, unbiased=False)  # biased: the output std is then y_s exactly
        return y_s[:, :, None, None] * (x - mu) * torch.rsqrt(var + EPS) + y_b[:, :, None, None]


class NoiseInput(nn.Module):
    """Adds one N(0, 1) map per image, scaled per channel: stochastic detail
    (hair, texture) without spending the style's capacity on it."""

    def __init__(self, channels: int):
        super().__init__()
        # Zero: the net starts deterministic and learns how much noise each channel wants (the paper's init).
        self.scale = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        n = noise((x.shape[0], 1, *x.shape[2:]), device=x.device, generator=generator)
        return x + self.scale[None, :, None, None] * n
