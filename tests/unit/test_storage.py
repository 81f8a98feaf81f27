"""Local storage: atomic writes, checksums, and URIs that cannot escape their root."""

import pytest

from pipelines import storage
from pipelines.errors import InvalidInput


def test_write_is_atomic_and_verified(tmp_path):
    uri = storage.join(str(tmp_path), "a", "b.bin")
    storage.write_bytes(uri, b"hello")
    storage.write_bytes(uri, b"world")
    assert storage.read_bytes(uri) == b"world"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.bin"]  # no temp file left beside it
    assert storage.read_verified(uri, storage.sha256(b"world")) == b"world"
    with pytest.raises(InvalidInput, match="corrupt"):
        storage.read_verified(uri, storage.sha256(b"hello"))
    with pytest.raises(InvalidInput, match="missing"):
        storage.read_verified(uri + ".nope", "0" * 64)


@pytest.mark.parametrize("uri, message", [
    ("ftp://host/x", "only local paths and s3://"),
    ("s3:///prefix", "no bucket"),
    ("/data/../etc", "must not contain '..'"),
])
def test_bad_uris(uri, message):
    with pytest.raises(InvalidInput, match=message):
        storage.validate(uri)


def test_join_refuses_escapes():
    assert storage.join("s3://b/p", "x", "y.json") == "s3://b/p/x/y.json"
    for part in ("../x", "/abs", "a/../../b"):
        with pytest.raises(InvalidInput, match="escape"):
            storage.join("s3://b/p", part)
