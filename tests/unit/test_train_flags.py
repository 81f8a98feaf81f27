"""The GPU-path spec flags (train.precision, train.channels_last, train.compile)
on the CPU: every family trains under them and stays close to full precision,
and each flag is seen to act inside the model: its layers compute in bf16, the
maps they see are channels_last, its compile modules run as compiled graphs.
Their speed is measured in benchmarks/, never here."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from gen_models.base import GenerativeModel, StepContext
from gen_models.registry import FAMILIES
from pipelines.steps import StepBatches, run_steps
from tests.unit.test_contract import make

CPU = torch.device("cpu")


def _layout(t: torch.Tensor) -> str | None:
    """The memory format of t, "channels_last" or "nchw"; None where t's shape lays both out alike
    (not 4-D, one channel or one pixel)."""
    if t.dim() != 4 or t.shape[1] == 1 or t.shape[2] * t.shape[3] == 1:
        return None
    return "channels_last" if t.is_contiguous(memory_format=torch.channels_last) else "nchw"


@dataclass
class Seen:
    """What a model saw while `_train` drove it."""

    batches: set = field(default_factory=set)  # layouts of the images training_step was given
    dtypes: set = field(default_factory=set)  # dtypes every conv and linear layer computed in
    maps: set = field(default_factory=set)  # layouts of the 4-D maps the conv layers made
    compiled: dict[str, torch.Tensor] = field(default_factory=dict)  # compile module -> calls run as a compiled graph

    def watch(self, model: GenerativeModel, *, compiled: bool) -> None:
        step = model.training_step

        def training_step(batch, ctx):  # the real step, after a look at the images it is given
            self.batches.add(_layout(batch[0]))
            return step(batch, ctx)

        model.training_step = training_step
        if compiled:
            # Inside a compiled graph a Python-side record (a list append) makes dynamo recompile at every call;
            # an in-place add on a tensor is part of the graph. is_compiling() is False when the module runs eager.
            for name, m in model.compile_modules().items():
                calls = self.compiled[name] = torch.zeros((), dtype=torch.long)

                def count(_m, _args, calls=calls) -> None:  # None: a pre-hook's result would replace the input
                    if torch.compiler.is_compiling():
                        calls.add_(1)

                m.register_forward_pre_hook(count)
            return

        def record(_m, _args, out):
            self.dtypes.add(out.dtype)
            self.maps.add(_layout(out))

        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                m.register_forward_hook(record)


def _train(family: str, *, steps: int, amp: bool = False, channels_last: bool = False,
           compile: bool = False) -> tuple[dict[str, float], dict[str, torch.Tensor], Seen]:
    """`steps` pipeline steps on fixed random 8x8 RGB images; (last metrics, final weights, what the model saw).
    RGB, not grey: a one-channel image is laid out alike in both memory formats."""
    torch.manual_seed(0)
    model = make(family, channels=3)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    seen = Seen()
    seen.watch(model, compiled=compile)
    if compile:
        for m in model.compile_modules().values():
            m.compile()
    ctx = StepContext(optimizers=model.configure_optimizers(), amp_dtype=torch.bfloat16 if amp else None)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.randint(0, model.config.num_classes, (64,), generator=g)
    batches = StepBatches(x, y, global_batch=16, seed=0, rank=0, world=1, memory_format=fmt)
    (_, metrics), = run_steps(model, ctx, batches, start=0, stop=steps, seed=0, device=CPU,
                              report_due=lambda done: done == steps)
    return metrics, {k: v.detach().clone() for k, v in model.plain_state_dict().items()}, seen


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_channels_last_step_matches_full_precision(family):
    ref, ref_w, ref_seen = _train(family, steps=1)
    got, got_w, seen = _train(family, steps=1, amp=True, channels_last=True)
    # Same weights and noise. bf16 forward passes (8 mantissa bits) move a loss by
    # under a percent; a metric taken after an update (G's loss after D's step)
    # moves more, since Adam's first step is about lr * sign(grad) and gradients
    # near zero can flip sign. A wrong dtype path would be off by far more.
    for k in ref:
        if k != "img_per_s":
            assert abs(got[k] - ref[k]) <= 0.1 * max(1.0, abs(ref[k])), (k, got[k], ref[k])
    # Every conv and linear layer computed in bf16 under autocast, in float32 without it.
    assert (ref_seen.dtypes, seen.dtypes) == ({torch.float32}, {torch.bfloat16})
    # The images reach training_step in the layout asked for, and every map a conv makes keeps it
    # (the MLP families make none: their layers flatten the images first).
    assert (ref_seen.batches, seen.batches) == ({"nchw"}, {"channels_last"})
    assert seen.maps - {None} <= {"channels_last"}, seen.maps
    # Weights stay float32 (autocast casts copies), and the trained ones keep the layout asked for.
    assert all(v.dtype == ref_w[k].dtype for k, v in got_w.items())
    assert {_layout(v) for v in got_w.values()} - {None} <= {"channels_last"}


def test_compile_leaves_out_modules_differentiated_twice():
    for family in FAMILIES:
        model = make(family)
        assert set(model.compile_modules()) <= set(model.ddp_modules()), family
    assert set(make("wgan_gp").compile_modules()) == {"generator"}
    assert set(make("wgan").compile_modules()) == {"generator", "critic"}


@pytest.mark.parametrize("family", ["dcgan", "wgan_gp"])
def test_compiled_training_follows_eager(family):
    """Inductor on the CPU, a few steps: the same weights as eager to float32 rounding."""
    _, eager, _ = _train(family, steps=3)
    _, compiled, seen = _train(family, steps=3, compile=True)
    # Each compile module ran as a compiled graph at every step at least (run eager, its count stays 0).
    assert {name: int(calls) >= 3 for name, calls in seen.compiled.items()} == \
        dict.fromkeys(make(family).compile_modules(), True), seen.compiled
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-4, atol=1e-5, msg=k)
