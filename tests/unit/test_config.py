"""Specs: defaults, --set overrides, and one clear line for every kind of bad input."""

import pytest

from pipelines import config
from pipelines.errors import InvalidInput


def test_defaults_and_overrides_are_typed():
    spec = config.load(None, ["train.steps=7", "train.use_gpu=true", "model.z_dim=16", "name=x-1"])
    assert spec.train.steps == 7 and spec.train.use_gpu is True and spec.name == "x-1"
    assert spec.model.fields() == {"z_dim": 16}
    cfg = spec.model.build_config(image_size=28, channels=1, num_classes=10)
    assert cfg.z_dim == 16 and cfg.image_size == 28


def test_shipped_specs_load(tmp_path):
    for name in ("demo", "smoke"):
        assert config.load(f"jobs/{name}.yaml").name == name


@pytest.mark.parametrize("override, message", [
    ("train.stepz=1", "unknown key 'train.stepz'; allowed here: num_workers"),
    ("bogus=1", "unknown key 'bogus'"),
    ("train.steps=many", "train.steps: Input should be a valid integer"),
    ("train.steps=0", "train.steps: Input should be greater than or equal to 1"),
    ("model.family=nope", "unknown family 'nope'"),
    ("model.image_size=32", "unknown key 'image_size' for family dcgan"),
    ("model.z_dim=x", "z_dim: Input should be a valid integer"),
    ("data.source=cifar", "data.source: Input should be"),
    ("name=Bad Name", "name: String should match pattern"),
    ("novalue", "expected key.sub=value"),
])
def test_bad_input_is_one_line(override, message):
    with pytest.raises(InvalidInput) as e:
        config.load(None, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(InvalidInput, match="not valid YAML"):
        config.load(bad)
    bad.write_text("- a list\n")
    with pytest.raises(InvalidInput, match="a spec is a mapping"):
        config.load(bad)
    with pytest.raises(InvalidInput, match="does not exist"):
        config.load(tmp_path / "nope.yaml")


@pytest.mark.parametrize("kind, num_classes, fitted", [
    ("auto", 10, "classifier"), ("auto", 1, "rotation"), ("classifier", 2, "classifier"), ("rotation", 10, "rotation"),
    ("inception", 1, "inception"),
])
def test_the_extractor_kind_follows_the_classes_of_the_data(kind, num_classes, fitted):
    spec = config.load(None, [f"extractor.kind={kind}", "extractor.weights_uri=/w.pth"])
    assert spec.extractor_kind(num_classes) == fitted


def test_a_classifier_of_one_class_is_refused_and_told_what_needs_no_labels():
    # labels that name one class show only once prepare has read the data
    spec = config.load(None, ["data.source=image_folder", "data.uri=/imgs", "data.image_size=32",
                              "data.labels=labels.csv", "extractor.kind=classifier"])
    with pytest.raises(InvalidInput, match="those of /imgs name one class: .* use extractor.kind rotation"):
        spec.extractor_kind(num_classes=1)


def test_hash_is_stable_and_sectioned():
    a = config.load(None, ["train.steps=5"])
    b = config.load(None, ["train.steps=5"])
    c = config.load(None, ["train.steps=6"])
    assert a.hash() == b.hash() != c.hash()
    assert a.hash("data", "extractor", "seed") == c.hash("data", "extractor", "seed")
