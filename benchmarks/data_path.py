"""The train workers' data path: a split read in place from its shards (`data.ShardedImages`)
against the same images held in memory, and against Ray Data.

    .venv/bin/python benchmarks/data_path.py              # ~6 minutes on the 2-core VM
    python3 benchmarks/data_path.py --device cuda --batch 256 --training-only   # on a GPU (no Ray, S3 or moto)

Three measurements, on random 64x64 RGB images (and 32x32 for the loader):
    loader    img/s of batches alone (no model): in memory, read in place from local shards,
              the first read of S3 shards (a moto server on 127.0.0.1: the copy into the node cache),
              and Ray Data (`read_numpy` over the same images, `iter_torch_batches` with a local
              shuffle buffer): what `ray.train.get_dataset_shard` would feed a worker
    training  DCGAN (the family's defaults) at 64x64 RGB, batch 64: img/s of `run_steps` over the
              split in memory (on the device, as workers held it) and read in place, rounds
              interleaved; the ratio is read in place / memory
    memory    peak RSS of a process that trains 20 such steps over 1x and 10x the images, read in
              place and held in memory (what a worker did before)
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from gen_models import registry
from gen_models.base import StepContext
from pipelines import data, storage
from pipelines.steps import StepBatches, run_steps


def shards(n: int, size: int, out: str) -> dict:
    """n random images as a prepared split (all train: val and test empty of interest)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    y = np.zeros(n, np.int64)
    raw = data.RawData(x_train=x, y_train=y, x_test=x[:1], y_test=y[:1], num_classes=1)
    return data.split_and_shard(raw, val_fraction=0.0, seed=0, shard_size=5000, out_uri=out)


def loader_img_s(x, y, steps: int) -> float:
    batches = StepBatches(x, y, global_batch=256, seed=0, rank=0, world=1)
    batches.batch(0, torch.device("cpu"))
    t = time.perf_counter()
    for step in range(1, steps + 1):
        batches.batch(step, torch.device("cpu"))
    return steps * 256 / (time.perf_counter() - t)


def ray_data_img_s(m: dict, tmp: str, steps: int) -> float:
    """Ray Data over the same images: one .npy per shard, read as a stream, shuffled in a local buffer."""
    import ray

    paths = []
    for i, shard in enumerate(m["splits"]["train"]["shards"]):
        x = data.load_npz(storage.read_bytes(shard["uri"]), shard["uri"])["x"]
        paths.append(str(Path(tmp, f"ray-{i}.npy")))
        np.save(paths[-1], x)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        ds = ray.data.read_numpy(paths)
        done, t = -1, 0.0
        while done < steps:  # epoch after epoch, each a new pass over the files, as a worker's would be
            for batch in ds.iter_torch_batches(batch_size=256, local_shuffle_buffer_size=2048, drop_last=True):
                done += 1
                if done == 0:
                    t = time.perf_counter()  # the first batch: the pipeline's start-up, as the others' warm-up
                if done == steps:
                    break
        return steps * 256 / (time.perf_counter() - t)
    finally:
        ray.shutdown()


class MotoS3:
    """A moto S3 server on 127.0.0.1 for the run, with the environment pointed at it."""

    def __enter__(self):
        port = 5000 + os.getpid() % 1000
        self.proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1",
                                      "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_DEFAULT_REGION="us-east-1")
        storage._s3().create_bucket(Bucket="bench")
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(10)


def s3_first_read_img_s(m: dict, tmp: str, prefix: str) -> float:
    """The first read of the split from S3: the copy of every shard into the node cache (then as local)."""
    os.environ["GENPIPE_SHARD_CACHE"] = str(Path(tmp, "cache"))
    on_s3 = json.loads(json.dumps(m))
    for src, shard in zip(m["splits"]["train"]["shards"], on_s3["splits"]["train"]["shards"]):
        shard["uri"] = f"s3://bench/{prefix}/{Path(src['uri']).name}"
        storage.write_bytes(shard["uri"], Path(src["uri"]).read_bytes())
    t = time.perf_counter()
    data.ShardedImages(on_s3, "train")
    return on_s3["splits"]["train"]["count"] / (time.perf_counter() - t)


def train_img_s(x, y, steps: int, batch: int = 64, device: torch.device | None = None) -> float:
    device = device or torch.device("cpu")
    torch.manual_seed(0)
    model = registry.build("dcgan", {"image_size": 64, "channels": 3}).to(device)
    ctx = StepContext(optimizers=model.configure_optimizers(), device_type=device.type)
    batches = StepBatches(x, y, global_batch=batch, seed=0, rank=0, world=1)
    for _ in run_steps(model, ctx, batches, start=0, stop=2, seed=0, device=device,
                       report_due=lambda s: False):  # warm-up steps
        pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in run_steps(model, ctx, batches, start=2, stop=2 + steps, seed=0, device=device,
                       report_due=lambda s: False):
        pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * batch / (time.perf_counter() - t)


def training_ratio(m: dict, a, out: dict) -> None:
    device = torch.device(a.device)
    x, y = data.load_split(m, "train")
    x, y = x.to(device), y.to(device)
    s = data.ShardedImages(m, "train")
    rounds = {"memory": [], "in_place": []}
    for _ in range(a.rounds):  # interleaved: the machine's drift hits both alike
        rounds["memory"].append(train_img_s(x, y, a.steps, a.batch, device))
        rounds["in_place"].append(train_img_s(s, s.y, a.steps, a.batch, device))
    med = {k: statistics.median(v) for k, v in rounds.items()}
    ratio = med["in_place"] / med["memory"]
    print(f"\ntraining dcgan 64x64 RGB on {a.device}, batch {a.batch}: memory {med['memory']:.0f} img/s, "
          f"in place {med['in_place']:.0f} img/s, ratio {ratio:.3f} (median of {a.rounds} interleaved rounds)")
    out["training"] = {"device": a.device, "batch": a.batch, "memory_img_s": round(med["memory"], 1),
                       "in_place_img_s": round(med["in_place"], 1), "ratio": round(ratio, 3),
                       "rounds": {k: [round(r, 1) for r in v] for k, v in rounds.items()}}


def peak_rss_child(manifest_path: str, mode: str) -> None:
    """Train 20 steps over the split (read in place, or loaded whole as a worker did), print peak RSS."""
    m = json.loads(Path(manifest_path).read_text())
    if mode == "in_place":
        x = data.ShardedImages(m, "train")
        y = x.y
    else:
        x, y = data.load_split(m, "train")
    train_img_s(x, y, steps=20)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over an exec, so a child would report its parent's peak.
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    print(int(hwm.split()[1]) / 1024)  # KiB -> MiB


def peak_rss(m: dict, tmp: str, mode: str) -> float:
    path = Path(tmp, f"manifest-{m['splits']['train']['count']}.json")
    path.write_text(json.dumps(m))
    out = subprocess.run([sys.executable, __file__, "--child", str(path), mode], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=4000, help="the 1x dataset (the 10x one is ten times this)")
    ap.add_argument("--steps", type=int, default=15, help="training steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64, help="training batch")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--training-only", action="store_true", help="only the training ratio (what a GPU adds)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return peak_rss_child(*a.child)
    torch.set_num_threads(2)
    out: dict = {"benchmark": "data_path", "images": a.images}
    with tempfile.TemporaryDirectory() as tmp:
        if a.training_only:
            training_ratio(shards(a.images, 64, str(Path(tmp, "train"))), a, out)
            print(json.dumps(out))
            return None
        print(f"{'loader (no model), batch 256':40} {'img/s':>10}")
        loader = {}
        with MotoS3():
            for size in (32, 64):
                m = shards(a.images, size, str(Path(tmp, f"s{size}")))
                x, y = data.load_split(m, "train")
                loader[f"{size}/memory"] = loader_img_s(x, y, 200)
                loader[f"{size}/in_place"] = loader_img_s(data.ShardedImages(m, "train"), y, 200)
                loader[f"{size}/s3_first_read"] = s3_first_read_img_s(m, tmp, f"s{size}")
                loader[f"{size}/ray_data"] = ray_data_img_s(m, tmp, 50)
        for k, v in loader.items():
            print(f"{k:40} {v:10,.0f}")
        out["loader_img_s"] = {k: round(v) for k, v in loader.items()}

        m = shards(a.images, 64, str(Path(tmp, "train")))
        training_ratio(m, a, out)

        big = shards(10 * a.images, 64, str(Path(tmp, "big")))
        rss = {f"{mode}/{n}x": peak_rss(mm, tmp, mode) for n, mm in ((1, m), (10, big))
               for mode in ("in_place", "memory")}
        print(f"\n{'peak RSS, 20 training steps':40} {'MiB':>10}")
        for k, v in rss.items():
            print(f"{k:40} {v:10,.0f}")
        growth = rss["in_place/10x"] / rss["in_place/1x"] - 1
        print(f"read in place: 10x the images ({10 * a.images:,}, {big['splits']['train']['count'] * 64 * 64 * 3 / 2**20:,.0f} MiB) "
              f"-> peak RSS {growth:+.1%}")
        out["peak_rss_mib"] = {k: round(v, 1) for k, v in rss.items()}
        out["rss_growth_10x"] = round(growth, 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
