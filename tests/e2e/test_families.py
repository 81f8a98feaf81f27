"""Every family through `genpipe pipeline` to a registered model version: a
real Ray head, MLflow on sqlite, the digits. Each family's job spec trains (its
contract-suite `tiny()` config, one worker, a few steps), is evaluated and
registered for real; the learning tests are where they must learn. The three
families the registry review trains (tests/e2e/reviewed.py: cgan, pixelcnn,
ddpm) are checked on those pipelines instead of running a second one each
(tests/e2e/test_registry.py), with the same `assert_registered`.

They run three at a time on a GENPIPE_HOME of their own, with no head and no
database yet, so the first three start at the same moment, as three users'
commands would: one of them starts the local head and creates the MLflow
database, under a lock, and the others wait for it and share them. At the end
`genpipe head status` and `genpipe head stop` see and stop that head.

Nothing here touches the session's head, database or storage: under xdist this
module runs beside the other real-parts tests, on the unit tests' worker
(tests/conftest.py)."""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from gen_models import registry
from pipelines import config
from tests.e2e.reviewed import PIPELINES as REVIEWED
from tests.realparts import DIGITS, assert_registered, genpipe, home_env, last_json, sqlite_client

pytestmark = pytest.mark.integration

STEPS = 4
TRAIN = ["--set", "train.use_gpu=false", "--set", "train.num_workers=1", "--set", "train.batch_size=32",
         "--set", f"train.steps={STEPS}", "--set", f"train.checkpoint_every={STEPS}", "--set", "train.log_every=2",
         "--set", "evaluate.batch_size=300"]
# Three at a time: the head has a CPU for each of two train stages, and a pipeline spends most of its
# time outside them (its stages' start-up, prepare, evaluate, register), mostly on one core.
AT_A_TIME = 3


def tiny(family: str) -> list[str]:
    """`--set`s that make the spec's model exactly the family's tiny() config."""
    fields = dataclasses.asdict(registry.config_class(family).tiny())
    return [a for k, v in fields.items() if k not in config.DATA_SHAPED for a in ("--set", f"model.{k}={json.dumps(v)}")]


@pytest.fixture(scope="module")
def fresh_home(tmp_path_factory, moto_s3):
    """A GENPIPE_HOME with nothing in it: no head, no database."""
    path = tmp_path_factory.mktemp("families-home")
    home = {"path": path, "env": home_env(path, moto_s3)}
    yield home
    genpipe(home, "head", "stop", "--force")  # when a test failed before stopping it


@pytest.fixture(scope="module")
def pipelines(fresh_home) -> dict:
    """Every family's pipeline: its completed `genpipe pipeline`, or what running it raised."""

    def run(family: str):
        try:
            return genpipe(fresh_home, "pipeline", "--config", f"jobs/{family}.yaml", *DIGITS, *TRAIN, *tiny(family),
                           "--set", f"name=e2e-{family}")
        except Exception as e:  # a timeout: that family's test reports it
            return e

    with ThreadPoolExecutor(AT_A_TIME) as pool:  # the first AT_A_TIME start at the same moment
        return dict(zip(OWN, pool.map(run, OWN)))


OWN = [f for f in registry.FAMILIES if f not in REVIEWED]  # the families with a pipeline of their own here


@pytest.mark.parametrize("family", OWN)
def test_family_trains_evaluates_registers(family, pipelines, fresh_home):
    r = pipelines[family]
    if isinstance(r, Exception):
        raise r
    assert_registered(r, fresh_home, family=family, name=config.load(f"jobs/{family}.yaml").model_name, number=1,
                      steps=STEPS)


def test_pipelines_started_at_once_share_one_head_and_database(fresh_home, pipelines):
    first = [pipelines[f] for f in OWN[:AT_A_TIME]]
    for r in first:
        if isinstance(r, Exception):
            raise r
        assert r.returncode == 0, r.stderr[-3000:]
    assert sum("starting a local Ray head" in r.stderr for r in first) == 1
    # Every pipeline says, last, which head stays up: the same one for all.
    heads = {line for r in pipelines.values() if not isinstance(r, Exception)
             for line in r.stderr.splitlines() if "stays up for the next command" in line}
    assert len(heads) == 1, heads
    c = sqlite_client(fresh_home)
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()], max_results=1000)
    assert len(runs) == 5 * len(OWN)  # a pipeline run and four stage runs each
    assert {r.info.status for r in runs} == {"FINISHED"}
    # The digits, prepared by the first pipelines, are the later ones' prepare stage: no job, a run of its
    # own that names the run that did the work and carries the same dataset input.
    later = [f for f in OWN[AT_A_TIME:] if not isinstance(pipelines[f], Exception)]
    assert later and all("[prepare] cached: prepared by run" in pipelines[f].stderr for f in later)
    prepare = c.get_run(last_json(pipelines[later[-1]].stdout)["runs"]["prepare"])
    origin = c.get_run(prepare.data.tags["genpipe.prepared_by"])
    assert origin.data.tags["mlflow.runName"].endswith("/prepare") and origin.info.run_id != prepare.info.run_id
    assert prepare.data.tags["genpipe.data_hash"] == origin.data.tags["genpipe.data_hash"]
    assert [d.dataset.digest for d in prepare.inputs.dataset_inputs] == \
        [d.dataset.digest for d in origin.inputs.dataset_inputs] != []


def test_head_status_then_stop(fresh_home, pipelines):
    r = genpipe(fresh_home, "head", "status")
    assert r.returncode == 0 and "local Ray head at http://127.0.0.1:" in r.stdout and "0 job(s) running" in r.stdout
    url = r.stdout.split(" at ")[1].split()[0]
    assert url in next(line for line in pipelines["gan"].stderr.splitlines() if "stays up" in line)
    r = genpipe(fresh_home, "head", "stop")
    assert r.returncode == 0 and f"stopped the local Ray head at {url}" in r.stderr, r.stderr
    r = genpipe(fresh_home, "head", "status")
    assert r.returncode == 0 and "no local Ray head is up" in r.stdout
    r = genpipe(fresh_home, "head", "stop")
    assert r.returncode == 0 and "no local Ray head to stop" in r.stderr
