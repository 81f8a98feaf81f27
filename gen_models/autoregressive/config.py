"""The config of PixelCNN."""

from __future__ import annotations

from pydantic import NonNegativeInt, PositiveFloat, model_validator

from gen_models.config import ModelConfig, config_dataclass


@config_dataclass
class PixelCNNConfig(ModelConfig):
    hidden: int = 64
    """Channels of every hidden layer; at least `channels`, so every colour owns some."""
    num_layers: NonNegativeInt = 8
    """Residual blocks of mask-B convolutions after the 7x7 mask-A layer; each
    widens the receptive field by one pixel in every visible direction."""
    lr: PositiveFloat = 1e-3
    """Adam learning rate."""

    @model_validator(mode="after")
    def _every_colour_owns_a_channel(self) -> PixelCNNConfig:
        if self.hidden < self.channels:
            raise ValueError(f"hidden must be >= channels ({self.channels}), got {self.hidden}")
        return self

    @classmethod
    def tiny(cls, **overrides) -> PixelCNNConfig:
        return cls(**{"hidden": 6, "num_layers": 1, **overrides})

