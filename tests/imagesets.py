"""Image folders built from images that installed packages ship, for the image_folder source's tests:
no download. RGB: patches of scikit-learn's two sample photos (a temple in China, a flower), each photo a
class. Greyscale: Fashion-MNIST written out as PNGs, one folder per class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

FORMATS = (("png", {}), ("jpg", {"quality": 95}), ("webp", {"lossless": True}))


def photo_patches(root: Path, per_photo: int = 30, min_size: int = 40) -> Path:
    """`per_photo` patches of each sample photo, sizes from min_size up (some not square), saved as PNG,
    JPEG and WebP in turn under root/china/ and root/flower/, some one folder deeper."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    rng = np.random.default_rng(0)
    for photo, name in zip(photos.images, ("china", "flower")):
        h, w, _ = photo.shape
        for i in range(per_photo):
            ph, pw = rng.integers(min_size, 2 * min_size, size=2)
            y, x = rng.integers(0, h - ph), rng.integers(0, w - pw)
            ext, kw = FORMATS[i % 3]
            path = root / name / ("deeper" if i % 4 == 0 else "") / f"{i:03d}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(photo[y:y + ph, x:x + pw]).save(path, **kw)
    return root


def fashion_pngs(root: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """Fashion-MNIST images (N, 1, 28, 28) as root/<label>/<i>.png."""
    for i, (img, label) in enumerate(zip(x, y)):
        path = root / str(int(label)) / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0], "L").save(path)
    return root


def upload(folder: Path, s3, prefix: str) -> None:
    """Every file under folder to s3://genpipe/PREFIX/<its path under folder> (s3: a boto3 client)."""
    for f in folder.rglob("*"):
        if f.is_file():
            s3.upload_file(str(f), "genpipe", f"{prefix}/{f.relative_to(folder).as_posix()}")
