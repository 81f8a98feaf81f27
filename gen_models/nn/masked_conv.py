"""Masked convolution of PixelCNN (van den Oord et al. 2016).

An output at pixel (i, j) may see only pixels before (i, j) in raster order:
the rows above and, in row i, the columns left of j. At (i, j) itself the
colours are ordered R, then G, then B: every channel k of every layer belongs
to colour k % colours, and at the centre

    mask A (first layer):  colour(out) >  colour(in)    the pixel's own value stays hidden
    mask B (later layers): colour(out) >= colour(in)    a channel sees its own colour's features,
                                                         which saw only earlier values

For grayscale (colours = 1) this is the usual pair: A excludes the centre, B includes it.

The mask is a buffer applied in `forward` as conv2d(x, weight * mask). The
weights are never written to (multiplying weight.data by the mask on every call
would make each forward a hidden parameter update, outside autograd and the
optimizer), and the gradient at a masked tap is exactly 0, so those weights never move.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MaskedConv2d(nn.Conv2d):
    """A same-size convolution (odd kernel, padding kernel_size // 2) that sees only earlier pixels."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, *,
                 mask_type: Literal["A", "B"], colours: int = 1):
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if mask_type not in ("A", "B"):
            raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
        super().__init__(c_in, c_out, kernel_size, padding=kernel_size // 2)
        k = kernel_size // 2
        mask = torch.zeros(c_out, c_in, kernel_size, kernel_size)
        mask[:, :, :k, :] = 1  # rows above
        mask[:, :, k, :k] = 1  # left of the centre, same row
        out_colour = torch.arange(c_out)[:, None] % colours
        in_colour = torch.arange(c_in)[None, :] % colours
        mask[:, :, k, k] = (out_colour > in_colour if mask_type == "A" else out_colour >= in_colour).float()
        self.register_buffer("mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, self.stride, self.padding,
                        self.dilation, self.groups)
