"""Hyperparameter search on a real Ray head through the CLI: trials are DDP runs and MLflow child
runs, a killed search resumes, ASHA stops the poor ones, PBT exploits, and the best trial goes on to
evaluate and register."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.realparts import (DIGITS, genpipe, last_json, orphan_placement_group, reserved_placement_groups,
                             sqlite_client, start, train_workers)

pytestmark = pytest.mark.integration

SMOKE = ["--config", "jobs/smoke_tune.yaml", *DIGITS]
SEARCH_TIMEOUT = 1200  # a safety net for a whole search through the CLI, not a measurement


def _manifest(home, name: str, stage: str) -> dict:
    return json.loads((home["path"] / "storage" / name / stage / "manifest.json").read_text())


def test_asha_stops_diverging_learning_rates_and_the_best_comes_from_the_good_region(home):
    # A VAE whose learning rates of 3 and 10 diverge. ASHA is asynchronous: the trials that reach a rung
    # first set its bar (and the worse of two good ones may already fall below it). Grid order and 2
    # trials at a time put the good ones there first, so the known answer is deterministic: both
    # diverging trials are stopped at the first rung, and a good one wins, having run every step.
    r = genpipe(home, "tune", *SMOKE, "--set", "name=tune-asha",
                "--set", "model={family: vae, hidden: 32, z_dim: 4}",
                "--set", "tune.space={model.lr: {grid: [0.003, 0.01, 3.0, 10.0]}}", "--set", "tune.search=random",
                "--set", "tune.num_samples=1", "--set", "tune.max_concurrent_trials=2", timeout=SEARCH_TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    best = last_json(r.stdout)["best"]
    assert best["metric"]["name"] == "val/bits_per_dim"
    assert best["config"]["model.lr"] in (0.003, 0.01)
    rows = {row["model.lr"]: row for row in _manifest(home, "tune-asha", "tune")["outputs"]["trials"]}
    for lr in (3.0, 10.0):
        assert rows[lr]["status"] == "stopped" and rows[lr]["steps"] < 60, rows[lr]
    winner = rows[best["config"]["model.lr"]]
    assert winner["status"] == "done" and winner["steps"] == 60, winner
    # A stopped trial's MLflow run ends where Tune stopped it: its Train run did not log on past the cut.
    c = sqlite_client(home)
    exp = c.get_experiment_by_name("tune-asha").experiment_id
    for t in c.search_runs([exp], filter_string="attributes.run_name LIKE 'tune-asha/tune/%'"):
        row = rows[json.loads(t.data.tags["genpipe.trial_config"])["model.lr"]]
        logged = sorted(m.step for m in c.get_metric_history(t.info.run_id, "val/bits_per_dim"))
        assert logged == list(range(20, row["steps"] + 1, 20)), (row, logged)
    # Stopped trials gave their workers' CPUs back: nothing stays reserved once the search is over.
    assert reserved_placement_groups(home, within=30) == []


def test_search_commands_refuse_specs_that_do_not_fit(home):
    r = genpipe(home, "tune", "--config", "jobs/smoke.yaml")
    assert r.returncode == 2 and "genpipe: error: the spec has no tune.space" in r.stderr
    r = genpipe(home, "train", *SMOKE)
    assert r.returncode == 2 and "run genpipe tune or genpipe pipeline" in r.stderr


def _checkpointed_trials(search: Path) -> set[str]:
    """Trials with a checkpoint that the experiment state (what a resume restores) was saved after."""
    saved = max((s.stat().st_mtime for s in search.glob("experiment_state-*.json")), default=0)
    return {d.name for d in search.glob("Trial_*") if any(c.stat().st_mtime < saved for c in d.glob("checkpoint_*"))}


def _suspend_train_workers(home) -> list[psutil.Process]:
    """SIGSTOP the Ray Train workers of the session's head."""
    workers = train_workers(home)
    for p in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.suspend()
    return workers


def test_a_killed_search_resumes_without_rerunning_or_duplicating_then_the_best_is_registered(home):
    # The smoke search spec through `genpipe pipeline`, one trial at a time and every trial to the end:
    # trial 0 finishes, then trial 1 is cut after its first checkpoint. On resume trial 0 must not run
    # again and trial 1 must start from that checkpoint; the best trial then goes on to evaluate and
    # register. (ASHA's stops are the next test's.)
    args = ["pipeline", *SMOKE, "--set", "name=tune-resume", "--set", "tune.scheduler=fifo",
            "--set", "tune.num_samples=2", "--set", "tune.max_concurrent_trials=1"]
    proc = start(home, *args)
    tune_dir = home["path"] / "storage" / "tune-resume" / "tune"
    deadline = time.time() + SEARCH_TIMEOUT
    while len(_checkpointed_trials(next(iter(tune_dir.glob("search-*")), tune_dir))) < 2:
        assert proc.poll() is None, "the search ended before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.1)
    # Trial 1's worker is frozen until the search has stopped: its last 40 steps took less time than the
    # stop takes to land, and a trial that finished first left nothing to cut (seen on a fresh-clone run).
    frozen = _suspend_train_workers(home)
    try:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        for worker in frozen:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.resume()
    assert frozen and proc.returncode == 130, err[-3000:]
    c = sqlite_client(home)
    exp = c.get_experiment_by_name("tune-resume").experiment_id
    assert "RUNNING" not in {r.info.status for r in c.search_runs([exp])}
    finished = {t.data.tags.get("genpipe.trial_id") for t in c.search_runs([exp])
                if t.info.status == "FINISHED"} - {None}
    assert finished  # the trial that ended before the cut
    train_runs = {p.name for p in (tune_dir / "trials").iterdir()}
    # Tune deletes a trial's older checkpoint as soon as it has a newer one (num_to_keep: 1) and records
    # that in the experiment state only later: a cut in between leaves the state naming a checkpoint that
    # is gone. Make that window happen: the interrupted trial's newest checkpoint gets the next number.
    search = next(tune_dir.glob("search-*"))
    cut = next(d for d in search.glob("Trial_*") if not d.name.startswith(tuple("Trial_" + t for t in finished)))
    newest = max(cut.glob("checkpoint_*"))
    newest.rename(newest.with_name(f"checkpoint_{int(newest.name.split('_')[1]) + 1:06d}"))

    r = genpipe(home, *args)  # without --resume: refused, the interrupted search is left as it was
    assert r.returncode == 2 and "continue it with --resume" in r.stderr, r.stderr[-2000:]
    # A stopped job can leave its Train run's placement group reserved (ray_internals): the search that
    # resumes frees it before its trials wait for the CPU it holds.
    orphan = orphan_placement_group(home)
    r = genpipe(home, *args, "--resume", timeout=SEARCH_TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "placement group(s) that finished jobs left reserved" in r.stderr
    assert orphan not in {g["placement_group_id"] for g in reserved_placement_groups(home)}

    out = last_json(r.stdout)
    assert set(out["runs"]) == {"pipeline", "prepare", "tune", "evaluate", "register"}
    assert out["model"] == "smoke-tune-dcgan" and out["version"] == 1
    best = out["best"]
    assert set(best["config"]) == {"model.lr", "model.z_dim"} and best["metric"]["name"] == "val/fid"
    tuned = _manifest(home, "tune-resume", "tune")["outputs"]
    assert [(row["status"], row["steps"]) for row in tuned["trials"]] == [("done", 60)] * 2
    # The best trial's checkpoint is what evaluate scored and register packaged.
    assert _manifest(home, "tune-resume", "evaluate")["outputs"]["checkpoint"] == tuned["checkpoint"]
    assert "[tune] 2 trials, best" in r.stderr  # the table reaches the user too

    trial_runs = c.search_runs([exp], filter_string="attributes.run_name LIKE 'tune-resume/tune/%'")
    assert len(trial_runs) == 2  # the interrupted trial's run was reopened, not duplicated
    # Each start of a trial is a Train run named after its starting checkpoint ("-start": none).
    # Since the cut: no run of a finished trial, and no trial started from scratch.
    new_runs = {p.name for p in (tune_dir / "trials").iterdir()} - train_runs
    assert new_runs and not any(n.startswith(tuple(finished)) or n.endswith("-start") for n in new_runs), new_runs
    for t in trial_runs:
        assert set(t.data.params) == {"model.lr", "model.z_dim"}
        fid_steps = [m.step for m in c.get_metric_history(t.info.run_id, "val/fid")]
        assert min(fid_steps) == 20 and max(fid_steps) == 60
    assert {run.info.status for run in c.search_runs([exp])} == {"FINISHED"}  # none left RUNNING or FAILED
    tagged = [t for t in trial_runs if t.data.tags.get("genpipe.best_trial") == "true"]
    assert [t.info.run_id for t in tagged] == [best["run_id"]]
    assert float(tagged[0].data.params["model.lr"]) == pytest.approx(best["config"]["model.lr"])
    tune_run = c.get_run(out["runs"]["tune"])
    assert tune_run.data.tags["genpipe.best_trial"] == best["trial"]
    artifacts = {a.path for a in c.list_artifacts(tune_run.info.run_id)}
    assert artifacts >= {"trials.txt", "best_config.json", "metric_vs_step.png"}


PBT_STEPS = 40


def test_pbt_exploited_trial_continues_from_the_donors_checkpoint_and_step(home):
    # Two VAE trials, one diverging (lr 3): at the perturbation at step 20 the worse one takes the better
    # one's checkpoint and a perturbed lr, and goes on from the donor's step rather than from its own or 0.
    # Synchronous, so the first trial cannot finish before the second has a score to compare. One
    # perturbation before the end: each is every trial starting again (a Train run each, ~15 s here).
    r = genpipe(home, "tune", *SMOKE, "--set", "name=tune-pbt", "--set", "model={family: vae, hidden: 32, z_dim: 4}",
                "--set", "tune.space={model.lr: {grid: [0.01, 3.0]}}", "--set", "tune.search=random",
                "--set", "tune.scheduler=pbt", "--set", "tune.synch=true",
                "--set", "tune.num_samples=1", "--set", "tune.max_concurrent_trials=2", "--set", f"train.steps={PBT_STEPS}",
                timeout=SEARCH_TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    c = sqlite_client(home)
    exp = c.get_experiment_by_name("tune-pbt").experiment_id
    trials = {t.data.tags["genpipe.trial_id"]: t for t in
              c.search_runs([exp], filter_string="attributes.run_name LIKE 'tune-pbt/tune/%'")}
    assert len(trials) == 2
    # Synchronous PBT pauses every trial at a perturbation: each starts again, from its own checkpoint
    # or, exploited, from the other's.
    starts = {tid: json.loads(t.data.tags.get("genpipe.starts", "[]")) for tid, t in trials.items()}
    exploits = [(tid, s) for tid, ss in starts.items() for s in ss if s["trial"] != tid]
    assert exploits, f"no trial was exploited: {starts}"
    steps = {tid: sorted(m.step for m in c.get_metric_history(t.info.run_id, "val/bits_per_dim"))
             for tid, t in trials.items()}
    during = [(tid, s) for tid, s in exploits if s["step"] < PBT_STEPS]  # one at the last step has nothing to run
    assert during, exploits
    for tid, s in during:
        donor = s["trial"]
        # it goes on from the donor's step, where the donor reported: not from its own step or from 0
        assert s["step"] in steps[donor] and s["step"] + 20 in steps[tid]
    for tid, t in trials.items():
        # Every step once: a paused trial's Train run logged nothing past the report Tune decided on.
        # (A start at the last step only reports the weights it was handed, at that step.)
        assert [s for s in steps[tid] if s < PBT_STEPS] == [20] and steps[tid][-1] == PBT_STEPS, steps[tid]
        assert json.loads(t.data.tags["genpipe.trial_config"])["model.lr"] in (0.01, 3.0)  # explored on the grid
    # Paused trials (every one, at the perturbation) gave their workers' CPUs back.
    assert reserved_placement_groups(home, within=30) == []
