"""Reverse-process samplers, apart from the network: each takes eps_fn(x_t, t),
the noise predictor, and a NoiseSchedule, and returns x_0 in [-1, 1].

Both clip the predicted x_0 to [-1, 1], the range of the data: early on,
x0_hat from a nearly pure-noise x_t lies far outside it, and carrying that
error into x_{t-1} pushes the chain off the data (Ho et al.'s sampler does the same).
Noise is drawn from `generator` when given, so a seed fixes the samples.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gen_models.base import noise
from gen_models.diffusion.schedules import NoiseSchedule

EpsFn = Callable[[Tensor, Tensor], Tensor]


@torch.no_grad()
def ddpm_sample(eps_fn: EpsFn, schedule: NoiseSchedule, shape: tuple[int, ...], *,
                generator: torch.Generator | None = None) -> Tensor:
    """Ancestral sampling through all T steps (Ho et al. 2020, Algorithm 2):

        x_T ~ N(0, I),   x_{t-1} ~ q(x_{t-1} | x_t, x0_hat),   x0_hat = clip((x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t))

    with the true posterior mean and variance beta_tilde_t, and no noise on the last step.
    """
    device = schedule.betas.device
    x = noise(shape, device=device, generator=generator)
    for i in reversed(range(schedule.num_timesteps)):
        t = torch.full((shape[0],), i, device=device, dtype=torch.long)
        x0 = schedule.predict_x0(x, t, eps_fn(x, t)).clamp(-1, 1)
        mean, log_var = schedule.q_posterior(x0, x, t)
        x = mean + (0.5 * log_var).exp() * noise(shape, device=device, generator=generator) if i > 0 else mean
    return x


def ddim_timesteps(timesteps: int, steps: int) -> list[int]:
    """`steps` evenly spaced steps of 0 .. T-1, always ending at T - 1.

    "Trailing" spacing (Lin et al. 2024): the first step starts from the step
    whose x_t is (nearly) pure noise, as x_T ~ N(0, I) assumes; steps = T gives every step.
    """
    if not 1 <= steps <= timesteps:
        raise ValueError(f"steps must be in [1, {timesteps}], got {steps}")
    # spacing T / steps >= 1, so the rounded values are distinct
    return [round(timesteps * (i + 1) / steps) - 1 for i in range(steps)]


def ddim_sigma(abar_t: Tensor, abar_s: Tensor, eta: float) -> Tensor:
    """Noise scale of a DDIM step from t to s < t (Song et al. 2020, eq. 16):

        sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s)

    At eta = 1 and s = t - 1 this is sqrt(beta_tilde_t), the ancestral sampler's.
    """
    return eta * ((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)).sqrt()


@torch.no_grad()
def ddim_sample(eps_fn: EpsFn, schedule: NoiseSchedule, shape: tuple[int, ...], *, steps: int,
                eta: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
    """DDIM (Song et al. 2020, eq. 12) on `steps` of the T steps, from t to the previous step s:

        x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z

    eta = 0 is deterministic given x_T (the only draw); eta = 1 with steps = T
    is ancestral sampling, step for step, draw for draw.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    device = schedule.betas.device
    abar = schedule.alphas_cumprod
    taus = ddim_timesteps(schedule.num_timesteps, steps)
    x = noise(shape, device=device, generator=generator)
    for i in reversed(range(len(taus))):
        t = torch.full((shape[0],), taus[i], device=device, dtype=torch.long)
        abar_t = abar[taus[i]]
        abar_s = abar[taus[i - 1]] if i > 0 else abar.new_ones(())  # the last step lands on x_0
        x0 = schedule.predict_x0(x, t, eps_fn(x, t)).clamp(-1, 1)
        # The eps that, with the clipped x0, gives back x_t: without it the step would mix two
        # inconsistent guesses and would not reduce to the posterior mean at eta = 1.
        eps = schedule.predict_eps(x, t, x0)
        sigma = ddim_sigma(abar_t, abar_s, eta)
        x = abar_s.sqrt() * x0 + (1 - abar_s - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and i > 0:  # sigma = 0 on the last step
            x = x + sigma * noise(shape, device=device, generator=generator)
    return x
