"""The promises of the ebm and stylegan families beyond the shared contract:
the Langevin chain and replay buffer of the EBM, AdaIN, truncation, style
mixing and the mapping network's learning rate of StyleGAN."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gen_models.base import StepContext
from gen_models.ebm.config import EBMConfig
from gen_models.ebm.ebm import EBM
from gen_models.ebm.langevin import langevin
from gen_models.gan.config import StyleGANConfig
from gen_models.gan.stylegan import StyleGAN
from gen_models.nn.style import AdaIN


class CountingWrapper(nn.Module):
    """Stands in for DDP: the `.module` level, and a count of the forwards through it."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.module(x)


def batch(n: int = 16, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(n, 1, size, size), torch.zeros(n, dtype=torch.long)


# --- EBM ---------------------------------------------------------------------

@pytest.mark.parametrize("weight_scale", [1.0, 1e3])
def test_langevin_stays_in_range_for_a_random_net(weight_scale):
    """The reference's bare chain leaves the data range and blows up; clipped
    gradients and clamping keep every iterate in [0, 1] and finite, even for a
    net whose gradients are a thousand times too large."""
    torch.manual_seed(0)
    model = EBM(EBMConfig(image_size=8))  # the paper's step 10, noise 0.005
    with torch.no_grad():
        for p in model.energy.parameters():
            p.mul_(weight_scale)
    x = torch.rand(16, 1, 8, 8)
    for _ in range(10):  # 10 x 50 = 500 steps, checked along the way
        x = model.chain(x, steps=50)
        assert torch.isfinite(x).all()
        assert x.min() >= 0 and x.max() <= 1


def test_langevin_settles_at_the_mode_of_a_known_energy():
    """E = 0.025 |x - 0.5|^2: each step halves the distance to 0.5 (1 - 10 * 0.05),
    so the chain settles there with a spread of about the noise scale."""
    x = langevin(lambda x: 0.025 * (x - 0.5).pow(2).flatten(1).sum(1), torch.rand(64, 1, 8, 8),
                 steps=100, step_size=10.0, noise_scale=0.005, grad_clip=0.03,
                 generator=torch.Generator().manual_seed(0))
    assert (x - 0.5).abs().max() < 0.05
    assert 0.003 < x.std() < 0.01


def test_replay_buffer_reinitialises_about_five_percent():
    model = EBM(EBMConfig.tiny(image_size=8, buffer_size=100))
    model.replay.fill_(-1.0)  # outside uniform noise's [0, 1): fresh starts are told apart
    torch.manual_seed(0)
    start, idx = model.draw_from_buffer(20000)
    fresh = start[:, 0, 0, 0] >= 0
    # Binomial(20000, 0.05): std 0.0015, so +-0.01 is over six standard deviations.
    assert abs(fresh.float().mean().item() - 0.05) < 0.01
    assert (start[~fresh] == -1).all() and (start[fresh] >= 0).all()
    assert idx.min() >= 0 and idx.max() < 100


# An untrained net's energies differ by thousandths, and Langevin lowers them by that much: over 8 seeds,
# 20 steps (from noise, or from the buffer below) lower every image's energy by 0.002 or more, while
# 20 steps of the noise alone move it by 0.0004 at most. A fall of 0.001 tells the two apart.
FALL = 0.001


def test_training_step_writes_its_chains_back_over_the_images_they_started_from():
    """No fresh starts: every chain starts from a buffer image, and goes back in its place, lower in energy."""
    torch.manual_seed(0)
    model = EBM(EBMConfig.tiny(image_size=8, buffer_size=16, langevin_steps=20, reinit_prob=0.0))
    energy = copy.deepcopy(model.energy)  # the net the chains follow; the step then updates it
    before = model.replay.clone()
    model.training_step(batch(), StepContext(optimizers=model.configure_optimizers()))
    changed = (model.replay != before).flatten(1).any(1)
    assert changed.any()
    # Each written image is nearest the one it replaced: over 8 seeds, at most 1.6 from it (L2) and 2.5 or
    # more from any other image of the buffer (uniform noise at first).
    written = model.replay[changed]
    assert torch.equal(torch.cdist(written.flatten(1), before.flatten(1)).argmin(1), changed.nonzero()[:, 0])
    with torch.no_grad():
        fall = energy(before[changed]) - energy(written)
    assert (fall > FALL).all(), fall
    assert model.replay.min() >= 0 and model.replay.max() <= 1


def test_langevin_chain_gives_the_parameters_no_gradient():
    model = EBM(EBMConfig.tiny(image_size=8))
    model.chain(torch.rand(4, 1, 8, 8), steps=5)
    model.sample(4)
    assert all(p.grad is None for p in model.energy.parameters())


def test_sample_runs_its_chain_under_no_grad():
    """The evaluate stage samples under torch.no_grad(); the chain still follows dE/dx: the same images
    as with gradients on, each lower in energy than the noise it started from."""
    torch.manual_seed(0)
    model = EBM(EBMConfig.tiny(image_size=8, sample_steps=20))
    with torch.no_grad():
        x = model.sample(16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, model.sample(16, generator=torch.Generator().manual_seed(0)))
    start = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))  # sample's first draw
    with torch.no_grad():
        fall = model.energy(start) - model.energy(x)
    assert (fall > FALL).all(), fall


def test_only_the_loss_goes_through_the_ddp_wrapper():
    """The chain runs on the bare net: one forward through the wrapper per step,
    the loss's, so DDP's reducer sees one forward for its one backward."""
    model = EBM(EBMConfig.tiny(image_size=8, langevin_steps=7))
    optimizers = model.configure_optimizers()
    model.wrap_ddp(CountingWrapper)
    model.training_step(batch(), StepContext(optimizers=optimizers))
    assert model.energy.calls == 1
    assert all(p.grad is not None for p in model.energy.parameters())


def test_ebm_config_rejects_bad_values():
    for bad in ({"langevin_steps": 0}, {"step_size": 0.0}, {"reinit_prob": 1.5}, {"alpha": -1.0},
                {"buffer_size": 0}, {"betas": (0.0, 1.0)}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            EBMConfig.tiny(**bad)


# --- StyleGAN ----------------------------------------------------------------

def test_adain_gives_each_channel_the_style_mean_and_std():
    torch.manual_seed(0)
    adain = AdaIN(6, w_dim=10)
    nn.init.normal_(adain.affine.weight)  # styles far from the identity init
    x = torch.randn(4, 6, 5, 5) * 3 + 2
    w = torch.randn(4, 10)
    out = adain(x, w)
    y_s, y_b = adain.style(w)
    torch.testing.assert_close(out.mean((2, 3)), y_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.std((2, 3), unbiased=False), y_s.abs(), atol=1e-5, rtol=1e-5)


def trained_stylegan() -> StyleGAN:
    """A tiny StyleGAN one training step in: the mean w is off zero."""
    torch.manual_seed(0)
    model = StyleGAN(StyleGANConfig.tiny(image_size=8))
    model.training_step(batch(), StepContext(optimizers=model.configure_optimizers()))
    return model


def test_truncation_zero_draws_the_mean_w_only():
    model = trained_stylegan()
    g = model.generator.eval()
    assert model.generator.w_avg.abs().sum() > 0
    torch.testing.assert_close(g.styles(torch.randn(5, 8), psi=0.0), g.w_avg.expand(5, g.num_layers, -1))

    with torch.no_grad():
        for noise_input in g.noises:
            noise_input.scale.fill_(0.5)
    x = model.sample(5, truncation=0.0)
    assert not torch.allclose(x[0], x[1])  # the noise inputs still differ
    with torch.no_grad():
        for noise_input in g.noises:
            noise_input.scale.zero_()
    x = model.sample(5, truncation=0.0)
    torch.testing.assert_close(x, x[:1].expand_as(x))
    # psi 1 keeps the mapping's w at every layer; psi 0.5 goes halfway from it to the mean w
    z = torch.randn(5, 8)
    w = g.styles(z, psi=1.0)
    torch.testing.assert_close(w, g.mapping(z)[:, None].expand_as(w))
    torch.testing.assert_close(g.styles(z, psi=0.5), (g.w_avg + w) / 2)


def test_sampling_leaves_the_mean_w_alone():
    model = trained_stylegan()
    w_avg = model.generator.w_avg.clone()
    model.train()
    model.sample(8)
    assert torch.equal(model.generator.w_avg, w_avg)


def test_style_mixing_happens_at_rate_p_in_training_only():
    torch.manual_seed(0)
    g = StyleGAN(StyleGANConfig.tiny(image_size=8)).generator
    ws = g.styles(torch.randn(20000, 8))
    mixed = (ws[:, 0] != ws[:, -1]).any(1)
    # Binomial(20000, 0.9): std 0.0021, so +-0.01 is over four standard deviations.
    assert abs(mixed.float().mean().item() - 0.9) < 0.01
    # A mixed image switches once, from w1 to w2, at a crossover anywhere in 1..L-1.
    takes_w2 = (ws[mixed] == ws[mixed][:, -1:]).all(2)
    assert (takes_w2.diff(dim=1) >= 0).all()
    assert set((g.num_layers - takes_w2.sum(1)).tolist()) == set(range(1, g.num_layers))
    g.eval()
    ws = g.styles(torch.randn(100, 8))
    assert (ws == ws[:, :1]).all()


def test_mapping_network_learns_at_a_hundredth_of_the_rate():
    model = StyleGAN(StyleGANConfig.tiny(image_size=8, lr=2e-4))
    groups = model.configure_optimizers()["generator"].param_groups
    mapping_ids = {id(p) for p in model.generator.mapping.parameters()}
    (mapping,) = [g for g in groups if {id(p) for p in g["params"]} == mapping_ids]
    (synthesis,) = [g for g in groups if g is not mapping]
    assert synthesis["lr"] == 2e-4
    assert mapping["lr"] == pytest.approx(2e-6)
    assert not mapping_ids & {id(p) for p in synthesis["params"]}


@pytest.mark.parametrize("family", [StyleGAN, EBM])
def test_image_size_32_starts_from_the_papers_4x4_map(family):
    cfg = (StyleGANConfig if family is StyleGAN else EBMConfig).tiny(image_size=32, channels=3)
    model = family(cfg)
    if family is StyleGAN:
        assert model.generator.const.shape[-2:] == (4, 4)
        assert model.generator.num_layers == 7  # 4 -> 8 -> 16 -> 32
    else:
        assert model.energy[:-3](torch.rand(2, 3, 32, 32)).shape[-2:] == (4, 4)  # the map the read-out sees
    assert model.sample(2).shape == (2, 3, 32, 32)


def test_stylegan_config_rejects_bad_values():
    for bad in ({"mapping_depth": 0}, {"mapping_lr_mult": 0.0}, {"mixing_prob": 1.5},
                {"truncation": -0.1}, {"w_avg_beta": 1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            StyleGANConfig.tiny(**bad)
