"""Each family's full recipe, the run its spec describes, on one device: quality and speed.

    python3 benchmarks/full_recipes.py --specs jobs/dcgan.yaml jobs/vae.yaml --device cuda \\
        --work /tmp/full --max-train-s 120 [--data-root DIR] [--extractor DIR] [--out DIR] [--set K=V ...]

For each spec: prepare its data as the prepare stage does, train its model for the spec's
steps at the spec's global batch with the pipeline's own loop (`pipelines.steps`: the
same batches whatever the number of workers, so one device runs the spec's recipe), then
score it as the evaluate stage does (`pipelines.evaluate.score`: FID, KID, precision and
recall on the spec's `evaluate.num_samples`, bits/dim on the test split). No Ray and no
MLflow: this measures the recipe, not the orchestration.

A family whose training would outlast `--max-train-s` stops there and says how many of its
steps it ran: its figures are then for that many steps, not for the recipe.

The extractor (the spec's kind and `extractor.epochs`, fitted as prepare fits it) is fitted
once per data version and saved under `--extractor`; one already there is loaded, so a
GPU's time is not spent fitting it. Prints one JSON line per spec; with `--out`, a grid of
each model's samples goes to `OUT/grids.tar`.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import time
from pathlib import Path

import torch

from pipelines import config, metrics
from pipelines import data as datasets
from pipelines.evaluate import grid_png, score
from pipelines.steps import StepBatches, build_model, run_steps


def extractor_for(spec, manifest: dict, root: Path) -> tuple[torch.nn.Module, metrics.ReferenceStats, str]:
    """The spec's extractor and the test split's reference statistics: loaded from under `root`, or fitted and
    saved there, in a directory named as prepare names it (data hash, kind, epochs)."""
    kind = spec.extractor_kind(manifest["num_classes"])
    if kind == "inception":
        raise SystemExit("full_recipes fits its extractor: an Inception extractor's weights are not handled here")
    where = root / f"{manifest['data_hash'][:32]}-{kind}-e{spec.extractor.epochs}"
    ext_file, ref_file = where / "extractor.safetensors", where / "reference.npz"
    if not ext_file.exists():
        t0 = time.perf_counter()
        x, xt = datasets.ShardedImages(manifest, "train"), datasets.ShardedImages(manifest, "test")
        ext, acc = metrics.train_extractor(x, x.y, num_classes=manifest["num_classes"], epochs=spec.extractor.epochs,
                                           seed=spec.seed, x_test=xt, y_test=xt.y, kind=kind)
        ref = metrics.reference_stats(metrics.extract_uint8(ext, xt)[0])
        where.mkdir(parents=True, exist_ok=True)
        ref_file.write_bytes(ref.to_bytes())
        ext_file.write_bytes(metrics.save_extractor(ext))  # last: marks the pair complete
        print(f"extractor fitted in {time.perf_counter() - t0:.0f}s, test accuracy {acc:.4f}", flush=True)
    return (metrics.load_extractor(ext_file.read_bytes()), metrics.ReferenceStats.from_bytes(ref_file.read_bytes()),
            kind)


def run_spec(path: str, a: argparse.Namespace, device: torch.device) -> tuple[dict, bytes]:
    spec = config.load(path, [f"data.root={a.data_root}"] * bool(a.data_root) + a.set)
    manifest = datasets.prepare(spec.data, seed=spec.seed, out_uri=str(Path(a.work, "datasets", spec.hash("data", "seed"))),
                                parallel=False)
    extractor, ref, kind = extractor_for(spec, manifest, Path(a.extractor or Path(a.work, "extractor")))
    extractor.to(device)

    model, ctx = build_model(spec, manifest, device)
    x = datasets.ShardedImages(manifest, "train")  # read in place, as a train worker reads it
    batches = StepBatches(x, x.y, global_batch=spec.train.batch_size, seed=spec.seed, rank=0, world=1)
    steps, done, windows = spec.train.steps, 0, []
    t0 = time.perf_counter()
    for done, m in run_steps(model, ctx, batches, start=0, stop=steps, seed=spec.seed, device=device,
                             report_due=lambda s: s % 500 == 0 or s == steps):
        windows.append(m["img_per_s"])
        if done % 5000 == 0 or done == steps:
            print(f"  {spec.model.family} step {done}/{steps} " + " ".join(f"{k} {v:.4g}" for k, v in m.items()),
                  flush=True)
        if time.perf_counter() - t0 > a.max_train_s:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0

    model.eval()
    test = datasets.ShardedImages(manifest, "test") if model.has_log_prob else None
    t1 = time.perf_counter()
    results, samples = score(model, extractor, ref, kind=kind, num_samples=spec.evaluate.num_samples,
                             batch_size=spec.evaluate.batch_size, seed=spec.seed, test=test)
    row = {"spec": path, "family": spec.model.family, "steps": done, "spec_steps": steps,
           "complete": done == steps, "batch": spec.train.batch_size, "train_s": round(train_s, 1),
           # the median window: the first holds the warm-up (cuDNN's autotuning, the allocator's growth)
           "img_per_s": round(sorted(windows)[len(windows) // 2]),
           "eval_s": round(time.perf_counter() - t1, 1), "num_samples": spec.evaluate.num_samples,
           **{k: round(float(v), 4) for k, v in results.items()}}
    return row, grid_png(samples[:spec.evaluate.grid_size])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--specs", nargs="+", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--work", required=True, help="where prepared data (and, by default, the extractor) go")
    p.add_argument("--extractor", help="directory of a fitted extractor, or where to save the one fitted here")
    p.add_argument("--data-root", help="directory holding the source's raw files (data.root)")
    p.add_argument("--max-train-s", type=float, default=float("inf"), help="stop a family's training after this long")
    p.add_argument("--out", help="directory for grids.tar")
    p.add_argument("--set", nargs="*", default=[], help="spec overrides for every spec (a quick look: train.steps=20)")
    a = p.parse_args()
    device = torch.device(a.device)
    grids = {}
    for path in a.specs:
        row, grids[Path(path).stem] = run_spec(path, a, device)
        print(json.dumps({"benchmark": "full_recipes", "device": torch.cuda.get_device_name() if device.type == "cuda"
                          else "cpu", "torch": torch.__version__, **row}), flush=True)
        if a.out:  # after every spec: a later one that runs out of time leaves the earlier grids
            Path(a.out).mkdir(parents=True, exist_ok=True)
            with tarfile.open(Path(a.out, "grids.tar"), "w") as tar:
                for name, png in grids.items():
                    info = tarfile.TarInfo(f"{name}.png")
                    info.size = len(png)
                    tar.addfile(info, io.BytesIO(png))


if __name__ == "__main__":
    main()
