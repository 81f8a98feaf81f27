"""The GPU-path spec flags (train.precision, train.channels_last, train.compile)
on the CPU: every family trains under them and stays close to full precision.
Their speed is measured in benchmarks/, never here."""

from __future__ import annotations

import pytest
import torch

from gen_models.base import StepContext
from gen_models.registry import FAMILIES
from pipelines.train import StepBatches, run_steps
from tests.unit.test_contract import make

CPU = torch.device("cpu")


def _train(family: str, *, steps: int, amp: bool = False, channels_last: bool = False,
           compile: bool = False) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """`steps` pipeline steps on fixed random 8x8 images; (last metrics, final weights)."""
    torch.manual_seed(0)
    model = make(family)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    if compile:
        for m in model.compile_modules().values():
            m.compile()
    ctx = StepContext(optimizers=model.configure_optimizers(), amp_dtype=torch.bfloat16 if amp else None)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.randint(0, model.config.num_classes, (64,), generator=g)
    batches = StepBatches(x, y, global_batch=16, seed=0, rank=0, world=1, memory_format=fmt)
    (_, metrics), = run_steps(model, ctx, batches, start=0, stop=steps, seed=0, device=CPU,
                              report_due=lambda done: done == steps)
    return metrics, {k: v.detach().clone() for k, v in model.plain_state_dict().items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_channels_last_step_matches_full_precision(family):
    ref, ref_w = _train(family, steps=1)
    got, got_w = _train(family, steps=1, amp=True, channels_last=True)
    # Same weights and noise. bf16 forward passes (8 mantissa bits) move a loss by
    # under a percent; a metric taken after an update (G's loss after D's step)
    # moves more, since Adam's first step is about lr * sign(grad) and gradients
    # near zero can flip sign. A wrong dtype path would be off by far more.
    for k in ref:
        if k != "img_per_s":
            assert abs(got[k] - ref[k]) <= 0.1 * max(1.0, abs(ref[k])), (k, got[k], ref[k])
    # Weights stay float32 (autocast casts copies), in the layout asked for.
    assert all(v.dtype == ref_w[k].dtype for k, v in got_w.items())
    model = make(family)
    model.to(memory_format=torch.channels_last)
    for p in model.parameters():
        if p.dim() == 4:
            assert p.is_contiguous(memory_format=torch.channels_last)


def test_compile_leaves_out_modules_differentiated_twice():
    for family in FAMILIES:
        model = make(family)
        assert set(model.compile_modules()) <= set(model.ddp_modules()), family
    assert set(make("wgan_gp").compile_modules()) == {"generator"}
    assert set(make("wgan").compile_modules()) == {"generator", "critic"}


@pytest.mark.parametrize("family", ["dcgan", "wgan_gp"])
def test_compiled_training_follows_eager(family):
    """Inductor on the CPU, a few steps: the same weights as eager to float32 rounding."""
    _, eager = _train(family, steps=3)
    _, compiled = _train(family, steps=3, compile=True)
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-4, atol=1e-5, msg=k)
