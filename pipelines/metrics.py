"""Evaluation metrics on a small CNN's features.

No Inception weights can be fetched here, and Inception judges 28x28 greyscale
poorly anyway, so prepare fits `Extractor` on the train split of the same data
(to its labels, or, without labels, to the rotations of its images) and FID /
KID / IS / precision-recall are computed on its penultimate features and
logits. Numbers are comparable only under the same extractor hash and the same
reference statistics hash; both are logged beside every metric.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipelines.data import ShardedImages, load_npz, npz_bytes
from pipelines.errors import InvalidInput

# -----------------------------------------------------------------------------
# feature extractor


class Extractor(nn.Module):
    """Two stride-2 convs, then a `num_features` layer and the classifier.
    Strided convs rather than conv + max-pool: no full-resolution activations
    are ever computed, which matters because prepare trains this on CPU once per
    data version. Sized for `image_size` inputs: features are only comparable
    between images of the size the extractor learned on anyway."""

    def __init__(self, channels: int, image_size: int, num_classes: int, num_features: int = 128):
        super().__init__()
        self.config = dict(channels=channels, image_size=image_size, num_classes=num_classes, num_features=num_features)
        self.num_features = num_features  # torchmetrics reads this instead of probing with a 299x299 image
        # each stride-2 conv maps n to ceil(n / 2): 8 -> 2, 28 -> 7, 32 -> 8. A flatten rather than an
        # adaptive pool to a fixed grid: that pool was an identity here and still cost a sixth of a step
        grid = (image_size + 3) // 4
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 5, stride=2, padding=2), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * grid * grid, num_features), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(num_features, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x - 0.5)  # centre [0, 1] input; BN takes care of the scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _labels(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return x, y


def _rotations(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    # RotNet (Gidaris et al. 2018): which way up an image is takes its shapes to tell, and no labels
    k = torch.randint(4, (len(x),), generator=gen)
    out = x.clone()  # each image turned by its own k, without four turned copies of the batch in memory
    for r in range(1, 4):
        out[k == r] = x[k == r].rot90(r, (2, 3))
    return out, k


@dataclass(frozen=True)
class Pretext:
    """What an `Extractor` learns to predict: `batch` maps images in [0, 1] and their labels to the
    network's inputs and targets, of which there are `outputs` kinds (None: the data's classes); `lr` is
    the step size it is learned at."""

    batch: Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    outputs: int | None
    lr: float


PRETEXTS = {
    "classifier": Pretext(_labels, None, 2e-3),
    # A quarter of the classifier's lr. Where rotations teach little (crops of photos: 26-29 % of 16 px ones told
    # apart, 25 % is chance), Adam's first full-size steps into the wide feature layer switched off every
    # feature of 32 px ones for good at 2e-3, and FID was 0 for anything, noise included. A jigsaw of quadrants
    # and an autoencoder on the same network died too; pseudo-labels from k-means on the pixels lived, but a
    # 0.7 px blur raised their FID by 6-11 %, rotation's by 12-41 %.
    "rotation": Pretext(_rotations, 4, 5e-4),
}


TEST_IMAGES = 10_000


def train_extractor(
    x_uint8: torch.Tensor | np.ndarray | ShardedImages, y: torch.Tensor | np.ndarray, *, num_classes: int, epochs: int,
    seed: int,
    x_test: torch.Tensor | np.ndarray | None = None, y_test: torch.Tensor | np.ndarray | None = None,
    batch_size: int = 256, kind: str = "classifier",
) -> tuple[Extractor, float | None]:
    """An extractor fitted to the `PRETEXTS[kind]` of these images, and its accuracy at that on the test
    split when one is given: label accuracy for the classifier, rotations told apart for rotation."""
    pretext = PRETEXTS[kind]
    # A split read in place stays on disk: only each batch is read
    x_uint8 = torch.as_tensor(x_uint8) if isinstance(x_uint8, np.ndarray) else x_uint8
    y = torch.as_tensor(y)
    if x_uint8.dtype != torch.uint8:
        raise TypeError(f"train_extractor wants uint8 images, got {x_uint8.dtype}")
    # a private RNG stream: the same seed gives the same weights, and the caller's RNG is left as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # channels_last: oneDNN's convolutions take a fifth less time per step on the CPU (38 -> 30 ms at batch
        # 256, 28 px), and prepare fits this on the critical path of a pipeline on new data
        model = Extractor(x_uint8.shape[1], x_uint8.shape[-1], pretext.outputs or num_classes).to(
            memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=pretext.lr)
        steps_per_epoch = -(-len(x_uint8) // batch_size)
        # cosine decay to zero: a 2-epoch budget ends on small steps instead of noisy ones
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(x_uint8), generator=gen).split(batch_size):
                inputs, targets = pretext.batch(x_uint8[idx].float() / 255, y[idx], gen)
                loss = F.cross_entropy(model(inputs.contiguous(memory_format=torch.channels_last)), targets)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    model.to(memory_format=torch.contiguous_format).eval()  # safetensors stores contiguous tensors only
    if x_test is None or y_test is None:
        return model, None
    # At most 10,000 test images (Fashion-MNIST's whole test split): enough to tell an accuracy to about 1 %
    n, gen, correct = min(len(x_test), TEST_IMAGES), torch.Generator().manual_seed(seed), 0
    for i in range(0, n, batch_size):  # a batch of floats at a time, as in training
        inputs, targets = pretext.batch(torch.as_tensor(x_test[i:min(i + batch_size, n)]).float() / 255,
                                        torch.as_tensor(y_test[i:min(i + batch_size, n)]), gen)
        _, logits = extract(model, inputs)
        correct += int((logits.argmax(1) == targets.numpy()).sum())
    return model, correct / n


@torch.no_grad()
def extract(extractor: Extractor, images: torch.Tensor, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(features, logits) as float64 for images in [0, 1], NCHW, on any device."""
    if not images.is_floating_point():
        raise TypeError(f"extract wants float images in [0, 1], got {images.dtype}")
    was_training = extractor.training
    extractor.eval()
    device = next(extractor.parameters()).device
    feats, logits = [], []
    for xb in images.split(batch_size):
        f = extractor.features(xb.to(device, torch.float32))
        feats.append(f.double().cpu())
        logits.append(extractor.head(f).double().cpu())
    extractor.train(was_training)
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def extract_uint8(extractor: Extractor, images: torch.Tensor | ShardedImages, batch_size: int = 512
                  ) -> tuple[np.ndarray, np.ndarray]:
    """`extract` of uint8 images (a tensor, or a split read in place), scaled to [0, 1] a batch at a
    time: a split is never all in memory, let alone as floats (4 bytes a value)."""
    parts = [extract(extractor, images[i:i + batch_size].float() / 255, batch_size)
             for i in range(0, len(images), batch_size)]
    return np.concatenate([f for f, _ in parts]), np.concatenate([g for _, g in parts])


class InceptionExtractor(nn.Module):
    """torchvision's Inception v3 under given ImageNet weights: the 2048 pool features and the
    1000-way logits, as pytorch-fid and torchmetrics use them. Greyscale is repeated to RGB and
    every image resized to 299 bilinearly; numbers are comparable with other Inception FIDs only
    as far as that resize and these weights agree with theirs."""

    def __init__(self):
        super().__init__()
        from torchvision.models import inception_v3

        self.config = {"kind": "inception"}
        self.num_features = 2048
        # transform_input: torchvision's ImageNet weights expect it, on top of the ImageNet normalisation below
        self.net = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x.expand(-1, 3, -1, -1), size=(299, 299), mode="bilinear", align_corners=False)
        net = self.net
        x = net._transform_input((x - self.mean) / self.std)
        for layer in (net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, net.maxpool1, net.Conv2d_3b_1x1,
                      net.Conv2d_4a_3x3, net.maxpool2, net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a,
                      net.Mixed_6b, net.Mixed_6c, net.Mixed_6d, net.Mixed_6e, net.Mixed_7a, net.Mixed_7b, net.Mixed_7c):
            x = layer(x)
        return net.avgpool(x).flatten(1)

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.net.fc(f)


def inception_from_weights(data: bytes, origin: str) -> InceptionExtractor:
    """An InceptionExtractor from torchvision's Inception v3 state dict, as safetensors or a
    `torch.save` file (read with weights_only: no pickled code runs)."""
    try:
        state = (safetensors.torch.load(data) if data[8:9] == b"{" else
                 torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
        model = InceptionExtractor()
        model.net.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - torch.load and load_state_dict raise many types for a wrong file
        raise InvalidInput(f"{origin}: not Inception v3 weights: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return model.eval()


def save_extractor(extractor: Extractor | InceptionExtractor) -> bytes:
    """safetensors with the constructor args as JSON in its metadata: one blob, no pickle."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in extractor.state_dict().items()}
    return safetensors.torch.save(tensors, metadata={"config": json.dumps(extractor.config, sort_keys=True)})


def load_extractor(data: bytes) -> Extractor | InceptionExtractor:
    try:
        # safetensors layout: u64 little-endian header length, then the JSON header
        n = int.from_bytes(data[:8], "little")
        config = json.loads(json.loads(data[8:8 + n])["__metadata__"]["config"])
        model = InceptionExtractor() if config.pop("kind", None) == "inception" else Extractor(**config)
        model.load_state_dict(safetensors.torch.load(data))
    except (ValueError, KeyError, TypeError, RuntimeError, safetensors.SafetensorError) as e:
        raise InvalidInput(f"extractor weights are corrupt or not an Extractor: {type(e).__name__}: {e}") from None
    return model.eval()


def extractor_hash(extractor: Extractor) -> str:
    return hashlib.sha256(save_extractor(extractor)).hexdigest()


# -----------------------------------------------------------------------------
# reference statistics


@dataclass(frozen=True, eq=False)  # arrays have no single truth value, so no == and no hash
class ReferenceStats:
    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)
    features: np.ndarray  # (<= max_features, D), what KID and precision/recall compare against
    n: int  # how many samples mu and sigma come from

    def to_bytes(self) -> bytes:
        return npz_bytes({"mu": self.mu, "sigma": self.sigma, "features": self.features, "n": np.array(self.n)})

    @classmethod
    def from_bytes(cls, data: bytes) -> ReferenceStats:
        a = load_npz(data, "reference statistics")
        shapes = {k: v.shape for k, v in a.items()}
        d = shapes.get("mu", (0,))[-1:]
        if (set(a) != {"mu", "sigma", "features", "n"} or len(shapes["mu"]) != 1 or shapes["sigma"] != d * 2
                or shapes["features"][1:] != d or shapes["n"] != ()):
            raise InvalidInput(f"reference statistics are corrupt: arrays {shapes}")
        return cls(mu=a["mu"], sigma=a["sigma"], features=a["features"], n=int(a["n"]))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()


def reference_stats(features: np.ndarray, max_features: int = 10_000, seed: int = 0) -> ReferenceStats:
    features = np.asarray(features, np.float64)
    keep = features
    if len(features) > max_features:
        keep = features[np.sort(np.random.default_rng(seed).choice(len(features), max_features, replace=False))]
    return ReferenceStats(mu=features.mean(0), sigma=np.cov(features, rowvar=False), features=keep, n=len(features))


# -----------------------------------------------------------------------------
# metrics


def fid(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    tr (S1 S2)^(1/2) = tr (S1^(1/2) S2 S1^(1/2))^(1/2): the right side is a
    symmetric PSD matrix, so eigvalsh gives real eigenvalues; rounding can push
    the smallest ones a hair below zero, and those are clipped."""
    w, v = np.linalg.eigh(sigma1)
    s1_half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = s1_half @ sigma2 @ s1_half
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid_from_features(fa: np.ndarray, fb: np.ndarray) -> float:
    return fid(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))


def kid(fa: np.ndarray, fb: np.ndarray, subsets: int = 50, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, averaged over random subsets (Bińkowski et al. 2018)."""
    d = fa.shape[1]
    m = min(subset_size, len(fa), len(fb))
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(subsets):
        a = fa[rng.choice(len(fa), m, replace=False)]
        b = fb[rng.choice(len(fb), m, replace=False)]
        kaa, kbb, kab = (a @ a.T / d + 1) ** 3, (b @ b.T / d + 1) ** 3, (a @ b.T / d + 1) ** 3
        # the diagonals k(x, x) are what make the plain estimate biased: leave them out
        within = (kaa.sum() - np.trace(kaa) + kbb.sum() - np.trace(kbb)) / (m * (m - 1))
        scores.append(within - 2 * kab.mean())
    return float(np.mean(scores)), float(np.std(scores))


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """exp E_x KL(p(y|x) || p(y)), p(y) taken per split; mean and std over splits."""
    scores = []
    for part in np.array_split(np.asarray(logits, np.float64), splits):
        logp = part - np.logaddexp.reduce(part, axis=1, keepdims=True)  # log softmax
        # log of the marginal in log space: a class no sample predicts would give log(0) and then 0 * inf
        log_py = np.logaddexp.reduce(logp, axis=0) - np.log(len(part))
        scores.append(np.exp((np.exp(logp) * (logp - log_py)).sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0)


def _kth_radius(f: np.ndarray, k: int, chunk: int) -> np.ndarray:
    # index k, not k-1: every point is its own nearest neighbour at distance 0
    return np.concatenate([np.partition(_sq_dists(f[i:i + chunk], f), k, axis=1)[:, k]
                           for i in range(0, len(f), chunk)])


def _inside(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, chunk: int) -> np.ndarray:
    return np.concatenate([(_sq_dists(points[i:i + chunk], centres) <= radii).any(1)
                           for i in range(0, len(points), chunk)])


def precision_recall(real_f: np.ndarray, fake_f: np.ndarray, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019: each set's manifold is the union of balls reaching
    each point's k-th nearest neighbour. Precision: share of fakes inside the real
    manifold; recall: share of reals inside the fake one. Distances in chunks, so
    10k x 10k never sits in memory at once."""
    r_real, r_fake = _kth_radius(real_f, k, chunk), _kth_radius(fake_f, k, chunk)
    precision = _inside(fake_f, real_f, r_real, chunk).mean()
    recall = _inside(real_f, fake_f, r_fake, chunk).mean()
    return float(precision), float(recall)
