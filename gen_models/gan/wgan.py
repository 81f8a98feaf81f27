"""Wasserstein GAN: weight clipping (Arjovsky et al. 2017) or gradient penalty
(Gulrajani et al. 2017), chosen by `variant`. MLP generator and critic.

    critic: max  E_x D(x) - E_z D(G(z))              over 1-Lipschitz D: W1(data, G) by duality
    G:      max  E_z D(G(z))

D is a critic, not a classifier: its output is an unbounded score, never a
sigmoid. The duality needs D 1-Lipschitz, which each variant enforces its way:

    clip: every critic weight clamped to [-c, c] after every critic step: in
          that compact box D is K-Lipschitz for some K, which only scales W1.
          RMSprop, since momentum made the clipped critic unstable in the paper.
    gp:   + lambda * E[(||grad_x D(x^)||_2 - 1)^2] at x^ on random lines between
          real and fake images, where the optimal critic has unit gradient norm.
          Adam with beta1 = 0. No BatchNorm in the critic: it makes D(x^_i)
          depend on the rest of the batch, so the per-image gradient the penalty
          constrains would not be D's. LayerNorm works per image and stands in.

Schedule: each trainer step is one critic update; G also updates on steps with
(step + 1) % n_critic == 0, i.e. steps n_critic - 1, 2 n_critic - 1, ... The
schedule is read from the step counter, never from an attribute, so it survives
a checkpoint and every DDP rank agrees on it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gen_models.base import Batch, Metrics, StepContext, from_unit, noise
from gen_models.gan.adversarial import AdversarialModel
from gen_models.gan.config import WGANConfig
from gen_models.nn.mlp import mlp_features, mlp_generator


def gradient_penalty(critic: nn.Module, real: Tensor, fake: Tensor) -> Tensor:
    """E[(||grad_x D(x^)||_2 - 1)^2] at x^ = eps x + (1 - eps) x~, eps ~ U[0, 1] per image."""
    eps = torch.rand(real.shape[0], *[1] * (real.dim() - 1), device=real.device, dtype=real.dtype)
    mixed = (eps * real + (1 - eps) * fake).requires_grad_(True)
    # Summing over the batch before differentiating is exact: D(x^_j) does not
    # depend on x^_i for j != i (no BatchNorm). create_graph, because the
    # penalty depends on D's weights through this gradient: the critic's
    # backward differentiates it again (a double backward).
    (grad,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    # One norm per image, over all its pixels and channels.
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


class WGAN(AdversarialModel):
    """Unconditional: `sample` ignores labels."""

    def __init__(self, config: WGANConfig):
        super().__init__()
        self.config = config
        c, s, h, depth = config.channels, config.image_size, config.hidden, config.depth
        self.generator = mlp_generator(config.z_dim, h, depth, c, s)
        # LayerNorm under the penalty (see above). Under clipping, a norm's gain
        # (1 at init) would be clamped to c like any weight; the paper's MLP critic has none.
        norm = nn.LayerNorm if config.variant == "gp" else None
        # No output bias: the critic's loss sees D only through E D(x) - E D(G(z))
        # and D's gradient, which a constant shift leaves as they are: a bias
        # would never get a gradient from it.
        self.critic = nn.Sequential(mlp_features(c, s, h, depth, norm=norm), nn.Linear(h, 1, bias=False),
                                    nn.Flatten(0))
        self.apply_recipe()

    discriminator_name = "critic"

    def ddp_modules(self) -> dict[str, nn.Module]:
        # "critic", not "discriminator": the name training_step's optimizer calls
        # and existing checkpoints' keys use.
        return {"generator": self.generator, "critic": self.critic}

    def compile_modules(self) -> dict[str, nn.Module]:
        # The penalty differentiates the critic twice.
        return {"generator": self.generator} if self.config.variant == "gp" else self.ddp_modules()

    def build_optimizer(self, module: nn.Module, *, lr: float | None = None) -> torch.optim.Optimizer:
        if self.config.variant == "clip":
            return torch.optim.RMSprop(module.parameters(), lr=self.config.lr if lr is None else lr)
        return super().build_optimizer(module, lr=lr)

    def training_step(self, batch: Batch, ctx: StepContext) -> Metrics:
        cfg = self.config
        real = from_unit(batch[0])
        generator_step = (ctx.step + 1) % cfg.n_critic == 0
        # G's graph is only needed when G updates; critic-only steps skip it.
        with torch.set_grad_enabled(generator_step):
            fake = self.generator(noise((real.shape[0], cfg.z_dim), device=real.device))

        # Critic: descend E D(G(z)) - E D(x) (+ penalty). G(z) is detached so this loss stops at D.
        ctx.zero_grad("critic")
        wasserstein = self.critic(real).mean() - self.critic(fake.detach()).mean()
        loss_critic = -wasserstein
        metrics = {}
        if cfg.variant == "gp":
            # Through the critic as the trainer wrapped it: the penalty's gradient
            # reaches D's weights within this one backward, where DDP's hooks
            # all-reduce it with the rest (test_gan_schedules runs this under gloo DDP).
            penalty = gradient_penalty(self.critic, real, fake.detach())
            loss_critic = loss_critic + cfg.gp_weight * penalty
            metrics["gp"] = penalty.detach()
        ctx.backward(loss_critic)
        ctx.step_optimizer("critic")
        if cfg.variant == "clip":
            # After the step, so the weights D is used with are always within [-c, c].
            with torch.no_grad():
                for p in self.critic.parameters():
                    p.clamp_(-cfg.clip_value, cfg.clip_value)

        if generator_step:
            # This pass also leaves gradients on the critic; its next zero_grad discards them.
            ctx.zero_grad("generator")
            loss_g = -self.critic(fake).mean()
            ctx.backward(loss_g)
            ctx.step_optimizer("generator")

        return {"loss_critic": loss_critic.detach(), "wasserstein": wasserstein.detach(), **metrics}
