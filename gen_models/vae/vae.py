"""Variational autoencoder (Kingma & Welling 2013); β-VAE (Higgins et al. 2017)
and KL warm-up (Bowman et al. 2016; Sønderby et al. 2016) are config options.

    q(z|x) = N(mu(x), diag exp(logvar(x))),   p(z) = N(0, I),   p(x|z) = Bernoulli(sigmoid(decoder(z)))
    loss   = -log p(x|z) + w * KL(q(z|x) || p(z)),   w = beta * min(1, step / kl_warmup_steps)

Likelihood. Training uses the paper's Bernoulli decoder: -log p(x|z) is binary
cross-entropy with logits summed over pixels, for x in [0, 1]. That is not a
density over grey levels, so `log_prob` reports a bound that is one: the ELBO
of the same networks read as a continuous Bernoulli decoder (Loaiza-Ganem &
Cunningham 2019), whose normaliser C(l) = l / tanh(l / 2) makes
C(l) sigmoid(l)^x sigmoid(-l)^(1-x) a density on [0, 1], evaluated at a
uniformly dequantised y = (255 x + u) / 256 as RealNVP is. Its bits/dim are
then an upper bound on the 8-bit data's, comparable with PixelCNN's and
RealNVP's. The decoder was not trained with the normaliser, so the bound is
loose; it is honest, not flattering.
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gen_models.base import Batch, GenerativeModel, Metrics, noise
from gen_models.config import resolution_steps
from gen_models.nn.layers import downsample, upsample
from gen_models.vae.config import VAEConfig


class VAE(GenerativeModel):
    primary_metric = ("bits_per_dim", "min")
    log_prob_is_bound = True

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        c, s, h, z = config.channels, config.image_size, config.hidden, config.z_dim
        if config.encoder == "conv":
            n = resolution_steps(s)
            # c -> k -> 2k -> ... -> 2^(n-1) k channels, the image halved at each step.
            widths = [c] + [config.conv_channels * 2**i for i in range(n)]
            step_widths = list(pairwise(widths))
            flat_shape = (widths[-1], s // 2**n, s // 2**n)
            convs_down = [m for a, b in step_widths for m in (downsample(a, b), nn.ReLU())]
            convs_up = [m for a, b in reversed(step_widths) for m in (nn.ReLU(), upsample(b, a))]
        else:
            flat_shape, convs_down, convs_up = (c, s, s), [], []
        flat = math.prod(flat_shape)
        # encoder: x -> (mu, logvar); decoder: z -> Bernoulli logits of every pixel
        self.encoder = nn.Sequential(*convs_down, nn.Flatten(),
                                     nn.Linear(flat, h), nn.ReLU(), nn.Linear(h, 2 * z))
        self.decoder = nn.Sequential(nn.Linear(z, h), nn.ReLU(), nn.Linear(h, flat),
                                     nn.Unflatten(1, flat_shape), *convs_up)
        self.register_load_state_dict_pre_hook(_drop_steps_done)

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"vae": torch.optim.Adam(self.parameters(), lr=self.config.lr)}

    def kl_weight(self, step: int) -> float:
        """The KL term's weight after `step` completed training steps."""
        warmup = self.config.kl_warmup_steps
        return self.config.beta * (min(step / warmup, 1.0) if warmup else 1.0)

    def _elbo_terms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """-log p(x|z) at one z ~ q(z|x), and KL(q(z|x) || p(z)) in closed form; each (N,)."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()  # reparameterised: gradients reach mu, logvar
        recon = _bernoulli_nll(self.decoder(z), x)
        kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)
        return recon, kl

    def loss(self, batch: Batch, *, step: int = 0) -> tuple[Tensor, Metrics]:
        recon, kl = self._elbo_terms(batch[0])
        loss = (recon + self.kl_weight(step) * kl).mean()
        return loss, {"recon": recon.mean().detach(), "kl": kl.mean().detach()}

    @torch.no_grad()
    def log_prob(self, x: Tensor, importance_samples: int = 1) -> Tensor:
        """A lower bound on log p(y), y a dequantisation of x, in nats per image, shape (N,),
        under the continuous Bernoulli decoder (see the module docstring); beta and warm-up never enter.

        importance_samples = 1: the ELBO (closed-form KL, one z).
        importance_samples = K > 1: the IWAE bound (Burda et al. 2016),
        log (1/K) sum_k p(y, z_k) / q(z_k|y), which tightens as K grows.
        """
        if importance_samples < 1:
            raise ValueError(f"importance_samples must be >= 1, got {importance_samples}")
        y = ((x * 255).round() + torch.rand_like(x)) / 256
        K, N = importance_samples, x.shape[0]
        mu, logvar = self.encoder(y).chunk(2, dim=1)
        eps = torch.randn((K, *mu.shape), device=mu.device, dtype=mu.dtype)
        z = mu + eps * (0.5 * logvar).exp()  # (K, N, z_dim)
        logits = self.decoder(z.flatten(0, 1))
        log_py_z = -_continuous_bernoulli_nll(logits, y.expand(K, *y.shape).flatten(0, 1)).view(K, N)
        if K == 1:
            return log_py_z[0] - 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)
        # log N(z; 0, I) - log N(z; mu, sigma^2): the log(2 pi) terms cancel
        log_pz_qz = 0.5 * (eps**2 - z**2 + logvar).sum(2)
        return torch.logsumexp(log_py_z + log_pz_qz, dim=0) - math.log(K)

    @torch.no_grad()
    def sample(self, n: int, *, labels: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """Bernoulli means sigmoid(decoder(z)), z ~ p(z): grey levels, not binary draws.
        Unconditional: labels are ignored."""
        z = noise((n, self.config.z_dim), device=next(self.parameters()).device, generator=generator)
        return torch.sigmoid(self.decoder(z))


def _drop_steps_done(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *_) -> None:
    """Drop the `steps_done` buffer of checkpoints written before `loss` took the step: the
    trainer restores the step from the checkpoint itself, and every load of a checkpoint
    (resume, evaluate, the served model) is strict, so the extra key would refuse them."""
    state_dict.pop(prefix + "steps_done", None)


def _bernoulli_nll(logits: Tensor, x: Tensor) -> Tensor:
    """-log Bernoulli(x | sigmoid(logits)) summed over pixels, per image."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def _continuous_bernoulli_nll(logits: Tensor, x: Tensor) -> Tensor:
    """-log CB(x | sigmoid(logits)) summed over pixels, per image: the Bernoulli term
    minus log C(l), C(l) = l / tanh(l / 2), which tends to 2 (+ l^2 / 6) at l = 0."""
    small = logits.abs() < 1e-3
    safe = torch.where(small, torch.ones_like(logits), logits)
    log_c = torch.where(small, math.log(2) + logits**2 / 12, (safe / torch.tanh(safe / 2)).log())
    return _bernoulli_nll(logits, x) - log_c.flatten(1).sum(1)
