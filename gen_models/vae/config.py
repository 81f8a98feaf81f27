"""The configs of the VAE families: vae, conv_vae and beta_vae differ only in defaults."""

from __future__ import annotations

from typing import Literal

from pydantic import NonNegativeInt, PositiveFloat, PositiveInt

from gen_models.config import ModelConfig, config_dataclass


@config_dataclass
class VAEConfig(ModelConfig):
    encoder: Literal["mlp", "conv"] = "mlp"
    """Network shape of the encoder; the decoder mirrors it. "conv" adds
    resolution_steps(image_size) stride-2 convolutions before the dense layers
    (gen_models.nn.layers): 28 -> 7 in two, 64 -> 4 in four."""
    hidden: PositiveInt = 400
    """Width of the dense hidden layer of encoder and decoder."""
    conv_channels: PositiveInt = 32
    """Channels of the first convolution (encoder "conv" only); each next one has twice as many."""
    z_dim: PositiveInt = 20
    """Dimensions of the latent z."""
    beta: PositiveFloat = 1.0
    """Weight of the KL term in the training loss: 1 is the plain VAE, > 1 a β-VAE.
    Never applied to `log_prob`, which stays the true bound."""
    kl_warmup_steps: NonNegativeInt = 0
    """Steps over which the KL weight rises linearly from 0 to beta; 0 for none."""
    lr: PositiveFloat = 1e-3
    """Adam learning rate."""

    @classmethod
    def tiny(cls, **overrides) -> VAEConfig:
        return cls(**{"hidden": 32, "conv_channels": 4, "z_dim": 4, **overrides})



@config_dataclass
class ConvVAEConfig(VAEConfig):
    encoder: Literal["mlp", "conv"] = "conv"
    """Convolutional encoder and decoder by default."""



@config_dataclass
class BetaVAEConfig(VAEConfig):
    beta: PositiveFloat = 4.0
    """β > 1 trades reconstruction for a more factorised latent (Higgins et al. 2017)."""
    kl_warmup_steps: NonNegativeInt = 1000
    """Warm-up keeps the heavy KL term from collapsing q(z|x) onto the prior early on."""

