"""The register stage: package the trained model as an MLflow pyfunc,
register a version with its lineage as tags and a model card, and move the
aliases: every version is `challenger`; `champion` moves only to a version
whose primary metric beats the champion's on comparable terms."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pipelines import storage
from pipelines.config import PipelineSpec

GEN_MODELS_DIR = Path(__file__).resolve().parent.parent / "gen_models"
SERVING_FILE = Path(__file__).resolve().parent / "serving.py"


def comparable(a: dict[str, str], b: dict[str, str], metric: str) -> bool:
    """Same data, and for feature metrics the same extractor and reference statistics."""
    if a.get("data_hash") != b.get("data_hash"):
        return False
    if metric == "bits_per_dim":
        return True
    return a.get("extractor_hash") == b.get("extractor_hash") and a.get("reference_hash") == b.get("reference_hash")


def better(new: float, old: float, mode: str) -> bool:
    return new < old if mode == "min" else new > old


def model_card(spec: PipelineSpec, prepared: dict, evaluated: dict, trained: dict) -> str:
    m = evaluated["metrics"]
    rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in m.items())
    return f"""# {spec.model_name}: {spec.model.family}

- **data**: {spec.data.source}, hash `{prepared['data']['data_hash'][:16]}`
- **training**: {spec.train.steps} steps, global batch {spec.train.batch_size}, {spec.train.num_workers} workers \
({'GPU' if spec.train.use_gpu else 'CPU'})
- **evaluation**: {evaluated['eval_num_samples']} samples, extractor `{evaluated['extractor_hash'][:12]}`, \
reference statistics `{evaluated['reference_hash'][:12]}`

| metric | value |
|---|---|
{rows}

## Config

```json
{json.dumps(spec.to_dict()["model"], indent=2)}
```

Sample grid: the `samples.png` artifact of the evaluate run `{evaluated.get('run_id', '')}`.
"""


def run(spec: PipelineSpec, prepared: dict, trained: dict, evaluated: dict, *, run_id: str,
        tracking_uri: str, code_version: str) -> dict:
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    c = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    name = spec.model_name
    ckpt = trained["checkpoint"]
    with tempfile.TemporaryDirectory() as tmp:
        weights, config = Path(tmp, "weights.safetensors"), Path(tmp, "config.json")
        weights.write_bytes(storage.read_bytes(storage.join(ckpt, "model.safetensors")))
        meta = json.loads(storage.read_bytes(storage.join(ckpt, "meta.json")))
        config.write_text(json.dumps({"family": meta["family"], "config": meta["config"]}))
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(SERVING_FILE), code_paths=[str(GEN_MODELS_DIR)],
                artifacts={"weights": str(weights), "config": str(config)},
                pip_requirements=["torch==2.14.1", "safetensors", "numpy", "pandas"])
    metric, mode = evaluated["primary_metric"]
    tags = {
        "family": spec.model.family, "data_hash": prepared["data"]["data_hash"],
        "config_hash": spec.hash("model", "train", "seed"), "code_version": code_version,
        "extractor_hash": evaluated["extractor_hash"], "reference_hash": evaluated["reference_hash"],
        "eval_num_samples": evaluated["eval_num_samples"], "primary_metric": metric,
        **{f"metric.{k}": f"{v:.6g}" for k, v in evaluated["metrics"].items()},
    }
    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(name, description=f"genpipe {spec.model.family} models from pipeline {spec.name}")
    mv = c.create_model_version(name, source=info.model_uri, run_id=run_id, tags=tags,
                                description=model_card(spec, prepared, evaluated, trained))
    c.set_registered_model_alias(name, "challenger", mv.version)
    aliases = ["challenger"]
    try:
        champ = c.get_model_version_by_alias(name, "champion")
    except MlflowException:
        champ = None
    new = evaluated["metrics"][metric]
    if champ is None:
        reason = "no champion yet"
        promote = True
    elif not comparable(tags, champ.tags, metric):
        reason, promote = f"champion v{champ.version} was scored on other data or features: not compared", False
    else:
        old = float(champ.tags[f"metric.{metric}"])
        promote = better(new, old, mode)
        reason = f"{metric} {new:.4g} vs champion v{champ.version} {old:.4g}"
    if promote:
        c.set_registered_model_alias(name, "champion", mv.version)
        aliases.append("champion")
    print(f"registered {name} v{mv.version} ({', '.join(aliases)}); {reason}", flush=True)
    return {"model": name, "version": int(mv.version), "aliases": aliases, "model_uri": info.model_uri}
