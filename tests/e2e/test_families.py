"""Every family through `genpipe pipeline` to a registered model version: a
real Ray head, MLflow on sqlite, the digits. Each family's job spec trains (its
contract-suite `tiny()` config, one worker, a few steps), is evaluated and
registered for real; the learning tests are where they must learn. The three
families the registry review trains (tests/e2e/family_runs.py: cgan,
pixelcnn, ddpm) are checked on those pipelines instead of running a second one each
(tests/e2e/test_registry.py), with the same `assert_registered`.

The pipelines run in tests/e2e/family_runs.py, three at a time on a GENPIPE_HOME of
their own that has no head and no database when the first three start. At the
end `genpipe head status` and `genpipe head stop` see and stop that head (the
registry review's tests after it need MLflow only)."""

from __future__ import annotations

import pytest

from pipelines import config
from tests.e2e.family_runs import AT_A_TIME, OWN, STEPS
from tests.realparts import assert_registered, genpipe, last_json, sqlite_client

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("family", OWN)
def test_family_trains_evaluates_registers(family, pipelines, fresh_home):
    r = pipelines[family]
    if isinstance(r, Exception):
        raise r
    assert_registered(r, fresh_home, family=family, name=config.load(f"jobs/{family}.yaml").model_name, number=1,
                      steps=STEPS)


def test_pipelines_started_at_once_share_one_head_and_database(fresh_home, pipelines, reviewed):
    first = [pipelines[f] for f in OWN[:AT_A_TIME]]
    for r in first:
        if isinstance(r, Exception):
            raise r
        assert r.returncode == 0, r.stderr[-3000:]
    assert sum("starting a local Ray head" in r.stderr for r in first) == 1
    # Every pipeline says, last, which head stays up: the same one for all (the review's among them).
    done = [r for r in [*(pipelines[f] for f in OWN), *reviewed["runs"].values()] if not isinstance(r, Exception)]
    heads = {line for r in done for line in r.stderr.splitlines() if "stays up for the next command" in line}
    assert len(heads) == 1, heads
    c = sqlite_client(fresh_home)
    runs = c.search_runs([c.get_experiment_by_name(f"e2e-{f}").experiment_id for f in OWN], max_results=1000)
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
