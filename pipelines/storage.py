"""Where stages keep their outputs: a local directory or `s3://bucket/prefix`.

Every write is atomic: a local file is written beside its target and renamed
over it; an S3 object only appears once its PUT completes. So a reader sees a
whole file or none, never half of one. Readers that care check the SHA-256 the
manifest recorded.
"""

from __future__ import annotations

import functools
import hashlib
import os
import posixpath
import tempfile
from pathlib import Path

from pipelines.errors import InvalidInput


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def validate(uri: str) -> str:
    """Reject what is not a local path or an s3:// URI, and `..` escapes."""
    if "://" in uri and not is_s3(uri):
        raise InvalidInput(f"storage URI {uri!r}: only local paths and s3://bucket/prefix are supported")
    rest = uri[len("s3://"):] if is_s3(uri) else uri
    if is_s3(uri) and not rest.split("/", 1)[0]:
        raise InvalidInput(f"storage URI {uri!r} has no bucket")
    if ".." in Path(rest).parts:
        raise InvalidInput(f"storage URI {uri!r} must not contain '..'")
    return uri.rstrip("/") if is_s3(uri) else str(Path(uri).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    for p in parts:
        if ".." in p.split("/") or p.startswith("/"):
            raise InvalidInput(f"path part {p!r} would escape the storage root {base!r}")
    return posixpath.join(base, *parts) if is_s3(base) else str(Path(base, *parts))


@functools.cache
def _s3():
    import boto3
    from botocore.config import Config

    # Endpoint (AWS_ENDPOINT_URL) and credentials come from the environment only.
    return boto3.client("s3", config=Config(retries={"mode": "standard", "max_attempts": 10}))


def ray_storage(uri: str) -> tuple[object | None, str]:
    """(filesystem, path) for a Ray Train/Tune RunConfig over `uri`.

    Ray's own S3 filesystem gives up after 3 attempts, a fraction of a second: one blip of the
    object store during a checkpoint upload would fail the run. This one retries like boto3's
    standard mode above (10 attempts, exponential backoff: about 15 s of outage).
    """
    if not is_s3(uri):
        return None, uri
    # Unlike FileSystem.from_uri, the constructor does not read AWS_ENDPOINT_URL itself.
    return retrying_s3_filesystem(os.environ.get("AWS_ENDPOINT_URL")), uri[len("s3://"):]


def retrying_s3_filesystem(endpoint: str | None):
    from pyarrow import fs

    class RetryingS3FileSystem(fs.S3FileSystem):
        # pyarrow pickles an S3FileSystem without its retry strategy, and Ray ships the filesystem
        # to the Train controller and workers by pickle: rebuild it whole on the other side instead.
        def __reduce__(self):
            return retrying_s3_filesystem, (endpoint,)

    return RetryingS3FileSystem(endpoint_override=endpoint,
                                retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=10))


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def write_bytes(uri: str, data: bytes) -> None:
    if is_s3(uri):
        bucket, key = _split(uri)
        _s3().put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_first(uri: str, data: bytes) -> None:
    """`write_bytes` for a command's first write to its storage: a storage it cannot write (no such bucket,
    credentials refused, a read-only directory) is the user's to fix, so it is InvalidInput, not a crash."""
    if not is_s3(uri):
        try:
            return write_bytes(uri, data)
        except (PermissionError, NotADirectoryError, FileExistsError) as e:
            raise InvalidInput(f"cannot write to storage {uri}: {e.strerror}") from None
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        write_bytes(uri, data)
    except (ClientError, BotoCoreError) as e:
        raise InvalidInput(f"cannot write to storage {uri}: {str(e).splitlines()[0]}") from None


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        bucket, key = _split(uri)
        try:
            return _s3().get_object(Bucket=bucket, Key=key)["Body"].read()
        except _s3().exceptions.NoSuchKey:
            raise FileNotFoundError(uri) from None
    return Path(uri).read_bytes()


def exists(uri: str) -> bool:
    return stat(uri) is not None


def _not_found(e: Exception) -> bool:
    """Whether an S3 ClientError says the object is not there."""
    return e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


def stat(uri: str) -> tuple[int, str] | None:
    """(size, stamp) of a file, or None when there is none: the stamp changes when the file does
    (its mtime locally, its ETag on S3)."""
    if is_s3(uri):
        bucket, key = _split(uri)
        try:
            head = _s3().head_object(Bucket=bucket, Key=key)
        except _s3().exceptions.ClientError as e:
            if _not_found(e):
                return None
            raise
        return head["ContentLength"], head["ETag"]
    path = Path(uri)
    if not path.is_file():
        return None
    st = path.stat()
    return st.st_size, str(st.st_mtime_ns)


def list_files(uri: str) -> list[tuple[str, int, str]]:
    """(path relative to `uri`, '/'-separated; size; stamp as in `stat`) of every file under a local
    directory or an S3 prefix, sorted. Symlinked directories are not followed (no cycles)."""
    if is_s3(uri):
        bucket, prefix = _split(uri.rstrip("/") + "/")
        found = []
        for page in _s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            found += [(o["Key"][len(prefix):], o["Size"], o["ETag"]) for o in page.get("Contents", [])
                      if not o["Key"].endswith("/")]  # "folder" marker objects
        return sorted(found)
    found = []
    for d, _, files in os.walk(uri):
        for f in files:
            p = Path(d, f)
            if p.is_file():
                st = p.stat()
                found.append((p.relative_to(uri).as_posix(), st.st_size, str(st.st_mtime_ns)))
    return sorted(found)


def download(uri: str, path: str) -> None:
    """An S3 object to a local file, streamed (an archive may not fit in memory)."""
    bucket, key = _split(uri)
    try:
        _s3().download_file(bucket, key, path)
    except _s3().exceptions.ClientError as e:
        if _not_found(e):
            raise FileNotFoundError(uri) from None
        raise


def delete(uri: str) -> None:
    """Remove one file; one already gone is fine."""
    if is_s3(uri):
        bucket, key = _split(uri)
        _s3().delete_object(Bucket=bucket, Key=key)
        return
    Path(uri).unlink(missing_ok=True)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_verified(uri: str, expected_sha256: str) -> bytes:
    """The bytes at `uri`, or InvalidInput when they are not what was written."""
    try:
        data = read_bytes(uri)
    except FileNotFoundError:
        raise InvalidInput(f"{uri} is missing") from None
    check_sha256(uri, sha256(data), expected_sha256)
    return data


def check_sha256(uri: str, got: str, expected: str) -> None:
    if got != expected:
        raise InvalidInput(f"{uri} is corrupt: checksum {got[:12]} != recorded {expected[:12]}")
