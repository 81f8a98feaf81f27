"""The GAN training recipe of gen_models.gan.adversarial, piece by piece: each option's math,
on tiny nets in milliseconds. That every GAN family trains, samples and checkpoints with the
whole recipe on is test_contract's (its `-recipe` cases)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gen_models.base import StepContext
from gen_models.gan.adversarial import d_loss, g_loss
from gen_models.nn.diffaugment import cutout, diff_augment, translation
from gen_models.nn.ema import ema_decay_at
from gen_models.registry import build, config_class, model_class


def tiny(family: str, **overrides):
    cls, cfg = model_class(family), config_class(family)
    return cls(cfg.tiny(image_size=8, channels=1, **overrides))


def step(model, ctx: StepContext | None = None) -> StepContext:
    ctx = ctx or StepContext(optimizers=model.configure_optimizers())
    model.training_step((torch.rand(4, 1, 8, 8), torch.randint(10, (4,))), ctx)
    return ctx


def test_hinge_and_nonsaturating_losses_are_the_formulas():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 3.0])
    # D: mean relu(1 - l(x)) + mean relu(1 + l(G(z))) = (0 + 0.5 + 2) / 3 + (0 + 1 + 4) / 3
    assert d_loss(real, fake, "hinge").item() == pytest.approx(2.5)
    assert g_loss(fake, "hinge").item() == pytest.approx(-1 / 3)  # -mean l(G(z))
    # The non-saturating losses are binary cross-entropy on the logits.
    ones, zeros = torch.ones(3), torch.zeros(3)
    torch.testing.assert_close(d_loss(real, fake, "nonsaturating"),
                               F.binary_cross_entropy_with_logits(real, ones)
                               + F.binary_cross_entropy_with_logits(fake, zeros))
    torch.testing.assert_close(g_loss(fake, "nonsaturating"), F.binary_cross_entropy_with_logits(fake, ones))


@pytest.mark.parametrize("family", ["dcgan", "gan", "cgan", "stylegan"])
def test_a_hinge_step_moves_every_weight_but_ds_output_bias(family):
    """While every logit is inside the margin (|l| < 1, as at init) the hinge loss's gradient on a
    bias added to all of D's logits is (fakes inside - reals inside) / n = 0: that bias alone stays."""
    model = tiny(family, loss="hinge", spectral_norm=True, ema_decay=0.9, augment=("translation", "cutout"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = model.training_step((torch.rand(4, 1, 8, 8), torch.randint(10, (4,))),
                                  StepContext(optimizers=model.configure_optimizers()))
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in metrics.values())
    still = [n for n, p in model.named_parameters() if torch.equal(before[n], p)]
    assert len(still) <= 1 and all(n.startswith("discriminator.") and n.endswith("bias") for n in still), still


@pytest.mark.parametrize("family", ["dcgan", "stylegan", "gan", "wgan_gp"])
def test_spectral_norm_bounds_every_layer_of_d_and_drops_its_batchnorm(family):
    model = tiny(family, spectral_norm=True)
    d = getattr(model, model.discriminator_name)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in d.modules())
    layers = [m for m in d.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert layers and all(nn.utils.parametrize.is_parametrized(m, "weight") for m in layers)
    d.train()
    x = torch.rand(4, 1, 8, 8)
    for _ in range(30):  # power iterations, one per training-mode forward
        d(x)
    for m in layers:
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
        assert sigma.item() == pytest.approx(1.0, abs=0.02)
    # Off by default: the plain D keeps its layers and BatchNorm.
    plain = tiny("dcgan").discriminator
    assert not any(nn.utils.parametrize.is_parametrized(m) for m in plain.modules())


@pytest.mark.parametrize("family, d_name", [("dcgan", "discriminator"), ("stylegan", "discriminator"),
                                            ("wgan_gp", "critic")])
def test_d_lr_is_the_discriminators_alone(family, d_name):
    optimizers = tiny(family, lr=1e-4, d_lr=4e-4).configure_optimizers()
    assert {g["lr"] for g in optimizers[d_name].param_groups} == {4e-4}
    assert optimizers["generator"].param_groups[0]["lr"] == 1e-4
    default = tiny(family, lr=1e-4).configure_optimizers()
    assert {g["lr"] for g in default[d_name].param_groups} == {1e-4}


def test_ema_of_g_is_the_formula_copies_the_batchnorm_statistics_and_is_sampled():
    model = tiny("dcgan", ema_decay=0.9)
    assert not any(n.startswith("generator_ema.") for n, _ in model.named_parameters())
    assert any(n.startswith("generator_ema.") for n in model.state_dict())
    assert "generator_ema" not in model.ddp_modules()
    ctx = step(model)
    ema_before = {n: b.clone() for n, b in model.generator_ema.named_buffers()}
    live_params = dict(model.generator.named_parameters())
    model.on_step_end(5)
    d = ema_decay_at(0.9, 5)
    assert d == pytest.approx(6 / 15)
    for name, p in live_params.items():
        torch.testing.assert_close(model.generator_ema.get_buffer(name), d * ema_before[name] + (1 - d) * p.detach())
    sampled = model.sampling_generator
    assert sampled is model.generator_ema
    for name, b in model.generator.named_buffers():  # BatchNorm running statistics: the live G's
        assert torch.equal(sampled.get_buffer(name), b), name
    step(model, ctx)  # the live G moves on; sample draws from the average, not from it
    g = lambda: torch.Generator().manual_seed(0)
    ema_images = model.sample(3, generator=g())
    model.generator_ema.load_state_dict(model.generator.state_dict())
    assert not torch.equal(ema_images, model.sample(3, generator=g()))
    assert "generator_ema.0.weight" not in tiny("dcgan").state_dict()  # off by default


def test_the_default_recipe_is_the_plain_dcgan_update():
    """Defaults: the non-saturating loss on unaugmented images, both nets at lr, no EMA, no spectral norm."""
    c = config_class("dcgan")()
    assert (c.loss, c.spectral_norm, c.d_lr, c.augment, c.ema_decay) == ("nonsaturating", False, None, (), None)


def test_diffaugment_transforms():
    x = torch.arange(2 * 36, dtype=torch.float).reshape(2, 1, 6, 6) + 1
    assert torch.equal(diff_augment(x, ()), x)
    torch.manual_seed(0)
    shifted = translation(x)
    for img, out in zip(x, shifted):  # a shift by whole pixels: some pixels kept, the rest the 0 fill
        kept = out[out != 0]
        assert set(kept.tolist()) <= set(img.flatten().tolist())
    cut = cutout(torch.ones(64, 1, 8, 8))
    removed = (cut == 0).flatten(1).sum(1)
    assert removed.max() == 16 and removed.min() >= 4  # a 4x4 square, clipped at the border
    y = torch.rand(4, 3, 8, 8, requires_grad=True)
    out = diff_augment(y, ("color", "translation", "cutout"))
    assert out.shape == y.shape
    out.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0  # differentiable: G learns through it


@pytest.mark.parametrize("bad", [{"loss": "hinge"}, {"augment": ("cutout",)}])
def test_wasserstein_families_refuse_what_does_not_apply(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        config_class("wgan_gp").tiny(**bad)


def test_config_rejects_bad_recipe_values():
    for bad in ({"loss": "wasserstein"}, {"ema_decay": 1.0}, {"d_lr": 0.0}, {"augment": ("flip",)}):
        with pytest.raises(ValueError):
            build("dcgan", {"image_size": 8, **bad})
