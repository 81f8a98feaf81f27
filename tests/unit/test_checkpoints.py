"""Checkpoints are verified before anything is loaded from them: a truncated,
swapped or pickled file is refused with one line naming it."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from pipelines import checkpoints
from pipelines.checkpoints import META, MODEL, OPTIMIZERS, CorruptCheckpoint


@pytest.fixture
def ckpt(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    checkpoints.save(tmp_path, model_state=model.state_dict(), optimizer_states={"opt": opt.state_dict()},
                     meta={"family": "x", "config": {}, "seed": 0, "step": 7})
    return tmp_path, model, opt


def test_round_trip(ckpt):
    path, model, opt = ckpt
    meta, weights, optimizers = checkpoints.load_training_state(str(path))
    assert meta["step"] == 7 and set(meta["sha256"]) == {MODEL, OPTIMIZERS}
    for k, v in model.state_dict().items():
        assert torch.equal(weights[k], v)
    torch.testing.assert_close(optimizers["opt"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


@pytest.mark.parametrize("name", [MODEL, OPTIMIZERS])
def test_truncated_file_is_refused(ckpt, name):
    path = ckpt[0]
    data = (path / name).read_bytes()
    (path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpoint, match=f"{name} is corrupt: checksum"):
        checkpoints.load_training_state(str(path))


def test_missing_file_is_refused(ckpt):
    path = ckpt[0]
    os.remove(path / MODEL)
    with pytest.raises(CorruptCheckpoint, match=f"{MODEL} is missing"):
        checkpoints.load_model_state(str(path))


def test_checkpoint_without_checksums_is_refused(ckpt):
    path = ckpt[0]
    meta = json.loads((path / META).read_text())
    del meta["sha256"]
    (path / META).write_text(json.dumps(meta))
    with pytest.raises(CorruptCheckpoint, match="records no checksums"):
        checkpoints.load_model_state(str(path))


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_payload_is_refused_even_with_a_matching_checksum(ckpt):
    """Whoever can write the checkpoint can rewrite meta.json too: the loader itself must refuse code."""
    path = ckpt[0]
    payload = pickle.dumps({"opt": _RunsCode()})
    (path / OPTIMIZERS).write_bytes(payload)
    meta = json.loads((path / META).read_text())
    meta["sha256"][OPTIMIZERS] = checkpoints.storage.sha256(payload)
    (path / META).write_text(json.dumps(meta))
    with pytest.raises(CorruptCheckpoint, match="holds more than tensors"):
        checkpoints.load_training_state(str(path))
