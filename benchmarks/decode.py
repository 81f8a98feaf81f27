"""What an image folder costs prepare: CPU per image by kind of file, then a whole folder through
`data.prepare` decoded by Ray tasks on this machine's CPUs.

    .venv/bin/python benchmarks/decode.py                  # 2,000 files
    .venv/bin/python benchmarks/decode.py --files 20000 --size 64

Per-image figures are CPU time (one decode is single-threaded), so they hold on a busy machine; the
folder figure is wall time, files per second over all CPUs, and needs an idle one. The files are
patches of scikit-learn's sample photos (no download). Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

from PIL import Image
from sklearn.datasets import load_sample_images

from pipelines import data, images
from pipelines.config import DataSpec


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def per_image(size: int) -> dict[str, float]:
    """CPU milliseconds per decode of one file of each kind, over 2 s of repeats."""
    photo = Image.fromarray(load_sample_images().images[0])  # 640x427
    big = photo.resize((4000, 3000))  # a 12-megapixel phone photo
    cases = {
        "12 MP JPEG": encode(big, "JPEG", quality=90),
        "640x427 JPEG": encode(photo, "JPEG", quality=90),
        "640x427 PNG": encode(photo, "PNG"),
        "640x427 WebP": encode(photo, "WEBP", quality=90),
        "256x256 PNG": encode(photo.crop((0, 0, 256, 256)), "PNG"),
    }
    out = {}
    for name, blob in cases.items():
        n, t0 = 0, time.process_time()
        while time.process_time() - t0 < 2:
            images.decode(blob, size, 3)
            n += 1
        out[name] = 1000 * (time.process_time() - t0) / n
    return out


def folder(n: int, root: Path) -> Path:
    """n JPEG patches, 200 to 400 px, of the two sample photos, in two class folders."""
    photos = load_sample_images().images
    for i in range(n):
        p = photos[i % 2]
        side = 200 + (i * 37) % 200
        y, x = (i * 53) % (p.shape[0] - side), (i * 97) % (p.shape[1] - side)
        path = root / ("china", "flower")[i % 2] / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(p[y:y + side, x:x + side]).save(path, quality=90)
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--size", type=int, default=64)
    a = p.parse_args()
    costs = per_image(a.size)
    print(f"decode to {a.size}x{a.size}x3, CPU ms per image:")
    for name, ms in costs.items():
        print(f"  {name:14s} {ms:7.2f}")
    import ray

    cpus = os.cpu_count() or 1
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="WARNING")
    with tempfile.TemporaryDirectory() as tmp:
        src = folder(a.files, Path(tmp, "photos"))
        spec = DataSpec(source="image_folder", uri=str(src), image_size=a.size, labels="subfolders")
        wall = {}
        for parallel in (False, True):  # one process, then Ray tasks over every CPU
            t0 = time.perf_counter()
            m = data.prepare(spec, seed=0, out_uri=str(Path(tmp, f"out-{parallel}")), parallel=parallel)
            wall[parallel] = time.perf_counter() - t0
    ray.shutdown()
    rate = a.files / wall[True]
    print(f"folder of {a.files} JPEGs (200-400 px) -> {a.size}x{a.size}x3 shards: one process {wall[False]:.1f} s, "
          f"Ray tasks on {cpus} CPUs {wall[True]:.1f} s ({wall[False] / wall[True]:.2f}x), {rate:.0f} files/s; "
          f"100,000 such files: {100_000 / rate / 60:.1f} min")
    print(json.dumps({"bench": "decode", "size": a.size, "cpu_ms_per_image": costs, "files": a.files, "cpus": cpus,
                      "serial_s": wall[False], "ray_s": wall[True], "files_per_s": rate, "data_hash": m["data_hash"][:16]}))


if __name__ == "__main__":
    main()
