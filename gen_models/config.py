"""Fields every family's config shares, and the one way configs are declared
and validated. The pipeline fills the data-shaped fields from the prepared
dataset, so a spec names only what it chooses.

Every config is a frozen pydantic dataclass (`config_dataclass`): a spec's
model section, a dict given to `registry.build` and a config built in code all
go through the same validation, with single-field ranges as field constraints
and cross-field rules as `model_validator(mode="after")` methods. Frozen, since
the config a model was built from is stored beside its weights: a field set
later would skip validation and no longer describe the model.
"""

from typing import Annotated, Literal, TypeVar, dataclass_transform

from pydantic import ConfigDict, Field, PositiveInt
from pydantic.dataclasses import dataclass

# Adam's betas and EMA decays: at 1 an average would never move from its first value.
Decay = Annotated[float, Field(ge=0, lt=1)]
UnitInterval = Annotated[float, Field(ge=0, le=1)]
AdamBetas = tuple[Decay, Decay]

C = TypeVar("C", bound=type)


@dataclass_transform(kw_only_default=True, frozen_default=True, field_specifiers=(Field,))
def config_dataclass(cls: C) -> C:
    """A family's config class: keyword-only, frozen, unknown fields refused.

    A subclass that overrides a field's default repeats its constrained type
    (`lr: PositiveFloat = 1e-4`): the constraint lives in the type.
    """
    return dataclass(cls, kw_only=True, frozen=True, config=ConfigDict(extra="forbid"))


@config_dataclass
class ModelConfig:
    image_size: int = Field(28, ge=8, multiple_of=4)
    """Height = width of the images; set from the prepared data."""
    channels: Literal[1, 3] = 1
    """1 for grayscale, 3 for RGB; set from the prepared data."""
    num_classes: PositiveInt = 10
    """Number of labels; set from the prepared data (used by conditional families)."""

    @classmethod
    def tiny(cls, **overrides):
        """The smallest config that still exercises every code path, for tests."""
        return cls(**overrides)
