"""What each DDP worker of a train stage (or a search trial) runs: `train_loop`.

Each worker reads its images of each batch from the training split's shards
(`data.ShardedImages`: nothing but the labels in memory) and runs the
step-indexed loop of `pipelines.steps`, so where training stands is one
integer and a run resumed from a checkpoint at step k continues exactly as
the uninterrupted run would have. In a train stage rank 0 logs to MLflow
through `tracking.MetricLogger`; a search trial's actor logs the reports it
hands to Tune (pipelines/tune.py), so MLflow holds what Tune took, and the
workers never import MLflow. Checkpoints hold the weights (safetensors),
optimizer states and the step; Ray Train writes them atomically to storage,
keeps `num_to_keep`, and hands the latest back to a re-run with the same
name (and to workers restarted after a failure).

Torch is imported here, in the workers, and not by `pipelines.train`: the
stage's job only starts the run (see there).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from gen_models import registry
from gen_models.base import GenerativeModel, StepContext
from pipelines import checkpoints, tracking
from pipelines import data as datasets
from pipelines.config import PipelineSpec
from pipelines.steps import StepBatches, build_model, run_steps


def _average_buffers(model: GenerativeModel) -> None:
    """BatchNorm running stats drift apart per rank (no SyncBatchNorm on CPU): average them.

    Only the DDP-wrapped modules' buffers: anything else (EMA weights, schedules)
    is computed identically on every rank already.
    """
    world = dist.get_world_size()
    for buf in (b for m in model.ddp_modules().values() for b in m.buffers()):
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(world)


def _rank_spread(model: GenerativeModel) -> float:
    """Max minus min over ranks of a float64 parameter fingerprint: 0 when the ranks agree."""
    fp = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    gathered = [torch.zeros_like(fp) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, fp)
    return float(torch.cat(gathered).max() - torch.cat(gathered).min())


def _peak_memory_mib(device: torch.device) -> float:
    """This worker's peak: allocated device memory on a GPU, resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


class NonFiniteMetrics(RuntimeError):
    """Some rank's training metrics were NaN or infinite at a report."""


def _on_any_rank(flag: bool, device: torch.device) -> bool:
    """True when `flag` is true on some rank: one all-reduce, so all ranks take the same branch."""
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


@contextlib.contextmanager
def _files_in_a_directory(files: dict[str, bytes]):
    """A temporary directory holding `files` (name -> content): a checkpoint handed over as bytes."""
    with tempfile.TemporaryDirectory() as d:
        for name, content in files.items():
            (Path(d) / name).write_bytes(content)
        yield d


@dataclass
class _Snapshot:
    """The last checkpoint's state, kept in memory (on the device) for a rollback."""

    step: int
    model: dict[str, Tensor]
    optimizers: dict[str, dict]

    @classmethod
    def take(cls, model: GenerativeModel, ctx: StepContext, step: int) -> _Snapshot:
        return cls(step, {k: v.detach().clone() for k, v in model.state_dict().items()},
                   {n: copy.deepcopy(o.state_dict()) for n, o in ctx.optimizers.items()})

    def restore(self, model: GenerativeModel, ctx: StepContext, lr_factor: float) -> None:
        model.load_state_dict(self.model)
        for name, opt in ctx.optimizers.items():
            opt.load_state_dict(copy.deepcopy(self.optimizers[name]))
            for group in opt.param_groups:
                group["lr"] *= lr_factor


def train_loop(cfg: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    spec = PipelineSpec.model_validate(cfg["spec"])
    ctx_ray = ray.train.get_context()
    rank, world = ctx_ray.get_world_rank(), ctx_ray.get_world_size()
    torch.set_num_threads(spec.train.cpus_per_worker)
    device = ray.train.torch.get_device()

    manifest = cfg["data"]
    # Read in place, batch by batch: a worker's memory does not grow with the dataset.
    x = datasets.ShardedImages(manifest, "train")
    model, ctx = build_model(spec, manifest, device)
    meta = {"family": spec.model.family, "config": registry.config_dict(model.config), "seed": spec.seed}

    start = 0
    # Ray Train's latest (a restart after a worker failure) first; else, in a search, the checkpoint
    # Tune hands the trial: its own on resume, a donor's after a PBT exploit.
    restarted = ray.train.get_checkpoint()
    if restarted or cfg.get("start_from"):
        with (restarted.as_directory() if restarted else _files_in_a_directory(cfg["start_from"])) as d:
            saved, weights, optimizer_states = checkpoints.load_training_state(d)
        model.load_state_dict(weights)
        for name, opt in ctx.optimizers.items():
            opt.load_state_dict(optimizer_states[name])
        start = saved["step"]
        if rank == 0:
            os.write(2, f"resuming from step {start}\n".encode())  # fd 2: see the step lines below

    memory_format = torch.channels_last if spec.train.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    if world > 1:  # one worker has nothing to all-reduce: DDP would only add its hooks' cost
        if spec.train.use_gpu:
            for name, m in model.ddp_modules().items():
                setattr(model, name, torch.nn.SyncBatchNorm.convert_sync_batchnorm(m))
        model.wrap_ddp(lambda m: DDP(m, forward_sync_buffers=False,
                                     device_ids=[device.index] if device.type == "cuda" else None))
    if spec.train.compile:
        for m in model.compile_modules().values():
            m.compile()  # in place: state_dict keys stay as they are

    batches = StepBatches(x, x.y, global_batch=spec.train.batch_size, seed=spec.seed, rank=rank, world=world,
                          memory_format=memory_format)
    logger = None
    if cfg["run_id"]:  # the same on every rank: the gather below is a collective
        # A restart recomputes, bit for bit, the steps between its checkpoint and the failure: those already
        # in MLflow are not logged twice.
        logger = tracking.MetricLogger(cfg["tracking_uri"], cfg["run_id"], skip_logged=bool(restarted)) if rank == 0 else None
        nodes = [None] * world
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
        if logger:
            logger.tag("genpipe.train_nodes", json.dumps(nodes))
    searching = cfg.get("validate") is not None
    validate = cfg["validate"] if searching and rank == 0 else None  # a search's trial metric (pipelines/tune.py)

    # Only a rollback needs the last checkpoint's state in memory: copying it costs every checkpoint.
    keep_snapshot = spec.train.on_nan == "rollback" and not searching
    snapshot = _Snapshot.take(model, ctx, start) if keep_snapshot else None
    resume_at = start

    def report(step: int, metrics: dict[str, float]) -> bool:
        """Log, checkpoint and report to Ray at `step`; True when Tune has stopped the trial (the run ends)."""
        nonlocal snapshot, resume_at
        # Before anything is logged or saved: a NaN never reaches MLflow or a checkpoint. Except in a
        # search trial, which scores a diverged run as the worst (tune.Validation) for the scheduler to stop.
        if not searching and _on_any_rank(not all(math.isfinite(v) for v in metrics.values()), device):
            raise NonFiniteMetrics(f"non-finite training metrics in the {spec.train.log_every} steps up to "
                                   f"step {step} on at least one rank")
        metrics = {f"train/{k}": v for k, v in metrics.items()}
        checkpoint_due = step % spec.train.checkpoint_every == 0 or step == spec.train.steps
        if checkpoint_due:
            _average_buffers(model)
            if keep_snapshot:
                snapshot, resume_at = _Snapshot.take(model, ctx, step), step
            # A desync (e.g. a module called outside its DDP wrapper) shows up here, not in the samples.
            metrics["train/rank_param_spread"] = _rank_spread(model)
            metrics["train/peak_mem_mib"] = _peak_memory_mib(device)
        if searching:
            scored = validate(model) if validate else {}
            # Tune stopped the trial (rank 0 heard it waiting for its go-ahead): every rank ends here.
            if _on_any_rank(scored is None, device):
                return True
            metrics |= scored
        if logger:
            logger.log(metrics, step)
        if rank == 0:
            shown = " ".join(f"{k.removeprefix('train/')}={v:.4g}" for k, v in metrics.items())
            # Straight to fd 2: Ray Train's worker tees sys.stderr, which would print every line twice.
            os.write(2, f"step {step}/{spec.train.steps} {shown}\n".encode())
        if not checkpoint_due:
            ray.train.report({**metrics, "step": step})
            return False
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                checkpoints.save(Path(tmp), model_state=model.plain_state_dict(), meta={**meta, "step": step},
                                 optimizer_states={n: o.state_dict() for n, o in ctx.optimizers.items()})
                ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            else:
                ray.train.report({**metrics, "step": step})
        return False

    due = lambda done: (done % spec.train.log_every == 0 or done % spec.train.checkpoint_every == 0  # noqa: E731
                        or done == spec.train.steps)
    try:
        rollbacks, step = 0, start
        while True:
            try:
                for step, metrics in run_steps(model, ctx, batches, start=resume_at, stop=spec.train.steps,
                                               seed=spec.seed, device=device, report_due=due):
                    if report(step, metrics):
                        return
                break
            except NonFiniteMetrics as e:
                if spec.train.on_nan == "stop" or rollbacks == spec.train.max_rollbacks:
                    hint = ("set train.on_nan: rollback to retry from the last checkpoint with a lower learning rate"
                            if spec.train.on_nan == "stop" else f"gave up after {rollbacks} rollbacks")
                    raise NonFiniteMetrics(f"{e}; {hint}") from None
                rollbacks += 1
                factor = spec.train.nan_lr_factor ** rollbacks
                snapshot.restore(model, ctx, factor)
                if rank == 0:
                    os.write(2, f"{e}: rolled back to step {snapshot.step}, learning rates x{factor:g} "
                                f"(rollback {rollbacks}/{spec.train.max_rollbacks})\n".encode())
        if start >= spec.train.steps:  # re-run of a finished run: hand the final weights on again
            report(start, {})
    finally:
        if logger:
            logger.close()
