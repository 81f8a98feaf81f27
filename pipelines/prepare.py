"""The prepare stage: the data source -> content-hashed shards, then the FID extractor and reference
statistics, fitted (or loaded, for Inception) once per data hash and extractor kind."""

from __future__ import annotations

import json
import time

from pipelines import storage
from pipelines.config import PipelineSpec
from pipelines.errors import InvalidInput
from pipelines.stages import StageJob


def stage(job: StageJob) -> dict:
    return prepare(job.spec, job.root)


def prepare(spec: PipelineSpec, root: str) -> dict:
    """Source -> shards (content-hashed); extractor and reference statistics once per data hash. The driver
    records the outputs in MLflow (`tracking.log_prepared`)."""
    import torch

    from pipelines import data as datasets
    from pipelines import metrics

    d = spec.data
    out = storage.join(root, "datasets", f"{d.source}-{spec.hash('data', 'seed')}")
    manifest = datasets.prepare(d, seed=spec.seed, out_uri=out)
    data_hash = manifest["data_hash"]

    e, kind = spec.extractor, spec.extractor_kind(manifest["num_classes"])
    if kind == "inception":
        try:
            weights = storage.read_bytes(e.weights_uri)
        except (FileNotFoundError, IsADirectoryError):
            raise InvalidInput(f"extractor.weights_uri {e.weights_uri} does not exist (Inception weights are "
                               "never downloaded: put torchvision's inception_v3 weights there)") from None
        ext_dir = storage.join(root, "extractors", f"{data_hash[:32]}-inception-{storage.sha256(weights)[:16]}")
    else:
        # a classifier's keeps the name it had before there were other kinds: its weights are still the same
        named = "" if kind == "classifier" else f"-{kind}"
        ext_dir = storage.join(root, "extractors", f"{data_hash[:32]}{named}-e{e.epochs}")
    ext_uri, ref_uri, info_uri = (storage.join(ext_dir, n) for n in ("extractor.safetensors", "reference.npz",
                                                                      "extractor.json"))
    if storage.exists(info_uri):
        info = json.loads(storage.read_bytes(info_uri))
        print(f"{kind} extractor for data {data_hash[:12]} already there", flush=True)
    else:
        # Both splits read in place, a batch at a time: prepare's memory does not grow with the dataset either.
        for split in ("train", "test"):  # shards reused from an earlier prepare: still what it wrote?
            datasets.verify_split(manifest, split)
        xt = datasets.ShardedImages(manifest, "test")
        t0 = time.perf_counter()
        if kind == "inception":
            ext, acc = metrics.inception_from_weights(weights, e.weights_uri), None  # ImageNet classes: no accuracy
        else:
            x = datasets.ShardedImages(manifest, "train")
            ext, acc = metrics.train_extractor(x, x.y, num_classes=manifest["num_classes"], epochs=e.epochs,
                                               seed=spec.seed, x_test=xt, y_test=xt.y, kind=kind)
        feats, _ = metrics.extract_uint8(ext, xt)
        ref = metrics.reference_stats(feats)
        ext_bytes, ref_bytes = metrics.save_extractor(ext), ref.to_bytes()
        storage.write_bytes(ext_uri, ext_bytes)
        storage.write_bytes(ref_uri, ref_bytes)
        # test_accuracy (extractor/test_accuracy in MLflow) is a classifier's on the labels, or none; rotation's
        # accuracy only says whether it learned anything at all, so it is printed and kept apart
        info = {"test_accuracy": acc if kind == "classifier" else None, "extractor_sha256": storage.sha256(ext_bytes),
                "reference_sha256": storage.sha256(ref_bytes), "seconds": time.perf_counter() - t0,
                "threads": torch.get_num_threads()}
        if kind == "rotation":
            info["rotation_accuracy"] = acc
        storage.write_bytes(info_uri, json.dumps(info).encode())  # last: marks the pair complete
        print(f"{kind} extractor and reference statistics ready in {info['seconds']:.0f}s on {info['threads']} "
              "threads", flush=True)
    if "rotation_accuracy" in info:
        print(f"extractor tells {info['rotation_accuracy']:.1%} of the test split's rotations apart (25% is chance)",
              flush=True)
    if info["test_accuracy"] is not None:
        print(f"extractor test accuracy {info['test_accuracy']:.4f}", flush=True)

    return {"data": manifest,
            "extractor": {"kind": kind, "uri": ext_uri, "sha256": info["extractor_sha256"],
                          "test_accuracy": info["test_accuracy"]},
            "reference": {"uri": ref_uri, "sha256": info["reference_sha256"]}}
