"""Every family's job spec through `genpipe pipeline` to a registered model
version: a real Ray head, MLflow on sqlite, the digits. Each family trains
(its contract-suite `tiny()` config, one worker, a few steps), is evaluated
and registered for real; the learning tests are where they must learn.

All families run under one pipeline name, so prepare's cache key (data,
extractor, seed) matches after the first and its job runs once: prepare is
then the run of the first family's pipeline, as a re-run would find it."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from mlflow.tracking import MlflowClient

from gen_models import registry
from pipelines import config
from tests.realparts import DIGITS, genpipe, last_json

pytestmark = pytest.mark.integration

STEPS = 4
TRAIN = ["--set", "train.use_gpu=false", "--set", "train.num_workers=1", "--set", "train.batch_size=32",
         "--set", f"train.steps={STEPS}", "--set", f"train.checkpoint_every={STEPS}", "--set", "train.log_every=2",
         "--set", "evaluate.batch_size=300", "--set", "name=e2e-families"]


def tiny(family: str) -> list[str]:
    """`--set`s that make the spec's model exactly the family's tiny() config."""
    fields = dataclasses.asdict(registry.config_class(family).tiny())
    return [a for k, v in fields.items() if k not in config.DATA_SHAPED for a in ("--set", f"model.{k}={json.dumps(v)}")]


@pytest.mark.parametrize("family", list(registry.FAMILIES))
def test_family_spec_trains_evaluates_registers(family, home):
    spec = f"jobs/{family}.yaml"
    r = genpipe(home, "pipeline", "--config", spec, *DIGITS, *TRAIN, *tiny(family))
    assert r.returncode == 0, r.stderr[-3000:]
    out = last_json(r.stdout)
    name = config.load(spec).model_name
    assert out["model"] == name and out["version"] == 1
    assert f"step {STEPS}/{STEPS}" in r.stderr

    uri = f"sqlite:///{home['path'] / 'mlflow.db'}"
    c = MlflowClient(uri, registry_uri=uri)
    for stage in ("train", "evaluate", "register"):
        assert c.get_run(out["runs"][stage]).info.status == "FINISHED", stage
    assert c.get_run(out["runs"]["train"]).data.metrics["train/img_per_s"] > 0
    version = c.get_model_version(name, "1")
    assert version.run_id == out["runs"]["register"]
    tags = version.tags
    assert tags["family"] == family
    primary = registry.FAMILIES[family][0].primary_metric[0]
    assert tags["primary_metric"] == primary
    assert math.isfinite(float(tags[f"metric.{primary}"])) and math.isfinite(float(tags["metric.fid"]))
    assert math.isfinite(c.get_run(out["runs"]["evaluate"]).data.metrics[f"eval/{primary}"])
