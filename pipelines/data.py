"""prepare, data half: a dataset source -> train/val/test shards + manifest.

Sources are the built-in sets (fashion_mnist, mnist, digits) and `image_folder`,
the user's own images (see `images`). Shards are `.npz` files (x: uint8 NCHW,
y: int64) written through `storage`, so the same code writes a local directory
or an S3 prefix; a shard's name carries its content hash, so a new version of
the data never overwrites the shards an older manifest points to. The manifest
records each shard's SHA-256 and one content hash over all splits, the data
version that training, evaluation and the registry carry along.

Torch is imported inside the functions that make tensors: the train stage's
job, which imports no torch (pipelines/train.py), checks the shards here.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import sys
import tempfile
import time
import zipfile
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipelines import images, storage
from pipelines.errors import InvalidInput

if TYPE_CHECKING:
    import torch

    from pipelines.config import DataSpec

SOURCES = ("fashion_mnist", "mnist", "digits")  # the built-in sets; image_folder is the user's own
SPLITS = ("train", "val", "test")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# idx file stems, as published by LeCun / Zalando and unpacked by torchvision
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
# torchvision's folder name under root for each source
TORCHVISION_DIRS = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST"}


@dataclass(frozen=True)
class RawData:
    x_train: np.ndarray  # uint8 (N, C, H, W)
    y_train: np.ndarray  # int64 (N,)
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    origin: str = ""  # where the set was read from: the lineage's source URI


# -----------------------------------------------------------------------------
# sources


def load_source(source: str, root: str | None) -> RawData:
    if source == "digits":
        return _digits()
    if source not in TORCHVISION_DIRS:
        raise InvalidInput(f"unknown data source {source!r}; allowed: {', '.join(SOURCES)}")
    dirs = []
    if root is not None:
        dirs += [Path(root, TORCHVISION_DIRS[source], "raw"), Path(root)]
    if source == "fashion_mnist":
        dirs.append(DEBIAN_FASHION_MNIST)
    for d in dirs:
        files = _idx_files(d)
        if files is not None:
            return _from_idx(files, d)
    tried = ", ".join(str(d) for d in dirs) or "nowhere (no root given, and no system copy of this source)"
    if root is not None:
        _download(source, root, tried)
        files = _idx_files(dirs[0])
        if files is not None:
            return _from_idx(files, dirs[0])
    raise InvalidInput(f"{source}: idx files ({', '.join(IDX_FILES.values())}, optionally .gz) not found in {tried}")


def _idx_files(d: Path) -> dict[str, Path] | None:
    """The four idx files in `d`, gzipped or not, or None unless all four are there."""
    files = {}
    for key, stem in IDX_FILES.items():
        found = [p for p in (d / stem, d / f"{stem}.gz") if p.is_file()]
        if not found:
            return None
        files[key] = found[0]
    return files


def _download(source: str, root: str, tried: str) -> None:
    import torchvision

    dataset = {"fashion_mnist": torchvision.datasets.FashionMNIST, "mnist": torchvision.datasets.MNIST}[source]
    try:
        dataset(root, train=True, download=True)
        dataset(root, train=False, download=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; torchvision gives up with RuntimeError
        where = Path(root, TORCHVISION_DIRS[source], "raw")
        reason = " ".join(str(e).split())  # torchvision lists every mirror on its own line; exit 2 wants one line
        raise InvalidInput(f"{source}: no idx files in {tried}, "
                           f"and the download into {where} failed: {reason}") from None


def _read_idx(path: Path) -> np.ndarray:
    """One idx file: 2 zero bytes, a dtype code (0x08 = uint8), ndim, big-endian u32 dims, data."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise InvalidInput(f"{path}: unreadable idx file: {e}") from None
    ndim = raw[3] if len(raw) >= 4 else 0
    if raw[:3] != b"\x00\x00\x08" or ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise InvalidInput(f"{path}: not a uint8 idx file")
    shape = tuple(int(n) for n in np.frombuffer(raw, ">u4", ndim, offset=4))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise InvalidInput(f"{path}: header says {shape} but holds {data.size} bytes, truncated?")
    return data.reshape(shape).copy()  # frombuffer views immutable bytes; callers get ordinary writable arrays


def _from_idx(files: dict[str, Path], where: Path) -> RawData:
    a = {key: _read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        x, y = a[f"x_{split}"], a[f"y_{split}"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise InvalidInput(f"{files[f'x_{split}'].parent}: {split} images {x.shape} do not match labels {y.shape}")
    return RawData(
        x_train=a["x_train"][:, None], y_train=a["y_train"].astype(np.int64),
        x_test=a["x_test"][:, None], y_test=a["y_test"].astype(np.int64),
        num_classes=10, origin=str(where.absolute()),
    )


def _digits() -> RawData:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.rint(d.images * (255 / 16)).astype(np.uint8)[:, None]  # 0..16 grey levels -> 0..255
    y = d.target.astype(np.int64)
    # sklearn orders the digits by writer; a fixed permutation spreads writers over both halves
    perm = np.random.default_rng(0).permutation(len(x))
    n_train = int(0.8 * len(x))
    tr, te = perm[:n_train], perm[n_train:]
    return RawData(x_train=x[tr], y_train=y[tr], x_test=x[te], y_test=y[te], num_classes=10,
                   origin="sklearn.datasets.load_digits")


def convert(raw: RawData, name: str, image_size: int | None, channels: int | None) -> RawData:
    """A built-in set at data.image_size x data.channels, through the same conversion as an image folder
    (None: the set's own). Its images are never upscaled either."""
    c, size = raw.x_train.shape[1], raw.x_train.shape[-1]
    image_size, channels = image_size or size, channels or c
    if (image_size, channels) == (size, c):
        return raw
    if image_size > size:
        raise InvalidInput(f"{name} images are {size}x{size}, smaller than data.image_size {image_size} "
                           "(images are never upscaled)")
    from PIL import Image

    def each(x: np.ndarray) -> np.ndarray:
        out = np.empty((len(x), channels, image_size, image_size), np.uint8)
        for i, im in enumerate(x):
            out[i] = images.to_array(Image.fromarray(im[0], "L"), image_size, channels)
        return out

    return RawData(x_train=each(raw.x_train), y_train=raw.y_train, x_test=each(raw.x_test), y_test=raw.y_test,
                   num_classes=raw.num_classes, origin=raw.origin)


# -----------------------------------------------------------------------------
# npz bytes, reproducible to the byte


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """What np.savez writes, but with a fixed zip timestamp: np.savez stamps the
    current time into every member, so equal arrays would get a new SHA-256 on
    every run and the manifest's checksums could never be compared."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, a in arrays.items():
            with zf.open(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(a), allow_pickle=False)
    return buf.getvalue()


def load_npz(data: bytes, what: str) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise InvalidInput(f"{what} is corrupt: not a readable npz ({type(e).__name__}: {e})") from None


# -----------------------------------------------------------------------------
# shards and manifest


def split_and_shard(raw: RawData, *, val_fraction: float, seed: int, shard_size: int, out_uri: str) -> dict:
    if not 0.0 <= val_fraction < 1.0:
        raise InvalidInput(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_size < 1:
        raise InvalidInput(f"shard_size must be >= 1, got {shard_size}")
    perm = np.random.default_rng(seed).permutation(len(raw.x_train))
    n_val = round(val_fraction * len(perm))
    # train keeps the permuted order, so every shard (and every rank's slice) mixes all classes
    splits = {
        "train": (raw.x_train[perm[n_val:]], raw.y_train[perm[n_val:]]),
        "val": (raw.x_train[perm[:n_val]], raw.y_train[perm[:n_val]]),
        "test": (raw.x_test, raw.y_test),
    }
    h = hashlib.sha256(json.dumps({"shape": raw.x_train.shape[1:], "num_classes": raw.num_classes}).encode())
    manifest = {"shape": list(raw.x_train.shape[1:]), "num_classes": raw.num_classes, "splits": {}}
    for split, (x, y) in splits.items():
        h.update(f"{split}:{len(x)}".encode())
        h.update(np.ascontiguousarray(x).tobytes())
        h.update(y.astype("<i8").tobytes())
        writer = SplitWriter(out_uri, split, shard_size)
        writer.add(x, y)
        manifest["splits"][split] = writer.close()
    manifest["data_hash"] = h.hexdigest()
    return manifest


class SplitWriter:
    """One split's shards, written as its images arrive in order: each full shard as soon as it is."""

    def __init__(self, out_uri: str, split: str, shard_size: int):
        self.out_uri, self.split, self.shard_size = out_uri, split, shard_size
        self.xs: list[np.ndarray] = []
        self.ys: list[np.ndarray] = []
        self.buffered = self.count = 0
        self.shards: list[dict] = []

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        self.xs.append(x)
        self.ys.append(y.astype(np.int64))
        self.buffered += len(x)
        self.count += len(x)
        while self.buffered >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, n: int) -> None:
        x, y = np.concatenate(self.xs), np.concatenate(self.ys)
        self.xs, self.ys, self.buffered = [x[n:]], [y[n:]], len(x) - n
        blob = npz_bytes({"x": x[:n], "y": y[:n]})
        sha = storage.sha256(blob)
        uri = storage.join(self.out_uri, f"{self.split}-{len(self.shards):05d}-{sha[:12]}.npz")
        storage.write_bytes(uri, blob)
        self.shards.append({"uri": uri, "sha256": sha, "count": n})

    def close(self) -> dict:
        if self.buffered:
            self._flush(self.buffered)
        return {"count": self.count, "shards": self.shards}


# -----------------------------------------------------------------------------
# prepare: any source -> shards + manifest

DECODE_BATCH = 64  # files per Ray task: a few hundred milliseconds of decoding, against ~1 ms of overhead


def prepare(d: DataSpec, *, seed: int, out_uri: str, parallel: bool = True) -> dict:
    """The source `d` names, split, converted and sharded under `out_uri`: the manifest. Its `source`
    entry says where the images came from and, for an image folder, what was skipped.
    `parallel`: decode an image folder in Ray tasks on the cluster this process is connected to."""
    if d.source == "image_folder":
        return _image_folder(d, out_uri, parallel)
    raw = convert(load_source(d.source, d.root), d.source, d.image_size, d.channels)
    print(f"sharding {d.source}: {len(raw.x_train)} train, {len(raw.x_test)} test images -> {out_uri}", flush=True)
    manifest = split_and_shard(raw, val_fraction=d.val_fraction, seed=seed, shard_size=d.shard_size, out_uri=out_uri)
    return manifest | {"source": {"kind": d.source, "uri": raw.origin, "labels": "built-in", "classes": None}}


def _image_folder(d: DataSpec, out_uri: str, parallel: bool) -> dict:
    size, channels = d.image_size, d.channels or 3
    with images.open_source(d.uri) as source:
        labels, classes = images.read_labels(source, d.labels)
        bad: list[str] = []

        def reject(name: str, why: str) -> None:
            if d.on_bad_image == "error":
                raise InvalidInput(f"{source.where(name)} {why} (data.on_bad_image: skip would skip it)")
            bad.append(f"{source.where(name)} {why}")

        usable = []
        for name, label in labels.items():  # in sorted order: the first offending path is the first listed
            if not name.lower().endswith(images.IMAGE_SUFFIXES):
                reject(name, "is not a PNG, JPEG or WebP file")
            elif label is None:
                reject(name, "has no label" + (" (it is in no class folder)" if d.labels == "subfolders"
                                               else f" in {d.labels}"))
            else:
                usable.append(name)
        split = {n: images.split_of(n, val_fraction=d.val_fraction, test_fraction=d.test_fraction) for n in usable}
        for s in SPLITS:
            if s not in split.values():
                raise InvalidInput(f"data.uri {d.uri}: none of its {len(usable)} images falls in the {s} split "
                                   "(each image's split comes from a hash of its path): add images")
        order = images.ordered(usable)
        writers = {s: SplitWriter(out_uri, s, d.shard_size) for s in SPLITS}
        x_hash, y_hash = {s: hashlib.sha256() for s in SPLITS}, {s: hashlib.sha256() for s in SPLITS}
        batches = [order[i:i + DECODE_BATCH] for i in range(0, len(order), DECODE_BATCH)]
        progress = _Progress(len(order), f"decoding {len(order)} images from {d.uri} at {size}x{size}x{channels}")
        with ThreadPoolExecutor(16, thread_name_prefix="read") as pool:
            files = (images.read_many(source, names, pool) for names in batches)
            for names, decoded in zip(batches, _decode_in_order(files, size, channels, parallel)):
                ok: dict[str, tuple[list, list]] = {s: ([], []) for s in SPLITS}
                for name, a in zip(names, decoded):
                    if isinstance(a, str):
                        reject(name, a)
                    else:
                        ok[split[name]][0].append(a)
                        ok[split[name]][1].append(labels[name])
                for s, (xs, ys) in ok.items():
                    if xs:
                        x, y = np.stack(xs), np.array(ys, np.int64)
                        x_hash[s].update(x.tobytes())
                        y_hash[s].update(y.astype("<i8").tobytes())
                        writers[s].add(x, y)
                progress.update(len(names), len(bad))
    if bad:
        print(f"bad files skipped (data.on_bad_image: skip): {len(bad)}; the first: {bad[0]}", file=sys.stderr,
              flush=True)
    splits = {s: w.close() for s, w in writers.items()}
    empty = [s for s in SPLITS if not splits[s]["count"]]
    if empty:
        raise InvalidInput(f"data.uri {d.uri}: the {empty[0]} split has no usable image left "
                           f"({len(bad)} skipped as bad; the first: {bad[0] if bad else '-'})")
    num_classes = len(classes) if classes else 1  # unlabeled: every image is class 0
    # The data version: the pixels and labels of each split in order (each file's split and place come
    # from its path), and what the labels' indices name; not listing order, mtimes or where the source is.
    h = hashlib.sha256(json.dumps({"shape": [channels, size, size], "num_classes": num_classes,
                                   "classes": classes}).encode())
    for s in SPLITS:
        h.update(f"{s}:{splits[s]['count']}".encode())
        h.update(x_hash[s].digest())
        h.update(y_hash[s].digest())
    return {"shape": [channels, size, size], "num_classes": num_classes, "splits": splits,
            "data_hash": h.hexdigest(),
            "source": {"kind": "image_folder", "uri": d.uri, "labels": d.labels, "classes": classes,
                       "files": len(labels), "bad": len(bad), "bad_first": bad[:20]}}


def _decode_in_order(files: Iterable[list[bytes | str]], size: int, channels: int,
                     parallel: bool) -> Iterator[list[np.ndarray | str]]:
    """decode_batch over the batches, results in the batches' order. In parallel: one Ray task per batch,
    at most two per cluster CPU in flight, so the driver holds a bounded window of files and pixels."""
    if not parallel:
        yield from (images.decode_batch(f, size, channels) for f in files)
        return
    import ray

    # A stage job's process connects to the cluster it runs on; Ray's own INFO lines would bury the progress.
    ray.init(log_to_driver=False, logging_level=logging.WARNING, ignore_reinit_error=True)
    if ray.available_resources().get("CPU", 0) < 1:
        # Tasks would wait for a CPU, and the one this job's driver holds may be the cluster's last.
        print("no free CPU in the cluster: decoding in this process", file=sys.stderr, flush=True)
        yield from _decode_in_order(files, size, channels, parallel=False)
        return
    task = ray.remote(num_cpus=1)(images.decode_batch)
    window = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    pending: deque = deque()
    try:
        for batch in files:
            pending.append(task.remote(batch, size, channels))
            if len(pending) >= window:
                yield ray.get(pending.popleft())
        while pending:
            yield ray.get(pending.popleft())
    finally:
        for ref in pending:  # a bad image stopped the run: the rest is not needed
            ray.cancel(ref)


class _Progress:
    """A line on stderr at every tenth of the work and at least every 10 s: a progress bar that reads
    well in a Ray job's log."""

    def __init__(self, total: int, what: str):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        self.shown_at, self.shown_tenth = self.t0, 0
        print(what, file=sys.stderr, flush=True)

    def update(self, n: int, bad: int) -> None:
        self.done += n
        now, tenth = time.perf_counter(), 10 * self.done // max(self.total, 1)
        if tenth > self.shown_tenth or now - self.shown_at >= 10:
            self.shown_at, self.shown_tenth = now, tenth
            rate = self.done / max(now - self.t0, 1e-9)
            print(f"  {self.done}/{self.total} images ({100 * self.done // max(self.total, 1)}%), {rate:.0f}/s"
                  f"{f', {bad} bad' if bad else ''}", file=sys.stderr, flush=True)


def load_split(manifest: dict, split: str, *, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's part of a split: a contiguous slice of count // world_size
    samples, so all DDP ranks run the same number of steps (the last
    count % world_size samples are dropped, as DistributedSampler(drop_last=True)
    does). Only the shards that overlap the slice are read."""
    import torch

    if split not in manifest["splits"]:
        raise InvalidInput(f"split {split!r} not in manifest; it has {', '.join(manifest['splits'])}")
    if not 0 <= rank < world_size:
        raise InvalidInput(f"rank {rank} is outside world_size {world_size}")
    info = manifest["splits"][split]
    per_rank = info["count"] // world_size
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    xs, ys, start = [], [], 0
    for shard in info["shards"]:
        end = start + shard["count"]
        if start < hi and end > lo:
            arrays = load_npz(storage.read_verified(shard["uri"], shard["sha256"]), shard["uri"])
            x, y = arrays.get("x"), arrays.get("y")
            if (x is None or y is None or x.dtype != np.uint8 or y.dtype != np.int64
                    or len(x) != shard["count"] or len(y) != shard["count"] or list(x.shape[1:]) != manifest["shape"]):
                raise InvalidInput(f"{shard['uri']} is corrupt: its arrays do not match the manifest")
            xs.append(x[max(lo - start, 0):hi - start])
            ys.append(y[max(lo - start, 0):hi - start])
        start = end
    if not xs:
        return torch.empty(0, *manifest["shape"], dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


# -----------------------------------------------------------------------------
# a split read in place: what training streams from

SHARD_CACHE_ENV = "GENPIPE_SHARD_CACHE"  # where a node keeps the S3 shards it trains on


class ShardedImages:
    """A split's images, read by index from its shard files in place: only the labels are held in memory.

    A shard is an uncompressed npz (a zip of .npy files, stored, not deflated), so image i of a shard is
    `item` bytes at a fixed offset in the file, and a batch is one positioned read per image. The OS page
    cache keeps what is read often; the process itself holds one batch. A local shard is read where it
    is; an S3 shard is first copied, verified, into a node-local cache (GENPIPE_SHARD_CACHE, default
    {tmp}/genpipe-shards), which every rank on the node shares: training draws a fresh random order each
    epoch (`steps.StepBatches`), and random reads from S3 itself would cost a request per image.

    Indexed by a tensor of indices, a slice or an int, it returns a uint8 tensor as the in-memory split
    does, so StepBatches and the evaluation's batches take either.
    """

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.image_shape)

    def __init__(self, manifest: dict, split: str):
        import torch

        if split not in manifest["splits"]:
            raise InvalidInput(f"split {split!r} not in manifest; it has {', '.join(manifest['splits'])}")
        self.device = torch.device("cpu")  # where indices are built for it (StepBatches)
        self.dtype = torch.uint8
        self.image_shape = tuple(manifest["shape"])
        self.item = int(np.prod(self.image_shape))
        self.files, self.x_offsets, labels = [], [], []
        self.uris = [shard["uri"] for shard in manifest["splits"][split]["shards"]]
        for shard in manifest["splits"][split]["shards"]:
            f = open(_local_shard(shard), "rb", buffering=0)  # noqa: SIM115 - open for this object's life
            x_at = _array_at(f, "x", np.uint8, (shard["count"], *self.image_shape), shard["uri"])
            y_at = _array_at(f, "y", np.int64, (shard["count"],), shard["uri"])
            labels.append(np.frombuffer(os.pread(f.fileno(), 8 * shard["count"], y_at), "<i8"))
            self.files.append(f)
            self.x_offsets.append(x_at)
        counts = [s["count"] for s in manifest["splits"][split]["shards"]]
        self.starts = np.cumsum([0, *counts])
        self.y = torch.from_numpy(np.concatenate(labels) if labels else np.empty(0, np.int64)).clone()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, idx: torch.Tensor | slice | int) -> torch.Tensor:
        import torch

        if isinstance(idx, slice):
            idx = np.arange(*idx.indices(len(self)))
        elif np.ndim(idx) == 0:  # an int, numpy's or a 0-d tensor: one image, counted from the end if negative
            return self[torch.tensor([range(len(self))[int(idx)]])][0]
        idx = np.asarray(idx, np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"indices {idx.min()}..{idx.max()} outside a split of {len(self)} images")
        out = np.empty((len(idx), self.item), np.uint8)
        shards = np.searchsorted(self.starts, idx, side="right") - 1
        for row, (s, i) in enumerate(zip(shards.tolist(), (idx - self.starts[shards]).tolist())):
            if os.preadv(self.files[s].fileno(), [out[row]], self.x_offsets[s] + i * self.item) != self.item:
                raise InvalidInput(f"{self.uris[s]} is corrupt: shorter than its header says")
        return torch.from_numpy(out).view(len(idx), *self.image_shape)


def _array_at(f, name: str, dtype, shape: tuple[int, ...], uri: str) -> int:
    """Where array `name` of the npz open as `f` starts in the file, checked against what the manifest says."""
    try:
        info = zipfile.ZipFile(f).getinfo(f"{name}.npy")
        f.seek(info.header_offset)
        local = f.read(30)  # a zip local file header, then the name and the extra field
        if info.compress_type != zipfile.ZIP_STORED or local[:4] != b"PK\x03\x04":
            raise ValueError("not a stored member")
        f.seek(info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little"))
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        got_shape, fortran, got_dtype = read_header(f)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise InvalidInput(f"{uri} is corrupt: not a readable npz ({type(e).__name__}: {e})") from None
    if fortran or got_dtype != np.dtype(dtype).newbyteorder("<") or tuple(got_shape) != shape:
        raise InvalidInput(f"{uri} is corrupt: its arrays do not match the manifest")
    return f.tell()


def _local_shard(shard: dict) -> str:
    """A local path holding the shard: the file itself, or, for S3, this node's verified copy."""
    if not storage.is_s3(shard["uri"]):
        return shard["uri"]
    path = _cache_path(shard)
    if path.exists():
        return str(path)
    from pipelines.tracking import file_lock

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # the default is in a /tmp other users share
    with file_lock(path.with_suffix(".lock")):  # the node's other ranks wait, then find it there
        if not path.exists():
            tmp = path.with_suffix(f".{os.getpid()}.part")
            try:
                storage.download(shard["uri"], str(tmp))
                _verify_file(tmp, shard)
            except FileNotFoundError:
                raise InvalidInput(f"{shard['uri']} is missing") from None
            except InvalidInput:
                tmp.unlink()
                raise
            os.replace(tmp, path)
    return str(path)


def _cache_path(shard: dict) -> Path:
    """Where this node keeps its copy of an S3 shard, named by content: the right file or none."""
    cache = Path(os.environ.get(SHARD_CACHE_ENV) or Path(tempfile.gettempdir(), "genpipe-shards"))
    return cache / f"{shard['sha256']}.npz"


def _verify_file(path, shard: dict) -> None:
    """The file at `path` is the shard prepare wrote (InvalidInput if not), hashed a MiB at a time."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except FileNotFoundError:
        raise InvalidInput(f"{shard['uri']} is missing") from None
    storage.check_sha256(shard["uri"], h.hexdigest(), shard["sha256"])


def verify_split(manifest: dict, split: str) -> None:
    """Every shard of the split is there and is what prepare wrote (InvalidInput if not): a local shard
    where it is, an S3 one in this node's cache (copied there first if need be), where the node's workers
    then find it."""
    for shard in manifest["splits"][split]["shards"]:
        if not storage.is_s3(shard["uri"]):
            _verify_file(shard["uri"], shard)
            continue
        cached = _cache_path(shard)
        if cached.exists():  # copied by an earlier run: damaged since, it is fetched again
            try:
                _verify_file(cached, shard)
                continue
            except InvalidInput:
                cached.unlink(missing_ok=True)
        _local_shard(shard)  # copied and checked on its way in
