"""Every family's job spec through `genpipe pipeline` to a registered model
version: a real Ray head, MLflow on sqlite, the digits. Each family trains
(its contract-suite `tiny()` config, one worker, a few steps), is evaluated
and registered for real; the learning tests are where they must learn.

The first family's pipeline runs alone and builds the feature extractor; the
others find it in storage and run two at a time: a pipeline mostly waits on
its stages' start-up with one core busy, and the head has a CPU for each of
two train stages."""

from __future__ import annotations

import dataclasses
import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
from mlflow.tracking import MlflowClient

from gen_models import registry
from pipelines import config
from tests.realparts import DIGITS, genpipe, last_json

pytestmark = pytest.mark.integration

STEPS = 4
TRAIN = ["--set", "train.use_gpu=false", "--set", "train.num_workers=1", "--set", "train.batch_size=32",
         "--set", f"train.steps={STEPS}", "--set", f"train.checkpoint_every={STEPS}", "--set", "train.log_every=2",
         "--set", "evaluate.batch_size=300"]
AT_A_TIME = 2


def tiny(family: str) -> list[str]:
    """`--set`s that make the spec's model exactly the family's tiny() config."""
    fields = dataclasses.asdict(registry.config_class(family).tiny())
    return [a for k, v in fields.items() if k not in config.DATA_SHAPED for a in ("--set", f"model.{k}={json.dumps(v)}")]


@pytest.fixture(scope="module")
def pipelines(home) -> dict:
    """Every family's pipeline: its completed `genpipe pipeline`, or what running it raised."""

    def run(family: str):
        try:
            return genpipe(home, "pipeline", "--config", f"jobs/{family}.yaml", *DIGITS, *TRAIN, *tiny(family),
                           "--set", f"name=e2e-{family}")
        except Exception as e:  # a timeout: that family's test reports it
            return e

    first, *rest = registry.FAMILIES
    out = {first: run(first)}
    with ThreadPoolExecutor(AT_A_TIME) as pool:
        out |= zip(rest, pool.map(run, rest))
    return out


@pytest.mark.parametrize("family", list(registry.FAMILIES))
def test_family_spec_trains_evaluates_registers(family, home, pipelines):
    spec = f"jobs/{family}.yaml"
    r = pipelines[family]
    if isinstance(r, Exception):
        raise r
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
