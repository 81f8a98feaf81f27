"""A small UNet for noise prediction (Ho et al. 2020, after PixelCNN++).

    stem 3x3 -> per level: num_res_blocks ResBlocks, then halve (not after the last level)
             -> middle: ResBlock, self-attention, ResBlock
             -> per level, mirrored: num_res_blocks + 1 ResBlocks, each on [h, skip], then double
             -> GroupNorm, SiLU, 3x3 conv to the image channels

Every activation pushed on the way down (stem, each ResBlock, each downsample)
is concatenated back on the way up, so fine detail need not pass the
bottleneck. Every ResBlock adds a projection of the time embedding, so the
output depends on t at every resolution: a noise predictor that ignores t must
guess the noise level from the image alone, which at small t it cannot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gen_models.config import NORM_GROUPS
from gen_models.nn.layers import downsample, upsample
from gen_models.nn.time_embedding import TimeEmbedding


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(NORM_GROUPS, c)


class ResBlock(nn.Module):
    """x + conv(SiLU(norm(conv(SiLU(norm(x))) + W emb))), a 1x1 conv on x when widths differ."""

    def __init__(self, c_in: int, c_out: int, t_dim: int):
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(t_dim, c_out)
        self.norm2 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(F.silu(emb))[:, :, None, None]  # a per-channel shift set by t
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over the pixels, residual; used at the lowest
    resolution only, where it is cheap and links distant parts of the image."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=2)  # each (n, hw, c)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v
        return x + self.proj(out.transpose(1, 2).reshape(n, c, h, w))


class UNet(nn.Module):
    """eps_theta(x_t, t): (N, C, H, W) and (N,) integer steps -> (N, C, H, W).

    Level i has width base_channels * channel_mults[i]; H and W are halved
    len(channel_mults) - 1 times, so they must be divisible by 2 that often.
    """

    def __init__(self, *, channels: int, base_channels: int, channel_mults: tuple[int, ...], num_res_blocks: int):
        super().__init__()
        widths = [base_channels * m for m in channel_mults]
        t_dim = 4 * base_channels
        self.time_embedding = TimeEmbedding(base_channels, t_dim)
        self.stem = nn.Conv2d(channels, widths[0], 3, padding=1)

        skip_widths, c = [widths[0]], widths[0]
        self.down = nn.ModuleList()
        for i, w in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(c, w, t_dim))
                c = w
                skip_widths.append(c)
            self.down.append(blocks)
            if i < len(widths) - 1:
                skip_widths.append(c)  # the downsample's output
        self.downsamples = nn.ModuleList(downsample(w, w) for w in widths[:-1])

        self.mid1 = ResBlock(c, c, t_dim)
        self.attention = SelfAttention(c)
        self.mid2 = ResBlock(c, c, t_dim)

        self.up = nn.ModuleList()
        for w in reversed(widths):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(c + skip_widths.pop(), w, t_dim))
                c = w
            self.up.append(blocks)
        self.upsamples = nn.ModuleList(upsample(w, w) for w in reversed(widths[1:]))
        self.out = nn.Sequential(_norm(c), nn.SiLU(), nn.Conv2d(c, channels, 3, padding=1))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        emb = self.time_embedding(t)
        h = self.stem(x)
        skips = [h]
        for i, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb)
                skips.append(h)
            if i < len(self.downsamples):
                h = self.downsamples[i](h)
                skips.append(h)
        h = self.mid2(self.attention(self.mid1(h, emb)), emb)
        for i, blocks in enumerate(self.up):
            for block in blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if i < len(self.upsamples):
                h = self.upsamples[i](h)
        return self.out(h)
