"""The registry review's pipelines, shared by the session: a conditional GAN, PixelCNN and DDPM trained
on the digits through `genpipe pipeline`, and a quality gate that fails. tests/e2e/test_registry.py
reviews them, and counts them as those three families' pipelines to a registered version (a family
needs one, not two; the other families': tests/e2e/test_families.py)."""

from __future__ import annotations

import pytest

from tests.realparts import DIGITS, genpipe, sqlite_client

# one worker and a batch of 32: these tests are about what happens after training
TRAIN = ["--set", "train.num_workers=1", "--set", "train.batch_size=32", "--set", "train.steps=60",
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
    return [*DIGITS, *TRAIN, "--set", f"name=reg-{family}", *PIPELINES[family]]


@pytest.fixture(scope="session")
def reviewed(home):
    """cgan -> reg-digits v1; a gate that fails on the cgan (no version); ddpm -> reg-digits v2; pixelcnn."""
    out = {}
    for family in ("cgan", "gate", "pixelcnn", "ddpm"):
        if family == "gate":
            r = genpipe(home, "register", *spec_args("cgan"), "--set", "registry.gates.fid=<= 0.001",
                        "--set", "registry.gates.precision=>= 0")
        else:
            r = genpipe(home, "pipeline", *spec_args(family))
            assert r.returncode == 0, r.stderr[-3000:]
        out[family] = r
    return {"runs": out, "client": sqlite_client(home), "tracking_uri": f"sqlite:///{home['path'] / 'mlflow.db'}"}
