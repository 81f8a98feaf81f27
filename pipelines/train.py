"""The train stage: Ray Train runs `pipelines.worker.train_loop` on every DDP
worker (how a worker trains, reads its data, logs and checkpoints: see there).

This module is what the stage's job runs, a Ray driver that starts the run
and waits for it. It imports no torch: torch's import (about 2 CPU-seconds
and 2 s before a `genpipe train` job reaches Ray) belongs in the workers,
which do the tensor work. So the run is started with Train's
`DataParallelTrainer` and genpipe's own torch config
(`pipelines.torch_backend`), which is what `TorchTrainer` is.
"""

from __future__ import annotations

from typing import Any

from pipelines import data as datasets
from pipelines import ray_internals, storage, torch_backend
from pipelines.config import PipelineSpec
from pipelines.errors import InvalidInput
from pipelines.stages import StageJob


def train_loop(cfg: dict[str, Any]) -> None:
    """Each worker's loop; imported there, not in the job that pickles this function for the workers."""
    from pipelines import worker

    worker.train_loop(cfg)


def connect() -> None:
    """The stage job's Ray driver (pipelines.stages connects it before the work), as `fit()` would start it."""
    import ray

    ray.init()


def stage(job: StageJob) -> dict:
    # Verify the shards here, where a bad one is a clean exit 2, not a failure inside every worker.
    datasets.verify_split(job.inputs["prepare"]["data"], "train")
    return {"checkpoint": run(job.spec, job.inputs["prepare"]["data"], run_id=job.run_id,
                              tracking_uri=job.tracking_uri, storage_path=job.stage_dir,
                              name=f"{job.spec.name}-{job.key}")}


def run(spec: PipelineSpec, data_manifest: dict, *, run_id: str | None, tracking_uri: str | None,
        storage_path: str, name: str, callbacks: list | None = None, validate=None, start_from=None) -> str:
    """Fit with Ray Train; return the URI of the final checkpoint directory.

    Rank 0 logs the reports into the MLflow run `run_id`. A tune trial passes no run id (it logs the
    reports it hands to Tune itself) and adds `callbacks` (its reports go on to Tune), `validate`
    (model -> metrics, run by rank 0 at every report) and `start_from` (a checkpoint to begin at).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    ray_internals.poll_train_workers_often()
    ray_internals.time_out_train_barriers(spec.train.collective_timeout_s)
    fs, path = storage.ray_storage(storage_path)
    trainer = ray_internals.torch_trainer(
        in_search=callbacks is not None,  # only a search trial passes callbacks
        train_loop_per_worker=train_loop,
        train_loop_config={"spec": spec.to_dict(), "data": data_manifest, "run_id": run_id,
                           "tracking_uri": tracking_uri, "validate": validate, "start_from": start_from},
        torch_config=torch_backend.TorchConfig(backend="nccl" if spec.train.use_gpu else "gloo",
                                               timeout_s=spec.train.collective_timeout_s),
        scaling_config=ScalingConfig(num_workers=spec.train.num_workers, use_gpu=spec.train.use_gpu,
                                     resources_per_worker={"CPU": spec.train.cpus_per_worker}),
        run_config=RunConfig(
            name=name, storage_path=path, storage_filesystem=fs, callbacks=callbacks,
            checkpoint_config=CheckpointConfig(num_to_keep=spec.train.num_to_keep),
            failure_config=FailureConfig(max_failures=spec.train.max_failures)),
    )
    with ray_internals.controller_dies_first(trainer):
        result = trainer.fit()
    if result.error:
        # A bad checkpoint or shard fails every worker the same way: the user's error, not Ray's (exit 2).
        invalid = [e for e in getattr(result.error, "worker_failures", {}).values() if isinstance(e, InvalidInput)]
        if invalid:
            raise InvalidInput(str(invalid[0])) from None
        raise result.error
    ckpt = result.checkpoint
    return f"s3://{ckpt.path}" if storage_path.startswith("s3://") else ckpt.path
