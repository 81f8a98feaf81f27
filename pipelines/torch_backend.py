"""Ray Train's torch backend (`TorchConfig`), in a module that does not import torch.

Train's controller unpickles the run's backend config and the backend itself (two of its callbacks
carry one each). Ray's live in `ray.train.torch.config`, which imports torch at its top, so every
controller imported torch before it started the workers, which import it again: on the 2-core VM,
1.5-2 s of every Train run's start, before any worker existed (benchmarks/train_start.py). This
backend does what Ray's does for genpipe's runs (an env:// process group of gloo or nccl, torn down at
the end) by calling that module's own functions in the workers, where torch is imported anyway. It is
pinned to Ray's internals like everything in `pipelines/ray_internals.py`, which checks the version.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray
from ray.train.backend import Backend, BackendConfig
from ray.train.v2._internal.util import TrainingFramework

from pipelines import ray_internals  # noqa: F401 -- its import checks the Ray version these internals are for


@dataclass
class TorchConfig(BackendConfig):
    backend: str
    """"gloo" or "nccl"."""
    timeout_s: int
    """Of every collective: how long a rank waits for a peer that has died or hangs."""

    @property
    def backend_cls(self):
        return _TorchBackend

    @property
    def train_func_context(self):
        return _DeviceContext

    @property
    def framework(self):
        return TrainingFramework.TORCH

    def to_dict(self) -> dict:
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}


def _in_worker(name: str, **kwargs):
    """Call `ray.train.torch.config.<name>(**kwargs)` in a Train worker."""
    from ray.train.torch import config

    return getattr(config, name)(**kwargs)


def _set_master(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)


class _TorchBackend(Backend):
    # As Ray's: the workers of a node all see the node's GPUs, so NCCL can use the links between them.
    share_cuda_visible_devices = True

    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        from ray.train._internal.utils import get_address_and_port

        addr, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(_set_master, addr=addr, port=port)
        worker_group.execute(_in_worker, name="_set_torch_distributed_env_vars")
        ray.get([worker_group.execute_single_async(i, _in_worker, name="_setup_torch_process_group",
                                                   backend=backend_config.backend, world_rank=i,
                                                   world_size=len(worker_group), init_method="env://",
                                                   timeout_s=backend_config.timeout_s)
                 for i in range(len(worker_group))])

    def on_shutdown(self, worker_group, backend_config: TorchConfig) -> None:
        from ray._private import ray_constants
        from ray.exceptions import GetTimeoutError
        from ray.train.constants import (
            DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
            TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
        )

        timeout_s = ray_constants.env_integer(TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
                                              DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S)
        try:
            ray.get(worker_group.execute_async(_in_worker, name="_shutdown_torch",
                                               destroy_process_group=len(worker_group) > 1), timeout=timeout_s)
        except GetTimeoutError:
            print(f"genpipe: the workers' process group did not shut down in {timeout_s} s", flush=True)


class _DeviceContext:
    """Ray's TorchConfigContextManager, entered in each worker around the training function."""

    def __enter__(self):
        from ray.train.torch.config import TorchConfigContextManager

        self._inner = TorchConfigContextManager()
        return self._inner.__enter__()

    def __exit__(self, *exc):
        return self._inner.__exit__(*exc)
