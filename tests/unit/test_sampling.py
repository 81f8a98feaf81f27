"""How `genpipe sample` draws, on tiny real models behind the real pyfunc (loaded as MLflow
loads it): requests of at most serving.MAX_N with derived seeds, progress inside a slow
request, a .npy written whole or not at all, and the requests the served model refuses.
tests/e2e/test_registry.py runs the same through the CLI and `mlflow models serve`."""

from __future__ import annotations

import importlib.util
import io
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModelContext
from safetensors.torch import save_file

from gen_models.registry import FAMILIES, config_class, config_dict, model_class
from pipelines import sampling, serving
from pipelines.serving import MAX_N, GenerativePyfunc


def tiny(family: str, **overrides):
    cls, cfg_cls = model_class(family), config_class(family)
    return cls(cfg_cls.tiny(image_size=8, channels=1, **overrides)).eval()


def served(tmp_path: Path, family: str) -> GenerativePyfunc:
    """The pyfunc the register stage logs, its context as MLflow gives it, over an untrained tiny model."""
    model = tiny(family)
    tmp_path.mkdir(exist_ok=True)
    weights, config = tmp_path / "weights.safetensors", tmp_path / "config.json"
    save_file(model.plain_state_dict(), weights)
    config.write_text(json.dumps({"family": family, "config": config_dict(model.config)}))
    pyfunc = GenerativePyfunc()
    pyfunc.load_context(PythonModelContext({"weights": str(weights), "config": str(config)}, None))
    return pyfunc


def requests(pyfunc: GenerativePyfunc) -> sampling.Request:
    return lambda n, seed: pyfunc.predict(None, pd.DataFrame([{"n": n, "seed": seed}]))


def test_requests_are_server_sized_the_first_seeded_by_the_seed_the_rest_by_derived_ones():
    plan = sampling.chunks(2 * MAX_N + 5, 7)
    assert [size for size, _ in plan] == [MAX_N, MAX_N, 5]
    assert plan[0][1] == 7 and len({seed for _, seed in plan}) == 3
    assert all(0 <= seed <= serving.MAX_SEED for _, seed in plan)  # the signature's int64
    assert sampling.chunks(MAX_N + 1, 7)[1][1] == plan[1][1]  # request k's seed depends on (seed, k) only
    assert sampling.chunks(MAX_N + 1, 8)[1][1] != plan[1][1]
    assert sampling.chunks(3, 7) == [(3, 7)]


def test_a_large_draw_is_its_requests_written_to_npy(tmp_path):
    pyfunc = served(tmp_path / "model", "dcgan")
    ask = requests(pyfunc)
    n, out, stream = MAX_N + 3, tmp_path / "x.npy", io.StringIO()
    sampling.write_npy(out, n, sampling.draw(ask, pyfunc.model, n, 5, stream=stream))
    x = np.load(out)
    assert x.shape == (n, 1, 8, 8) and x.dtype == np.uint8 and x.std() > 0
    (_, first), (_, second) = sampling.chunks(n, 5)
    assert np.array_equal(x[:MAX_N], ask(MAX_N, first)) and np.array_equal(x[MAX_N:], ask(3, second))
    assert not np.array_equal(x[:3], x[MAX_N:])
    # a one-pass sampler over several requests: only the closing line, as this takes no time
    assert re.fullmatch(rf"genpipe: sampling 100% \({n}/{n} images done\), in \S+\n", stream.getvalue())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "x.npy"]  # no partial file left

    quiet = io.StringIO()
    assert np.array_equal(next(sampling.draw(ask, pyfunc.model, 5, 5, stream=quiet)), ask(5, 5))
    assert quiet.getvalue() == ""  # one pass, one request


def test_progress_moves_inside_one_slow_request(tmp_path):
    pyfunc = served(tmp_path, "pixelcnn")  # 64 sequential passes for 8x8 grey images
    stream = io.StringIO()
    images = list(sampling.draw(requests(pyfunc), pyfunc.model, 3, 0, stream=stream, every=0))
    assert len(images) == 1 and images[0].shape == (3, 1, 8, 8)
    lines = stream.getvalue().splitlines()
    shown = [int(re.match(r"genpipe: sampling (\d+)% \(\d/3 images done\)", line)[1]) for line in lines]
    assert len(shown) == 64 + 1 and shown == sorted(shown) and shown[0] < 50 < shown[32] < 100 == shown[-1]
    assert lines[1].endswith(" left") and lines[-1].startswith("genpipe: sampling 100% (3/3 images done), in ")


@pytest.mark.parametrize("family, overrides", [(f, {}) for f in FAMILIES] + [("ddpm", {"sampler": "ddim"})])
def test_progress_counts_the_passes_each_family_reports(family, overrides):
    model = tiny(family, **overrides)
    calls = []
    with sampling.counting_passes(model, lambda *_: calls.append(1)):
        model.sample(2, generator=torch.Generator().manual_seed(0))
    assert len(calls) == model.sampling_cost()[1]
    model.sample(2, generator=torch.Generator().manual_seed(0))
    assert len(calls) == model.sampling_cost()[1]  # the hooks are gone


def test_a_draw_cut_short_leaves_the_file_as_it_was(tmp_path):
    out = tmp_path / "x.npy"
    out.write_bytes(b"what was there")

    def cut():
        yield np.zeros((MAX_N, 1, 8, 8), np.uint8)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sampling.write_npy(out, MAX_N + 1, cut())
    assert out.read_bytes() == b"what was there" and list(tmp_path.iterdir()) == [out]


def test_the_served_model_refuses_what_it_cannot_draw_in_one_line(tmp_path):
    cgan, dcgan = served(tmp_path / "cgan", "cgan"), served(tmp_path / "dcgan", "dcgan")
    for pyfunc, row, message in [
        (cgan, {"n": 0}, "n must be in [1, 1024], got 0"),
        (cgan, {"n": MAX_N + 1}, "n must be in [1, 1024], got 1025"),
        (cgan, {"n": 1, "seed": -1}, "seed must be in [0, 2^63), got -1"),
        (cgan, {"n": 1, "label": 10}, "label 10: out of range: the model has 10 classes, 0 to 9"),
        (cgan, {"n": 1, "label": -1}, "label -1: out of range: the model has 10 classes, 0 to 9"),
        (dcgan, {"n": 1, "label": 0}, "label 0: DCGAN is unconditional and takes no label"),
    ]:
        with pytest.raises(MlflowException, match=f"^{re.escape(message)}$"):
            pyfunc.predict(None, pd.DataFrame([row]))
    threes = cgan.predict(None, pd.DataFrame([{"n": 4, "seed": 0, "label": 3}]))
    assert threes.shape == (4, 1, 8, 8)
    assert not np.array_equal(threes, cgan.predict(None, pd.DataFrame([{"n": 4, "seed": 0, "label": 5}])))


def test_mlflow_loads_the_serving_code_without_a_type_hint_warning():
    # as MLflow loads a model from code: the file run as a module of a fresh name
    spec = importlib.util.spec_from_file_location("code_model_under_test", serving.__file__)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert [str(w.message) for w in caught if "type hint" in str(w.message)] == []
