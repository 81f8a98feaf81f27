"""The configs of the adversarial families: the latent generator and Adam
optimizers they share (`AdversarialConfig`, with the training recipe of
gen_models/gan/adversarial.py), then each family's networks."""

from __future__ import annotations

from typing import Literal

from pydantic import PositiveFloat, PositiveInt, model_validator

from gen_models.config import AdamBetas, AugmentPolicy, Decay, ModelConfig, UnitInterval, config_dataclass

Loss = Literal["nonsaturating", "hinge"]


@config_dataclass
class AdversarialConfig(ModelConfig):
    z_dim: PositiveInt = 64
    """Size of the latent vector z ~ N(0, I)."""
    lr: PositiveFloat = 2e-4
    """Adam learning rate of both networks (DCGAN paper)."""
    betas: AdamBetas = (0.5, 0.999)
    """Adam betas of both networks; beta1 = 0.5 instead of 0.9 damps oscillation (DCGAN paper).
    SNGAN, BigGAN and StyleGAN take beta1 = 0: momentum lags behind an opponent that keeps moving."""
    d_lr: PositiveFloat | None = None
    """Adam learning rate of the discriminator (critic); None: lr. A D faster than G (TTUR,
    Heusel et al. 2017: e.g. 4e-4 against 1e-4) tracks G closely, as the convergence proof wants."""
    loss: Loss = "nonsaturating"
    """The adversarial loss of the dcgan, gan, cgan and stylegan update: "nonsaturating"
    (D: -log D(x) - log(1 - D(G(z))), G: -log D(G(z))) or "hinge" (D: relu(1 - l(x)) +
    relu(1 + l(G(z))), G: -l(G(z)); SNGAN, BigGAN), which stops pushing D on examples it
    already scores beyond the margin. The Wasserstein families have their own."""
    spectral_norm: bool = False
    """Divide each conv and linear weight of D by its largest singular value (one power
    iteration per forward, Miyato et al. 2018): D is then 1-Lipschitz per layer, which keeps
    its gradients to G informative. D's BatchNorm layers are dropped with it, as in SNGAN:
    their rescaling would undo the bound."""
    augment: tuple[AugmentPolicy, ...] = ()
    """DiffAugment transforms ("color", "translation", "cutout"; Zhao et al. 2020) applied to
    real and fake images alike before D, in both updates: D cannot memorise the data as fast.
    Empty: none. Not with the Wasserstein families."""
    ema_decay: Decay | None = None
    """Sample and evaluate with an EMA of G's weights at this decay (after a warm-up, see
    gen_models.nn.ema), with the live G's BatchNorm statistics. None: the live G.
    StyleGAN and BigGAN evaluate the EMA: the last iterate of a GAN oscillates around the
    solution, its average sits closer to it."""

    @classmethod
    def tiny(cls, **overrides) -> AdversarialConfig:
        return super().tiny(**{"z_dim": 8, **overrides})



@config_dataclass
class GANConfig(AdversarialConfig):
    hidden: PositiveInt = 256
    """Width of every hidden layer of G and D."""
    depth: PositiveInt = 2
    """Hidden layers in G and in D."""

    @classmethod
    def tiny(cls, **overrides) -> GANConfig:
        return super().tiny(**{"hidden": 16, "depth": 1, **overrides})



@config_dataclass
class CGANConfig(GANConfig):
    embed_dim: PositiveInt = 16
    """Size of G's label embedding, concatenated to z. (D's embedding is `hidden`
    wide: it is dotted with D's features.)"""

    @classmethod
    def tiny(cls, **overrides) -> CGANConfig:
        return super().tiny(**{"embed_dim": 4, **overrides})



@config_dataclass
class DCGANConfig(AdversarialConfig):
    z_dim: PositiveInt = 100
    """Size of the latent vector z ~ N(0, I) (DCGAN paper)."""
    g_channels: PositiveInt = 64
    """Channels of G's last hidden layer; each layer before it has twice as many as the next."""
    d_channels: PositiveInt = 64
    """Channels of D's first layer; each layer after it has twice as many as the one before."""

    @classmethod
    def tiny(cls, **overrides) -> DCGANConfig:
        return super().tiny(**{"g_channels": 8, "d_channels": 8, **overrides})



@config_dataclass
class StyleGANConfig(AdversarialConfig):
    z_dim: PositiveInt = 128
    """Size of z ~ N(0, I) and of w (the paper: 512 for both)."""
    mapping_depth: PositiveInt = 8
    """Linear layers of the mapping network (paper: 8)."""
    mapping_lr_mult: PositiveFloat = 0.01
    """The mapping network learns at lr times this (paper: 0.01)."""
    g_channels: PositiveInt = 64
    """Channels of every synthesis layer."""
    d_channels: PositiveInt = 64
    """Channels of D's first layer; each layer after it has twice as many as the one before."""
    lr: PositiveFloat = 1e-3
    """Adam learning rate of both networks (paper: 0.001); on the digits it learns far faster than DCGAN's 2e-4."""
    betas: AdamBetas = (0.0, 0.99)
    """Adam betas of both networks (paper: 0, 0.99)."""
    mixing_prob: UnitInterval = 0.9
    """Probability that a training image mixes two styles at a random crossover layer (paper: 0.9)."""
    truncation: UnitInterval = 0.7
    """psi of `sample`: w -> mean w + psi (w - mean w); 1 is no truncation, 0 the mean image only."""
    w_avg_beta: Decay = 0.995
    """EMA decay of the tracked mean w that truncation pulls towards, per training step."""

    @classmethod
    def tiny(cls, **overrides) -> StyleGANConfig:
        return super().tiny(**{"mapping_depth": 2, "g_channels": 8, "d_channels": 8, **overrides})



@config_dataclass
class WGANConfig(GANConfig):
    variant: Literal["clip", "gp"] = "clip"
    """How the critic is kept (close to) 1-Lipschitz: "clip" weight clipping, "gp" gradient penalty."""
    n_critic: PositiveInt = 5
    """Critic updates per generator update (both papers: 5)."""
    clip_value: PositiveFloat = 0.01
    """Critic weights are clamped to [-clip_value, clip_value] (variant "clip" only)."""
    gp_weight: PositiveFloat = 10.0
    """lambda, the weight of the gradient penalty (variant "gp" only)."""
    lr: PositiveFloat = 5e-5
    """Learning rate of both networks: RMSprop for "clip", Adam for "gp"."""
    betas: AdamBetas = (0.0, 0.9)
    """Adam betas (variant "gp" only; "clip" uses RMSprop, which has none)."""

    @model_validator(mode="after")
    def _recipe_applies(self) -> WGANConfig:
        # The critic's loss is the Wasserstein one; DiffAugment is untested under the penalty here.
        if self.loss != "nonsaturating":
            raise ValueError(f"loss {self.loss!r} does not apply to a Wasserstein critic, whose loss is its own")
        if self.augment:
            raise ValueError("augment is not implemented for the Wasserstein families")
        return self

    @classmethod
    def tiny(cls, **overrides) -> WGANConfig:
        # n_critic 1: a single step then moves both networks, as the contract suite expects.
        return super().tiny(**{"n_critic": 1, **overrides})



@config_dataclass
class WGANGPConfig(WGANConfig):
    variant: Literal["clip", "gp"] = "gp"
    """Gradient penalty by default."""
    lr: PositiveFloat = 1e-4
    """Adam learning rate of both networks (WGAN-GP paper)."""

