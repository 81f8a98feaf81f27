"""Job specs: pydantic models (unknown keys refused), loaded from YAML, with
`--set a.b=value` overrides. Every field has a safe default, so a spec names
only what it changes; `jobs/*.yaml` are the ready ones."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from gen_models import registry
from pipelines.errors import InvalidInput


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(Section):
    source: Literal["fashion_mnist", "mnist", "digits"] = "fashion_mnist"
    """Dataset to prepare; `digits` (scikit-learn, 8x8) is the small one for tests."""
    root: str | None = None
    """Directory with the raw files (torchvision layout); searched before the Debian package and a download."""
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    """Share of the train split held out for validation."""
    shard_size: int = Field(10_000, ge=100)
    """Images per shard file."""


class ExtractorSpec(Section):
    epochs: int = Field(2, ge=1)
    """Epochs of the evaluation classifier, trained once per data hash."""


class ModelSpec(BaseModel):
    """`family` plus that family's config fields (see gen_models/registry.py)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    family: str = "dcgan"

    @model_validator(mode="after")
    def _check_family_fields(self) -> "ModelSpec":
        cfg_cls = registry.config_class(self.family) if self.family in registry.FAMILIES else None
        if cfg_cls is None:
            raise ValueError(f"unknown family {self.family!r}; allowed: {', '.join(sorted(registry.FAMILIES))}")
        allowed = {f.name for f in dataclasses.fields(cfg_cls)} - DATA_SHAPED
        unknown = set(self.fields()) - allowed
        if unknown:
            raise ValueError(f"unknown key {sorted(unknown)[0]!r} for family {self.family}; "
                             f"allowed: family, {', '.join(sorted(allowed))}")
        try:
            TypeAdapter(cfg_cls).validate_python(self.fields())
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ValueError(f"{where + ': ' if where else ''}{err['msg'].removeprefix('Value error, ')}") from None
        return self

    def fields(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def build_config(self, *, image_size: int, channels: int, num_classes: int):
        """The family's config dataclass, with the data-shaped fields from the prepared data."""
        cfg_cls = registry.config_class(self.family)
        return TypeAdapter(cfg_cls).validate_python(
            {**self.fields(), "image_size": image_size, "channels": channels, "num_classes": num_classes})


# Set from the prepared data, never by a spec: a spec that disagreed with the data could only fail later.
DATA_SHAPED = {"image_size", "channels", "num_classes"}


class TrainSpec(Section):
    num_workers: int = Field(2, ge=1)
    """DDP workers (Ray Train); each takes `cpus_per_worker` CPUs and a GPU if `use_gpu`."""
    use_gpu: bool = False
    """nccl on GPUs when true, gloo on CPUs otherwise."""
    cpus_per_worker: int = Field(1, ge=1)
    """CPUs reserved per worker; also the worker's torch thread count."""
    batch_size: int = Field(128, ge=2)
    """Global batch size, split evenly across workers."""
    steps: int = Field(2000, ge=1)
    """Optimisation steps; a resumed run ends at exactly this count."""
    checkpoint_every: int = Field(500, ge=1)
    """Steps between checkpoints (always one at the end)."""
    num_to_keep: int = Field(2, ge=1)
    """Checkpoints kept in storage; older ones are deleted."""
    log_every: int = Field(50, ge=1)
    """Steps between metric logs to MLflow and reports to Ray."""
    grad_clip: float | None = Field(None, gt=0)
    """Clip gradients to this global norm (per optimizer)."""
    max_failures: int = Field(0, ge=-1)
    """Worker failures Ray Train recovers from (restarting from the latest checkpoint); -1 for unlimited."""

    @model_validator(mode="after")
    def _divisible(self) -> "TrainSpec":
        if self.batch_size % self.num_workers:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by num_workers {self.num_workers}")
        return self


class EvaluateSpec(Section):
    num_samples: int = Field(5000, ge=10)
    """Samples drawn for FID/KID/IS; FID depends on it, so compare only at equal n."""
    batch_size: int = Field(500, ge=1)
    """Sampling batch size."""
    grid_size: int = Field(64, ge=1)
    """Images in the logged sample grid."""


class RegisterSpec(Section):
    model_name: str | None = None
    """Registered model name; defaults to the pipeline name."""


class PipelineSpec(Section):
    name: str = Field("genpipe", pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    """Pipeline name: the storage prefix, the MLflow experiment and run names."""
    seed: int = 0
    """Seeds the data split, the extractor, initialisation and data order."""
    storage: str | None = None
    """Local directory or s3://bucket/prefix; defaults to $GENPIPE_HOME/storage."""
    data: DataSpec = DataSpec()
    extractor: ExtractorSpec = ExtractorSpec()
    model: ModelSpec = ModelSpec()
    train: TrainSpec = TrainSpec()
    evaluate: EvaluateSpec = EvaluateSpec()
    registry: RegisterSpec = RegisterSpec()

    @property
    def model_name(self) -> str:
        return self.registry.model_name or self.name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def hash(self, *sections: str) -> str:
        """Hash of the named sections (all when none): the cache key of a stage."""
        d = self.to_dict()
        part = {k: d[k] for k in sections} if sections else d
        return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]


def _set(tree: dict[str, Any], dotted: str) -> None:
    key, sep, raw = dotted.partition("=")
    if not sep or not key:
        raise InvalidInput(f"--set {dotted!r}: expected key.sub=value")
    node = tree
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise InvalidInput(f"--set {key}: {p} is not a section")
    try:
        node[leaf] = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        node[leaf] = raw


def _describe(err: dict[str, Any], tree: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        section: type[BaseModel] = PipelineSpec
        for p in err["loc"][:-1]:
            section = section.model_fields[str(p)].annotation
        allowed = ", ".join(section.model_fields)
        return f"unknown key {loc!r}; allowed here: {allowed}"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    return f"{loc}: {msg}{shown}" if loc else msg


def parse(tree: dict[str, Any], *, origin: str = "spec") -> PipelineSpec:
    try:
        return PipelineSpec.model_validate(tree)
    except ValidationError as e:
        raise InvalidInput(f"{origin}: {_describe(e.errors()[0], tree)}") from None


def load(path: str | Path | None, overrides: list[str] = ()) -> PipelineSpec:
    """Spec from a YAML file (or defaults when None) with `key.sub=value` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InvalidInput(f"spec file {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise InvalidInput(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(tree, dict):
            raise InvalidInput(f"{path}: a spec is a mapping of sections, got {type(tree).__name__}")
    for o in overrides:
        _set(tree, o)
    return parse(tree, origin=str(path or "spec"))
