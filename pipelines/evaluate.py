"""The evaluate stage: sample from the trained model and score the samples
with the extractor fitted in prepare, against the test split's statistics.

Every number is logged with the hashes of the extractor and of the reference
statistics, and with the sample count: FID is biased by n, so two FIDs are
comparable only when all three agree. Besides the feature metrics, a
conditional family is scored on whether its samples show the class asked for,
a likelihood family on bits/dim of the test split, and every family on its
sampling cost (sampler, sequential passes, images/s).
"""

from __future__ import annotations

import io
import math
import time

import numpy as np
import torch

from gen_models import registry
from gen_models.base import GenerativeModel
from pipelines import checkpoints, metrics, storage
from pipelines import data as datasets
from pipelines.config import PipelineSpec
from pipelines.stages import StageJob


def load_model(checkpoint_uri: str) -> GenerativeModel:
    """The model saved in a train checkpoint directory (local path or s3://), checksums verified."""
    meta, weights = checkpoints.load_model_state(checkpoint_uri)
    model = registry.build(meta["family"], meta["config"])
    model.load_state_dict(weights)
    return model.eval()


@torch.no_grad()
def draw(model: GenerativeModel, n: int, *, batch_size: int, seed: int, labels: torch.Tensor | None = None) -> torch.Tensor:
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for i in range(0, n, batch_size):
        lab = None if labels is None else labels[i:i + batch_size]
        out.append(model.sample(min(batch_size, n - i), labels=lab, generator=g).cpu())
    return torch.cat(out)


def grid_png(images: torch.Tensor) -> bytes:
    """(N, C, H, W) in [0, 1] -> a PNG of a near-square grid, 2 white pixels between tiles.

    Drawn here, not with torchvision.utils.make_grid: importing torchvision imports torch._dynamo,
    1.5 s of every evaluate stage's start-up for a few lines of tensor reshaping."""
    from PIL import Image

    n, c, h, w = images.shape
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    pad = 2
    canvas = torch.ones(c, pad + rows * (h + pad), pad + cols * (w + pad))
    for i, img in enumerate(images.clamp(0, 1)):
        y, x = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
        canvas[:, y:y + h, x:x + w] = img
    pixels = canvas.mul(255).add(0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels[..., 0] if c == 1 else pixels).save(buf, format="png")
    return buf.getvalue()


@torch.no_grad()
def bits_per_dim(model: GenerativeModel, x: torch.Tensor, batch_size: int = 1000) -> float:
    """-log p(x) / (D ln 2) + 8: the density on [0, 1]^D rescaled to 8-bit values."""
    device = next(model.parameters()).device
    nll = torch.cat([-model.log_prob(x[i:i + batch_size].to(device).float() / 255).cpu()
                     for i in range(0, len(x), batch_size)])
    dims = x[0].numel()
    return float(nll.mean() / (dims * math.log(2)) + 8)


def stage(job: StageJob) -> dict:
    outputs = run(job.spec, job.inputs["prepare"], job.inputs["train"]["checkpoint"], out_uri=job.stage_dir)
    return outputs | {"run_id": job.run_id}


def run(spec: PipelineSpec, prepared: dict, checkpoint_uri: str, *, out_uri: str) -> dict:
    """Score the checkpoint and write the sample grid; the driver logs both to the stage's run from the
    returned outputs (`tracking.log_evaluated`), so this job imports no MLflow."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(checkpoint_uri).to(device)
    extractor = metrics.load_extractor(storage.read_verified(prepared["extractor"]["uri"],
                                                             prepared["extractor"]["sha256"]))
    ref = metrics.ReferenceStats.from_bytes(storage.read_verified(prepared["reference"]["uri"],
                                                                  prepared["reference"]["sha256"]))
    # Manifests from before there were other kinds have no kind: a classifier's or Inception's.
    kind = prepared["extractor"].get("kind", "classifier")
    test = None
    if model.has_log_prob:
        datasets.verify_split(prepared["data"], "test")
        test = datasets.ShardedImages(prepared["data"], "test")  # read a batch at a time
    results, samples = score(model, extractor, ref, kind=kind, num_samples=spec.evaluate.num_samples,
                             batch_size=spec.evaluate.batch_size, seed=spec.seed, test=test)
    sampler, _ = model.sampling_cost()
    png = grid_png(samples[:spec.evaluate.grid_size])
    grid_uri = storage.join(out_uri, "samples.png")
    storage.write_bytes(grid_uri, png)
    # What the numbers compare under: the run's tags (tracking.EVAL_TAGS) and the registered version's
    tags = {"extractor_hash": prepared["extractor"]["sha256"], "reference_hash": prepared["reference"]["sha256"],
            "eval_num_samples": str(spec.evaluate.num_samples), "sampler": sampler}
    if model.has_log_prob:
        tags["bits_per_dim_kind"] = "bound" if model.log_prob_is_bound else "exact"
    return {"metrics": results, "grid": grid_uri, "checkpoint": checkpoint_uri,
            "primary_metric": list(model.primary_metric), **tags}


def score(model: GenerativeModel, extractor: torch.nn.Module, ref: metrics.ReferenceStats, *, kind: str,
          num_samples: int, batch_size: int, seed: int, test: datasets.ShardedImages | None
          ) -> tuple[dict[str, float], torch.Tensor]:
    """What the evaluate stage measures of `model`, and the samples it drew: FID, KID, precision and
    recall against `ref` in the features of `extractor` (of `kind`), and bits/dim on `test` for a
    model with a density."""
    n = num_samples
    device = next(model.parameters()).device
    # a conditional model is asked for every class equally often, so its samples also measure
    # whether it draws the class it was asked for
    labels = torch.arange(n, device=device) % model.config.num_classes if model.conditional else None
    t0 = time.perf_counter()
    samples = draw(model, n, batch_size=batch_size, seed=seed, labels=labels)
    sample_s = time.perf_counter() - t0
    feats, logits = metrics.extract(extractor, samples)
    kid_mean, kid_std = metrics.kid(feats, ref.features, subset_size=min(1000, n, len(ref.features)))
    precision, recall = metrics.precision_recall(ref.features[:n], feats[:len(ref.features)])
    _, sample_steps = model.sampling_cost()
    results = {
        "fid": metrics.fid(*_stats(feats), ref.mu, ref.sigma),
        "kid": kid_mean, "kid_std": kid_std, "precision": precision, "recall": recall,
        "sample_img_per_s": n / sample_s, "sample_steps": sample_steps,
    }
    # Logits are classes only for a classifier (on the data's labels) and Inception (ImageNet's); a rotation
    # extractor's say which way up a sample looks, and samples that all look upright would score IS 1.
    if kind != "rotation":
        results["is"], results["is_std"] = metrics.inception_score(logits)
    if labels is not None and kind == "classifier":
        results["conditional_accuracy"] = float((logits.argmax(1) == labels.cpu().numpy()).mean())
    if model.has_log_prob and test is not None:
        with torch.random.fork_rng(devices=[]):  # ELBOs and dequantisation draw noise: the same noise on a re-run
            torch.manual_seed(seed)
            results["bits_per_dim"] = bits_per_dim(model, test)
    return results, samples


def _stats(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return f.mean(0), np.cov(f, rowvar=False)
