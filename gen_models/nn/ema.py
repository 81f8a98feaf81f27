"""An exponential moving average (EMA) of a network's weights, for sampling.

    ema <- d_n * ema + (1 - d_n) * theta      after step n,  d_n = min(decay, (1 + n) / (10 + n))

The warm-up d_n lets the average forget the random init early on; beyond ~10 / (1 - decay) steps
d_n is `decay`. The last iterate of a GAN or a diffusion model wanders around a good solution;
its average sits nearer the middle (Ho et al. 2020 sample DDPM from EMA 0.9999; Karras et al.
2018/2019 and Brock et al. 2019 evaluate G's EMA).

The EMA copy holds the weights as buffers (`ema_copy`): it is saved and loaded with the model's
state dict, but is no parameter, so no optimizer steps it and DDP never wraps it. The buffers of
the live network (BatchNorm's running statistics, a tracked mean) are not averaged: a model
whose network has some copies them into the EMA copy before using it (`copy_buffers_`), as the
BigGAN and StyleGAN implementations do, so the average is normalised with the statistics of the
live network, whose weights it follows (benchmarks/recipes.py compares statistics re-estimated
on the EMA network's own batches).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def as_buffers(module: nn.Module) -> nn.Module:
    """`module` with every parameter turned into a buffer of the same name, in place."""
    for m in module.modules():
        for name, param in list(m.named_parameters(recurse=False)):
            delattr(m, name)
            m.register_buffer(name, param.detach())
    return module


def ema_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` (not DDP-wrapped) to hold its EMA weights, as buffers."""
    return as_buffers(copy.deepcopy(module))


def ema_decay_at(decay: float, step: int) -> float:
    """d_n of the module docstring, after `step` completed steps."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema_(ema: nn.Module, live: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * live, weight by weight. `live` may be DDP-wrapped
    (or compiled in place)."""
    live = getattr(live, "module", live)
    weight = 1 - decay
    for name, param in live.named_parameters():
        ema.get_buffer(name).lerp_(param.detach(), weight)


@torch.no_grad()
def copy_buffers_(ema: nn.Module, live: nn.Module) -> nn.Module:
    """Each buffer of `live` (maybe DDP-wrapped) copied into `ema`; returns `ema`."""
    live = getattr(live, "module", live)
    for name, buf in live.named_buffers():
        ema.get_buffer(name).copy_(buf)
    return ema
