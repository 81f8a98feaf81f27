"""The config of the RealNVP coupling flow."""

from __future__ import annotations

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from gen_models.config import ModelConfig, config_dataclass


@config_dataclass
class RealNVPConfig(ModelConfig):
    num_scales: PositiveInt = 2
    """Scales of the stack; each ends with a squeeze that halves the image, so
    image_size must be divisible by 2^num_scales (28 -> 14 -> 7 for 2)."""
    couplings_per_mask: int = Field(3, ge=2)
    """Checkerboard couplings, and then channel-wise couplings, per scale (the
    paper uses 3). At least 2, so that the flipping masks reach every dimension."""
    hidden: PositiveInt = 64
    """Width of the residual network that computes each layer's scale and shift."""
    num_blocks: PositiveInt = 4
    """Residual blocks in that network."""
    alpha: float = Field(0.05, gt=0, lt=0.5)
    """Logit-transform margin: y' = alpha + (1 - 2 alpha) y (0.05 in the paper for CIFAR-10)."""
    lr: PositiveFloat = 1e-3
    """Adam learning rate."""

    @model_validator(mode="after")
    def _squeezes_fit_the_image(self) -> RealNVPConfig:
        if self.image_size % 2**self.num_scales:
            raise ValueError(f"num_scales {self.num_scales} halves image_size {self.image_size} {self.num_scales} "
                             f"times; it must be divisible by {2**self.num_scales}")
        return self

    @classmethod
    def tiny(cls, **overrides) -> RealNVPConfig:
        return cls(**{"num_scales": 1, "couplings_per_mask": 2, "hidden": 8, "num_blocks": 1, **overrides})

