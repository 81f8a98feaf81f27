"""Fields every family's config shares, and the one way configs are declared
and validated. The pipeline fills the data-shaped fields from the prepared
dataset, so a spec names only what it chooses.

Every config is a frozen pydantic dataclass (`config_dataclass`): a spec's
model section, a dict given to `registry.build` and a config built in code all
go through the same validation, with single-field ranges as field constraints
and cross-field rules as `model_validator(mode="after")` methods. Frozen, since
the config a model was built from is stored beside its weights: a field set
later would skip validation and no longer describe the model.

Configs import no torch: they live in each package's `config.py`, apart from
the networks, so that the CLI and the pipeline's driver validate a spec
without torch's import (about 2 s of every command). What a config shares with
its network (`resolution_steps`, `NORM_GROUPS`, `AugmentPolicy`) is defined here.
"""

from typing import Annotated, Literal, TypeVar, dataclass_transform

from pydantic import ConfigDict, Field, PositiveInt
from pydantic.dataclasses import dataclass

# Adam's betas and EMA decays: at 1 an average would never move from its first value.
Decay = Annotated[float, Field(ge=0, lt=1)]
UnitInterval = Annotated[float, Field(ge=0, le=1)]
AdamBetas = tuple[Decay, Decay]
# The DiffAugment transforms of gen_models.nn.diffaugment, by name.
AugmentPolicy = Literal["color", "translation", "cutout"]
# GroupNorm groups everywhere in gen_models.nn.unet: widths must be multiples of this (checked by the configs).
NORM_GROUPS = 8

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


def resolution_steps(image_size: int) -> int:
    """Stride-2 steps from image_size down to the map a generator starts from
    and a discriminator ends at: at least 2, then one more while the map stays
    even and the next one is at least 4x4, the DCGAN paper's start.

        8 -> 2x2, 28 -> 7x7 (2 steps; the nets these sizes were tuned with)
        32 -> 4x4 (3 steps), 64 -> 4x4 (4), 128 -> 4x4 (5), 48 -> 6x6 (3)

    Any multiple of 4 takes the first two steps exactly (ModelConfig asks for one).
    """
    steps, side = 2, image_size // 4
    while side % 2 == 0 and side // 2 >= 4:
        steps, side = steps + 1, side // 2
    return steps
