from dataclasses import dataclass

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


@pytest.mark.parametrize("kind", metrics.PRETEXTS)
def test_extractor_is_deterministic_and_round_trips(digits, digits_extractor, kind):
    def fit() -> metrics.Extractor:
        return metrics.train_extractor(digits["x_train_uint8"], digits["y_train"], num_classes=10, epochs=10, seed=0,
                                       kind=kind)[0]

    model = digits_extractor[0] if kind == "classifier" else fit()
    assert metrics.extractor_hash(fit()) == metrics.extractor_hash(model)
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


@dataclass(frozen=True)
class Source:
    """uint8 images of one data source, split; the epochs that fit an extractor to them in seconds; the
    sigmas in pixels of a light and a heavy blur of them. Blurs per source: 0.4 px barely touches a photo, and
    1 px blurs an 8x8 digit past what half noise hides of it."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    epochs: int
    blurs: tuple[float, float]


def photo_crops(per_photo: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random size x size crops of scikit-learn's two sample photos at full resolution, the photo the class."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    crops, labels = [], []
    for label, photo in enumerate(load_sample_images().images):
        h, w, _ = photo.shape
        for y, x in zip(rng.integers(0, h - size, per_photo), rng.integers(0, w - size, per_photo)):
            crops.append(photo[y:y + size, x:x + size].transpose(2, 0, 1))
            labels.append(label)
    return torch.from_numpy(np.stack(crops)), torch.tensor(labels)


@pytest.fixture(scope="session")
def source(request, digits) -> Source:
    """The sources the tests have, parametrised by name (indirect); subsets, so that fitting takes seconds."""
    if request.param == "digits":
        return Source(digits["x_train_uint8"], digits["y_train"], digits["x_test_uint8"], digits["y_test"], 10, 10,
                      (0.4, 0.7))
    if request.param == "fashion_mnist":
        if not data.DEBIAN_FASHION_MNIST.is_dir():
            pytest.skip("no Debian fashion-mnist package")
        raw = data.load_source("fashion_mnist", None)
        return Source(torch.from_numpy(raw.x_train[:6000]), torch.from_numpy(raw.y_train[:6000]),
                      torch.from_numpy(raw.x_test[:1000]), torch.from_numpy(raw.y_test[:1000]), 10, 2, (0.7, 1.5))
    x, y = photo_crops(per_photo=1200, size=16)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))  # both photos in either split
    train, test = perm[len(x) // 6:], perm[:len(x) // 6]
    return Source(x[train], y[train], x[test], y[test], 2, 10, (0.7, 1.5))


def degraded(x: torch.Tensor, blurs: tuple[float, float]) -> dict[str, torch.Tensor]:
    """Images in [0, 1] and four ever worse versions of them: a light and a heavy Gaussian blur (kernel out
    to 2 sigma, reflected at the border), a 50/50 blend with uniform noise, and uniform noise alone."""
    from torchvision.transforms.functional import gaussian_blur

    def blur(sigma: float) -> torch.Tensor:
        k = 2 * int(np.ceil(2 * sigma)) + 1
        return gaussian_blur(x, [k, k], [sigma, sigma])

    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
    return {"real": x, "light blur": blur(blurs[0]), "heavy blur": blur(blurs[1]), "half noise": (x + noise) / 2,
            "noise": noise}


# Inception (kind inception) is not here: its weights are never downloaded, so it cannot be fitted or judged.
@pytest.mark.parametrize("source", ["digits", "fashion_mnist", "photos"], indirect=True)
@pytest.mark.parametrize("kind", metrics.PRETEXTS)
def test_fid_ranks_real_blurred_and_noisy_images(kind, source):
    """FID against the test split's reference statistics: train-split images (as many as the test split
    has) < lightly blurred < heavily blurred < half noise < noise, strictly, on every extractor a kind fits.

    Measured, in that order: digits classifier 2.45 4.55 57.4 65.5 70.5, rotation 0.197 0.442 7.53 15.6 37.8;
    Fashion-MNIST classifier 2.27 25.3 99.3 171 262, rotation 0.358 3.27 11.3 30.4 52.8; photos classifier
    2.11 10.0 15.8 442 1470, rotation 0.233 0.292 0.394 2.25 9.9. Rotations teach little on crops of photos
    (29 % of the test split's told apart, 25 % is chance) but enough: seeds 1 and 2 rank all five too, light
    blur / real 1.12 and 1.16, where the untrained network's 0.94 fails."""
    model, _ = metrics.train_extractor(source.x_train, source.y_train, num_classes=source.num_classes,
                                       epochs=source.epochs, seed=0, kind=kind)
    ref = metrics.reference_stats(metrics.extract(model, source.x_test.float() / 255)[0])
    real = source.x_train[:len(source.x_test)].float() / 255
    fids = {}
    for name, images in degraded(real, source.blurs).items():
        f, _ = metrics.extract(model, images)
        fids[name] = metrics.fid(f.mean(0), np.cov(f, rowvar=False), ref.mu, ref.sigma)
    assert list(fids.values()) == sorted(set(fids.values())), fids


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
