"""The contract every generative model family implements.

The pipeline never branches on the family name: it builds a model from its
config, asks it for the modules to wrap in DDP and for its optimizers, and
drives it through `training_step`. A family either implements `loss` (one
optimizer stepping on one loss; the default `training_step` does the rest) or
overrides `training_step` for a manual schedule (GANs, EBMs).

Data enters every model as float images in [0, 1], NCHW, with integer labels;
each family maps it to its own range. `sample` returns [0, 1] as well.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

Batch = tuple[Tensor, Tensor]  # (images in [0, 1], NCHW float; labels, int64)
Metrics = dict[str, Tensor | float]


@dataclass(kw_only=True)
class StepContext:
    """What a `training_step` may do to the optimizers.

    The trainer owns this object so it keeps control of gradient clipping,
    mixed precision and logging; models never call `optimizer.step()` or
    `loss.backward()` themselves. `step` counts completed training steps, so
    schedules such as n_critic derive from it instead of mutating state.
    """

    optimizers: dict[str, torch.optim.Optimizer]
    step: int = 0
    # Clip each optimizer's gradients to this global norm before stepping.
    grad_clip: float | None = None
    # Autocast dtype of forward passes (torch.bfloat16), None for full precision.
    # bf16 has float32's exponent range, so no loss scaling is needed.
    amp_dtype: torch.dtype | None = None
    # Device type autocast applies to ("cpu", "cuda").
    device_type: str = "cpu"

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context the trainer runs `training_step` in."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.amp_dtype)

    def backward(self, loss: Tensor, **kwargs: Any) -> None:
        # Autocast belongs to forward passes; backward ops already run in the
        # dtypes their forward ops chose.
        with torch.autocast(self.device_type, enabled=False):
            loss.backward(**kwargs)

    def zero_grad(self, name: str) -> None:
        self.optimizers[name].zero_grad(set_to_none=True)

    def step_optimizer(self, name: str) -> None:
        opt = self.optimizers[name]
        if self.grad_clip is not None:
            params = [p for g in opt.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        opt.step()


class GenerativeModel(nn.Module):
    """Base class of every family. Subclasses set `config` in `__init__`."""

    # Name of the metric (and its mode) this family is judged by in the registry.
    primary_metric: ClassVar[tuple[str, str]] = ("fid", "min")
    # True when `log_prob` is a lower bound (an ELBO), not the exact likelihood.
    log_prob_is_bound: ClassVar[bool] = False
    # True when `sample(labels=...)` honours the labels (class-conditional families).
    conditional: ClassVar[bool] = False

    config: Any

    def ddp_modules(self) -> dict[str, nn.Module]:
        """Attribute name -> submodule to wrap in DDP, one wrapper each.

        A GAN returns generator and discriminator apart: one DDP around both,
        called through `.module`, would skip the gradient all-reduce hooks.
        """
        return {name: m for name, m in self.named_children()
                if any(p.requires_grad for p in m.parameters())}

    def compile_modules(self) -> dict[str, nn.Module]:
        """The `ddp_modules()` that `torch.compile` may take (train.compile).

        Leave out any module differentiated twice (a gradient penalty):
        compiled graphs have no double backward.
        """
        return self.ddp_modules()

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def loss(self, batch: Batch, *, step: int = 0) -> tuple[Tensor, Metrics]:
        """(loss to descend, metrics) of one batch.

        `step`: completed training steps, read by schedules such as the VAE's
        KL warm-up; 0 outside training. Passed, not kept in the model, so a
        resumed run continues from the step the trainer restored.
        """
        raise NotImplementedError(f"{type(self).__name__} trains through training_step")

    def training_step(self, batch: Batch, ctx: StepContext) -> Metrics:
        """One optimisation step. Default: one optimizer on `self.loss`."""
        (name,) = ctx.optimizers
        ctx.zero_grad(name)
        loss, metrics = self.loss(batch, step=ctx.step)
        ctx.backward(loss)
        ctx.step_optimizer(name)
        return {"loss": loss.detach(), **metrics}

    @torch.no_grad()
    def sample(self, n: int, *, labels: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def log_prob(self, x: Tensor) -> Tensor:
        """Log-likelihood (or a lower bound) in nats per image, for x in [0, 1]."""
        raise NotImplementedError(f"{type(self).__name__} has no likelihood")

    @property
    def has_log_prob(self) -> bool:
        return type(self).log_prob is not GenerativeModel.log_prob

    def sampling_cost(self) -> tuple[str, int]:
        """(sampler, sequential network passes per batch): logged beside img/s, so a
        reviewer sees why a 100-step DDIM and a one-pass GAN differ in speed."""
        return "one pass", 1

    def on_step_end(self, step: int) -> None:
        """Hook after each optimisation step, for state that accumulates over steps
        (DDPM's EMA weights). Schedules read the step instead (`ctx.step`, `loss`'s `step`)."""

    # --- DDP wrapping -----------------------------------------------------
    def wrap_ddp(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Replace each `ddp_modules()` entry by `wrap(module)` in place.

        Optimizers built before wrapping keep working: DDP shares parameters.
        """
        for name, module in self.ddp_modules().items():
            setattr(self, name, wrap(module))

    def plain_state_dict(self) -> dict[str, Tensor]:
        """`state_dict()` without the `.module` level that DDP wrapping adds."""
        names = "|".join(re.escape(n) for n in self.ddp_modules())
        pattern = re.compile(rf"^({names})\.module\.") if names else None
        return {(pattern.sub(r"\1.", k) if pattern else k): v
                for k, v in self.state_dict().items()}


def noise(shape: tuple[int, ...], *, device: torch.device | str | None = None,
          generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise drawn from `generator` (on its device) when given."""
    if generator is not None:
        return torch.randn(shape, generator=generator, device=generator.device).to(device)
    return torch.randn(shape, device=device)


def to_unit(x: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((x + 1) / 2).clamp(0, 1)


def from_unit(x: Tensor) -> Tensor:
    """[0, 1] -> [-1, 1]."""
    return x * 2 - 1


__all__ = ["Batch", "GenerativeModel", "Metrics", "StepContext", "from_unit", "noise", "to_unit"]
