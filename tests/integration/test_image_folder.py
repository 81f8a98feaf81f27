"""Your own images through the real CLI: a folder on S3 (moto), decoded by Ray tasks on the session's
head, a bad file refused and then skipped, the lineage in MLflow, with no credential written anywhere. The
conversions, archives, labels and data version are tests/unit/test_images.py's; such a folder on to a
registered model, on a two-node cluster with storage on S3, is tests/e2e/test_cluster.py's."""

from __future__ import annotations

import json
import shutil

import pytest
from mlflow.tracking import MlflowClient

from pipelines import storage
from pipelines.config import DataSpec
from pipelines.data import prepare
from pipelines.models import _dataset_lines
from tests.imagesets import photo_patches, upload
from tests.realparts import genpipe, ray_state, s3_client

pytestmark = pytest.mark.integration


def _ray_tasks(home: dict, name: str) -> list[dict]:
    """The tasks of that function name the session's head has run."""
    return ray_state(home["address"], "tasks", ("func_or_class_name", "=", name))


def test_an_image_folder_on_s3_is_prepared_by_ray_tasks(home, tmp_path, monkeypatch):
    folder = photo_patches(tmp_path / "photos", per_photo=40)  # 80 files: two Ray tasks of 64
    bad = sorted(folder.rglob("*.jpg"))[0]
    bad.write_bytes(bad.read_bytes()[: int(0.9 * bad.stat().st_size)])  # a tenth of its bytes cut
    env = home["env"]
    s3 = s3_client(env)
    upload(folder, s3, "photos")
    base = ["--config", "jobs/smoke.yaml", "--set", "name=photos", "--set", "data.source=image_folder",
            "--set", "data.uri=s3://genpipe/photos/", "--set", "data.image_size=32", "--set", "data.labels=subfolders",
            "--set", "data.shard_size=100", "--set", "extractor.epochs=3"]
    prepare_dir = home["path"] / "storage" / "photos" / "prepare"

    r = genpipe(home, "prepare", *base)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("genpipe: error:")]
    where = f"s3://genpipe/photos/{bad.relative_to(folder).as_posix()}"
    assert len(errors) == 1, r.stderr[-3000:]
    assert errors[0].startswith(f"genpipe: error: prepare: {where} cannot be decoded (OSError: image file is truncated")
    assert errors[0].endswith("(data.on_bad_image: skip would skip it)")
    assert not (prepare_dir / "manifest.json").exists()

    decoded_before = len(_ray_tasks(home, "decode_batch"))
    r = genpipe(home, "prepare", *base, "--set", "data.on_bad_image=skip")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "80/80 images (100%)" in r.stderr and f"bad files skipped (data.on_bad_image: skip): 1; the first: {where}" \
        in r.stderr
    # two batches of files, each decoded by a Ray task on the head
    assert len(_ray_tasks(home, "decode_batch")) - decoded_before == 2
    printed = r.stderr
    manifest = json.loads((prepare_dir / "manifest.json").read_text())
    data = manifest["outputs"]["data"]
    assert data["shape"] == [3, 32, 32] and data["num_classes"] == 2
    assert data["source"]["bad"] == 1 and sum(s["count"] for s in data["splits"].values()) == 79

    # Ray's tasks decoded what one process decodes, and the folder, on S3, locally or zipped on S3, is one
    # data version
    def version(uri: str) -> str:
        spec = DataSpec(source="image_folder", uri=uri, image_size=32, labels="subfolders", on_bad_image="skip")
        return prepare(spec, seed=0, out_uri=str(tmp_path / "out" / uri.replace("/", "_")), parallel=False)["data_hash"]

    assert version(str(folder)) == data["data_hash"]
    shutil.make_archive(str(tmp_path / "photos"), "zip", folder.parent, folder.name)
    s3.upload_file(str(tmp_path / "photos.zip"), "genpipe", "archives/photos.zip")
    for k, v in env.items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    storage._s3.cache_clear()  # a client made with this process's own environment
    try:
        assert version("s3://genpipe/archives/photos.zip") == data["data_hash"]
    finally:
        storage._s3.cache_clear()

    c = MlflowClient(f"sqlite:///{home['path'] / 'mlflow.db'}")
    run = c.get_run(manifest["run_id"])
    assert run.data.metrics["data/bad_images_skipped"] == 1
    ds = run.inputs.dataset_inputs[0].dataset
    assert json.loads(ds.source) == {"uri": "s3://genpipe/photos"} and ds.source_type == "s3"
    assert ds.digest == data["data_hash"][:32] and ds.name == "image_folder:photos"
    profile = json.loads(ds.profile)
    assert (profile["images"], profile["image_size"], profile["channels"], profile["bad_images_skipped"]) == \
        (79, 32, 3, 1)
    # A driver killed after the job wrote its manifest and before it recorded the run (the job, not the
    # driver, used to): the re-run finds the stage cached and records the run then, once.
    c.delete_tag(manifest["run_id"], "genpipe.data_hash")
    r = genpipe(home, "prepare", *base, "--set", "data.on_bad_image=skip")
    assert r.returncode == 0 and "[prepare] cached" in r.stderr, r.stderr[-3000:]
    run = c.get_run(manifest["run_id"])
    assert run.data.tags["genpipe.data_hash"] == data["data_hash"] and len(run.inputs.dataset_inputs) == 1
    # what `genpipe models show` prints of a version whose lineage holds this prepare run
    n = data["splits"]
    assert _dataset_lines(c, manifest["run_id"]) == [
        f"dataset image_folder:photos: s3://genpipe/photos (s3), digest {data['data_hash'][:32]}",
        f"  79 images (train {n['train']['count']}, val {n['val']['count']}, test {n['test']['count']}), 32x32x3, "
        "2 classes (subfolders), bad files skipped: 1"]
    assert _dataset_lines(c, None) == ["dataset: - (no prepare run in the lineage)"]

    # Credentials come from the environment only: nothing prepare wrote or printed holds them (the
    # manifests, the MLflow db with every param and tag, the job logs it streamed).
    written = {str(f): f.read_bytes() for f in home["path"].rglob("*") if f.is_file()}
    written["what it printed"] = (printed + r.stderr).encode()
    assert {str(prepare_dir / "manifest.json"), str(home["path"] / "mlflow.db")} <= set(written)
    for secret in (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]):
        leaks = [where for where, data in written.items() if secret.encode() in data]
        assert not leaks, f"{secret} written to {leaks}"
