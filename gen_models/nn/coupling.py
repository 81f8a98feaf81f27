"""Affine coupling layers and squeezing, the invertible pieces of RealNVP (Dinh et al. 2016).

A coupling layer keeps the inputs where a binary mask b is 1 and transforms
the rest with a scale and shift computed from the kept part only:

    (s, t) = net(b * x),  masked to the free part (1 - b)
    y      = x * exp(s) + t              (where b = 1, s = t = 0: y = x)
    log |det dy/dx| = sum(s)             (the Jacobian is triangular, diagonal exp(s))
    x      = (y - t) * exp(-s),  with (s, t) = net(b * y) = net(b * x): inverting costs one pass

A layer leaves the kept half untouched, so consecutive layers must flip the
mask: a stack that always kept the same half would pass half the dimensions
through unchanged. `checkerboard` and `channel_halves` take a parity for this.

Every layer maps (N, C, H, W) to (y, log|det|) with log|det| of shape (N,), and
has `inverse(y) -> (x, log|det dx/dy|)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def checkerboard(size: int, parity: int) -> Tensor:
    """(1, size, size) mask, 1 where (row + col) % 2 == parity; the same for every channel."""
    i = torch.arange(size)
    return ((i[:, None] + i[None, :]) % 2 == parity).float()[None]


def channel_halves(channels: int, parity: int) -> Tensor:
    """(channels, 1, 1) mask keeping the first half of the channels (parity 0) or the second (1)."""
    first = torch.arange(channels) < channels // 2
    return (first if parity == 0 else ~first).float()[:, None, None]


class ResidualBlock(nn.Module):
    """x + conv(relu(conv(relu(x)))), 3x3 convolutions at constant width.

    No normalisation: BatchNorm would make an image's log-density depend on the
    rest of its batch, and the Jacobian of the flow would no longer be per image.
    """

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class AffineCoupling(nn.Module):
    """One affine coupling layer on (N, channels, H, W) with a fixed mask.

    s = scale * tanh(raw_s): tanh bounds each layer's log-scale, so exp(s)
    neither overflows nor vanishes early in training, and the learned
    per-channel `scale` (initialised to 1) lets training widen the range again.
    """

    def __init__(self, channels: int, mask: Tensor, *, hidden: int, num_blocks: int):
        super().__init__()
        # A buffer: saved with the model, moved with .to(), never trained.
        self.register_buffer("mask", mask)
        self.net = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1),
            *[ResidualBlock(hidden) for _ in range(num_blocks)],
            nn.ReLU(),
            nn.Conv2d(hidden, 2 * channels, 3, padding=1),
        )
        self.scale = nn.Parameter(torch.ones(channels, 1, 1))

    def _scale_shift(self, kept: Tensor) -> tuple[Tensor, Tensor]:
        raw_s, t = self.net(kept).chunk(2, dim=1)
        free = 1 - self.mask
        return free * self.scale * torch.tanh(raw_s), free * t

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self._scale_shift(self.mask * x)
        return x * s.exp() + t, s.flatten(1).sum(1)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self._scale_shift(self.mask * y)
        return (y - t) * (-s).exp(), -s.flatten(1).sum(1)


class Squeeze(nn.Module):
    """(N, C, H, W) -> (N, 4C, H/2, W/2): each 2x2 block of pixels becomes 4 channels.

    A permutation of the dimensions, so log|det| = 0. It turns spatial
    neighbours into channels, which the channel masks then split.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        n, c, h, w = x.shape
        y = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return y.reshape(n, 4 * c, h // 2, w // 2), x.new_zeros(n)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        n, c4, h, w = y.shape
        x = y.view(n, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(n, c4 // 4, 2 * h, 2 * w), y.new_zeros(n)
