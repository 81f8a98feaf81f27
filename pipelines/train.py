"""The train stage: Ray Train runs `train_loop` on every DDP worker.

Each worker holds its shard of the training split in memory and draws
batches by step number, so where training stands is one integer. Randomness
is a function of (seed, rank, step) — reseeded every step — so a run resumed
from a checkpoint at step k continues exactly as the uninterrupted run would
have, with no RNG state to save. Checkpoints hold the weights (safetensors),
optimizer states and the step; Ray Train writes them atomically to storage,
keeps `num_to_keep`, and hands the latest back to a re-run with the same
name (and to workers restarted after a failure).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import queue
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from gen_models import registry
from gen_models.base import GenerativeModel, StepContext
from pipelines import checkpoints, storage
from pipelines import data as datasets
from pipelines.config import PipelineSpec
from pipelines.errors import InvalidInput


class StepBatches:
    """Batch `step` of an endless, epoch-wise shuffled pass over the data.

    The global batch at a step is the same whatever the world size; rank r
    takes its r-th contiguous slice. So 2 workers x b see exactly what
    1 worker x 2b sees.
    """

    def __init__(self, x: Tensor, y: Tensor, *, global_batch: int, seed: int, rank: int, world: int,
                 memory_format: torch.memory_format = torch.contiguous_format):
        self.x, self.y = x, y
        self.memory_format = memory_format
        self.n = len(x)
        self.global_batch, self.seed, self.rank, self.world = global_batch, seed, rank, world
        self.local = global_batch // world
        self._perms: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            # On the data's device: indexing a GPU tensor with CPU indices would copy
            # them over synchronously every step, stalling the launch queue.
            self._perms = {epoch: torch.randperm(self.n, generator=g).to(self.x.device)}  # one epoch at a time
        return self._perms[epoch]

    def indices(self, step: int) -> Tensor:
        # Slices of cached permutations, not per-element arithmetic: this runs every step.
        pos, left, parts = step * self.global_batch + self.rank * self.local, self.local, []
        while left:  # at most two epochs meet in one batch
            epoch, offset = divmod(pos, self.n)
            take = min(left, self.n - offset)
            parts.append(self._perm(epoch)[offset:offset + take])
            pos, left = pos + take, left - take
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def batch(self, step: int, device: torch.device) -> tuple[Tensor, Tensor]:
        idx = self.indices(step)
        x = self.x[idx].to(device, non_blocking=True).float().div_(255)
        return x.contiguous(memory_format=self.memory_format), self.y[idx].to(device, non_blocking=True)


def step_seed(seed: int, rank: int, step: int) -> int:
    """A seed per (seed, rank, step), hashed so no two ranks' streams ever coincide."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{rank}:{step}".encode(), digest_size=8).digest(), "little") >> 1


def seed_step(seed: int, device: torch.device) -> None:
    """Reseed the generators a step draws from: the CPU's and, on a GPU, that device's.

    Not `torch.manual_seed`: it seeds every backend, and while CUDA is uninitialised it queues
    each seeding with a formatted stack trace, about 150 us a call on this VM's CPU, paid every step.
    """
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()
                                      ].manual_seed(seed)


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


def _all_finite(metrics: dict[str, float], device: torch.device) -> bool:
    """True when every rank's metrics are finite: one all-reduce, so all ranks take the same branch."""
    bad = torch.tensor([0.0 if all(math.isfinite(v) for v in metrics.values()) else 1.0], device=device)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bad.item()


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
    x, y = datasets.load_split(manifest, "train")
    # The whole uint8 split on the device (47 MB for Fashion-MNIST): no host copy per step.
    x, y = x.to(device), y.to(device)
    c, h, _ = manifest["shape"]
    model_cfg = spec.model.build_config(image_size=h, channels=c, num_classes=manifest["num_classes"])
    torch.manual_seed(spec.seed)  # identical initial weights on every rank
    model = registry.build(spec.model.family, model_cfg).to(device)
    ctx = StepContext(optimizers=model.configure_optimizers(), grad_clip=spec.train.grad_clip,
                      amp_dtype=torch.bfloat16 if spec.train.precision == "bf16" else None,
                      device_type=device.type)
    meta = {"family": spec.model.family, "config": registry.config_dict(model_cfg), "seed": spec.seed}

    start = 0
    # Ray Train's latest (a restart after a worker failure) first; else, in a search, the checkpoint
    # Tune hands the trial: its own on resume, a donor's after a PBT exploit.
    restarted = ray.train.get_checkpoint()
    checkpoint = restarted or cfg.get("start_from")
    if checkpoint:
        with checkpoint.as_directory() as d:
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

    batches = StepBatches(x, y, global_batch=spec.train.batch_size, seed=spec.seed, rank=rank, world=world,
                          memory_format=memory_format)
    # A restart recomputes, bit for bit, the steps between its checkpoint and the failure: those already
    # in MLflow are not logged twice.
    logger = _MetricLogger(cfg["tracking_uri"], cfg["run_id"], skip_logged=bool(restarted)) if rank == 0 else None
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

    def report(step: int, metrics: dict[str, float]) -> None:
        nonlocal snapshot, resume_at
        # Before anything is logged or saved: a NaN never reaches MLflow or a checkpoint. Except in a
        # search trial, which scores a diverged run as the worst (tune.Validation) for the scheduler to stop.
        if not searching and not _all_finite(metrics, device):
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
        if validate:
            metrics |= validate(model)
        if logger:
            logger.log(metrics, step)
            if searching:  # Tune may stop the trial at this report: MLflow must have it by then
                logger.flush()
            shown = " ".join(f"{k.removeprefix('train/')}={v:.4g}" for k, v in metrics.items())
            # Straight to fd 2: Ray Train's worker tees sys.stderr, which would print every line twice.
            os.write(2, f"step {step}/{spec.train.steps} {shown}\n".encode())
        if not checkpoint_due:
            ray.train.report({**metrics, "step": step})
            return
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                checkpoints.save(Path(tmp), model_state=model.plain_state_dict(), meta={**meta, "step": step},
                                 optimizer_states={n: o.state_dict() for n, o in ctx.optimizers.items()})
                ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            else:
                ray.train.report({**metrics, "step": step})

    due = lambda done: (done % spec.train.log_every == 0 or done % spec.train.checkpoint_every == 0  # noqa: E731
                        or done == spec.train.steps)
    try:
        rollbacks, step = 0, start
        while True:
            try:
                for step, metrics in run_steps(model, ctx, batches, start=resume_at, stop=spec.train.steps,
                                               seed=spec.seed, device=device, report_due=due):
                    report(step, metrics)
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


def run_steps(model: GenerativeModel, ctx: StepContext, batches: StepBatches, *, start: int, stop: int,
              seed: int, device: torch.device, report_due) -> Iterator[tuple[int, dict[str, float]]]:
    """The hot loop: steps `start`..`stop`, yielding (step, window means + img/s) when `report_due(step)`.

    A step's metrics (detached tensors) are only kept; they are averaged at the
    report, so no step waits on a host sync or launches kernels of its own. Time
    spent by the consumer between yields is not counted in img_per_s.
    """
    model.train()
    window: list[dict] = []
    t0 = time.perf_counter()
    for step in range(start, stop):
        seed_step(step_seed(seed, batches.rank, step), device)
        ctx.step = step
        with ctx.autocast():
            out = model.training_step(batches.batch(step, device), ctx)
        model.on_step_end(step + 1)
        window.append(out)
        if report_due(step + 1):
            metrics = {k: float(sum(o[k] for o in window)) / len(window) for k in window[0]}
            metrics["img_per_s"] = batches.global_batch * len(window) / (time.perf_counter() - t0)
            yield step + 1, metrics
            window, t0 = [], time.perf_counter()


class _MetricLogger:
    """Rank 0's metric log into the train stage's MLflow run (run status stays the driver's).

    A thread of its own imports MLflow, then sends each report, so training never waits on
    MLflow, from its first step on (the import alone is 4 s of a cold start): when the server
    is away (restarted, unreachable) the reports queue up and go once it answers again, in
    order. `close` waits for the queue to drain, up to `drain_s`; a search trial, which Tune
    may stop at any report, flushes at each one.
    """

    def __init__(self, tracking_uri: str, run_id: str, *, skip_logged: bool, drain_s: float = 300):
        self.tracking_uri, self.run_id, self.skip_logged, self.drain_s = tracking_uri, run_id, skip_logged, drain_s
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._send_all, name="mlflow-metrics", daemon=True)
        self.thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.queue.put(("metrics", step, int(time.time() * 1000), {k: v for k, v in metrics.items() if k != "step"}))

    def tag(self, key: str, value: str) -> None:
        self.queue.put(("tag", key, value))

    def _send_all(self) -> None:
        from mlflow.entities import Metric, RunTag
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking_uri)
        logged_through = None if self.skip_logged else -1  # a restart asks MLflow (below) what it already has
        while (item := self.queue.get()) is not None:
            kind, *rest = item
            delay, warned = 1.0, False
            while True:
                try:
                    if kind == "tag":
                        client.log_batch(self.run_id, tags=[RunTag(*rest)])
                    else:
                        step, ts, metrics = rest
                        if logged_through is None:  # every report carries img_per_s
                            logged_through = max((m.step for m in client.get_metric_history(
                                self.run_id, "train/img_per_s")), default=-1)
                        if step > logged_through:
                            client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v in metrics.items()])
                    break
                except Exception as e:  # noqa: BLE001 - any failure: keep the report, try again
                    if not warned:
                        os.write(2, f"MLflow did not take a report ({str(e).splitlines()[0][:200]}); "
                                    "training goes on, retrying\n".encode())
                        warned = True
                    time.sleep(delay)
                    delay = min(2 * delay, 30.0)
            if warned:
                os.write(2, b"MLflow took the report; logging resumed\n")
            self.queue.task_done()

    def flush(self) -> None:
        """Wait until every report so far is in MLflow."""
        self.queue.join()

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(self.drain_s)
        if self.thread.is_alive():
            os.write(2, f"{self.queue.qsize()} metric reports did not reach MLflow in {self.drain_s:.0f} s; "
                        "they are lost (the checkpoints are not)\n".encode())


def run(spec: PipelineSpec, data_manifest: dict, *, run_id: str, tracking_uri: str,
        storage_path: str, name: str, callbacks: list | None = None, validate=None, start_from=None) -> str:
    """Fit with Ray Train; return the URI of the final checkpoint directory.

    A tune trial adds `callbacks` (its reports go on to Tune), `validate` (model -> metrics, run by
    rank 0 at every report) and `start_from` (a checkpoint to begin at).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # Train's controller takes a report off a worker's one-slot result queue only when it polls the
    # workers, every 2 s by default: a worker that reports more often than that blocks in each
    # `ray.train.report` until the next poll (1.6 s a report on the smoke spec), and the end of a run
    # is seen up to 2 s late. A poll is one small actor call per worker. Set before `fit`, which hands
    # the variable on to the controller; a value in the environment wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    fs, path = storage.ray_storage(storage_path)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec.to_dict(), "data": data_manifest, "run_id": run_id,
                           "tracking_uri": tracking_uri, "validate": validate, "start_from": start_from},
        torch_config=TorchConfig(backend="nccl" if spec.train.use_gpu else "gloo",
                                 timeout_s=spec.train.collective_timeout_s),
        scaling_config=ScalingConfig(num_workers=spec.train.num_workers, use_gpu=spec.train.use_gpu,
                                     resources_per_worker={"CPU": spec.train.cpus_per_worker}),
        run_config=RunConfig(
            name=name, storage_path=path, storage_filesystem=fs, callbacks=callbacks,
            checkpoint_config=CheckpointConfig(num_to_keep=spec.train.num_to_keep),
            failure_config=FailureConfig(max_failures=spec.train.max_failures)),
    )
    result = trainer.fit()
    if result.error:
        # A bad checkpoint or shard fails every worker the same way: the user's error, not Ray's (exit 2).
        invalid = [e for e in getattr(result.error, "worker_failures", {}).values() if isinstance(e, InvalidInput)]
        if invalid:
            raise InvalidInput(str(invalid[0])) from None
        raise result.error
    ckpt = result.checkpoint
    return f"s3://{ckpt.path}" if storage_path.startswith("s3://") else ckpt.path
