"""The config of the energy-based model and its Langevin sampler."""

from __future__ import annotations

from pydantic import NonNegativeFloat, PositiveFloat, PositiveInt

from gen_models.config import AdamBetas, ModelConfig, UnitInterval, config_dataclass


@config_dataclass
class EBMConfig(ModelConfig):
    hidden: PositiveInt = 32
    """Channels of the energy net's first layer; each stride-2 layer after it has twice as many as the one before."""
    langevin_steps: PositiveInt = 60
    """Langevin steps K per training step, from the replay buffer (paper: 60)."""
    sample_steps: PositiveInt = 180
    """Langevin steps of `sample`, from uniform noise: 3 K, since it has no buffer to start from."""
    step_size: PositiveFloat = 10.0
    """Step on the (clipped) energy gradient, for images in [0, 1] (paper: 10)."""
    noise_scale: NonNegativeFloat = 0.005
    """Standard deviation of the Gaussian noise added at every Langevin step (paper: 0.005)."""
    grad_clip: PositiveFloat = 0.03
    """Each entry of dE/dx is clipped to +-grad_clip, so one step moves a pixel at most step_size * grad_clip."""
    buffer_size: PositiveInt = 10000
    """Images in the replay buffer of past Langevin chains."""
    reinit_prob: UnitInterval = 0.05
    """Fraction of chains started from fresh uniform noise instead of the buffer (paper: 5 %)."""
    alpha: NonNegativeFloat = 1.0
    """Weight of the energy regulariser alpha (E(x+)^2 + E(x-)^2) (paper: 1)."""
    data_noise: NonNegativeFloat = 0.005
    """Std of Gaussian noise added to the data: the digits have 17 grey levels, a density needs a continuum."""
    lr: PositiveFloat = 1e-4
    """Adam learning rate."""
    betas: AdamBetas = (0.0, 0.999)
    """Adam betas; beta1 = 0: the negatives change every step, so momentum on old gradients lags behind them."""

    @classmethod
    def tiny(cls, **overrides) -> EBMConfig:
        return super().tiny(**{"hidden": 8, "langevin_steps": 3, "sample_steps": 5,
                               "buffer_size": 64, **overrides})

