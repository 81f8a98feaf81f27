"""The register stage: check the quality gates, package the trained model as an
MLflow pyfunc, register a version with its lineage as tags and a model card,
and move the aliases: every version is `challenger`; `champion` moves only to
a version whose primary metric beats the champion's on comparable terms.

A model that misses a gate is not registered at all: the stage exits 3 and
says which gate it missed and by how much.
"""

from __future__ import annotations

import json
import operator
import tempfile
from importlib.metadata import version
from pathlib import Path

from pipelines import checkpoints, storage, tracking
from pipelines.config import PipelineSpec, parse_gate
from pipelines.errors import GateFailed, InvalidInput
from pipelines.stages import StageJob, code_version

GEN_MODELS_DIR = Path(__file__).resolve().parent.parent / "gen_models"
SERVING_FILE = Path(__file__).resolve().parent / "serving.py"
CARD_LIMIT = 5000  # characters MLflow's SQL stores keep of a version description

GATE_OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt}
# What must agree before two feature metrics mean the same: the data, the features, the statistics they are
# compared with, and n (FID is biased by the sample count).
FEATURE_TERMS = {"data_hash": "data", "extractor_hash": "extractor", "reference_hash": "reference statistics",
                 "eval_num_samples": "sample count"}
FEATURE_METRICS = {"fid", "kid", "kid_std", "is", "is_std", "precision", "recall", "conditional_accuracy"}
# Bits/dim is measured on the test split itself: comparable whenever the data is. Sampling cost (img/s,
# steps) depends on hardware no hash covers, and is read as such.
TERMS = {**dict.fromkeys(FEATURE_METRICS, FEATURE_TERMS), "bits_per_dim": {"data_hash": "data"}}


def differences(a: dict[str, str], b: dict[str, str], metric: str) -> list[str]:
    """Why `metric` of two versions (given their tags) cannot be compared; empty when it can."""
    terms = TERMS.get(metric, {})
    why = [f"{what} {a.get(k, '?')[:12]} vs {b.get(k, '?')[:12]}" for k, what in terms.items() if a.get(k) != b.get(k)]
    missing = [f"v{t.get('version', '?')}" for t in (a, b) if f"metric.{metric}" not in t]
    return why + ([f"{metric} not reported by {', '.join(missing)}"] if missing else [])


def check_gates(gates: dict[str, str], results: dict[str, float]) -> list[str]:
    """One line per gate missed, with the margin; raises InvalidInput for a metric the model does not report."""
    missed = []
    for metric, bound in gates.items():
        if metric not in results:
            raise InvalidInput(f"registry.gates.{metric}: this model reports only {', '.join(sorted(results))}")
        op, limit = parse_gate(bound)
        value = results[metric]
        if not GATE_OPS[op](value, limit):
            missed.append(f"{metric} = {value:.4g} misses '{op} {limit:g}' by {abs(value - limit):.4g}")
    return missed


def model_card(spec: PipelineSpec, prepared: dict, evaluated: dict, train_run, grid_uri: str) -> str:
    """Markdown for the version's MLflow description: what a reviewer needs without running code."""
    data = prepared["data"]
    m = evaluated["metrics"]
    seconds = ((train_run.info.end_time or train_run.info.start_time) - train_run.info.start_time) // 1000
    hardware = (f"{spec.train.num_workers} x GPU" if spec.train.use_gpu
                else f"{spec.train.num_workers} x {spec.train.cpus_per_worker} CPU")
    kind = evaluated.get("bits_per_dim_kind")
    rows = "\n".join(f"| {k}{' (bound)' if k == 'bits_per_dim' and kind == 'bound' else ''} | {v:.4g} |"
                     for k, v in m.items())
    config = json.dumps({"model": spec.to_dict()["model"], "train": spec.to_dict()["train"]}, separators=(", ", ": "))
    card = f"""# {spec.model_name}: {spec.model.family}

- **data**: {spec.data.source}, images {'x'.join(map(str, data['shape']))}, {data['num_classes']} classes, \
hash `{data['data_hash'][:16]}`
- **training**: {spec.train.steps} steps, global batch {spec.train.batch_size}, {hardware}, \
{seconds // 60} min {seconds % 60} s (train run `{train_run.info.run_id}`)
- **evaluation**: {evaluated['eval_num_samples']} samples by `{evaluated['sampler']}`, extractor \
`{evaluated['extractor_hash'][:12]}`, reference statistics `{evaluated['reference_hash'][:12]}`; \
feature metrics compare only under the same data, extractor, reference statistics and sample count
- **samples**: `samples.png` in this version's run artifacts (`{grid_uri}`)

| metric | value |
|---|---|
{rows}

## Config

```json
{config}
```
"""
    return card if len(card) <= CARD_LIMIT else card[:CARD_LIMIT - 20] + "\n```\n(truncated)\n"


def pip_requirements(distributions: tuple[str, ...]) -> list[str]:
    """`dist==version` of each, as installed here: the served model gets the versions it was registered with.
    A local label (torch's `+cpu`) is dropped: the index a server installs from has the public version only."""
    return [f"{d}=={version(d).split('+')[0]}" for d in distributions]


def stage(job: StageJob) -> dict:
    return run(job.spec, job.inputs["prepare"], job.inputs["train"], job.inputs["evaluate"], run_id=job.run_id,
               runs=job.runs, tracking_uri=job.tracking_uri, code_version=code_version())


def run(spec: PipelineSpec, prepared: dict, trained: dict, evaluated: dict, *, run_id: str, runs: dict[str, str],
        tracking_uri: str, code_version: str) -> dict:
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipelines import serving

    c = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    missed = check_gates(spec.registry.gates, evaluated["metrics"])
    if missed:
        c.set_tag(run_id, "genpipe.gates", "missed: " + "; ".join(missed))
        raise GateFailed("; ".join(missed))
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    name = spec.model_name
    ckpt = trained["checkpoint"]
    with tempfile.TemporaryDirectory() as tmp:
        weights, config, grid = Path(tmp, "weights.safetensors"), Path(tmp, "config.json"), Path(tmp, "samples.png")
        meta = checkpoints.read_meta(ckpt)
        weights.write_bytes(checkpoints.read_file(ckpt, checkpoints.MODEL, meta))
        config.write_text(json.dumps({"family": meta["family"], "config": meta["config"]}))
        grid.write_bytes(storage.read_bytes(evaluated["grid"]))
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(SERVING_FILE), code_paths=[str(GEN_MODELS_DIR)],
                artifacts={"weights": str(weights), "config": str(config)},
                signature=serving.signature(meta["config"]["channels"], meta["config"]["image_size"]),
                input_example=serving.INPUT_EXAMPLE, pip_requirements=pip_requirements(serving.REQUIREMENTS))
            mlflow.log_artifact(str(grid))
    metric, mode = evaluated["primary_metric"]
    tags = {
        "family": spec.model.family, "data_source": spec.data.source, "data_hash": prepared["data"]["data_hash"],
        "config_hash": spec.hash("model", "train", "seed"), "code_version": code_version,
        "train_steps": str(spec.train.steps), "primary_metric": metric,
        **{k: evaluated[k] for k in tracking.EVAL_TAGS if k in evaluated},
        **{f"lineage.{stage}": rid for stage, rid in runs.items()},
        **{f"metric.{k}": f"{v:.6g}" for k, v in evaluated["metrics"].items()},
    }
    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(name, description=f"genpipe models from pipeline {spec.name}")
    card = model_card(spec, prepared, evaluated, c.get_run(runs["train"]), evaluated["grid"])
    # model_id: an MLflow server refuses a models:/m-... source without it (a sqlite store does not check)
    mv = c.create_model_version(name, source=info.model_uri, run_id=run_id, tags=tags, description=card,
                                model_id=info.model_id)
    c.set_registered_model_alias(name, "challenger", mv.version)
    aliases = ["challenger"]
    try:
        champ = c.get_model_version_by_alias(name, "champion")
    except MlflowException:
        champ = None
    new = evaluated["metrics"][metric]
    if champ is None:
        promote, reason = True, "no champion yet"
    elif why := differences({**tags, "version": mv.version}, {**champ.tags, "version": champ.version}, metric):
        promote, reason = False, f"champion v{champ.version} not compared: {'; '.join(why)}"
    else:
        old = float(champ.tags[f"metric.{metric}"])
        promote = new < old if mode == "min" else new > old
        reason = f"{metric} {new:.4g} vs champion v{champ.version} {old:.4g}"
    if promote:
        c.set_registered_model_alias(name, "champion", mv.version)
        aliases.append("champion")
    print(f"registered {name} v{mv.version} ({', '.join(aliases)}); {reason}", flush=True)
    return {"model": name, "version": int(mv.version), "aliases": aliases, "model_uri": info.model_uri}
