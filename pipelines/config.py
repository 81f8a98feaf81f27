"""Job specs: pydantic models (unknown keys refused), loaded from YAML, with
`--set a.b=value` overrides. Every field has a safe default, so a spec names
only what it changes; `jobs/*.yaml` are the ready ones."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from gen_models import registry
from pipelines.errors import InvalidInput


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(Section):
    source: Literal["fashion_mnist", "mnist", "digits", "image_folder"] = "fashion_mnist"
    """Dataset to prepare: a built-in set (`digits`, scikit-learn's 8x8, is the small one for tests), or
    `image_folder`, your own images at `uri` (docs/data.md)."""
    root: str | None = None
    """Built-in sets: directory with the raw files (torchvision layout); searched before the Debian package
    and a download."""
    uri: str | None = None
    """image_folder: a local directory, a .zip/.tar/.tar.gz/.tgz archive (local or s3://), or an
    s3://bucket/prefix, of PNG, JPEG and WebP images in nested folders. A local path is made absolute
    where the spec is read."""
    labels: str | None = None
    """image_folder: none (every image class 0), `subfolders` (the first-level folder names are the
    classes), or a labels file (.csv or .json, file -> class): a path inside the source, or an absolute
    path or s3:// URI."""
    image_size: int | None = Field(None, ge=8, multiple_of=4)
    """Height = width of the prepared images: the shorter side is resized to it, then the centre cropped;
    smaller images are bad images, never upscaled. Required by image_folder; the built-in sets default to
    their own (28, or 8 for digits)."""
    channels: Literal[1, 3] | None = None
    """1 (greyscale) or 3 (RGB); default 3 for image_folder and the built-in sets' own (1) otherwise."""
    on_bad_image: Literal["error", "skip"] = "error"
    """image_folder: a file that is not a readable PNG/JPEG/WebP, is smaller than image_size or has no
    label stops prepare (exit 2, naming it), or is skipped and counted (manifest, MLflow)."""
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    """Share of the train split held out for validation (image_folder: of all images, by path hash)."""
    test_fraction: float = Field(0.1, gt=0, lt=0.5)
    """image_folder: share of the images in the test split, chosen by a hash of each file's path (the
    built-in sets have their own test split)."""
    shard_size: int = Field(10_000, ge=100)
    """Images per shard file."""

    @field_validator("uri")
    @classmethod
    def _absolute(cls, uri: str | None) -> str | None:
        # Made absolute where the spec is read (the user's working directory): the prepare job runs elsewhere.
        if uri is None:
            return None
        if uri.startswith("s3://"):
            return uri.rstrip("/")
        if "://" in uri:
            raise ValueError("only local paths and s3://bucket/prefix are supported")
        return os.path.abspath(os.path.expanduser(uri))

    @model_validator(mode="after")
    def _fields_of_the_source(self) -> "DataSpec":
        if self.source == "image_folder":
            if not self.uri:
                raise ValueError("source image_folder needs uri: a folder, a .zip/.tar/.tar.gz archive or an "
                                 "s3:// prefix of images")
            if self.image_size is None:
                raise ValueError("source image_folder needs image_size (e.g. 32 or 64): every image is resized "
                                 "and cropped to it")
            if self.root is not None:
                raise ValueError("root is for the built-in sets; image_folder reads uri")
        else:
            given = [k for k in ("uri", "labels") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"{given[0]} is for source image_folder, not {self.source}")
        return self


class ExtractorSpec(Section):
    kind: Literal["auto", "classifier", "rotation", "inception"] = "auto"
    """Features of FID/KID/IS/precision-recall: a small CNN fitted on the train split once per data hash, to
    its labels (`classifier`) or, needing none, to tell which way up its images were turned (`rotation`); or
    Inception v3. `auto`: classifier where the data has two classes or more, else rotation."""
    epochs: int = Field(2, ge=1)
    """Epochs of the fitted extractor (kinds classifier and rotation)."""
    weights_uri: str | None = None
    """Inception v3 weights (torchvision's state dict, safetensors or torch.save), a local path or s3://; never
    downloaded. Required by kind inception."""

    @model_validator(mode="after")
    def _weights_for_inception(self) -> "ExtractorSpec":
        if self.kind == "inception" and not self.weights_uri:
            raise ValueError("kind inception needs weights_uri (a local path or s3://; weights are never downloaded)")
        return self


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
    collective_timeout_s: int = Field(1800, ge=5)
    """A collective (all-reduce, barrier, Ray Train's report) waiting longer than this fails the run, which
    `max_failures` then retries: a hung or frozen peer becomes a restart, not a stall."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Forward passes in bf16 autocast (weights, optimizer states and backward stay float32)."""
    channels_last: bool = False
    """NHWC memory layout for weights and batches: faster convolutions on tensor-core GPUs."""
    compile: bool = False
    """torch.compile each DDP module (not those a gradient penalty differentiates twice)."""
    on_nan: Literal["stop", "rollback"] = "stop"
    """A non-finite training metric on any rank (checked at every report; all ranks agree through an
    all-reduce): stop with an error, or roll back to the last checkpoint with a lower learning rate."""
    nan_lr_factor: float = Field(0.5, gt=0, lt=1)
    """Learning rates are multiplied by this at each rollback."""
    max_rollbacks: int = Field(3, ge=1)
    """Rollbacks before the run stops with an error."""

    @model_validator(mode="after")
    def _divisible(self) -> "TrainSpec":
        if self.batch_size % self.num_workers:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by num_workers {self.num_workers}")
        return self


class EvaluateSpec(Section):
    num_samples: int = Field(10_000, ge=10)
    """Samples drawn for FID/KID/IS (10,000 for a final evaluation; smoke specs set fewer). FID depends on
    it, so versions are compared only at equal n."""
    batch_size: int = Field(500, ge=1)
    """Sampling batch size."""
    grid_size: int = Field(64, ge=1)
    """Images in the logged sample grid."""


def parse_gate(bound: str) -> tuple[str, float]:
    """'<= 40' -> ('<=', 40.0): the form of a `registry.gates` bound."""
    m = re.fullmatch(r"\s*(<=|>=|<|>)\s*(\S+)\s*", str(bound))
    try:
        return m.group(1), float(m.group(2))
    except (AttributeError, ValueError):
        raise ValueError(f"bound {bound!r} is not '<= N', '< N', '>= N' or '> N'") from None


class RegisterSpec(Section):
    model_name: str | None = None
    """Registered model name; defaults to the pipeline name."""
    gates: dict[str, str] = {}
    """Metric -> bound, e.g. {fid: "<= 40", bits_per_dim: "<= 3.6"}; a model that misses one is not registered (exit 3)."""

    @field_validator("gates")
    @classmethod
    def _bounds(cls, gates: dict[str, str]) -> dict[str, str]:
        for metric, bound in gates.items():
            try:
                parse_gate(bound)
            except ValueError as e:
                raise ValueError(f"gate {metric}: {e}") from None
        return gates


class Dimension(Section):
    """How `tune.space` searches one spec field: exactly one of these keys."""

    choice: list[Any] | None = None
    """Values drawn uniformly at random."""
    grid: list[Any] | None = None
    """Every value, crossed with the other grid fields (num_samples times over)."""
    uniform: tuple[float, float] | None = None
    """[low, high], drawn uniformly."""
    loguniform: tuple[float, float] | None = None
    """[low, high] with low > 0, drawn uniformly in log space: learning rates, beta."""
    randint: tuple[int, int] | None = None
    """Integers in [low, high)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> "Dimension":
        given = [k for k, v in self if v is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(type(self).model_fields)}; got {', '.join(given) or 'none'}")
        values = getattr(self, self.kind)
        if self.kind in ("choice", "grid") and not values:
            raise ValueError(f"{self.kind} needs at least one value")
        if self.kind in ("uniform", "loguniform", "randint") and not values[0] < values[1]:
            raise ValueError(f"{self.kind} [low, high] needs low < high, got {list(values)}")
        if self.kind == "loguniform" and values[0] <= 0:
            raise ValueError(f"loguniform needs low > 0, got {values[0]}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k, v in self if v is not None)

    def extremes(self) -> list[Any]:
        """Values the spec must accept for the search to be valid: every listed one, or the bounds."""
        values = getattr(self, self.kind)
        return [values[0], values[1] - 1] if self.kind == "randint" else list(values)


# Trials must fit side by side (resources), share the horizon schedulers measure against (steps), and
# report at the cadence the search sets (eval_every): none of these can differ between trials.
FIXED_IN_SEARCH = {"train.num_workers", "train.use_gpu", "train.cpus_per_worker", "train.steps",
                   "train.log_every", "train.checkpoint_every", "train.num_to_keep"}


class TuneSpec(Section):
    space: dict[str, Dimension] = {}
    """Spec field (dotted, e.g. model.lr) -> how to search it; empty: no search, the pipeline trains once."""
    metric: Literal["fid", "bits_per_dim"] | None = None
    """Validation metric trials are ranked by (lower is better); default the family's primary metric."""
    scheduler: Literal["asha", "pbt", "fifo"] = "asha"
    """asha stops poor trials early; pbt restarts poor trials from good ones' checkpoints with perturbed
    values; fifo runs every trial to the end."""
    search: Literal["random", "optuna"] = "random"
    """How values are drawn: independently at random (grid fields crossed), or by Optuna's TPE."""
    num_samples: int = Field(4, ge=1)
    """Trials to run; with grid fields, how many times the grid is repeated."""
    max_concurrent_trials: int | None = Field(None, ge=1)
    """Trials at once; default as many as the cluster's CPUs (GPUs with use_gpu) fit side by side."""
    time_budget_s: float | None = Field(None, gt=0)
    """Stop starting and running trials after this many seconds; the best so far wins."""
    eval_every: int = Field(100, ge=1)
    """Steps between a trial's validation reports, each with a checkpoint: ASHA rungs and PBT
    perturbations fall on them."""
    eval_samples: int = Field(500, ge=10)
    """Images behind a validation metric: samples for FID, validation images for bits/dim."""
    grace_period: int | None = Field(None, ge=1)
    """ASHA: steps every trial runs before it can be stopped; default eval_every."""
    reduction_factor: float = Field(2, gt=1)
    """ASHA: the share 1/reduction_factor of trials at a rung that go on."""
    perturbation_interval: int | None = Field(None, ge=1)
    """PBT: steps between exploit/explore decisions; default eval_every."""
    synch: bool = False
    """PBT: trials wait for each other at every perturbation, so each decision sees the whole population."""

    @model_validator(mode="after")
    def _compatible(self) -> "TuneSpec":
        if self.search == "optuna" and any(d.kind == "grid" for d in self.space.values()):
            raise ValueError("search optuna draws every value itself: use choice instead of grid")
        if self.search == "optuna" and self.scheduler == "pbt":
            raise ValueError("scheduler pbt perturbs values itself: use it with search random")
        return self


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
    tune: TuneSpec = TuneSpec()

    @model_validator(mode="after")
    def _extractor_fits_the_data(self) -> "PipelineSpec":
        # Caught here, at submission; data.labels that turn out to name one class are prepare's to refuse.
        if self.data.source == "image_folder" and self.data.labels is None and self.extractor.kind == "classifier":
            raise ValueError("extractor.kind classifier is fitted on labels and data.labels is none: set data.labels "
                             "(subfolders or a labels file), or use extractor.kind rotation (or auto), which needs "
                             "none")
        return self

    def extractor_kind(self, num_classes: int) -> str:
        """extractor.kind for the prepared data, which has `num_classes` classes, with `auto` resolved. Labels
        that name one class show only once the data is read: prepare asks this, not the validator above."""
        one_class = num_classes < 2
        if self.extractor.kind == "auto":
            return "rotation" if one_class else "classifier"
        if self.extractor.kind == "classifier" and one_class:
            raise InvalidInput(f"extractor.kind classifier is fitted on labels, and those of {self.data.uri} name one "
                               "class: label at least two, or use extractor.kind rotation (or auto), which needs none")
        return self.extractor.kind

    @model_validator(mode="after")
    def _searchable(self) -> "PipelineSpec":
        # Every value a search may draw must make a valid spec: fail at submission, not in trial 7.
        for key, dim in self.tune.space.items():
            if key.split(".")[0] not in ("model", "train", "seed") or key in FIXED_IN_SEARCH:
                raise ValueError(f"tune.space: {key!r} cannot be searched; model.*, seed and train.* except "
                                 f"{', '.join(sorted(FIXED_IN_SEARCH))} can")
            for value in dim.extremes():
                try:
                    self.with_overrides({key: value})
                except ValidationError as e:
                    raise ValueError(f"tune.space.{key}: {value!r} is not valid: {_describe(e.errors()[0], {})}") from None
        return self

    def with_overrides(self, values: dict[str, Any]) -> "PipelineSpec":
        """This spec with dotted fields set and no search: the spec of one trial's training run."""
        tree = {k: v for k, v in self.to_dict().items() if k != "tune"}
        for key, value in values.items():
            _put(tree, key, value)
        return PipelineSpec.model_validate(tree)

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
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    _put(tree, key, value)


def _put(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise InvalidInput(f"{key}: {p} is not a section")
    node[leaf] = value


def _describe(err: dict[str, Any], tree: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        section: Any = PipelineSpec
        for p in err["loc"][:-1]:
            # A mapping's key (a tune.space field) names no section: step into the mapping's values.
            section = (typing.get_args(section)[1] if typing.get_origin(section) is dict
                       else section.model_fields[str(p)].annotation)
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
