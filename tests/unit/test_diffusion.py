"""DDPM's parts checked against the closed forms of the papers: schedules,
the forward marginal, the reverse posterior, both samplers, the UNet's use of
t, and the EMA weights. Reference values are computed here in float64 from
the formulas, not from the code under test."""

from __future__ import annotations

import math

import pytest
import torch

from gen_models.base import StepContext, from_unit
from gen_models.diffusion.config import DDPMConfig
from gen_models.diffusion.ddpm import DDPM
from gen_models.diffusion.samplers import ddim_sample, ddim_sigma, ddim_timesteps, ddpm_sample
from gen_models.diffusion.schedules import NoiseSchedule, cosine_betas, linear_betas
from gen_models.nn.unet import UNet

pytestmark = pytest.mark.usefixtures("one_thread")


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def schedule_of(kind: str, timesteps: int) -> NoiseSchedule:
    return NoiseSchedule(linear_betas(timesteps) if kind == "linear" else cosine_betas(timesteps))


def cumprod64(betas: torch.Tensor) -> torch.Tensor:
    """abar_t = prod_{s <= t} (1 - beta_s), multiplied out in Python floats."""
    out, p = [], 1.0
    for b in betas.tolist():
        p *= 1 - b
        out.append(p)
    return torch.tensor(out, dtype=torch.float64)


# --- schedules ---------------------------------------------------------------

@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("timesteps", [50, 1000])
def test_schedules_are_monotone_and_end_in_noise(kind, timesteps):
    betas = linear_betas(timesteps) if kind == "linear" else cosine_betas(timesteps)
    assert betas.dtype == torch.float64 and betas.shape == (timesteps,)
    assert (betas > 0).all() and (betas <= 0.999).all()
    assert (betas.diff() >= 0).all()
    abar = cumprod64(betas)
    assert (abar.diff() < 0).all()
    assert abar[-1] < 1e-4  # x_T is (nearly) pure noise, as sampling from N(0, I) assumes


def test_linear_betas_scale_with_timesteps():
    """Ho et al.'s 1e-4 -> 0.02 is for T = 1000; T = 200 takes steps five times larger."""
    assert linear_betas(1000)[[0, -1]].tolist() == pytest.approx([1e-4, 0.02])
    assert linear_betas(200)[[0, -1]].tolist() == pytest.approx([5e-4, 0.1])
    with pytest.raises(ValueError):
        linear_betas(20)  # 0.02 * 50 = 1: a step that erases the image


@pytest.mark.parametrize("timesteps", [50, 1000])
def test_cosine_alphas_cumprod_is_the_closed_form(timesteps):
    s = 0.008

    def f(t: float) -> float:
        return math.cos((t / timesteps + s) / (1 + s) * math.pi / 2) ** 2

    betas = cosine_betas(timesteps)
    clipped = betas >= 0.999
    assert clipped.tolist() == [False] * (timesteps - 1) + [True]  # abar(T) = 0 exactly: only the last step clips
    closed = torch.tensor([f(t) / f(0) for t in range(1, timesteps + 1)], dtype=torch.float64)
    torch.testing.assert_close(cumprod64(betas)[:-1], closed[:-1], rtol=1e-12, atol=1e-15)
    sched = NoiseSchedule(betas)
    torch.testing.assert_close(sched.alphas_cumprod[:-1], closed[:-1].float(), rtol=1e-5, atol=1e-7)


# --- forward process and posterior -------------------------------------------

@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_q_sample_is_the_marginal_of_the_forward_chain(kind):
    sched = schedule_of(kind, 50)
    betas = sched.betas.double()
    abar = cumprod64(betas).tolist()
    x0, eps = torch.rand(4, 1, 3, 3) * 2 - 1, torch.randn(4, 1, 3, 3)
    t = torch.tensor([0, 7, 30, 49])
    expected = torch.stack([math.sqrt(abar[i]) * x0[k] + math.sqrt(1 - abar[i]) * eps[k] for k, i in enumerate(t)])
    x_t = sched.q_sample(x0, t, eps)
    torch.testing.assert_close(x_t, expected)
    torch.testing.assert_close(sched.predict_x0(x_t, t, eps), x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sched.predict_eps(x_t, t, x0), eps, atol=1e-4, rtol=1e-4)

    # and it is what t + 1 steps of q(x_t | x_{t-1}) = N(sqrt(1 - beta) x_{t-1}, beta) give
    x = torch.full((200_000,), 0.5, dtype=torch.float64)
    g = seeded(0)
    for i in range(30):
        x = (1 - betas[i]).sqrt() * x + betas[i].sqrt() * torch.randn(x.shape, generator=g, dtype=torch.float64)
    assert x.mean().item() == pytest.approx(math.sqrt(abar[29]) * 0.5, abs=0.005)
    assert x.std().item() == pytest.approx(math.sqrt(1 - abar[29]), rel=0.01)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_posterior_is_bayes_on_the_two_gaussians(kind):
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0): a Gaussian prior
    N(sqrt(abar_{t-1}) x_0, 1 - abar_{t-1}) times a Gaussian likelihood of x_t with mean
    sqrt(alpha_t) x_{t-1} and variance beta_t. Precisions add; the mean is the
    precision-weighted average of the two estimates of x_{t-1}."""
    sched = schedule_of(kind, 100)
    betas = sched.betas.double().tolist()
    abar = cumprod64(sched.betas.double()).tolist()
    x0, x_t = torch.rand(3, 1, 2, 2) * 2 - 1, torch.randn(3, 1, 2, 2)
    for i in range(1, 100):
        prior_var, prior_mean = 1 - abar[i - 1], math.sqrt(abar[i - 1]) * x0.double()
        lik_var, lik_mean = betas[i] / (1 - betas[i]), x_t.double() / math.sqrt(1 - betas[i])
        var = 1 / (1 / prior_var + 1 / lik_var)
        mean = var * (prior_mean / prior_var + lik_mean / lik_var)
        got_mean, got_log_var = sched.q_posterior(x0, x_t, torch.full((3,), i))
        torch.testing.assert_close(got_mean.double(), mean, rtol=1e-4, atol=1e-5)
        assert got_log_var.exp().flatten().tolist() == pytest.approx([var] * 3, rel=1e-4)
    # at the first step x_0 is known: the posterior is a point mass at it
    mean0, _ = sched.q_posterior(x0, x_t, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(mean0, x0)
    assert sched.posterior_variance[0] == 0


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_samplers_with_the_exact_denoiser_recover_gaussian_data(kind):
    """For data x_0 ~ N(mu, s^2), E[eps | x_t] is known in closed form. With it,
    the ancestral sampler must return N(mu, s^2) up to its O(1/T) bias (theory
    for this schedule: std 1.0 % (cosine) to 1.9 % (linear) low), and DDIM over all T steps
    too (0.4 %, 0.7 %). s is small enough that clipping x0_hat never bites."""
    mu, s = 0.1, 0.2
    sched = schedule_of(kind, 1000)

    def exact_eps(x, t):
        abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (1 - abar).sqrt() * (x - abar.sqrt() * mu) / (abar * s**2 + 1 - abar)

    shape = (20_000, 1, 1, 1)
    for x in (ddpm_sample(exact_eps, sched, shape, generator=seeded(0)),
              ddim_sample(exact_eps, sched, shape, steps=1000, generator=seeded(1))):
        assert x.mean().item() == pytest.approx(mu, abs=0.006)
        assert x.std().item() == pytest.approx(s, rel=0.03)


# --- samplers -----------------------------------------------------------------

def test_ddim_timesteps_end_at_the_noise_step():
    assert ddim_timesteps(1000, 50)[:2] == [19, 39] and ddim_timesteps(1000, 50)[-1] == 999
    assert ddim_timesteps(10, 10) == list(range(10))
    assert ddim_timesteps(10, 1) == [9]
    for steps in (3, 7, 33, 99):
        taus = ddim_timesteps(100, steps)
        assert len(set(taus)) == steps and taus == sorted(taus) and taus[-1] == 99
    for bad in (0, 11):
        with pytest.raises(ValueError, match="steps"):
            ddim_timesteps(10, bad)


def test_ddim_sigma_at_eta_1_is_the_posterior_std():
    betas = linear_betas(100)
    abar = cumprod64(betas)
    t = torch.arange(1, 100)
    beta_tilde = betas[t] * (1 - abar[t - 1]) / (1 - abar[t])
    torch.testing.assert_close(ddim_sigma(abar[t], abar[t - 1], 1.0) ** 2, beta_tilde, rtol=1e-10, atol=0)
    assert (ddim_sigma(abar[t], abar[t - 1], 0.0) == 0).all()


@pytest.fixture
def tiny_ddpm() -> DDPM:
    return DDPM(DDPMConfig.tiny(image_size=8, channels=1))


def test_ddim_at_eta_0_draws_only_x_T(tiny_ddpm):
    sched, net, shape = tiny_ddpm.schedule, tiny_ddpm.ema, (3, 1, 8, 8)
    g = seeded(4)
    a = ddim_sample(net, sched, shape, steps=10, generator=g)
    after_x_T = seeded(4)
    torch.randn(shape, generator=after_x_T)
    assert torch.equal(g.get_state(), after_x_T.get_state())  # deterministic given x_T
    assert torch.equal(a, ddim_sample(net, sched, shape, steps=10, generator=seeded(4)))
    assert not torch.equal(a, ddim_sample(net, sched, shape, steps=10, eta=0.5, generator=seeded(4)))


def test_ddim_over_all_steps_at_eta_1_is_the_ancestral_sampler(tiny_ddpm):
    """sigma^2 = beta_tilde, and sqrt(abar_{t-1}) x0 + sqrt(1 - abar_{t-1} - sigma^2) eps with the eps
    implied by x0 and x_t is the posterior mean: same draws, same samples."""
    sched, net, shape = tiny_ddpm.schedule, tiny_ddpm.ema, (4, 1, 8, 8)
    ancestral = ddpm_sample(net, sched, shape, generator=seeded(5))
    ddim = ddim_sample(net, sched, shape, steps=sched.num_timesteps, eta=1.0, generator=seeded(5))
    torch.testing.assert_close(ddim, ancestral, atol=1e-4, rtol=1e-4)
    assert ancestral.abs().max() <= 1


# --- UNet ---------------------------------------------------------------------

@pytest.mark.parametrize("image_size, mults", [(8, (1, 2)), (28, (1, 2, 2)), (32, (1, 2, 2, 2))])
@pytest.mark.parametrize("channels", [1, 3])
def test_unet_keeps_the_shape(image_size, mults, channels):
    net = UNet(channels=channels, base_channels=8, channel_mults=mults, num_res_blocks=1)
    x = torch.randn(2, channels, image_size, image_size)
    assert net(x, torch.tensor([0, 999])).shape == x.shape


def test_unet_output_depends_on_t():
    """Regression: the reference code's predictor ignored t, so it could not
    tell a slightly noisy image from a very noisy one."""
    net = UNet(channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1)
    x = torch.randn(1, 1, 8, 8).expand(3, -1, -1, -1)
    out = net(x, torch.tensor([1, 2, 500]))
    assert (out[0] - out[1]).abs().max() > 1e-4
    assert (out[0] - out[2]).abs().max() > 1e-2
    # and the gradient of the loss reaches the time embedding
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.time_embedding.parameters())


# --- the model ------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    {"timesteps": 1}, {"schedule": "quadratic"}, {"beta_start": 0.0}, {"beta_start": 0.03},
    {"beta_end": 0.5}, {"base_channels": 12}, {"channel_mults": ()}, {"channel_mults": (1, 0)},
    {"num_res_blocks": 0}, {"lr": 0.0}, {"ema_decay": 1.0}, {"sampler": "euler"},
    {"sample_steps": 0}, {"sample_steps": 33}, {"eta": -0.1},
])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        DDPMConfig.tiny(**bad)


def test_config_levels_must_fit_the_image_size():
    with pytest.raises(ValueError, match="channel_mults"):
        DDPMConfig(image_size=28, channel_mults=(1, 2, 2, 2))  # 28 -> 14 -> 7 -> 3.5
    assert DDPMConfig(image_size=32, channel_mults=(1, 2, 2, 2)).channel_mults == (1, 2, 2, 2)
    # Unset, the levels follow the image down to 4x4 (7x7 at 28): Ho et al.'s (1, 2, 2, 2) at 32.
    assert [DDPMConfig(image_size=s).unet_channel_mults for s in (8, 28, 32, 64)] == [
        (1, 2, 2), (1, 2, 2), (1, 2, 2, 2), (1, 2, 2, 2, 2)]
    assert DDPMConfig(image_size=64, channel_mults=(1, 2, 2)).unet_channel_mults == (1, 2, 2)
    assert DDPMConfig(channel_mults=[1, 2]).channel_mults == (1, 2)  # as JSON gives it back


def test_loss_is_eps_mse_on_data_in_minus_one_one(tiny_ddpm):
    x = torch.rand(6, 1, 8, 8)
    torch.manual_seed(3)
    loss, _ = tiny_ddpm.loss((x, torch.zeros(6, dtype=torch.long)))
    torch.manual_seed(3)
    t = torch.randint(tiny_ddpm.config.timesteps, (6,))
    eps = torch.randn_like(x)
    x_t = tiny_ddpm.schedule.q_sample(from_unit(x), t, eps)
    torch.testing.assert_close(loss, (tiny_ddpm.unet(x_t, t) - eps).square().mean())


def test_ema_is_outside_the_optimizer_and_ddp(tiny_ddpm):
    assert set(tiny_ddpm.ddp_modules()) == {"unet"}
    assert not any(name.startswith("ema.") for name, _ in tiny_ddpm.named_parameters())
    assert any(name.startswith("ema.") for name in tiny_ddpm.state_dict())
    assert not any(name.startswith("schedule.") for name in tiny_ddpm.state_dict())  # derived from the config
    ema_before = [b.clone() for b in tiny_ddpm.ema.buffers()]
    x = torch.rand(4, 1, 8, 8)
    tiny_ddpm.training_step((x, torch.zeros(4, dtype=torch.long)),
                            StepContext(optimizers=tiny_ddpm.configure_optimizers()))
    assert all(torch.equal(a, b) for a, b in zip(ema_before, tiny_ddpm.ema.buffers()))


@pytest.mark.parametrize("step, decay", [(0, 0.1), (5, 6 / 15), (10_000, 0.9)])
def test_ema_update_is_the_formula(tiny_ddpm, step, decay):
    """ema <- d ema + (1 - d) theta with d = min(ema_decay, (1 + n) / (10 + n)); tiny's ema_decay is 0.9."""
    assert tiny_ddpm.ema_decay_at(step) == pytest.approx(decay)
    with torch.no_grad():
        for p in tiny_ddpm.unet.parameters():
            p.normal_()
    params = {n: p.detach().clone() for n, p in tiny_ddpm.unet.named_parameters()}
    ema = {n: b.clone() for n, b in tiny_ddpm.ema.named_buffers()}
    tiny_ddpm.on_step_end(step)
    for name, value in tiny_ddpm.ema.named_buffers():
        torch.testing.assert_close(value, decay * ema[name] + (1 - decay) * params[name], rtol=1e-6, atol=1e-6)


def test_ema_follows_a_ddp_wrapped_unet_and_survives_a_checkpoint(tiny_ddpm):
    class Wrapper(torch.nn.Module):  # the `.module` level DDP adds
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args):
            return self.module(*args)

    x = torch.rand(4, 1, 8, 8)
    optimizers = tiny_ddpm.configure_optimizers()
    tiny_ddpm.wrap_ddp(Wrapper)
    for step in range(3):
        tiny_ddpm.training_step((x, torch.zeros(4, dtype=torch.long)), StepContext(optimizers=optimizers))
        ema = {n: b.clone() for n, b in tiny_ddpm.ema.named_buffers()}
        tiny_ddpm.on_step_end(step + 1)
        d = tiny_ddpm.ema_decay_at(step + 1)
        for name, p in tiny_ddpm.unet.module.named_parameters():
            torch.testing.assert_close(tiny_ddpm.ema.get_buffer(name), d * ema[name] + (1 - d) * p,
                                       rtol=1e-6, atol=1e-6)

    fresh = DDPM(DDPMConfig.tiny(image_size=8, channels=1))
    fresh.load_state_dict(tiny_ddpm.plain_state_dict())
    for (name, a), b in zip(tiny_ddpm.ema.named_buffers(), fresh.ema.buffers()):
        assert torch.equal(a, b), name
    assert not torch.equal(fresh.ema.get_buffer("stem.weight"), fresh.unet.stem.weight)
    assert torch.equal(tiny_ddpm.sample(2, generator=seeded(0)), fresh.sample(2, generator=seeded(0)))


def test_sample_uses_the_ema_net_and_the_chosen_sampler(tiny_ddpm):
    with torch.no_grad():
        for b in tiny_ddpm.ema.buffers():
            b.add_(0.05)  # EMA and trained weights now differ
    shape = (2, 1, 8, 8)
    ancestral = tiny_ddpm.sample(2, generator=seeded(1))
    torch.testing.assert_close(ancestral, (ddpm_sample(tiny_ddpm.ema, tiny_ddpm.schedule, shape,
                                                       generator=seeded(1)) + 1) / 2)
    assert not torch.allclose(ancestral, (ddpm_sample(tiny_ddpm.unet, tiny_ddpm.schedule, shape,
                                                      generator=seeded(1)) + 1) / 2)
    ddim = tiny_ddpm.sample(2, generator=seeded(1), sampler="ddim", steps=5)
    torch.testing.assert_close(ddim, (ddim_sample(tiny_ddpm.ema, tiny_ddpm.schedule, shape, steps=5,
                                                  generator=seeded(1)) + 1) / 2)
    by_config = DDPM(DDPMConfig.tiny(image_size=8, channels=1, sampler="ddim", sample_steps=5))
    by_config.load_state_dict(tiny_ddpm.state_dict())
    assert torch.equal(by_config.sample(2, generator=seeded(1)), ddim)
    with pytest.raises(ValueError, match="sampler"):
        tiny_ddpm.sample(2, sampler="euler")
    with pytest.raises(ValueError, match="steps"):
        tiny_ddpm.sample(2, sampler="ddpm", steps=5)
