"""pyproject.toml declares what the code imports, and the registered model's pip requirements
are the installed versions of what the served code imports, within pyproject's pins."""

from __future__ import annotations

import ast
import pickle
import subprocess
import sys
import tomllib
from functools import cache
from importlib.metadata import packages_distributions, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pipelines import serving
from pipelines.register import pip_requirements

ROOT = Path(__file__).resolve().parents[2]
OURS = ("gen_models", "pipelines", "tests", "benchmarks", "scripts")  # top-level packages of this repository


def imported_distributions(*paths: Path) -> set[str]:
    """The installed distributions (canonical names) whose modules these files import at any depth, ours excepted."""
    provides = packages_distributions()
    found = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for top in (n.split(".")[0] for n in names):
                if top not in sys.stdlib_module_names and top not in OURS:
                    # mlflow's modules come in three distributions: `mlflow` is the one a project names
                    dists = provides[top]
                    found.add(canonicalize_name(top if top in dists else dists[0]))
    return found


def sources(*dirs: str) -> list[Path]:
    return [p for d in dirs for p in sorted((ROOT / d).rglob("*.py"))]


@cache
def declared(extra: str | None = None) -> dict[str, Requirement]:
    """pyproject.toml's dependencies, or those of an extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return {canonicalize_name(r.name): r for r in map(Requirement, reqs)}


def test_pyproject_declares_every_distribution_the_code_imports():
    imported = imported_distributions(*sources("pipelines", "gen_models"))
    assert {"numpy", "pandas", "pyarrow", "matplotlib", "torch", "mlflow"} <= imported  # the scan sees them
    assert sorted(imported - set(declared())) == []


def test_what_only_tests_import_is_a_dev_extra():
    imported = imported_distributions(*sources("pipelines", "gen_models", "benchmarks"))
    tests_only = imported_distributions(*sources("tests")) - imported
    assert {"torchmetrics", "scipy", "pytest"} <= tests_only
    assert sorted(tests_only & set(declared())) == []
    assert sorted(tests_only - set(declared("dev"))) == []


def test_served_model_requirements_are_the_installed_pins_pyproject_allows():
    served = imported_distributions(ROOT / "pipelines" / "serving.py", *sources("gen_models"))
    assert set(map(canonicalize_name, serving.REQUIREMENTS)) == served
    for pin in map(Requirement, pip_requirements(serving.REQUIREMENTS)):
        (spec,) = pin.specifier
        assert spec.operator == "==" and spec.version == version(pin.name).split("+")[0], pin
        assert pin.name in declared() and declared()[pin.name].specifier.contains(spec.version), \
            f"{pin} is outside pyproject.toml's {declared().get(pin.name)}"


def test_ray_internals_are_checked_against_the_ray_pyproject_pins():
    from pipelines import ray_internals

    assert str(declared()["ray"].specifier) == f"=={ray_internals.RAY_VERSION}"


def test_the_driver_checks_a_spec_without_importing_torch():
    # Every `genpipe` command and pipeline driver would pay torch's import (about 2 s) before its first
    # line of work: the model configs (gen_models/*/config.py) and the registry import no torch.
    code = ("import sys; from pipelines import cli, config, pipeline; "
            "config.load('jobs/demo.yaml', ['model.z_dim=7']).model.build_config(image_size=32, channels=3, num_classes=10); "
            "print(sorted(m for m in ('torch', 'torchvision', 'mlflow', 'ray.train') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_train_controllers_and_jobs_import_no_torch_and_prepare_and_evaluate_jobs_no_mlflow():
    # Train's controller unpickles the run's backend config and builds its backend: with Ray's own
    # (ray.train.torch.config) every controller imported torch before it started a worker
    # (pipelines/torch_backend.py). The train job only starts the run: the workers import torch
    # (pipelines/worker.py), and the trainer it builds is not `TorchTrainer`, whose module imports torch.
    # The prepare and evaluate jobs leave MLflow to the driver (tracking.LOGGED_BY_THE_DRIVER).
    from pipelines import torch_backend

    config = pickle.dumps(torch_backend.TorchConfig(backend="gloo", timeout_s=60)).hex()
    code = f"""import importlib, pickle, sys
from pipelines.stages import TABLE
def stage(name):
    for m in (*TABLE[name].imports, TABLE[name].module):
        importlib.import_module(m)
pickle.loads(bytes.fromhex('{config}')).backend_cls()
controller = 'torch' in sys.modules
stage('train')
from ray.train import RunConfig, ScalingConfig
from pipelines import ray_internals, train
ray_internals.torch_trainer(in_search=False, train_loop_per_worker=train.train_loop,
                            torch_config=pickle.loads(bytes.fromhex('{config}')),
                            scaling_config=ScalingConfig(num_workers=1), run_config=RunConfig(name='probe'))
train_job = 'torch' in sys.modules
stage('prepare')
stage('evaluate')
print(controller, train_job, 'mlflow' in sys.modules)"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "False"]
    # nor inside a function, where the prepare and evaluate stages had imported it
    assert [m for m in ("prepare", "data", "metrics", "evaluate", "checkpoints")
            if "mlflow" in (ROOT / "pipelines" / f"{m}.py").read_text()] == []


def test_genpipe_torch_config_keeps_rays_settings():
    # What Train reads off the config and the backend class, beyond the process group they set up.
    from ray.train.torch.config import TorchConfig, _TorchBackend

    from pipelines import torch_backend

    ours = torch_backend.TorchConfig(backend="nccl", timeout_s=60)
    assert (ours.to_dict(), ours.framework) == (TorchConfig(backend="nccl", timeout_s=60).to_dict(),
                                                TorchConfig().framework)
    for setting in ("share_cuda_visible_devices", "has_replica_groups"):
        assert getattr(ours.backend_cls, setting) == getattr(_TorchBackend, setting), setting
    # What Ray's backend does, all of it looked at for the pinned version (a new member needs a look too)
    assert {n for n in vars(_TorchBackend) if not n.startswith("__") and n != "_abc_impl"} == {
        "share_cuda_visible_devices", "_setup_tpu_multislice", "on_start", "on_shutdown", "on_training_start"}
