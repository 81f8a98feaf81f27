"""Search spaces in specs: every distribution parses, a trial's spec is the base spec with its values,
and a space that could draw an invalid spec is refused with one line before anything runs."""

import pytest

from pipelines import config
from pipelines.errors import InvalidInput
from pipelines.pipeline import stages_of


def _spec(space: dict, **tune):
    return config.parse({"model": {"family": "wgan"}, "tune": {"space": space, **tune}})


def test_every_distribution_parses():
    spec = _spec({"model.n_critic": {"randint": [1, 6]}, "model.lr": {"loguniform": [1e-5, 1e-3]},
                  "model.variant": {"grid": ["clip", "gp"]}, "model.gp_weight": {"uniform": [1, 20]},
                  "train.batch_size": {"choice": [32, 64]}})
    kinds = {k: d.kind for k, d in spec.tune.space.items()}
    assert kinds == {"model.n_critic": "randint", "model.lr": "loguniform", "model.variant": "grid",
                     "model.gp_weight": "uniform", "train.batch_size": "choice"}
    assert spec.tune.space["model.n_critic"].extremes() == [1, 5]  # randint's high is exclusive


def test_a_trial_spec_is_the_base_with_its_values_and_no_search():
    spec = _spec({"model.lr": {"loguniform": [1e-5, 1e-3]}})
    trial = spec.with_overrides({"model.lr": 3e-4, "model.n_critic": 2, "train.batch_size": 32, "seed": 7})
    assert trial.model.fields() == {"lr": 3e-4, "n_critic": 2} and trial.model.family == "wgan"
    assert trial.train.batch_size == 32 and trial.seed == 7
    assert trial.tune.space == {} and trial.train.steps == spec.train.steps


def test_the_pipeline_searches_instead_of_training_when_there_is_a_space():
    assert stages_of(config.parse({})) == ("prepare", "train", "evaluate", "register")
    assert stages_of(_spec({"model.lr": {"choice": [1e-4]}})) == ("prepare", "tune", "evaluate", "register")


def test_shipped_tune_specs_load():
    for name in ("smoke_tune", "tune_beta_vae", "tune_wgan", "tune_ddpm"):
        assert config.load(f"jobs/{name}.yaml").tune.space


@pytest.mark.parametrize("space, message", [
    ({"model.lr": {"choise": [1e-4]}}, "unknown key 'tune.space.model.lr.choise'; allowed here: choice, grid"),
    ({"model.lr": {"choice": [1e-4], "grid": [1e-3]}}, "give exactly one of"),
    ({"model.lr": {}}, "give exactly one of"),
    ({"model.lr": {"uniform": [1e-3, 1e-4]}}, "needs low < high"),
    ({"model.lr": {"loguniform": [0, 1e-3]}}, "loguniform needs low > 0"),
    ({"model.lr": {"choice": []}}, "choice needs at least one value"),
    ({"model.lr": {"choice": [1e-4, -1]}},
     "tune.space.model.lr: -1 is not valid: model: lr: Input should be greater than 0"),
    ({"model.n_critic": {"randint": [0, 5]}}, "tune.space.model.n_critic: 0 is not valid"),
    ({"model.nope": {"choice": [1]}}, "unknown key 'nope' for family wgan"),
    ({"train.nope": {"choice": [1]}}, "unknown key 'train.nope'"),
    ({"train.num_workers": {"choice": [1, 2]}}, "'train.num_workers' cannot be searched"),
    ({"data.source": {"choice": ["mnist"]}}, "'data.source' cannot be searched"),
])
def test_bad_space_is_one_line(space, message):
    with pytest.raises(InvalidInput) as e:
        _spec(space)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_search_settings_are_refused():
    with pytest.raises(InvalidInput, match="tune.scheduler: Input should be 'asha', 'pbt' or 'fifo'"):
        _spec({}, scheduler="hyperband")
    with pytest.raises(InvalidInput, match="unknown key 'tune.samples'; allowed here: space"):
        _spec({}, samples=3)


def test_search_and_scheduler_must_agree():
    with pytest.raises(InvalidInput, match="search optuna draws every value itself: use choice instead of grid"):
        _spec({"model.lr": {"grid": [1e-4, 1e-3]}}, search="optuna")
    with pytest.raises(InvalidInput, match="scheduler pbt perturbs values itself"):
        _spec({"model.lr": {"choice": [1e-4, 1e-3]}}, search="optuna", scheduler="pbt")
    assert _spec({"model.lr": {"loguniform": [1e-5, 1e-3]}}, search="optuna").tune.search == "optuna"
