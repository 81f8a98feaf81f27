"""Fields every family's config shares. The pipeline fills the data-shaped
ones from the prepared dataset, so a spec names only what it chooses."""

from dataclasses import dataclass


@dataclass(kw_only=True)
class ModelConfig:
    image_size: int = 28
    """Height = width of the images; set from the prepared data."""
    channels: int = 1
    """1 for grayscale, 3 for RGB; set from the prepared data."""
    num_classes: int = 10
    """Number of labels; set from the prepared data (used by conditional families)."""

    def __post_init__(self) -> None:
        if self.image_size < 8 or self.image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4 and >= 8, got {self.image_size}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        self.require_at_least_one("num_classes")

    def require_at_least_one(self, *names: str) -> None:
        """Raise ValueError naming the first of these integer fields that is below 1."""
        for name in names:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def require_adam_betas(self) -> None:
        """Check a `betas` field (two numbers in [0, 1)), back to a tuple after a YAML or JSON round trip."""
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")

    @classmethod
    def tiny(cls, **overrides):
        """The smallest config that still exercises every code path, for tests."""
        return cls(**overrides)
