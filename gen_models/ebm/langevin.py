"""Langevin dynamics on an energy E(x), apart from any network (Du & Mordatch 2019).

    x_{k+1} = clamp(x_k - step_size * clip(dE/dx_k) + noise_scale * eps_k, low, high),   eps_k ~ N(0, I)

Two departures from the textbook update x - (eta / 2) dE/dx + sqrt(eta) eps,
both from the paper's code: the step on the gradient and the noise have their
own scales (step 10, noise 0.005 for images in [0, 1]), which mixes faster than
the coupled pair, and each gradient entry is clipped. A bare chain diverges:
an untrained net can have gradients of any size, and one large step throws x
far outside the data, where the net has never been trained and its gradient
means nothing. Clipping bounds a step to step_size * grad_clip per pixel, and
clamping to the data range after every step keeps x where E is meaningful.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gen_models.base import noise


def langevin(energy: Callable[[Tensor], Tensor], x: Tensor, *, steps: int, step_size: float,
             noise_scale: float, grad_clip: float, low: float = 0.0, high: float = 1.0,
             generator: torch.Generator | None = None) -> Tensor:
    """`steps` Langevin steps from x, detached, every iterate in [low, high].

    `energy` maps (N, ...) -> (N,). Only x is differentiated (autograd.grad with
    respect to x alone), so the chain leaves the parameters' .grad untouched:
    a training step's parameter gradients come from its loss only. Pass the
    bare net, not a DDP wrapper: a forward through DDP outside the loss
    backward would leave its reducer expecting a backward that never comes.
    """
    x = x.detach().clamp(low, high)
    for _ in range(steps):
        x.requires_grad_(True)
        with torch.enable_grad():
            # The sum's gradient is each image's own gradient: images do not interact.
            (grad,) = torch.autograd.grad(energy(x).sum(), x)
        eps = noise(tuple(x.shape), device=x.device, generator=generator)
        x = (x.detach() - step_size * grad.clamp(-grad_clip, grad_clip) + noise_scale * eps).clamp(low, high)
    return x.detach()
