"""The registered model: an MLflow pyfunc over safetensors weights + a config.

Logged as "models from code": MLflow stores this file itself, not a pickle,
and `gen_models/` beside it as code, so loading runs no pickled payload.
`predict` takes rows of {n, seed, label} (label optional) and returns uint8
images (N, C, H, W).
"""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from gen_models import registry

MAX_N = 1024  # one request may not ask for more images than this


class GenerativePyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        cfg = json.loads(open(context.artifacts["config"]).read())
        self.model = registry.build(cfg["family"], cfg["config"])
        self.model.load_state_dict(load_file(context.artifacts["weights"]))
        self.model.eval()

    def predict(self, context, model_input, params=None) -> np.ndarray:
        rows = model_input.to_dict("records") if isinstance(model_input, pd.DataFrame) else [model_input]
        return np.concatenate([self._one(**r) for r in rows])

    def _one(self, n: int = 16, seed: int = 0, label: int | None = None) -> np.ndarray:
        n = int(n)
        if not 1 <= n <= MAX_N:
            raise ValueError(f"n must be in [1, {MAX_N}], got {n}")
        labels = None
        if label is not None and not (isinstance(label, float) and np.isnan(label)) and int(label) >= 0:
            labels = torch.full((n,), int(label), dtype=torch.long)
        g = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            x = self.model.sample(n, labels=labels, generator=g)
        return (x * 255).round().clamp(0, 255).to(torch.uint8).numpy()


mlflow.models.set_model(GenerativePyfunc())
