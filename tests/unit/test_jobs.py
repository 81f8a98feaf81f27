"""The job specs: each one validates as `genpipe` would read it, every family
has its own, and the CPU command in a family spec's header (the run that drew
its README grid) validates too."""

from pathlib import Path

import pytest

from gen_models import registry
from pipelines import config
from scripts.family_grids import cpu_command

JOBS = Path(__file__).resolve().parents[2] / "jobs"


@pytest.mark.parametrize("path", sorted(JOBS.glob("*.yaml")), ids=lambda p: p.name)
def test_spec_validates(path):
    config.load(path)  # raises InvalidInput, the CLI's exit 2, on anything it would refuse


@pytest.mark.parametrize("family", list(registry.FAMILIES))
def test_family_has_gpu_spec_and_cpu_command(family):
    path = JOBS / f"{family}.yaml"
    spec = config.load(path)
    assert spec.model.family == family and spec.train.use_gpu
    args = cpu_command(path)
    assert args[:3] == ["pipeline", "--config", f"jobs/{family}.yaml"]
    assert set(args[3::2]) == {"--set"}, args
    cpu = config.load(path, args[4::2])
    assert cpu.model.family == family and not cpu.train.use_gpu
    assert cpu.train.steps < spec.train.steps


@pytest.mark.parametrize("family", list(registry.FAMILIES))
def test_family_grid_is_in_the_repo_and_its_record_is_the_spec_command(family):
    """The README shows docs/samples/FAMILY.png; its .json names the run that drew it: the spec's CPU command."""
    import json
    import shlex

    samples = JOBS.parent / "docs" / "samples"
    assert f"![{family}](docs/samples/{family}.png)" in (JOBS.parent / "README.md").read_text()
    assert (samples / f"{family}.png").stat().st_size > 0
    record = json.loads((samples / f"{family}.json").read_text())
    assert shlex.split(record["command"])[1:] == cpu_command(JOBS / f"{family}.yaml")
