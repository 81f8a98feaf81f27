"""Bad input: exit code 2 and one clear line, no traceback, nothing already written harmed."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from tests.realparts import DIGITS, digest, genpipe, one_clear_line

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("override, needles", [
    ("train.stepz=3", ("unknown key 'train.stepz'", "steps")),
    ("train.steps=abc", ("train.steps", "integer")),
    ("model.family=nope", ("unknown family 'nope'", "dcgan")),
    ("model.z_dimm=3", ("unknown key 'z_dimm'", "z_dim")),
    ("train.batch_size=7", ("not divisible",)),
    ("storage=ftp://host/x", ("only local paths and s3://",)),
    ("data.source=image_folder", ("source image_folder needs uri",)),
])
def test_bad_spec_exits_2_with_one_line(home, override, needles):
    one_clear_line(genpipe(home, "pipeline", "--config", "jobs/smoke.yaml", "--set", override), *needles)


def test_missing_spec_file(home):
    one_clear_line(genpipe(home, "pipeline", "--config", "jobs/nope.yaml"), "does not exist")


def test_unreachable_ray_address(home):
    one_clear_line(genpipe(home, "pipeline", "--config", "jobs/smoke.yaml", "--address", "http://127.0.0.1:9"),
                   "127.0.0.1:9")


def test_missing_data_root(home, tmp_path):
    # An empty root that nothing can be fetched into, whatever the network: it lies under a file, so the
    # download fails on its first mkdir, before a single request goes out.
    (tmp_path / "a-file").touch()
    root = tmp_path / "a-file" / "mnist"
    r = genpipe(home, "prepare", "--config", "jobs/smoke.yaml", "--set", "name=bad-data",
                "--set", "data.source=mnist", "--set", f"data.root={root}")
    one_clear_line(r, "prepare: mnist: no idx files in ", f"the download into {root}/MNIST/raw failed: ")


def test_corrupt_shard_is_refused_and_earlier_outputs_stay(home, tmp_path):
    # A storage of its own: the shard it corrupts is nobody else's, even if the test dies before restoring it.
    storage = tmp_path / "storage"
    base = ["--config", "jobs/smoke.yaml", *DIGITS, "--set", "name=corrupt", "--set", f"storage={storage}"]
    assert genpipe(home, "prepare", *base).returncode == 0
    shard = min((storage / "datasets").rglob("train-*.npz"))
    prepare_dir = storage / "corrupt" / "prepare"
    before = digest(prepare_dir)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = genpipe(home, "train", *base)
    one_clear_line(r, "corrupt")
    assert digest(prepare_dir) == before
    assert not (storage / "corrupt" / "train" / "manifest.json").exists()
    # The driver read why from the outcome the stage recorded, not from its log.
    (outcome,) = (storage / "corrupt" / "train" / "outcomes").glob("genpipe-train-*.json")
    recorded = json.loads(outcome.read_text())
    assert recorded["exit_code"] == 2 and recorded["message"] in r.stderr
    c = MlflowClient(f"sqlite:///{home['path'] / 'mlflow.db'}")
    runs = {r.info.run_name: r.info.status
            for r in c.search_runs([c.get_experiment_by_name("corrupt").experiment_id])}
    assert runs == {"corrupt": "FAILED", "corrupt/prepare": "FINISHED", "corrupt/train": "FAILED"}


def test_an_unreachable_address_is_refused_before_any_mlflow_run(home, tmp_path):
    fresh = tmp_path / "home"
    r = genpipe(home, "pipeline", "--config", "jobs/smoke.yaml", "--address", "http://127.0.0.1:1",
                extra_env={"GENPIPE_HOME": str(fresh)})
    one_clear_line(r, "cannot reach the Ray job API at http://127.0.0.1:1")
    assert not (fresh / "mlflow.db").exists()  # no database, so no run left FAILED with no stages


def test_remote_cluster_with_local_storage_is_refused(home):
    # Refused before any connection is tried: `.invalid` never resolves.
    r = genpipe(home, "pipeline", "--config", "jobs/smoke.yaml", "--address", "http://ray-head.invalid:8265")
    one_clear_line(r, "cannot see local storage")


def test_sample_from_a_model_that_is_not_registered(home, tmp_path):
    r = genpipe(home, "sample", "models:/no-such-model@champion", "-n", "4", "--out", str(tmp_path / "x.png"))
    one_clear_line(r, "cannot load models:/no-such-model@champion")
    assert not (tmp_path / "x.png").exists()


def test_sample_to_an_unknown_format(home, tmp_path):
    r = genpipe(home, "sample", "models:/any@champion", "--out", str(tmp_path / "x.jpg"))
    one_clear_line(r, "must end in .png")


def test_inception_weights_that_are_not_there_exit_2(home, tmp_path):
    missing = tmp_path / "inception_v3.pth"
    r = genpipe(home, "prepare", *DIGITS, "--set", "name=reg-inception", "--set", "extractor.kind=inception",
                "--set", f"extractor.weights_uri={missing}")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"genpipe: error: prepare: extractor.weights_uri {missing} does not exist (Inception weights are never "
        "downloaded: put torchvision's inception_v3 weights there)")
