"""prepare, data half: a dataset source -> train/val/test shards + manifest.

Shards are `.npz` files (x: uint8 NCHW, y: int64) written through `storage`,
so the same code writes a local directory or an S3 prefix. The manifest
records each shard's SHA-256 and one content hash over all splits, the data
version that training, evaluation and the registry carry along.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines import storage
from pipelines.errors import InvalidInput

SOURCES = ("fashion_mnist", "mnist", "digits")
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
            return _from_idx(files)
    tried = ", ".join(str(d) for d in dirs) or "nowhere (no root given, and no system copy of this source)"
    if root is not None:
        _download(source, root, tried)
        files = _idx_files(dirs[0])
        if files is not None:
            return _from_idx(files)
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


def _from_idx(files: dict[str, Path]) -> RawData:
    a = {key: _read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        x, y = a[f"x_{split}"], a[f"y_{split}"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise InvalidInput(f"{files[f'x_{split}'].parent}: {split} images {x.shape} do not match labels {y.shape}")
    return RawData(
        x_train=a["x_train"][:, None], y_train=a["y_train"].astype(np.int64),
        x_test=a["x_test"][:, None], y_test=a["y_test"].astype(np.int64),
        num_classes=10,
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
    return RawData(x_train=x[tr], y_train=y[tr], x_test=x[te], y_test=y[te], num_classes=10)


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
        shards = []
        for i, lo in enumerate(range(0, len(x), shard_size)):
            x_shard, y_shard = x[lo:lo + shard_size], y[lo:lo + shard_size]
            blob = npz_bytes({"x": x_shard, "y": y_shard.astype(np.int64)})
            uri = storage.join(out_uri, f"{split}-{i:05d}.npz")
            storage.write_bytes(uri, blob)
            shards.append({"uri": uri, "sha256": storage.sha256(blob), "count": len(x_shard)})
        manifest["splits"][split] = {"count": len(x), "shards": shards}
    manifest["data_hash"] = h.hexdigest()
    return manifest


def load_split(manifest: dict, split: str, *, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's part of a split: a contiguous slice of count // world_size
    samples, so all DDP ranks run the same number of steps (the last
    count % world_size samples are dropped, as DistributedSampler(drop_last=True)
    does). Only the shards that overlap the slice are read."""
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
