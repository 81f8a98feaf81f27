"""A stage job submitted ahead of its turn waits on its go file (pipelines.stages.wait_for_go): it starts
when the driver writes its arguments there, and ends by itself when the driver's lease stops moving.
Before that, a stage that trains frees what finished jobs left reserved: which placement groups those are."""

from __future__ import annotations

import json
import threading
import time

import pytest

from pipelines import ray_internals, stages


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


def test_only_groups_a_finished_genpipe_job_left_reserved_are_orphans():
    jobs = [{"job_id": "01000000", "submission_id": "genpipe-tune-1", "status": "STOPPED"},
            {"job_id": "02000000", "submission_id": "genpipe-train-2", "status": "RUNNING"},
            {"job_id": "03000000", "submission_id": "genpipe-train-3", "status": "SUCCEEDED"},
            {"job_id": "04000000", "submission_id": "serve-5", "status": "FAILED"},
            {"job_id": "05000000", "submission_id": None, "status": "SUCCEEDED"},  # a driver's
            {"job_id": None, "submission_id": "genpipe-eval-6", "status": "PENDING"}]

    def group(pg_id, job, state="CREATED", detached=False):
        return {"placement_group_id": pg_id, "creator_job_id": job, "state": state, "is_detached": detached}

    groups = [group("a", "01000000"), group("b", "01000000", state="PENDING"), group("c", "02000000"),
              group("d", "03000000", detached=True), group("e", "03000000", state="REMOVED"),
              group("f", "04000000"), group("g", "05000000"), group("h", "07000000")]
    # a running job's groups are its own, a detached one outlives its job, and others' jobs are not genpipe's
    assert ray_internals.orphaned_placement_groups(groups, jobs) == ["a", "b"]
