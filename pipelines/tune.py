"""The tune stage: a Ray Tune search whose trials are each a DDP training run.

Ray 2.60's shape (Train V2): a trial is a class trainable (`Trial`) that
launches a `TorchTrainer`, so a trial's own actor only drives its training
run and the run's workers hold the resources. Trials are `train.run` with two
additions: rank 0 scores the model on the validation split at every report
(FID on extractor features, or bits/dim), and every report carries a
checkpoint, which Tune copies as the trial's checkpoint.

Why not `TuneReportCallback`: it forwards metrics only (the checkpoint as a
path metric), and a trial without Tune checkpoints can neither be exploited
by PBT nor continue from its checkpoint when a search resumes. So a trial
starts from whatever checkpoint Tune hands it — none, its own latest, or a
PBT donor's — as a fresh Train run named after that checkpoint. Why a class,
not a function trainable: its `cleanup` may wait for the Train run to end
(a function trainable's is Tune's own, and does not wait).

MLflow: the stage's run is the parent of the search; each trial opens its
own child run (found again by trial id on resume) and logs into it the
reports it hands to Tune (its Train run's workers log nothing, nor import
MLflow); the driver's callback closes it when Tune says the trial ended.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import threading
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from ray import tune

from gen_models import registry
from gen_models.base import GenerativeModel
from pipelines import checkpoints, metrics, ray_internals, storage, tracking, train
from pipelines import data as datasets
from pipelines.config import PipelineSpec
from pipelines.errors import InvalidInput, StageFailed
from pipelines.mailbox import Channel, Mailbox
from pipelines.stages import StageJob

TRIAL_TAG = "genpipe.trial_id"
BEST_TAG = "genpipe.best_trial"
MODES = {"fid": "min", "bits_per_dim": "min"}


def objective(spec: PipelineSpec) -> tuple[str, str]:
    """(Tune metric name, mode): the tune.metric, else the family's primary metric."""
    model_cls = registry.model_class(spec.model.family)
    name = spec.tune.metric or model_cls.primary_metric[0]
    if name == "bits_per_dim" and model_cls.log_prob is GenerativeModel.log_prob:
        raise InvalidInput(f"tune.metric bits_per_dim: family {spec.model.family} has no likelihood")
    return f"val/{name}", MODES[name]


class Validation:
    """A trial's metric: the model scored on (part of) the validation split.

    FID compares `n` samples with the validation images on the extractor's
    features; bits/dim is measured on `n` validation images. The test split
    stays for the evaluate stage: choosing on it would flatter the winner.

    It also paces the run: from the second report on, it first waits for the
    trial's go-ahead (`pace`), given once Tune has taken the previous report.
    Train's workers would otherwise train and log ahead of Tune's decisions,
    and a trial that ASHA stopped at step 20 would show steps 40 and 60 in
    MLflow, or a PBT-paused one log the same steps twice after its restart.
    """

    def __init__(self, prepared: dict, metric: str, n: int, seed: int, pace=None):
        self.prepared, self.metric, self.n, self.seed = prepared, metric.removeprefix("val/"), n, seed
        self.pace, self.calls = pace, 0

    @cached_property
    def x_val(self) -> datasets.ShardedImages:
        return datasets.ShardedImages(self.prepared["data"], "val")  # read a batch at a time

    @cached_property
    def extractor(self) -> metrics.Extractor:
        ext = self.prepared["extractor"]
        return metrics.load_extractor(storage.read_verified(ext["uri"], ext["sha256"]))

    @cached_property
    def val_features(self):
        return metrics.extract_uint8(self.extractor, self.x_val)[0]

    @torch.no_grad()
    def __call__(self, model: GenerativeModel) -> dict[str, float] | None:
        """The trial's metric; None when the trial was stopped (the run ends here, logging nothing more)."""
        from pipelines.evaluate import bits_per_dim, draw

        if self.pace is not None and self.calls and self.pace.get() == STOP:
            return None
        self.calls += 1
        # A plain copy: sampling through the DDP wrappers on one rank is asking for trouble.
        device = next(model.parameters()).device
        plain = type(model)(model.config).to(device)
        plain.load_state_dict(model.plain_state_dict())
        plain.eval()
        if self.metric == "bits_per_dim":
            value = bits_per_dim(plain, self.x_val[:self.n])
        else:
            samples = draw(plain, self.n, batch_size=500, seed=self.seed)
            value = metrics.fid_from_features(metrics.extract(self.extractor, samples)[0], self.val_features)
        # A diverged trial is the worst, not a NaN that every comparison (ASHA's cut-off too) lets through.
        return {f"val/{self.metric}": value if math.isfinite(value) else math.inf}


def _forward_reports(queue):
    """A Train callback that puts each report (rank 0's metrics, the checkpoint) on `queue`."""
    from ray.train import UserCallback

    class ForwardReports(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            queue.put((metrics[0], checkpoint))

    return ForwardReports()


STARTS_TAG = "genpipe.starts"
ORIGIN = "origin.json"  # in Tune's copy of a checkpoint: the trial that reported it


def _record_start(c, run_id: str, step: int, trial_id: str) -> None:
    """Append this start to the trial run's list of starts: a PBT exploit shows as a start from another
    trial's checkpoint, a pause or a resumed search as one from the trial's own."""
    starts = json.loads(c.get_run(run_id).data.tags.get(STARTS_TAG, "[]"))
    starts.append({"step": step, "trial": trial_id})
    while len(json.dumps(starts)) > 5000:  # MLflow's limit on a tag value: the latest starts matter most
        starts.pop(0)
    c.set_tag(run_id, STARTS_TAG, json.dumps(starts))


class Trial(tune.Trainable):
    """One trial: a Train run of the spec with the trial's values set (dotted spec fields).

    Each `step` is one report of that run, with its checkpoint, which Tune copies as the trial's own
    (`save_checkpoint`). The run starts at the first `step`, from the checkpoint Tune handed over in
    `load_checkpoint` if any: the trial's own on resume, a PBT donor's after an exploit. When Tune stops
    or pauses the trial, `cleanup` tells the run to end at its next report and waits until it has: its
    workers' placement group is gone before Tune removes the trial's own (removing it first would kill
    the run's controller under its workers).
    """

    def setup(self, config: dict[str, Any], *, spec: dict, prepared: dict, parent_run: str, tracking_uri: str,
              storage_path: str, key: str) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.base = PipelineSpec.model_validate(spec)
        every = self.base.tune.eval_every
        # Train keeps one checkpoint: Tune keeps the trial's history of them.
        self.spec = self.base.with_overrides({**config, "train.log_every": every, "train.checkpoint_every": every,
                                              "train.num_to_keep": 1})
        self.prepared, self.storage_path = prepared, storage_path
        self.mlflow = MlflowClient(tracking_uri)
        self.run_id = tracking.open_run(self.mlflow, self.mlflow.get_run(parent_run).info.experiment_id,
                                        name=f"{self.base.name}/tune/{self.trial_id}", key=f"{key}/{self.trial_id}",
                                        parent_id=parent_run, tags={TRIAL_TAG: self.trial_id})
        if not self.mlflow.get_run(self.run_id).data.params:  # params are immutable: the values it started with
            self.mlflow.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in config.items()])
        self.mlflow.set_tag(self.run_id, "genpipe.trial_config", json.dumps(config))  # the values now
        # The reports Tune takes, and no other: a stopped or paused trial's run ends at the report Tune
        # decided on. A resumed search re-runs a trial from the checkpoint Tune last recorded, which may
        # be older than the report it last took: what MLflow has already is not logged twice.
        self.logger = tracking.MetricLogger(tracking_uri, self.run_id, skip_logged=True)
        mailbox = Mailbox.remote()
        self.reports, self.pace = Channel(mailbox, "reports"), Channel(mailbox, "pace")
        self.start: dict[str, bytes] | None = None
        self.origin = "start"
        self.fit: threading.Thread | None = None
        self.failure: Exception | None = None  # what ended the Train run, raised again by `step`
        self.last = None  # the latest report's Train checkpoint

    def restore(self, checkpoint_path) -> None:
        # Tune deletes a trial's older checkpoints (CheckpointConfig.num_to_keep) as soon as it has a newer
        # one, but snapshots the experiment (what a resumed search restores from) after that, in the
        # background: a search killed in between names a checkpoint that is gone, and Ray refuses to
        # restore it. The trial's newest checkpoint is the one the next snapshot would have named.
        ckpt = getattr(checkpoint_path, "checkpoint", None)
        if ckpt is not None and not _exists(ckpt.filesystem, ckpt.path):
            newest = _newest_checkpoint(ckpt.filesystem, os.path.dirname(ckpt.path))
            if newest is not None:
                print(f"trial {self.trial_id}: {os.path.basename(ckpt.path)} is gone (the search was stopped before "
                      f"Tune recorded a newer one); continuing from {os.path.basename(newest.path)}", flush=True)
                checkpoint_path = type(checkpoint_path)(checkpoint=newest, metrics=checkpoint_path.metrics)
        super().restore(checkpoint_path)

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        # The files themselves go to the workers: on S3 this directory is a download on this node only,
        # gone when this returns.
        d = Path(checkpoint_dir)
        self.start = {f.name: f.read_bytes() for f in d.iterdir() if f.is_file() and f.name != ORIGIN}
        step = checkpoints.read_meta(checkpoint_dir)["step"]
        donor = json.loads((d / ORIGIN).read_text())["trial_id"]
        _record_start(self.mlflow, self.run_id, step, donor)
        # A fresh Train run per starting point: Train would otherwise resume its own latest checkpoint
        # rather than the one Tune hands over.
        self.origin = f"{donor}-{step}"

    def step(self) -> dict[str, Any]:
        if self.fit is None:
            self.fit = threading.Thread(target=self._fit, daemon=True)
            self.fit.start()
        else:
            self.pace.put(True)  # Tune has taken the previous report
        item = self.reports.get()
        if item is None:
            raise self.failure or StageFailed(f"trial {self.trial_id}: its run ended early")
        metrics, self.last = item
        self.logger.log(metrics, metrics["step"])
        self.logger.flush()  # Tune may stop the trial at this report: MLflow must have it by then
        return {**metrics, "should_checkpoint": True, "done": metrics["step"] >= self.spec.train.steps}

    def _fit(self) -> None:
        try:
            train.run(self.spec, self.prepared["data"], run_id=None, tracking_uri=None,
                      storage_path=storage.join(self.storage_path, "trials"), name=f"{self.trial_id}-{self.origin}",
                      callbacks=[_forward_reports(self.reports)], start_from=self.start,
                      validate=Validation(self.prepared, objective(self.base)[0], self.base.tune.eval_samples,
                                          self.base.seed, self.pace))
        except Exception as e:  # raised again by `step`, in the thread Tune calls it from
            self.failure = e
        finally:
            self.reports.put(None)

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        self.last.to_directory(checkpoint_dir)
        (Path(checkpoint_dir) / ORIGIN).write_text(json.dumps({"trial_id": self.trial_id}))

    def cleanup(self) -> None:
        if self.fit is not None:
            self.pace.put(STOP)
            self.fit.join(timeout=STOP_TIMEOUT_S)
        self.logger.close()


def _exists(fs, path: str) -> bool:
    import pyarrow.fs

    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def _newest_checkpoint(fs, trial_dir: str):
    """The trial directory's newest complete `checkpoint_NNNNNN` (Tune numbers them in order), if any."""
    import pyarrow.fs

    found = [i.path for i in fs.get_file_info(pyarrow.fs.FileSelector(trial_dir, allow_not_found=True))
             if i.type == pyarrow.fs.FileType.Directory and os.path.basename(i.path).startswith("checkpoint_")]
    # Newest first, and only a whole one: a kill during Tune's copy of the next checkpoint leaves a partial
    # directory, and the checkpoint's meta.json and our origin.json are what a complete one has.
    for path in sorted(found, key=os.path.basename, reverse=True):
        if all(_exists(fs, f"{path}/{name}") for name in (ORIGIN, checkpoints.META)):
            return tune.Checkpoint(path, filesystem=fs)
    return None


STOP = "stop"  # on a trial's pace queue: end the run at its next report
STOP_TIMEOUT_S = 120  # past this Tune goes on, and Train's PlacementGroupCleaner frees what the run held


def trial_run(c, parent_run: str, trial_id: str):
    """The MLflow run of trial `trial_id` of the search whose run is `parent_run`, if it opened one."""
    found = c.search_runs([c.get_run(parent_run).info.experiment_id], max_results=1,
                          filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}' and "
                                        f"tags.`mlflow.parentRunId` = '{parent_run}'")
    return found[0] if found else None


def _trial_runs_callback(tracking_uri: str, parent_run: str, metric: str):
    """Closes each trial's MLflow run when Tune says the trial ended, and prints one line per result."""
    from mlflow.tracking import MlflowClient

    class TrialRuns(tune.Callback):
        def _close(self, trial, status: str) -> None:
            c = MlflowClient(tracking_uri)
            run = trial_run(c, parent_run, trial.trial_id)
            if run:  # none when the trial failed before it could open one
                c.set_terminated(run.info.run_id, status)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            print(f"trial {trial.trial_id} step {result.get('step')} {metric}={result.get(metric, float('nan')):.4g}",
                  flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._close(trial, "FINISHED")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._close(trial, "FAILED")

    return TrialRuns()


def _domain(dim):
    values = getattr(dim, dim.kind)
    return {"choice": lambda: tune.choice(values), "grid": lambda: tune.grid_search(values),
            "uniform": lambda: tune.uniform(*values), "loguniform": lambda: tune.loguniform(*values),
            "randint": lambda: tune.randint(*values)}[dim.kind]()


def concurrent_trials(spec: PipelineSpec) -> int:
    """tune.max_concurrent_trials, else as many trials as the cluster fits side by side."""
    import ray

    if spec.tune.max_concurrent_trials:
        return spec.tune.max_concurrent_trials
    total, t = ray.cluster_resources(), spec.train
    if t.use_gpu:
        return max(1, int(total.get("GPU", 0) // t.num_workers))
    return max(1, int(total.get("CPU", 0) // (t.num_workers * t.cpus_per_worker)))


def _scheduler(spec: PipelineSpec):
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    t = spec.tune
    # Time in training steps, not reports: a resumed or exploited trial's step is what it has learnt.
    if t.scheduler == "asha":
        return ASHAScheduler(time_attr="step", max_t=spec.train.steps, grace_period=t.grace_period or t.eval_every,
                             reduction_factor=t.reduction_factor)
    if t.scheduler == "pbt":
        # Explore around the space itself: listed values are resampled, ranges scaled or resampled.
        mutations = {k: list(getattr(d, d.kind)) if d.kind in ("choice", "grid") else _domain(d)
                     for k, d in t.space.items()}
        return PopulationBasedTraining(time_attr="step", perturbation_interval=t.perturbation_interval or t.eval_every,
                                       hyperparam_mutations=mutations, synch=t.synch)
    return None


def _search(spec: PipelineSpec):
    if spec.tune.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=spec.seed)
    return None


def connect() -> None:
    """The stage job's Ray driver (pipelines.stages connects it before the work)."""
    import ray

    ray.init(log_to_driver=False)  # the trials' worker logs would drown the progress lines


def stage(job: StageJob) -> dict:
    # As the train stage does: a bad shard is a clean exit 2 here, not a failure inside every trial.
    for split in ("train", "val"):
        datasets.verify_split(job.inputs["prepare"]["data"], split)
    return run(job.spec, job.inputs["prepare"], run_id=job.run_id, tracking_uri=job.tracking_uri,
               storage_path=job.stage_dir, key=job.key, resume=job.resume)


def run(spec: PipelineSpec, prepared: dict, *, run_id: str, tracking_uri: str, storage_path: str, key: str,
        resume: bool) -> dict:
    """Search; log the trials table; return the best trial's checkpoint, config and metric."""
    import ray
    from mlflow.tracking import MlflowClient

    metric, mode = objective(spec)
    # Tune snapshots the experiment at every checkpoint when it prunes them, which is what lets a killed
    # search resume where its trials were; with a report per checkpoint it warns about it every time.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    t = spec.tune
    trainable = tune.with_parameters(Trial, spec=spec.to_dict(), prepared=prepared, parent_run=run_id,
                                     tracking_uri=tracking_uri, storage_path=storage_path, key=key)
    trainable = tune.with_resources(
        trainable,
        # The trial actor only drives its Train run, whose workers reserve the CPUs (GPUs): a trial actor
        # holding (part of) a CPU too would leave the last trial that should fit waiting for its workers.
        # Tune needs some resource in the request: the driver's memory.
        {"CPU": 0, "memory": 256 * 2**20})
    space = {k: _domain(d) for k, d in t.space.items()}
    name = f"search-{key}"
    path = storage.join(storage_path, name)
    fs, fs_root = storage.ray_storage(storage_path)
    fs_path = storage.join(fs_root, name)  # `path` as the filesystem names it (no s3:// scheme)
    if tune.Tuner.can_restore(fs_path, storage_filesystem=fs):
        if not resume:
            raise InvalidInput(f"an interrupted search is at {path}: continue it with --resume")
        print(f"resuming the search at {path}", flush=True)
        tuner = tune.Tuner.restore(fs_path, trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=space, storage_filesystem=fs)
    else:
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=_scheduler(spec), search_alg=_search(spec),
                                        num_samples=t.num_samples, max_concurrent_trials=concurrent_trials(spec),
                                        time_budget_s=t.time_budget_s),
            run_config=tune.RunConfig(name=name, storage_path=fs_root, storage_filesystem=fs, verbose=0,
                                      # A trial whose Train run dies (a lost worker or node) starts again
                                      # from its last checkpoint, as Ray's guide to Train in Tune advises.
                                      failure_config=tune.FailureConfig(max_failures=spec.train.max_failures),
                                      callbacks=[_trial_runs_callback(tracking_uri, run_id, metric)],
                                      # A PBT donor's checkpoint must outlive the donor's next ones: the
                                      # exploiting trial reads it only once its Train run has started.
                                      checkpoint_config=tune.CheckpointConfig(
                                          num_to_keep=None if t.scheduler == "pbt" else spec.train.num_to_keep)))
    results = tuner.fit()
    try:
        freed = ray_internals.free_placement_groups_left_by(ray.get_runtime_context().get_job_id())
    except Exception as e:  # noqa: BLE001 -- the search's result stands; say what may stay reserved
        print(f"could not check for placement groups left by the trials' Train runs: {e}", flush=True)
    else:
        if freed:
            print(f"freed {freed} placement group(s) a trial's Train run left reserved", flush=True)

    rows = [_row(spec, r, metric) for r in results]
    done = [r for r in results if r.metrics and math.isfinite(r.metrics.get(metric, math.inf))]
    if not done:
        raise StageFailed(f"no trial reported a finite {metric}; trials:\n{format_table(rows)}")
    best = results.get_best_result(metric=metric, mode=mode, scope="last")
    best_id = best.metrics["trial_id"]
    c = MlflowClient(tracking_uri)
    best_run = trial_run(c, run_id, best_id)
    c.set_tag(best_run.info.run_id, BEST_TAG, "true")
    c.set_tag(run_id, BEST_TAG, best_id)
    c.log_metric(run_id, f"best/{metric}", best.metrics[metric])
    table = format_table(rows)
    print(f"{len(rows)} trials, best {best_id} ({metric}={best.metrics[metric]:.4g}):\n{table}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "trials.txt").write_text(table + "\n")
        (Path(tmp) / "best_config.json").write_text(json.dumps(best.config, indent=2))
        (Path(tmp) / "metric_vs_step.png").write_bytes(plot_curves(results, metric))
        for f in ("trials.txt", "best_config.json", "metric_vs_step.png"):
            c.log_artifact(run_id, str(Path(tmp) / f))
    ckpt = best.checkpoint
    return {"checkpoint": f"s3://{ckpt.path}" if storage.is_s3(storage_path) else ckpt.path,
            "best": {"trial": best_id, "run_id": best_run.info.run_id, "config": best.config,
                     "metric": {"name": metric, "mode": mode, "value": best.metrics[metric]}},
            "trials": rows}


def _row(spec: PipelineSpec, result, metric: str) -> dict[str, Any]:
    m = result.metrics or {}
    steps = int(m.get("step", 0))
    status = "error" if result.error else "done" if steps >= spec.train.steps else "stopped"
    return {"trial": m.get("trial_id", Path(result.path).name), **result.config,
            metric: m.get(metric, math.nan), "steps": steps, "status": status}


def plot_curves(results, metric: str) -> bytes:
    """The metric against the step, one line per trial: where ASHA cut, where PBT jumped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        df = r.metrics_dataframe
        if df is not None and metric in df:
            ax.plot(df["step"], df[metric], marker="o", ms=3, label=r.metrics.get("trial_id"))
    ax.set(xlabel="step", ylabel=metric, title=f"{metric} per trial")
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def format_table(rows: list[dict[str, Any]]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cells = [cols] + [[f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells)
