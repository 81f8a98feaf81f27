"""Differentiable augmentation (DiffAugment, Zhao et al. 2020) of what a discriminator sees.

The same random transforms go on real and fake images, in D's update and in G's: D never
sees an un-augmented image, so it cannot learn the augmentation as a tell of fakes, and G's
gradient flows back through the (differentiable) transforms. Each transform draws its own
parameters per image from the global RNG, which the trainer reseeds every step. Images in
[-1, 1]; 0 (mid grey) fills what a shift or cut leaves empty, as in the paper's code.

    color:        x + (u - 0.5)  (brightness);  (x - mean_c) * 2u + mean_c  (saturation, RGB only);
                  (x - mean) * (u + 0.5) + mean  (contrast),  u ~ U[0, 1) per image each
    translation:  shift by up to 1/8 of the side in x and y, integer pixels
    cutout:       zero one square of half the side, centred anywhere in the image
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gen_models.config import AugmentPolicy


def _u(x: Tensor) -> Tensor:
    return torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device)


def color(x: Tensor) -> Tensor:
    x = x + (_u(x) - 0.5)
    if x.shape[1] > 1:
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (_u(x) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_u(x) + 0.5) + mean


def translation(x: Tensor, ratio: float = 0.125) -> Tensor:
    n, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sh, sh + 1, (n, 1, 1), device=x.device)
    dx = torch.randint(-sw, sw + 1, (n, 1, 1), device=x.device)
    # Output pixel (i, j) reads input pixel (i + dy, j + dx) of the image padded by one pixel of 0.
    i = (torch.arange(h, device=x.device)[None, :, None] + dy + 1).clamp(0, h + 1)
    j = (torch.arange(w, device=x.device)[None, None, :] + dx + 1).clamp(0, w + 1)
    padded = F.pad(x, (1, 1, 1, 1))
    return padded[torch.arange(n, device=x.device)[:, None, None], :, i, j].permute(0, 3, 1, 2)


def cutout(x: Tensor, ratio: float = 0.5) -> Tensor:
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), device=x.device)
    cx = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), device=x.device)
    # The square covers rows cy - ch // 2 .. cy - ch // 2 + ch - 1 (and columns alike), clipped to the image.
    r = torch.arange(h, device=x.device)[None, :, None] - (cy - ch // 2)
    c = torch.arange(w, device=x.device)[None, None, :] - (cx - cw // 2)
    inside = (r >= 0) & (r < ch) & (c >= 0) & (c < cw)
    return x * (~inside)[:, None].to(x.dtype)


TRANSFORMS = {"color": color, "translation": translation, "cutout": cutout}


def diff_augment(x: Tensor, policy: tuple[AugmentPolicy, ...]) -> Tensor:
    """x with each transform of `policy` applied in turn (none: x itself)."""
    for name in policy:
        x = TRANSFORMS[name](x)
    return x
