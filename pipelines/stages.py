"""What a stage's Ray job runs: `python -m pipelines.stages STAGE --spec URI ...`.

A stage reads the spec and its input manifests by URI, does its work, and
ends by writing its own manifest (inputs, outputs, key, code version, run id).
The manifest is written last and atomically, so its presence means the stage
finished; the driver skips a stage whose manifest carries the same key.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pipelines import storage
from pipelines.config import PipelineSpec
from pipelines.errors import GateFailed, InvalidInput

STAGES = ("prepare", "train", "evaluate", "register")


def code_version() -> str:
    from importlib.metadata import version

    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        sha = ""
    return f"{version('genpipe')}+{sha}" if sha else version("genpipe")


def read_json(uri: str) -> dict:
    try:
        return json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        raise InvalidInput(f"{uri} is missing") from None
    except json.JSONDecodeError:
        raise InvalidInput(f"{uri} is not valid JSON (corrupt?)") from None


def prepare(spec: PipelineSpec, root: str, run_id: str, tracking_uri: str) -> dict:
    """Source -> shards (content-hashed); extractor and reference statistics once per data hash."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.tracking import MlflowClient

    from pipelines import data as datasets
    from pipelines import metrics

    d = spec.data
    out = storage.join(root, "datasets", f"{d.source}-{spec.hash('data', 'seed')}")
    manifest = datasets.prepare(d, seed=spec.seed, out_uri=out)
    data_hash = manifest["data_hash"]

    e = spec.extractor
    if e.kind == "classifier" and manifest["num_classes"] < 2:  # an image folder's labels name one class
        raise InvalidInput(f"extractor.kind classifier is fitted on labels, and those of {d.uri} name one class: "
                           "label at least two, or use extractor.kind inception with extractor.weights_uri")
    if e.kind == "inception":
        try:
            weights = storage.read_bytes(e.weights_uri)
        except (FileNotFoundError, IsADirectoryError):
            raise InvalidInput(f"extractor.weights_uri {e.weights_uri} does not exist (Inception weights are "
                               "never downloaded: put torchvision's inception_v3 weights there)") from None
        ext_dir = storage.join(root, "extractors", f"{data_hash[:32]}-inception-{storage.sha256(weights)[:16]}")
    else:
        ext_dir = storage.join(root, "extractors", f"{data_hash[:32]}-e{e.epochs}")
    ext_uri, ref_uri, info_uri = (storage.join(ext_dir, n) for n in ("extractor.safetensors", "reference.npz",
                                                                      "extractor.json"))
    if storage.exists(info_uri):
        info = json.loads(storage.read_bytes(info_uri))
        print(f"{e.kind} extractor for data {data_hash[:12]} already there", flush=True)
    else:
        xt, yt = datasets.load_split(manifest, "test")
        t0 = time.perf_counter()
        if e.kind == "inception":
            ext, acc = metrics.inception_from_weights(weights, e.weights_uri), None  # ImageNet classes: no accuracy
        else:
            x, y = datasets.load_split(manifest, "train")
            ext, acc = metrics.train_extractor(x, y, num_classes=manifest["num_classes"], epochs=e.epochs,
                                               seed=spec.seed, x_test=xt, y_test=yt)
        feats, _ = metrics.extract(ext, xt.float() / 255)
        ref = metrics.reference_stats(feats)
        ext_bytes, ref_bytes = metrics.save_extractor(ext), ref.to_bytes()
        storage.write_bytes(ext_uri, ext_bytes)
        storage.write_bytes(ref_uri, ref_bytes)
        info = {"test_accuracy": acc, "extractor_sha256": storage.sha256(ext_bytes),
                "reference_sha256": storage.sha256(ref_bytes), "seconds": time.perf_counter() - t0}
        storage.write_bytes(info_uri, json.dumps(info).encode())  # last: marks the pair complete
        print(f"{e.kind} extractor and reference statistics ready in {info['seconds']:.0f}s", flush=True)
    if info["test_accuracy"] is not None:
        print(f"extractor test accuracy {info['test_accuracy']:.4f}", flush=True)

    c = MlflowClient(tracking_uri)
    if info["test_accuracy"] is not None:
        c.log_metric(run_id, "extractor/test_accuracy", info["test_accuracy"])
    c.set_tag(run_id, "genpipe.data_hash", data_hash)
    if "bad" in manifest["source"]:
        c.log_metric(run_id, "data/bad_images_skipped", manifest["source"]["bad"])
    c.log_inputs(run_id, [DatasetInput(datasets.lineage(manifest), tags=[
        InputTag("mlflow.data.context", "training"), InputTag("genpipe.shards", out)])])
    return {"data": manifest,
            "extractor": {"uri": ext_uri, "sha256": info["extractor_sha256"], "test_accuracy": info["test_accuracy"]},
            "reference": {"uri": ref_uri, "sha256": info["reference_sha256"]}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.stages")
    p.add_argument("stage", choices=(*STAGES, "tune"))
    p.add_argument("--spec", required=True, help="URI of the resolved spec JSON")
    p.add_argument("--run-id", help="MLflow run this stage logs into")
    p.add_argument("--key", help="cache key recorded in the manifest")
    p.add_argument("--root", required=True, help="storage root")
    p.add_argument("--inputs", nargs="*", default=[], help="manifests of the earlier stages, in order")
    p.add_argument("--resume", action="store_true", help="tune: continue an interrupted search")
    p.add_argument("--go", help="a job submitted ahead of its turn: the URI where the driver hands it the rest of "
                                "its arguments (--run-id, --key) when the stage before it has finished")
    argv = sys.argv[1:] if argv is None else argv
    a = p.parse_args(argv)
    try:
        for module in STAGE_MODULES[a.stage]:
            importlib.import_module(module)
        ready_at = time.time()
        if a.go:
            a = p.parse_args([*argv, *wait_for_go(a.go)])
        if not (a.run_id and a.key):
            p.error("--run-id and --key are required (or --go)")
        return _run(a, ready_at=ready_at)
    except InvalidInput as e:
        print(f"genpipe: invalid input: {e}", file=sys.stderr, flush=True)
        return 2
    except GateFailed as e:
        print(f"genpipe: quality gate not met: {e}", file=sys.stderr, flush=True)
        return 3


def _process_started_at() -> float:
    """Wall-clock start of this process, so interpreter start-up and imports are counted (Linux)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()


# What each stage imports for its work. They are imported before the stage's work is timed, so the
# orchestration breakdown (benchmarks/orchestration.py) counts every import as start-up, not as work.
STAGE_MODULES = {"prepare": ("mlflow.tracking", "pipelines.data", "pipelines.metrics"),
                 "train": ("pipelines.train", "ray.train.torch"),
                 "tune": ("mlflow.tracking", "pipelines.tune", "ray.tune"),
                 "evaluate": ("mlflow.tracking", "pipelines.evaluate"),
                 "register": ("mlflow", "mlflow.tracking", "pipelines.register")}


# How often a job that waits for its turn looks for its go file, and how long it waits for the driver's
# lease on it to move before it decides the driver is gone (killed, so nobody will start or stop it).
GO_POLL_S = 0.1
GO_ORPHANED_S = 60.0


def wait_for_go(uri: str) -> list[str]:
    """Block until the driver writes `{"args": [...]}` to URI; return those arguments.

    Until then the driver rewrites the file with a counter every few seconds (`{"lease": n}`); a
    counter that stops moving means the driver is gone, and the job ends rather than wait forever."""
    poll = GO_POLL_S if not storage.is_s3(uri) else 5 * GO_POLL_S  # a GET each time, on S3
    seen, moved_at = None, time.monotonic()
    while True:
        try:
            go = json.loads(storage.read_bytes(uri))
        except (FileNotFoundError, json.JSONDecodeError):
            go = None
        if go and "args" in go:
            return go["args"]
        if go != seen:
            seen, moved_at = go, time.monotonic()
        elif time.monotonic() - moved_at > GO_ORPHANED_S:
            print(f"genpipe: the driver that submitted this job stopped renewing {uri}: it is gone; ending",
                  file=sys.stderr, flush=True)
            raise SystemExit(1)
        time.sleep(poll)


def _run(a: argparse.Namespace, *, ready_at: float) -> int:
    from pipelines.tracking import tracking_uri

    timing = {"process_started_at": _process_started_at(), "ready_at": ready_at, "work_started_at": time.time()}

    spec = PipelineSpec.model_validate(read_json(a.spec))
    manifests = [read_json(uri) for uri in a.inputs]
    inputs = {m["stage"]: m["outputs"] for m in manifests}
    runs = {m["stage"]: m["run_id"] for m in manifests}
    if "tune" in inputs:
        # Downstream of a search the best trial is the training run: its spec, checkpoint and MLflow run.
        best = inputs["tune"]["best"]
        spec, inputs["train"], runs["train"] = spec.with_overrides(best["config"]), inputs["tune"], best["run_id"]
    uri = tracking_uri()
    stage_dir = storage.join(a.root, spec.name, a.stage)
    if a.stage == "prepare":
        outputs = prepare(spec, a.root, a.run_id, uri)
    elif a.stage == "train":
        from pipelines import data as datasets
        from pipelines import train

        # Verify the shards here, where a bad one is a clean exit 2, not a failure inside every worker.
        datasets.load_split(inputs["prepare"]["data"], "train")
        ckpt = train.run(spec, inputs["prepare"]["data"], run_id=a.run_id, tracking_uri=uri,
                         storage_path=stage_dir, name=f"{spec.name}-{a.key}")
        outputs = {"checkpoint": ckpt}
    elif a.stage == "tune":
        from pipelines import tune

        outputs = tune.run(spec, inputs["prepare"], run_id=a.run_id, tracking_uri=uri, storage_path=stage_dir,
                           key=a.key, resume=a.resume)
    elif a.stage == "evaluate":
        from pipelines import evaluate

        outputs = evaluate.run(spec, inputs["prepare"], inputs["train"]["checkpoint"], out_uri=stage_dir,
                               run_id=a.run_id, tracking_uri=uri)
        outputs["run_id"] = a.run_id
    else:
        from pipelines import register

        outputs = register.run(spec, inputs["prepare"], inputs["train"], inputs["evaluate"], run_id=a.run_id,
                               runs=runs, tracking_uri=uri,
                               code_version=code_version())
    manifest = {"stage": a.stage, "key": a.key, "spec_hash": spec.hash(), "code_version": code_version(),
                "run_id": a.run_id, "inputs": a.inputs, "outputs": outputs,
                "timing": timing | {"finished_at": time.time()}}
    storage.write_bytes(storage.join(stage_dir, "manifest.json"), json.dumps(manifest, indent=2).encode())
    return 0


if __name__ == "__main__":
    rc = main()
    # By now the manifest is written and every MLflow call has returned. Tearing the interpreter down
    # (torch, mlflow, a Ray driver's shutdown) took 2 s a stage on the demo's machine, with nothing
    # left to save: exit at once. An uncaught exception still unwinds as usual.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
