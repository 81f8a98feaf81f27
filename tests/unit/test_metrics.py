import numpy as np
import pytest
import scipy.linalg
import torch

from pipelines import data, metrics
from pipelines.errors import InvalidInput


def correlated(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """Gaussian features with a fixed, far-from-diagonal covariance, like a real extractor's."""
    mix = np.random.default_rng(1234).normal(size=(d, d)) / np.sqrt(d)
    return np.random.default_rng(seed).normal(size=(n, d)) @ mix + shift


def test_fid_of_a_set_with_itself_is_zero():
    f = correlated(2000, 64, seed=0)
    sigma = np.cov(f, rowvar=False)
    assert abs(metrics.fid_from_features(f, f)) < 1e-6 * np.trace(sigma)


def test_fid_matches_scipy_sqrtm():
    fa, fb = correlated(3000, 32, seed=0), correlated(3000, 32, seed=1, shift=0.3) * 1.5
    mu1, mu2 = fa.mean(0), fb.mean(0)
    s1, s2 = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    # the textbook form, as in pytorch-fid: sqrtm of the (non-symmetric) product
    reference = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert metrics.fid(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-3)
    assert metrics.fid_from_features(fa, fb) == pytest.approx(reference, rel=1e-3)


def test_fid_survives_rank_deficient_covariance():
    # fewer samples than dimensions: sigma is singular, sqrt must not go complex or NaN
    f = correlated(20, 64, seed=0)
    value = metrics.fid_from_features(f, correlated(20, 64, seed=1))
    assert np.isfinite(value) and value > 0


def test_kid_is_unbiased_near_zero_and_sees_a_shift():
    real = correlated(2000, 32, seed=0)
    same_mean, same_std = metrics.kid(real, correlated(2000, 32, seed=1), subsets=20, subset_size=500)
    shifted_mean, shifted_std = metrics.kid(real, correlated(2000, 32, seed=1, shift=0.5), subsets=20, subset_size=500)
    assert abs(same_mean) < 3 * same_std + 1e-4
    assert shifted_mean > 20 * max(same_std, abs(same_mean)) and shifted_mean > 10 * shifted_std


def test_inception_score_extremes():
    labels = np.arange(1000) % 10
    confident = np.eye(10)[labels] * 50.0
    assert metrics.inception_score(confident)[0] == pytest.approx(10.0, rel=1e-3)
    assert metrics.inception_score(np.zeros((1000, 10)))[0] == pytest.approx(1.0, abs=1e-9)
    # confident but all one class: as bad as no confidence at all
    assert metrics.inception_score(np.eye(10)[np.zeros(1000, int)] * 50.0)[0] == pytest.approx(1.0, abs=1e-6)


def test_precision_recall_tell_fidelity_from_coverage():
    real = correlated(1500, 16, seed=0)
    p, r = metrics.precision_recall(real, correlated(1500, 16, seed=1), k=3)
    assert p > 0.7 and r > 0.7
    # a mode-collapsed generator: fakes all sit near one real point, so realistic but not covering
    collapsed = real[:1] + 0.01 * np.random.default_rng(2).normal(size=(1500, 16))
    p, r = metrics.precision_recall(real, collapsed, k=3)
    assert p > 0.9 and r < 0.05


def test_reference_stats_round_trip_and_hash():
    f = correlated(500, 16, seed=0)
    stats = metrics.reference_stats(f, max_features=200)
    again = metrics.ReferenceStats.from_bytes(stats.to_bytes())
    assert again.n == 500 and again.features.shape == (200, 16)
    assert np.array_equal(again.mu, stats.mu) and np.array_equal(again.sigma, stats.sigma)
    assert again.sha256 == stats.sha256 == metrics.reference_stats(f, max_features=200).sha256
    with pytest.raises(InvalidInput, match="corrupt"):
        metrics.ReferenceStats.from_bytes(stats.to_bytes()[:-100])


@pytest.mark.parametrize("channels, size", [(1, 8), (1, 28), (3, 32)])
def test_extractor_takes_the_pipeline_image_sizes(channels, size):
    model = metrics.Extractor(channels, size, num_classes=10).eval()
    x = torch.rand(5, channels, size, size)
    assert model.features(x).shape == (5, model.num_features) and model(x).shape == (5, 10)


# digits and digits_extractor (tests/unit/conftest.py): the learning tests' split and the extractor they judge with


def test_extractor_learns_digits(digits_extractor):
    _, acc = digits_extractor
    assert acc > 0.85


def test_extractor_is_deterministic_and_round_trips(digits, digits_extractor):
    model, _ = digits_extractor
    twin, _ = metrics.train_extractor(digits["x_train_uint8"], digits["y_train"], num_classes=10, epochs=10, seed=0)
    assert metrics.extractor_hash(twin) == metrics.extractor_hash(model)
    loaded = metrics.load_extractor(metrics.save_extractor(model))
    x = digits["x_test"]
    assert np.array_equal(metrics.extract(loaded, x)[1], metrics.extract(model, x)[1])
    assert metrics.extractor_hash(loaded) == metrics.extractor_hash(model)
    with pytest.raises(InvalidInput, match="corrupt"):
        metrics.load_extractor(metrics.save_extractor(model)[:-64])


def test_fid_separates_data_from_noise(digits, digits_extractor):
    model, _ = digits_extractor
    f_train, _ = metrics.extract(model, digits["x_train"])
    f_test, logits = metrics.extract(model, digits["x_test"])
    noise = torch.rand(len(f_test), 1, 8, 8, generator=torch.Generator().manual_seed(0))
    f_noise, _ = metrics.extract(model, noise)
    assert f_test.shape == (397, model.num_features) and f_test.dtype == np.float64
    assert metrics.fid_from_features(f_test, f_train) < 0.1 * metrics.fid_from_features(f_test, f_noise)
    assert metrics.kid(f_test, f_train, subsets=10)[0] < 0.1 * metrics.kid(f_test, f_noise, subsets=10)[0]
    # a classifier that learned its data is confident and spread over all 10 classes
    assert metrics.inception_score(logits, splits=1)[0] > 7


@pytest.mark.learning
@pytest.mark.skipif(not data.DEBIAN_FASHION_MNIST.is_dir(), reason="no Debian fashion-mnist package")
def test_extractor_learns_fashion_mnist(tmp_path):
    raw = data.load_source("fashion_mnist", None)
    m = data.split_and_shard(raw, val_fraction=0.1, seed=0, shard_size=20000, out_uri=str(tmp_path))
    x, y = data.load_split(m, "train")
    x_test, y_test = data.load_split(m, "test")
    _, acc = metrics.train_extractor(x, y, num_classes=10, epochs=2, seed=0, x_test=x_test, y_test=y_test)
    assert acc >= 0.88


def test_inception_extractor_takes_torchvision_weights_and_round_trips(tmp_path):
    """Random weights in torchvision's Inception v3 layout stand in for the real ones, which are never downloaded."""
    import io

    from torchvision.models import inception_v3

    buf = io.BytesIO()
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), buf)
    model = metrics.inception_from_weights(buf.getvalue(), "inception.pth")
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))  # greyscale 8x8, as the pipeline has
    feats, logits = metrics.extract(model, x)
    assert feats.shape == (2, 2048) and logits.shape == (2, 1000) and np.isfinite(feats).all()
    again = metrics.load_extractor(metrics.save_extractor(model))
    assert isinstance(again, metrics.InceptionExtractor)
    assert np.allclose(metrics.extract(again, x)[0], feats)
    with pytest.raises(InvalidInput, match="inception.pth: not Inception v3 weights"):
        metrics.inception_from_weights(metrics.save_extractor(metrics.Extractor(1, 8, 10)), "inception.pth")


def test_inception_needs_weights_in_the_spec():
    from pipelines import config

    with pytest.raises(InvalidInput, match="kind inception needs weights_uri"):
        config.parse({"extractor": {"kind": "inception"}})


def test_fid_agrees_with_torchmetrics_on_the_extractor_features(digits, digits_extractor):
    """An independent implementation, fed the same images through the same features."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    model, _ = digits_extractor

    class Features(torch.nn.Module):
        num_features = model.num_features  # torchmetrics reads this instead of probing with a 299x299 image

        def forward(self, x):
            return model.features(x)

    train, test = digits["x_train"], digits["x_test"]
    tm = FrechetInceptionDistance(feature=Features(), normalize=True)
    tm.update(test, real=True)
    tm.update(train, real=False)
    ours = metrics.fid_from_features(metrics.extract(model, test)[0], metrics.extract(model, train)[0])
    assert ours == pytest.approx(float(tm.compute()), rel=1e-3)


@pytest.mark.parametrize("n, channels, mode", [(10, 1, "L"), (5, 3, "RGB")])
def test_sample_grid_places_every_image_in_a_near_square_grid(n, channels, mode):
    import io

    from PIL import Image

    from pipelines.evaluate import grid_png

    images = torch.rand(n, channels, 8, 6)
    png = Image.open(io.BytesIO(grid_png(images)))
    cols = 4 if n == 10 else 3  # ceil(sqrt(n)) columns, as many rows as needed, 2 white pixels around tiles
    rows = -(-n // cols)
    assert png.mode == mode and png.size == (2 + cols * 8, 2 + rows * 10)
    pixels = np.asarray(png).reshape(png.height, png.width, channels)
    for i in (0, n - 1):
        y, x = 2 + (i // cols) * 10, 2 + (i % cols) * 8
        tile = pixels[y:y + 8, x:x + 6].transpose(2, 0, 1)
        assert np.abs(tile / 255 - images[i].numpy()).max() <= 0.5 / 255 + 1e-6
    assert (pixels[:2] == 255).all() and (pixels[:, x + 6:x + 8] == 255).all()
