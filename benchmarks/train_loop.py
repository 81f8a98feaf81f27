"""The pipeline's training loop against a bare PyTorch loop: same model, batch,
data, device, precision and thread count, in one process, rounds interleaved
so drift hits both alike.

    .venv/bin/python benchmarks/train_loop.py                     # every family, CPU, fp32
    python benchmarks/train_loop.py --device cuda --variant fp32 bf16 bf16_cl bf16_cl_compile

Three loops per (family, variant):
    bare      what a user would write: random batch from a device tensor, training_step
    pipeline  pipelines.steps.run_steps over StepBatches (step-indexed batches, per-step
              reseeding, tensor metric sums), as a train worker runs it
    ddp       the same with every ddp_module wrapped in DDP over a one-process group
              (gloo on the CPU, nccl on a GPU): what DDP's hooks cost a worker of
              a multi-worker run (a one-worker run skips DDP)
Ratios are over bare. "speedup" is a variant's bare img/s over fp32's. Peak memory
is the device's peak allocation in the ddp loop (CUDA only). Prints a table and
one JSON line.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from gen_models import registry
from gen_models.base import GenerativeModel, StepContext
from pipelines.steps import StepBatches, run_steps

VARIANTS = {  # name -> (autocast dtype, channels_last, compile)
    "fp32": (None, False, False),
    "bf16": (torch.bfloat16, False, False),
    "bf16_cl": (torch.bfloat16, True, False),
    "bf16_cl_compile": (torch.bfloat16, True, True),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# As the train worker wraps (forward_sync_buffers=False); torch < 2.13 spells it broadcast_buffers.
NO_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                  else {"broadcast_buffers": False})


def build(family: str, variant: str, device: torch.device, size: int, wrap_ddp: bool
          ) -> tuple[GenerativeModel, StepContext, torch.memory_format]:
    amp, channels_last, compile_ = VARIANTS[variant]
    torch.manual_seed(0)
    model = registry.build(family, {"image_size": size, "channels": 1, "num_classes": 10}).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    ctx = StepContext(optimizers=model.configure_optimizers(), amp_dtype=amp, device_type=device.type)
    if wrap_ddp:
        model.wrap_ddp(lambda m: DDP(m, **NO_BUFFER_SYNC,
                                     device_ids=[device.index] if device.type == "cuda" else None))
    if compile_:
        for m in model.compile_modules().values():
            m.compile()
    return model, ctx, fmt


def bare_loop(model, ctx, fmt, x, y, device, batch_size: int) -> Callable[[int, int], None]:
    def run(start: int, steps: int) -> None:
        for step in range(start, start + steps):
            idx = torch.randint(len(x), (batch_size,), device=device)
            ctx.step = step
            with ctx.autocast():
                model.training_step((x[idx].float().div_(255).contiguous(memory_format=fmt), y[idx]), ctx)
            model.on_step_end(step + 1)
    return run


def pipeline_loop(model, ctx, fmt, x, y, device, batch_size: int) -> Callable[[int, int], None]:
    batches = StepBatches(x, y, global_batch=batch_size, seed=0, rank=0, world=1, memory_format=fmt)

    def run(start: int, steps: int) -> None:
        for _ in run_steps(model, ctx, batches, start=start, stop=start + steps, seed=0, device=device,
                           report_due=lambda done: done % 20 == 0):
            pass
    return run


def measure(family: str, variant: str, device: torch.device, x, y, *, batch_size: int, steps: int,
            rounds: int) -> dict:
    loops = {"bare": (False, bare_loop), "pipeline": (False, pipeline_loop), "ddp": (True, pipeline_loop)}
    runners, rates = {}, {name: [] for name in loops}
    for name, (wrap, make) in loops.items():
        model, ctx, fmt = build(family, variant, device, x.shape[-1], wrap)
        runners[name] = make(model, ctx, fmt, x, y, device, batch_size)
    peak = None
    for r in range(rounds + 1):  # round 0 warms up allocator, kernels and compilation
        order = list(loops) if r % 2 else list(reversed(loops))
        for name in order:
            if device.type == "cuda" and name == "ddp":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t0 = time.perf_counter()
            runners[name](r * steps, steps)
            sync(device)
            if r:
                rates[name].append(batch_size * steps / (time.perf_counter() - t0))
            if device.type == "cuda" and name == "ddp":
                peak = torch.cuda.max_memory_allocated(device) / 2**20
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"bare_img_per_s": round(med["bare"], 1), "pipeline_img_per_s": round(med["pipeline"], 1),
            "ddp_img_per_s": round(med["ddp"], 1), "pipeline_ratio": round(med["pipeline"] / med["bare"], 3),
            "ddp_ratio": round(med["ddp"] / med["bare"], 3),
            "spread": round((max(rates["bare"]) - min(rates["bare"])) / med["bare"], 3),
            **({"peak_mib": round(peak, 1)} if peak is not None else {})}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--family", nargs="+", default=sorted(registry.FAMILIES))
    p.add_argument("--variant", nargs="+", default=["fp32"], choices=list(VARIANTS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=40, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=64, help="per-worker batch (the demo's 128 over 2 workers)")
    p.add_argument("--size", type=int, default=28, help="image side (Fashion-MNIST: 28)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, as one worker with cpus_per_worker=1")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # nccl wants an index
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                            device_id=device if device.type == "cuda" else None)
    g = torch.Generator().manual_seed(0)
    # uint8 images on the device, as a train worker holds its shard.
    x = torch.randint(0, 256, (10_000, 1, a.size, a.size), dtype=torch.uint8, generator=g).to(device)
    y = torch.randint(0, 10, (10_000,), generator=g).to(device)
    results: dict[str, dict] = {}
    for family in a.family:
        for variant in a.variant:
            try:
                results[f"{family}/{variant}"] = measure(family, variant, device, x, y, batch_size=a.batch,
                                                               steps=a.steps, rounds=a.rounds)
            except Exception as e:  # one family failing a flag must not hide the others' figures
                results[f"{family}/{variant}"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            print(json.dumps({f"{family}/{variant}": results[f"{family}/{variant}"]}), flush=True)
    for key, r in results.items():
        base = results.get(key.split("/")[0] + "/fp32", {})
        if "bare_img_per_s" in r and "bare_img_per_s" in base:
            r["speedup"] = round(r["bare_img_per_s"] / base["bare_img_per_s"], 2)
    head = f"{'family/variant':26} {'bare':>9} {'pipeline':>9} {'ddp':>9} {'pipe/bare':>9} {'ddp/bare':>8} {'speedup':>7} {'peak MiB':>8}"
    print(head)
    for key, r in results.items():
        if "error" in r:
            print(f"{key:26} {r['error']}")
            continue
        print(f"{key:26} {r['bare_img_per_s']:>9} {r['pipeline_img_per_s']:>9} {r['ddp_img_per_s']:>9} "
              f"{r['pipeline_ratio']:>9} {r['ddp_ratio']:>8} {r.get('speedup', ''):>7} {r.get('peak_mib', ''):>8}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{a.threads} threads"
    print(json.dumps({"benchmark": "train_loop", "device": name, "torch": torch.__version__, "batch": a.batch,
                      "size": a.size, "steps": a.steps, "rounds": a.rounds, "results": results}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
