"""The registered model: an MLflow pyfunc over safetensors weights + a config.

Logged as "models from code": MLflow stores this file itself, not a pickle,
and `gen_models/` beside it as code, so loading runs no pickled payload.
`predict` takes rows of {n, seed, label} (seed and label optional) and returns
uint8 images (N, C, H, W); `signature` is the schema MLflow checks requests
against, so a malformed request is refused before it reaches the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec
from safetensors.torch import load_file

from gen_models import registry
from gen_models.base import GenerativeModel

MAX_N = 1024  # one request may not ask for more images than this
MAX_SEED = 2**63 - 1  # seeds are int64 in the signature
# The distributions this file and gen_models/ import: what the serving environment installs, pinned by
# the register stage to the versions it runs with.
REQUIREMENTS = ("mlflow", "numpy", "pandas", "pydantic", "safetensors", "torch")
# Logged with the model: MLflow shows it as the request to send, and serves it once at registration
INPUT_EXAMPLE = pd.DataFrame([{"n": 2, "seed": 0}])


def signature(channels: int, image_size: int) -> ModelSignature:
    """Requests: rows of n, seed (default 0) and label (conditional families only); answers: uint8 images."""
    return ModelSignature(
        inputs=Schema([ColSpec("long", "n"), ColSpec("long", "seed", required=False),
                       ColSpec("long", "label", required=False)]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, channels, image_size, image_size))]))


def label_error(model: GenerativeModel, label: int) -> str | None:
    """Why `model` cannot draw images of class `label`; None when it can."""
    if not model.conditional:
        return f"{type(model).__name__} is unconditional and takes no label"
    k = model.config.num_classes
    return None if 0 <= label < k else f"out of range: the model has {k} classes, 0 to {k - 1}"


class GenerativePyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        cfg = json.loads(Path(context.artifacts["config"]).read_text())
        self.model = registry.build(cfg["family"], cfg["config"])
        self.model.load_state_dict(load_file(context.artifacts["weights"]))
        self.model.eval()

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        return np.concatenate([self._one(**row) for row in model_input.to_dict("records")])

    def _one(self, n: int, seed: int = 0, label: int | None = None) -> np.ndarray:
        # MlflowException: the server answers 400 with this message (anything else is a bare "unexpected error")
        if not 1 <= n <= MAX_N:
            raise MlflowException.invalid_parameter_value(f"n must be in [1, {MAX_N}], got {n}")
        if not 0 <= seed <= MAX_SEED:
            raise MlflowException.invalid_parameter_value(f"seed must be in [0, 2^63), got {seed}")
        labels = None
        if label is not None:
            if why := label_error(self.model, label):
                raise MlflowException.invalid_parameter_value(f"label {label}: {why}")
            labels = torch.full((n,), label, dtype=torch.long)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            x = self.model.sample(n, labels=labels, generator=g)
        return (x * 255).round().clamp(0, 255).to(torch.uint8).numpy()


mlflow.models.set_model(GenerativePyfunc())
