"""A stage job submitted ahead of its turn waits on its go file (pipelines.stages.wait_for_go): it starts
when the driver writes its arguments there, and ends by itself when the driver's lease stops moving."""

from __future__ import annotations

import json
import threading
import time

import pytest

from pipelines import stages


def _write_later(path, payloads: list[dict], every: float) -> threading.Thread:
    def write():
        for p in payloads:
            time.sleep(every)
            path.write_text(json.dumps(p))

    t = threading.Thread(target=write)
    t.start()
    return t


def test_waits_while_the_lease_moves_then_goes(tmp_path, monkeypatch):
    monkeypatch.setattr(stages, "GO_ORPHANED_S", 0.5)
    go = tmp_path / "go.json"
    go.write_text(json.dumps({"lease": 0}))
    # Four renewals 0.3 s apart outlast the 0.5 s a still lease is given: only a moving lease keeps it waiting.
    t = _write_later(go, [{"lease": n} for n in range(1, 5)] + [{"key": "k", "args": ["--run-id", "r"]}], 0.3)
    t0 = time.monotonic()
    assert stages.wait_for_go(str(go)) == ["--run-id", "r"]
    assert time.monotonic() - t0 > 1.4
    t.join()


def test_a_lease_that_stops_moving_ends_the_wait(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(stages, "GO_ORPHANED_S", 0.5)
    go = tmp_path / "go.json"
    go.write_text(json.dumps({"lease": 3}))
    with pytest.raises(SystemExit) as e:
        stages.wait_for_go(str(go))
    assert e.value.code == 1 and "driver that submitted this job" in capsys.readouterr().err
