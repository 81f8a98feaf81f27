"""Noise schedules of the forward process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I),
and the closed forms they imply (Ho et al. 2020, eqs. 4, 6, 7):

    q(x_t | x_0)           = N(sqrt(abar_t) x_0, (1 - abar_t) I),          abar_t = prod_{s <= t} (1 - beta_s)
    q(x_{t-1} | x_t, x_0)  = N(coef1_t x_0 + coef2_t x_t, beta_tilde_t I)
        coef1_t      = beta_t sqrt(abar_{t-1}) / (1 - abar_t)
        coef2_t      = (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t)
        beta_tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)

Steps are 0-indexed in code: index t is step t + 1 of the papers, so index 0 is
the first noising step and its "previous" is the data itself, abar = 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def linear_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Ho et al.: beta rising linearly from beta_start to beta_end, float64.

    The endpoints are the ones for T = 1000, scaled by 1000 / T (Nichol &
    Dhariwal 2021): a shorter chain then takes fewer, larger steps to about the
    same abar_T, i.e. still ends at (nearly) pure noise.
    """
    scale = 1000 / timesteps
    if not 0 < beta_start * scale <= beta_end * scale < 1:
        raise ValueError(f"betas {beta_start} -> {beta_end} scaled by 1000/{timesteps} leave (0, 1)")
    return torch.linspace(beta_start * scale, beta_end * scale, timesteps, dtype=torch.float64)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal 2021: abar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) pi/2), float64.

    beta_t = 1 - abar(t) / abar(t-1). abar falls slowly at both ends instead of
    the linear schedule's near-zero abar over the last part of the chain, where
    steps destroy nothing more. The offset s keeps beta_1 from being vanishingly
    small; near t = T, abar -> 0 and beta -> 1, so beta is clipped at max_beta,
    or 1 / sqrt(alpha_t) would blow up when sampling.
    """
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


class NoiseSchedule(nn.Module):
    """The tensors of one schedule, indexed by a batch of steps t (N,).

    Computed in float64 and stored in float32 as buffers, so they follow the
    model across devices. Not persistent: they are derived from the config,
    which is saved with every checkpoint, so the state dict holds only what was
    learned, and a checkpoint never disagrees with the config it comes with.
    """

    betas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor
    posterior_variance: Tensor
    posterior_log_variance_clipped: Tensor

    def __init__(self, betas: Tensor):
        super().__init__()
        betas = betas.double()
        alphas = 1 - betas
        abar = torch.cumprod(alphas, dim=0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        # Bayes on the two Gaussians q(x_t | x_{t-1}) and q(x_{t-1} | x_0): precisions add,
        # 1 / beta_tilde = alpha_t / beta_t + 1 / (1 - abar_{t-1}), which gives the module docstring's forms.
        posterior_variance = betas * (1 - abar_prev) / (1 - abar)
        tensors = {
            "betas": betas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "posterior_mean_coef1": betas * abar_prev.sqrt() / (1 - abar),
            "posterior_mean_coef2": (1 - abar_prev) * alphas.sqrt() / (1 - abar),
            "posterior_variance": posterior_variance,
            # beta_tilde_0 = 0 (x_0 is then known): its log is -inf, so index 0 takes
            # index 1's value. The sampler adds no noise at t = 0, so this is never used there.
            "posterior_log_variance_clipped": torch.cat([posterior_variance[1:2], posterior_variance[1:]]).log(),
        }
        for name, value in tensors.items():
            self.register_buffer(name, value.float(), persistent=False)

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    @staticmethod
    def _at(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
        """values[t] shaped (N, 1, 1, 1) to broadcast against an image batch."""
        return values[t].view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t ~ q(x_t | x_0) by reparameterisation: sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        abar = self._at(self.alphas_cumprod, t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * eps

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """q_sample solved for x_0: (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        abar = self._at(self.alphas_cumprod, t, x_t)
        return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()

    def predict_eps(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """q_sample solved for eps: (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)."""
        abar = self._at(self.alphas_cumprod, t, x_t)
        return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at(self.posterior_mean_coef1, t, x_t) * x0 + self._at(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, self._at(self.posterior_log_variance_clipped, t, x_t)
