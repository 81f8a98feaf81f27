"""Every family's pipeline to a registered version, on a GENPIPE_HOME of their own: the families of
tests/e2e/test_families.py one pipeline each, and the registry review's (a conditional GAN, PixelCNN and
DDPM on the digits, and a quality gate that fails), which tests/e2e/test_registry.py reviews and counts
as those three families' pipelines (a family needs one, not two). tests/e2e/conftest.py makes the
fixtures here every e2e test's.

They run three at a time on a home with no head and no database yet, so the first three start at the
same moment, as three users' commands would: one of them starts the local head and creates the MLflow
database, under a lock, and the others wait for it and share them. Nothing here touches the session's
head, database or storage: under xdist the two modules that use it run beside the other real-parts
tests, on the unit tests' worker (tests/conftest.py), and the review's pipelines no longer wait in the
session head's queue."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from gen_models import registry
from pipelines import config
from tests.realparts import DIGITS, genpipe, home_env, sqlite_client

# The review's: one worker and a batch of 32, these tests are about what happens after training
REVIEW_TRAIN = ["--set", "train.num_workers=1", "--set", "train.batch_size=32", "--set", "train.steps=60",
                "--set", "train.checkpoint_every=60", "--set", "train.log_every=20"]
PIPELINES = {
    "cgan": ["--set", "model.family=cgan", "--set", "registry.model_name=reg-digits"],
    # fewer samples than the others: its FID must then be flagged as not comparable with theirs
    "pixelcnn": ["--set", "model.family=pixelcnn", "--set", "model.hidden=16", "--set", "model.num_layers=2",
                 "--set", "evaluate.num_samples=200", "--set", "registry.model_name=reg-pixelcnn"],
    "ddpm": ["--set", "model.family=ddpm", "--set", "model.timesteps=32", "--set", "model.base_channels=8",
             "--set", "model.channel_mults=[1,2]", "--set", "model.num_res_blocks=1", "--set", "model.ema_decay=0.9",
             "--set", "model.sampler=ddim", "--set", "model.sample_steps=10",
             "--set", "registry.model_name=reg-digits"],
}


def spec_args(family: str) -> list[str]:
    return [*DIGITS, *REVIEW_TRAIN, "--set", f"name=reg-{family}", *PIPELINES[family]]


def review(home: dict) -> dict[str, subprocess.CompletedProcess]:
    """cgan -> reg-digits v1; a gate that fails on the cgan (no version); ddpm -> reg-digits v2; pixelcnn.
    In this order, one after the other: the version numbers depend on it."""
    out = {}
    for family in ("cgan", "gate", "pixelcnn", "ddpm"):
        if family == "gate":
            out[family] = genpipe(home, "register", *spec_args("cgan"), "--set", "registry.gates.fid=<= 0.001",
                                  "--set", "registry.gates.precision=>= 0")
        else:
            out[family] = genpipe(home, "pipeline", *spec_args(family))
            if out[family].returncode != 0:
                break  # the rest depend on it; the tests report what failed
    return out


STEPS = 4  # each family's own pipeline trains this many steps
TRAIN = ["--set", "train.use_gpu=false", "--set", "train.num_workers=1", "--set", "train.batch_size=32",
         "--set", f"train.steps={STEPS}", "--set", f"train.checkpoint_every={STEPS}", "--set", "train.log_every=2",
         "--set", "evaluate.batch_size=300"]
# Three at a time: the head has a CPU for each of two train stages, and a pipeline spends most of its
# time outside them (its stages' start-up, prepare, evaluate, register), mostly on one core.
AT_A_TIME = 3
OWN = [f for f in registry.FAMILIES if f not in PIPELINES]  # the families with a pipeline of their own


def tiny(family: str) -> list[str]:
    """`--set`s that make the spec's model exactly the family's tiny() config."""
    fields = dataclasses.asdict(registry.config_class(family).tiny())
    return [a for k, v in fields.items() if k not in config.DATA_SHAPED for a in ("--set", f"model.{k}={json.dumps(v)}")]


@pytest.fixture(scope="session")
def fresh_home(tmp_path_factory, moto_s3):
    """A GENPIPE_HOME with nothing in it: no head, no database."""
    path = tmp_path_factory.mktemp("families-home")
    home = {"path": path, "env": home_env(path, moto_s3)}
    yield home
    genpipe(home, "head", "stop", "--force")  # when a test failed before stopping it


@pytest.fixture(scope="session")
def pipelines(fresh_home) -> dict:
    """Each of OWN's completed `genpipe pipeline` (or what running it raised), and under "review" the
    registry review's commands, which run in order as one task of the same pool."""

    def run(task: str):
        try:
            if task == "review":
                return review(fresh_home)
            return genpipe(fresh_home, "pipeline", "--config", f"jobs/{task}.yaml", *DIGITS, *TRAIN, *tiny(task),
                           "--set", f"name=e2e-{task}")
        except Exception as e:  # a timeout: that family's test reports it
            return e

    # The first AT_A_TIME start at the same moment; the review, four commands long, starts next.
    tasks = [*OWN[:AT_A_TIME], "review", *OWN[AT_A_TIME:]]
    with ThreadPoolExecutor(AT_A_TIME) as pool:
        return dict(zip(tasks, pool.map(run, tasks)))


@pytest.fixture(scope="session")
def reviewed(pipelines, fresh_home) -> dict:
    """The review's runs by family ("gate": the register that missed its gate), the home they ran in and
    an MLflow client of its database."""
    runs = pipelines["review"]
    if isinstance(runs, Exception):
        raise runs
    last, ran = list(runs.items())[-1]
    for family in PIPELINES:
        assert family in runs, f"{family} did not run: {last} failed first: {ran.stderr[-3000:]}"
        assert runs[family].returncode == 0, runs[family].stderr[-3000:]
    return {"runs": runs, "home": fresh_home, "client": sqlite_client(fresh_home),
            "tracking_uri": f"sqlite:///{fresh_home['path'] / 'mlflow.db'}"}
