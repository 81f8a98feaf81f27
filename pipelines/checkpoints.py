"""A train checkpoint: a directory (local or s3://) of three files.

    model.safetensors   the weights (EMA copies included), tensors only
    optimizers.pt       each optimizer's state_dict, read back with weights_only=True
    meta.json           family, config, seed, step and the SHA-256 of the two files above

meta.json is written last and vouches for the others: a checkpoint whose files
don't match it (truncated by a failed upload, swapped, bit-rotted) is refused
with a CorruptCheckpoint naming the file, never half-loaded. A payload that is
not plain tensors (a pickle carrying code) is refused the same way.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from pipelines import storage
from pipelines.errors import InvalidInput

MODEL, OPTIMIZERS, META = "model.safetensors", "optimizers.pt", "meta.json"


class CorruptCheckpoint(InvalidInput):
    """A checkpoint's files are missing, don't match meta.json, or hold more than tensors."""


def save(path: Path, *, model_state: dict[str, torch.Tensor], optimizer_states: dict[str, dict],
         meta: dict[str, Any]) -> None:
    model_bytes = safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in model_state.items()})
    buf = io.BytesIO()
    torch.save(optimizer_states, buf)
    files = {MODEL: model_bytes, OPTIMIZERS: buf.getvalue()}
    for name, data in files.items():
        (path / name).write_bytes(data)
    (path / META).write_text(json.dumps({**meta, "sha256": {n: storage.sha256(d) for n, d in files.items()}}))


def read_meta(uri: str) -> dict[str, Any]:
    try:
        meta = json.loads(storage.read_bytes(storage.join(uri, META)))
    except FileNotFoundError:
        raise CorruptCheckpoint(f"checkpoint {uri} has no {META}") from None
    except json.JSONDecodeError:
        raise CorruptCheckpoint(f"checkpoint {uri}: {META} is not valid JSON") from None
    if not isinstance(meta.get("sha256"), dict):
        raise CorruptCheckpoint(f"checkpoint {uri}: {META} records no checksums")
    return meta


def read_file(uri: str, name: str, meta: dict[str, Any]) -> bytes:
    """One of the checkpoint's files, checked against the checksum meta.json recorded for it."""
    try:
        return storage.read_verified(storage.join(uri, name), meta["sha256"][name])
    except InvalidInput as e:
        raise CorruptCheckpoint(f"checkpoint {e}") from None


def load_model_state(uri: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(meta, weights) of the checkpoint at `uri`, verified."""
    meta = read_meta(uri)
    return meta, safetensors.torch.load(read_file(uri, MODEL, meta))


def load_training_state(uri: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, dict]]:
    """(meta, weights, optimizer states): all a resumed run needs, verified."""
    meta, weights = load_model_state(uri)
    try:
        optimizers = torch.load(io.BytesIO(read_file(uri, OPTIMIZERS, meta)), weights_only=True)
    except pickle.UnpicklingError as e:
        raise CorruptCheckpoint(f"checkpoint {uri}: {OPTIMIZERS} holds more than tensors and plain "
                                f"containers; refused ({str(e).splitlines()[0]})") from None
    return meta, weights, optimizers
