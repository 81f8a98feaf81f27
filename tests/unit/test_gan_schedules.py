"""The MLP GAN families' promises beyond the contract suite. WGAN: the n_critic
schedule follows the step counter (also across a checkpoint), clipping keeps
the critic in its box, the gradient penalty measures the right norm, the critic
is unbounded, and the penalty's double backward stays in sync under 2-process
gloo DDP. CGAN: samples follow the labels asked for, training the batch's."""

from __future__ import annotations

import gc
import io
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gen_models.base import StepContext
from gen_models.gan.cgan import CGAN
from gen_models.gan.config import CGANConfig, GANConfig, WGANConfig, WGANGPConfig
from gen_models.gan.wgan import WGAN, gradient_penalty
from pipelines.cluster import free_port

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny nets: threads only contend

CONFIGS = {"clip": WGANConfig, "gp": WGANGPConfig}


class RecordingContext(StepContext):
    """Records (step, optimizer name) for every optimizer step the model asks for."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.stepped: list[tuple[int, str]] = []

    def step_optimizer(self, name: str) -> None:
        self.stepped.append((self.step, name))
        super().step_optimizer(name)


def batch(step: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(10, (n,), generator=g)


def run(model: WGAN, ctx: StepContext, steps: range) -> list[dict]:
    """Drives the model as the trainer does: ctx.step = step, a seed per step."""
    out = []
    for step in steps:
        torch.manual_seed(step)
        ctx.step = step
        out.append(model.training_step(batch(step), ctx))
        model.on_step_end(step + 1)
    return out


@pytest.mark.parametrize("cfg_cls, bad", [
    (GANConfig, {"z_dim": 0}), (GANConfig, {"hidden": 0}), (GANConfig, {"depth": 0}), (GANConfig, {"lr": 0.0}),
    (GANConfig, {"betas": (0.5, 1.0)}), (CGANConfig, {"embed_dim": 0}), (WGANConfig, {"variant": "spectral"}),
    (WGANConfig, {"n_critic": 0}), (WGANConfig, {"clip_value": 0.0}), (WGANGPConfig, {"gp_weight": -1.0}),
])
def test_config_rejects_bad_values(cfg_cls, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        cfg_cls.tiny(**bad)


@pytest.mark.parametrize("variant", CONFIGS)
@pytest.mark.parametrize("n_critic", [1, 3, 5])
def test_generator_steps_on_steps_n_critic_minus_one_modulo_n_critic(variant, n_critic):
    model = WGAN(CONFIGS[variant].tiny(image_size=8, n_critic=n_critic))
    ctx = RecordingContext(optimizers=model.configure_optimizers())
    moved = []
    for step in range(12):
        before = [p.detach().clone() for p in model.generator.parameters()]
        metrics = run(model, ctx, range(step, step + 1))[0]
        moved.append(any(not torch.equal(b, p) for b, p in zip(before, model.generator.parameters())))
        # The same metrics every step: the trainer averages them over its log window.
        assert set(metrics) == ({"loss_critic", "wasserstein", "gp"} if variant == "gp"
                                else {"loss_critic", "wasserstein"})

    expected = [s for s in range(12) if s % n_critic == n_critic - 1]  # n_critic - 1, 2 n_critic - 1, ...
    assert [s for s, name in ctx.stepped if name == "generator"] == expected
    assert [s for s, name in ctx.stepped if name == "critic"] == list(range(12))  # one critic update per step
    assert [s for s in range(12) if moved[s]] == expected  # and G's weights move on exactly those steps


@pytest.mark.parametrize("variant", CONFIGS)
def test_schedule_and_weights_survive_a_checkpoint_mid_cycle(variant):
    cfg = CONFIGS[variant].tiny(image_size=8, n_critic=5)
    straight = WGAN(cfg)
    resumed = WGAN(cfg)
    resumed.load_state_dict(straight.state_dict())
    ctx = RecordingContext(optimizers=straight.configure_optimizers())
    run(straight, ctx, range(15))

    first = RecordingContext(optimizers=resumed.configure_optimizers())
    run(resumed, first, range(7))  # 7: two critic steps into the second cycle
    buffer = io.BytesIO()
    torch.save({"model": resumed.plain_state_dict(),
                "optimizers": {k: o.state_dict() for k, o in first.optimizers.items()}}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = WGAN(cfg)
    fresh.load_state_dict(state["model"])
    second = RecordingContext(optimizers=fresh.configure_optimizers())
    for name, opt in second.optimizers.items():
        opt.load_state_dict(state["optimizers"][name])
    run(fresh, second, range(7, 15))

    generator_steps = [s for s, name in first.stepped + second.stepped if name == "generator"]
    assert generator_steps == [4, 9, 14] == [s for s, name in ctx.stepped if name == "generator"]
    for (name, a), b in zip(straight.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_clipping_keeps_every_critic_weight_in_the_box_after_every_step():
    model = WGAN(WGANConfig.tiny(image_size=8, n_critic=2))
    c = model.config.clip_value
    assert max(p.abs().max() for p in model.critic.parameters()) > c  # PyTorch's init starts outside
    ctx = StepContext(optimizers=model.configure_optimizers())
    for step in range(6):
        run(model, ctx, range(step, step + 1))
        # Clamped after the optimizer step: clamping before it would leave
        # weights up to one RMSprop step (~10 lr) outside the box.
        assert all(p.abs().max() <= c for p in model.critic.parameters())
    assert all((p.abs() == c).any() for p in model.critic.parameters())  # the clamp did bite


def test_gradient_penalty_vanishes_exactly_for_a_unit_gradient_critic():
    real, fake = torch.rand(16, 1, 8, 8), torch.rand(16, 1, 8, 8)
    linear = nn.Linear(64, 1)
    critic = nn.Sequential(nn.Flatten(), linear, nn.Flatten(0))
    with torch.no_grad():
        linear.weight /= linear.weight.norm()
    # ||grad_x D|| = ||w|| = 1 for every image: a penalty taken over the whole
    # batch's gradient (norm sqrt(16)) or over channels only would not be ~0.
    assert float(gradient_penalty(critic, real, fake).detach()) < 1e-10

    with torch.no_grad():
        linear.weight *= 3
    penalty = gradient_penalty(critic, real, fake)
    assert float(penalty.detach()) == pytest.approx(4.0, rel=1e-5)  # (3 - 1)^2
    penalty.backward()  # the penalty reaches D's weights: autograd.grad kept its graph
    assert linear.weight.grad is not None and linear.weight.grad.norm() > 0

    model = WGAN(WGANGPConfig.tiny(image_size=8))
    assert float(gradient_penalty(model.critic, real * 2 - 1, fake * 2 - 1).detach()) > 0


@pytest.mark.parametrize("variant", CONFIGS)
def test_critic_has_no_sigmoid(variant):
    model = WGAN(CONFIGS[variant].tiny(image_size=8))
    assert not any(isinstance(m, nn.Sigmoid) for m in model.critic.modules())
    with torch.no_grad():
        model.critic[-2].weight.mul_(1e4)
        scores = model.critic(torch.rand(64, 1, 8, 8) * 2 - 1)
    assert scores.max() > 1 and scores.min() < 0  # a score, not a probability


# --- CGAN -----------------------------------------------------------------------

def test_cgan_samples_the_given_labels_and_rejects_bad_ones():
    model = CGAN(CGANConfig.tiny(image_size=8))
    threes = model.sample(4, labels=torch.full((4,), 3), generator=torch.Generator().manual_seed(0))
    fives = model.sample(4, labels=torch.full((4,), 5), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(threes, fives)  # same z, other label, other images
    for bad in (torch.full((3,), 3), torch.full((4,), 10), torch.full((4,), -1), torch.full((4,), 3.0)):
        with pytest.raises(ValueError, match="labels"):
            model.sample(4, labels=bad)


class LabelRecorder(nn.Module):
    """A stand-in for DDP that records the labels each call passes."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.labels: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.labels.append(y)
        return self.module(x, y)


def test_cgan_trains_both_networks_on_the_batch_labels():
    model = CGAN(CGANConfig.tiny(image_size=8))
    ctx = StepContext(optimizers=model.configure_optimizers())
    model.wrap_ddp(LabelRecorder)
    x, y = batch(0)
    model.training_step((x, y), ctx)
    assert len(model.generator.labels) == 1  # G(z, y)
    assert len(model.discriminator.labels) == 3  # D(x, y), D(G(z, y), y) for D's loss and again for G's
    assert all(torch.equal(labels, y) for labels in model.generator.labels + model.discriminator.labels)


# --- DDP ------------------------------------------------------------------------

def _ddp_train(rank: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(initial parameters, every rank's parameters after four steps) of a DDP-wrapped WGAN-GP."""
    torch.manual_seed(0)  # identical initial weights, as in the trainer
    model = WGAN(WGANGPConfig.tiny(image_size=8, n_critic=2))
    ctx = StepContext(optimizers=model.configure_optimizers())
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    model.wrap_ddp(lambda m: torch.nn.parallel.DistributedDataParallel(m, forward_sync_buffers=False))
    for step in range(4):  # two critic-only steps, two with the generator
        torch.manual_seed(100 * rank + step)  # each rank its own noise, interpolates and images
        ctx.step = step
        model.training_step((torch.rand(8, 1, 8, 8), torch.randint(10, (8,))), ctx)
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(params) for _ in range(2)]
    dist.all_gather(gathered, params)
    return start, gathered


def _ddp_worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        # The DDP model (its reducer holds the process group) is gone before the group is destroyed, as in
        # Ray Train's workers and test_ddp_equivalence's. With the model still alive there, rank 0 once died
        # of an uncaught C++ exception ("terminate called without an active exception") in a loaded suite
        # run; not reproduced in 25 runs beside three busy loops, so this is the likeliest cause, not a proven one.
        start, gathered = _ddp_train(rank)
        gc.collect()  # the model's reference cycles too
    finally:
        dist.destroy_process_group()
    assert not torch.equal(gathered[rank], start)
    assert torch.equal(gathered[0], gathered[1]), float((gathered[0] - gathered[1]).abs().max())


@pytest.mark.timeout(120)  # a hang guard: spawn imports torch twice, slow on a loaded machine
def test_wgan_gp_ranks_stay_identical_under_gloo_ddp():
    """The penalty goes through the DDP-wrapped critic (autograd.grad with
    create_graph, then one backward): DDP's hooks must all-reduce its gradient
    with the rest, or the ranks, fed different images, drift apart."""
    mp.spawn(_ddp_worker, args=(free_port(),), nprocs=2)
