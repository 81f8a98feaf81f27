"""Sinusoidal embedding of the diffusion step t (Vaswani et al. 2017, as used by
Ho et al. 2020): the network is told which noise level it is denoising."""

import math

import torch
from torch import Tensor, nn


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """(N,) steps -> (N, dim): [sin(t w_k), cos(t w_k)] with w_k = max_period^(-k / (dim/2)).

    Frequencies span periods from 2 pi to about 2 pi * max_period, so both
    neighbouring and distant steps get distinct codes.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


class TimeEmbedding(nn.Module):
    """Sinusoidal code of t through a two-layer MLP, as in Ho et al.: (N,) -> (N, out_dim)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"dim must be even (sin and cos halves), got {dim}")
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(sinusoidal_embedding(t, self.dim))
