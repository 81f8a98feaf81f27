import gzip
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import data, storage
from pipelines.config import DataSpec
from pipelines.errors import InvalidInput
from pipelines.steps import StepBatches
from tests.imagesets import fashion_pngs


@pytest.fixture(scope="module")
def digits() -> data.RawData:
    return data.load_source("digits", None)


def test_digits_shapes(digits):
    assert digits.x_train.shape == (1437, 1, 8, 8) and digits.x_test.shape == (360, 1, 8, 8)
    assert digits.x_train.dtype == np.uint8 and digits.y_train.dtype == np.int64
    assert digits.x_train.max() == 255 and digits.x_train.min() == 0
    assert set(np.unique(digits.y_test)) == set(range(10)) and digits.num_classes == 10
    # the split is a fixed permutation: loading twice gives the same halves
    again = data.load_source("digits", None)
    assert np.array_equal(again.x_test, digits.x_test) and np.array_equal(again.y_train, digits.y_train)


def test_split_is_deterministic_and_location_free(digits, tmp_path):
    a = data.split_and_shard(digits, val_fraction=0.1, seed=0, shard_size=500, out_uri=str(tmp_path / "a"))
    b = data.split_and_shard(digits, val_fraction=0.1, seed=0, shard_size=500, out_uri=str(tmp_path / "b"))
    c = data.split_and_shard(digits, val_fraction=0.1, seed=1, shard_size=500, out_uri=str(tmp_path / "c"))
    assert a["data_hash"] == b["data_hash"] != c["data_hash"]
    # shard bytes are reproducible too, so their recorded checksums compare across runs
    checksums = [[s["sha256"] for s in m["splits"]["train"]["shards"]] for m in (a, b)]
    assert checksums[0] == checksums[1]
    assert a["shape"] == [1, 8, 8] and a["num_classes"] == 10
    assert {k: v["count"] for k, v in a["splits"].items()} == {"train": 1293, "val": 144, "test": 360}
    assert [s["count"] for s in a["splits"]["train"]["shards"]] == [500, 500, 293]


def test_builtin_sets_keep_their_data_version(tmp_path):
    # the data hash digits had before image folders and content-named shards came; fashion_mnist's was
    # 208fd1500d9220be... then and is checked the same way when its Debian package is there
    m = data.prepare(DataSpec(source="digits"), seed=0, out_uri=str(tmp_path))
    assert m["data_hash"] == "f9d0a2e69f54fc4f8a89ef2ee4217c51fde7ec1d0c40604c8adf2847ab29853e"
    assert m["source"] == {"kind": "digits", "uri": "sklearn.datasets.load_digits", "labels": "built-in",
                           "classes": None}
    # the size and channels a spec asks for go through the image folder's conversion
    rgb = data.prepare(DataSpec(source="digits", channels=3), seed=0, out_uri=str(tmp_path / "rgb"))
    x1, x3 = data.load_split(m, "test")[0], data.load_split(rgb, "test")[0]
    assert rgb["shape"] == [3, 8, 8] and torch.equal(x3, x1.repeat(1, 3, 1, 1))
    with pytest.raises(InvalidInput, match="digits images are 8x8, smaller than data.image_size 12"):
        data.prepare(DataSpec(source="digits", image_size=12), seed=0, out_uri=str(tmp_path / "big"))


@pytest.mark.skipif(not data.DEBIAN_FASHION_MNIST.is_dir(), reason="no Debian fashion-mnist package")
@pytest.mark.parametrize("size, channels", [(28, 1), (20, 3)])
def test_fashion_mnist_as_a_png_folder_gives_the_builtin_pixels(tmp_path, size, channels):
    raw = data.load_source("fashion_mnist", None)
    pick = np.concatenate([np.flatnonzero(raw.y_test == c)[:20] for c in range(10)])
    folder = fashion_pngs(tmp_path / "pngs", raw.x_test[pick], raw.y_test[pick])
    spec = DataSpec(source="image_folder", uri=str(folder), labels="subfolders", image_size=size, channels=channels)
    m = data.prepare(spec, seed=0, out_uri=str(tmp_path / "out"), parallel=False)
    got = [data.load_split(m, s) for s in data.SPLITS]
    x, y = torch.cat([g[0] for g in got]).numpy(), torch.cat([g[1] for g in got]).numpy()
    sub = data.RawData(x_train=raw.x_test[pick], y_train=raw.y_test[pick], x_test=raw.x_test[:0],
                       y_test=raw.y_test[:0], num_classes=10)
    want = data.convert(sub, "fashion_mnist", size, channels)
    assert m["shape"] == [channels, size, size] and m["num_classes"] == 10
    assert _rows(x, y) == _rows(want.x_train, want.y_train)


def _rows(x: np.ndarray, y: np.ndarray) -> list[bytes]:
    """(image, label) pairs as sortable bytes, to compare datasets up to order."""
    return sorted(map(bytes, np.concatenate([x.reshape(len(x), -1), y[:, None].astype(np.uint8)], 1)))


def test_shards_round_trip(digits, tmp_path):
    m = data.split_and_shard(digits, val_fraction=0.2, seed=3, shard_size=100, out_uri=str(tmp_path))
    x_tr, y_tr = data.load_split(m, "train")
    x_val, y_val = data.load_split(m, "val")
    x_te, y_te = data.load_split(m, "test")
    assert x_tr.dtype == torch.uint8 and y_tr.dtype == torch.int64
    assert torch.equal(x_te, torch.from_numpy(digits.x_test)) and torch.equal(y_te, torch.from_numpy(digits.y_test))
    # val is carved out of train: together they are the original train set, nothing lost or doubled
    together = _rows(torch.cat([x_tr, x_val]).numpy(), torch.cat([y_tr, y_val]).numpy())
    assert together == _rows(digits.x_train, digits.y_train)
    # every shard is a plain npz
    with np.load(m["splits"]["val"]["shards"][0]["uri"], allow_pickle=False) as npz:
        assert npz["x"].dtype == np.uint8 and npz["y"].dtype == np.int64


def test_ranks_partition_a_split(digits, tmp_path):
    m = data.split_and_shard(digits, val_fraction=0.0, seed=0, shard_size=128, out_uri=str(tmp_path))
    whole, _ = data.load_split(m, "train")
    parts = [data.load_split(m, "train", rank=r, world_size=3)[0] for r in range(3)]
    assert {len(p) for p in parts} == {len(whole) // 3}
    assert torch.equal(torch.cat(parts), whole[: 3 * (len(whole) // 3)])
    with pytest.raises(InvalidInput, match="rank"):
        data.load_split(m, "train", rank=3, world_size=3)


def test_a_split_read_in_place_is_the_split(digits, tmp_path):
    m = data.split_and_shard(digits, val_fraction=0.1, seed=0, shard_size=300, out_uri=str(tmp_path))
    x, y = data.load_split(m, "train")
    s = data.ShardedImages(m, "train")
    assert len(s) == len(x) and len(m["splits"]["train"]["shards"]) > 3 and torch.equal(s.y, y)
    idx = torch.cat([torch.randperm(len(x)), torch.tensor([0, 299, 300, len(x) - 1, 300])])  # shard edges, repeats
    got = s[idx]
    assert got.dtype == torch.uint8 and torch.equal(got, x[idx])
    assert torch.equal(s[295:610], x[295:610]) and torch.equal(s[-1], x[-1]) and torch.equal(s[0], x[0])
    assert torch.equal(s[np.int64(7)], x[7]) and torch.equal(s[torch.tensor(-2)], x[-2])
    with pytest.raises(IndexError, match="outside a split"):
        s[torch.tensor([3, -1])]
    data.verify_split(m, "train")
    # Training's batches: read a step ahead from disk, they are those of the split in memory, in order,
    # after a jump ahead (a resume) and back (a rollback).
    cpu = torch.device("cpu")
    in_memory = StepBatches(x, y, global_batch=48, seed=1, rank=1, world=2)
    from_disk = StepBatches(s, s.y, global_batch=48, seed=1, rank=1, world=2)
    for step in (0, 1, 2, 40, 41, 3, 4):
        for a, b in zip(in_memory.batch(step, cpu), from_disk.batch(step, cpu)):
            assert torch.equal(a, b), step


def test_a_split_on_s3_is_read_from_a_verified_node_cache(digits, tmp_path, moto_s3, monkeypatch):
    for k, v in moto_s3.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv(data.SHARD_CACHE_ENV, str(tmp_path / "cache"))
    storage._s3.cache_clear()
    m = data.split_and_shard(digits, val_fraction=0.1, seed=0, shard_size=500, out_uri="s3://genpipe/sharded")
    x, _ = data.load_split(m, "train")
    assert torch.equal(data.ShardedImages(m, "train")[torch.arange(len(x))], x)
    cached = sorted(p.name for p in (tmp_path / "cache").glob("*.npz"))
    assert cached == sorted(f"{s['sha256']}.npz" for s in m["splits"]["train"]["shards"])
    # A cached copy damaged since is found by the next check and fetched again.
    first = tmp_path / "cache" / cached[0]
    first.write_bytes(first.read_bytes()[:-1] + b"!")
    data.verify_split(m, "train")
    assert torch.equal(data.ShardedImages(m, "train")[torch.arange(len(x))], x)
    # A shard changed on S3 since prepare: refused on its way in, nothing left in the cache.
    shard = m["splits"]["val"]["shards"][0]
    storage.write_bytes(shard["uri"], storage.read_bytes(shard["uri"])[:-1] + b"!")
    with pytest.raises(InvalidInput, match=f"{shard['uri']} is corrupt: checksum"):
        data.verify_split(m, "val")
    assert not list((tmp_path / "cache").glob(f"{shard['sha256']}*.npz")) and not list((tmp_path / "cache").glob("*.part"))
    storage._s3.cache_clear()


def test_a_shard_that_does_not_match_its_manifest_is_invalid_input(digits, tmp_path):
    m = data.split_and_shard(digits, val_fraction=0.1, seed=0, shard_size=500, out_uri=str(tmp_path))
    shard = Path(m["splits"]["train"]["shards"][1]["uri"])
    whole = shard.read_bytes()
    shard.write_bytes(whole[:len(whole) // 2])  # a shard cut in half: one clear line, never garbage images
    with pytest.raises(InvalidInput, match=f"{shard} is corrupt"):
        data.ShardedImages(m, "train")
    shard.write_bytes(whole)
    m["shape"] = [1, 16, 16]
    with pytest.raises(InvalidInput, match="its arrays do not match the manifest"):
        data.ShardedImages(m, "train")


def test_corrupt_shard_is_invalid_input(digits, tmp_path):
    m = data.split_and_shard(digits, val_fraction=0.1, seed=0, shard_size=500, out_uri=str(tmp_path))
    shard = Path(m["splits"]["train"]["shards"][1]["uri"])
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shard.write_bytes(bytes(blob))
    with pytest.raises(InvalidInput, match="is corrupt"):
        data.load_split(m, "train")
    with pytest.raises(InvalidInput, match=f"{shard} is corrupt: checksum"):
        data.verify_split(m, "train")


def test_truncated_npz_with_matching_checksum_is_invalid_input(digits, tmp_path):
    # the checksum guards against bit rot; a manifest that vouches for a broken file must not crash either
    m = data.split_and_shard(digits, val_fraction=0.1, seed=0, shard_size=5000, out_uri=str(tmp_path))
    shard = m["splits"]["test"]["shards"][0]
    truncated = Path(shard["uri"]).read_bytes()[:1000]
    Path(shard["uri"]).write_bytes(truncated)
    shard["sha256"] = storage.sha256(truncated)
    with pytest.raises(InvalidInput, match="is corrupt"):
        data.load_split(m, "test")


def test_unknown_source_lists_the_allowed_ones():
    with pytest.raises(InvalidInput, match="fashion_mnist, mnist, digits"):
        data.load_source("imagenet", None)


def test_missing_files_name_the_paths_tried(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    tried = f"no idx files in {tmp_path}/MNIST/raw, {tmp_path}, and the download into .*failed"
    with pytest.raises(InvalidInput, match=tried):
        data.load_source("mnist", str(tmp_path))
    with pytest.raises(InvalidInput, match="not found in nowhere"):
        data.load_source("mnist", None)


def test_truncated_idx_file_is_invalid_input(tmp_path):
    def idx(a: np.ndarray) -> bytes:
        return bytes([0, 0, 8, a.ndim]) + np.array(a.shape, ">u4").tobytes() + a.tobytes()

    x, y = np.zeros((4, 28, 28), np.uint8), np.arange(4, dtype=np.uint8)
    for stem, a in [("train-images-idx3-ubyte", x), ("train-labels-idx1-ubyte", y),
                    ("t10k-images-idx3-ubyte", x), ("t10k-labels-idx1-ubyte", y)]:
        (tmp_path / f"{stem}.gz").write_bytes(gzip.compress(idx(a)))
    raw = data.load_source("mnist", str(tmp_path))
    assert raw.x_train.shape == (4, 1, 28, 28) and raw.y_test.tolist() == [0, 1, 2, 3]

    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx(x))[:-20])
    with pytest.raises(InvalidInput, match="t10k-images"):
        data.load_source("mnist", str(tmp_path))


@pytest.mark.skipif(not data.DEBIAN_FASHION_MNIST.is_dir(), reason="no Debian fashion-mnist package")
def test_fashion_mnist_from_debian_dir():
    raw = data.load_source("fashion_mnist", None)
    assert raw.x_train.shape == (60000, 1, 28, 28) and raw.x_test.shape == (10000, 1, 28, 28)
    assert raw.y_train.dtype == np.int64 and np.bincount(raw.y_test).tolist() == [1000] * 10
