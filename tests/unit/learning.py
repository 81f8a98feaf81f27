"""The bare training loop the learning tests drive a family with."""

import torch

from gen_models.base import GenerativeModel, StepContext

BATCH = 64


def fit(model: GenerativeModel, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    ctx = StepContext(optimizers=model.configure_optimizers())
    for step in range(steps):
        idx = torch.randint(len(x), (BATCH,))
        ctx.step = step
        model.training_step((x[idx], y[idx]), ctx)
        model.on_step_end(step + 1)
