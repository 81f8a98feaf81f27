"""The image_folder source: decoding and conversion, split and order, folders and archives, labels, bad
files, the data version. Everything runs the decoder in-process (parallel=False); the Ray path is the
integration test's (tests/integration/test_image_folder.py)."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import config, data, images
from pipelines.config import DataSpec
from pipelines.errors import InvalidInput
from tests.imagesets import photo_patches


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# -----------------------------------------------------------------------------
# conversion


def test_an_image_of_the_right_size_passes_unchanged_and_converts_by_luma():
    a = rgb(16, 16)
    x = images.decode(encode(Image.fromarray(a), "PNG"), 16, 3)
    assert x.shape == (3, 16, 16) and np.array_equal(x, a.transpose(2, 0, 1))
    grey = images.decode(encode(Image.fromarray(a), "PNG"), 16, 1)
    luma = (a.astype(np.int64) @ [19595, 38470, 7471] + 0x8000) >> 16  # ITU-R 601: .299 R + .587 G + .114 B
    assert grey.shape == (1, 16, 16) and np.array_equal(grey[0], luma)
    # greyscale to RGB repeats the channel
    back = images.decode(encode(Image.fromarray(grey[0], "L"), "PNG"), 16, 3)
    assert np.array_equal(back, np.repeat(grey, 3, 0))


def test_the_shorter_side_is_resized_and_the_centre_kept():
    a = np.zeros((40, 100, 3), np.uint8)
    a[:, :30] = (255, 0, 0)
    a[:, 30:70] = (0, 0, 255)  # the centred 40x40 square
    a[:, 70:] = (0, 255, 0)
    x = images.decode(encode(Image.fromarray(a), "PNG"), 20, 3)
    assert x.shape == (3, 20, 20)
    # the outer columns see a little of the neighbours through the filter, as in a resize of the whole
    assert (x[2, :, 3:-3] == 255).all() and (x[:2, :, 3:-3] == 0).all() and x[2].min() > 200
    tall = images.decode(encode(Image.fromarray(a.transpose(1, 0, 2).copy()), "PNG"), 20, 3)
    assert np.array_equal(tall, x.transpose(0, 2, 1))


def test_alpha_palette_and_transparent_colour_are_composited_on_white():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (10, 200, 30)  # the colour under alpha 0 is arbitrary: it must not show
    rgba[4:, :, 3] = 255
    rgba[:4, :4, 3] = 128
    x = images.decode(encode(Image.fromarray(rgba, "RGBA"), "PNG"), 8, 3)
    assert (x[:, 4:] == np.array([10, 200, 30])[:, None, None]).all()  # opaque: as stored
    assert (x[:, :4, 4:] == 255).all()  # transparent: white
    half = np.round(np.array([10, 200, 30]) * 128 / 255 + 255 * 127 / 255)
    assert np.abs(x[:, :4, :4].astype(int) - half[:, None, None]).max() <= 1
    # greyscale + alpha
    la = Image.fromarray(np.stack([np.full((8, 8), 50, np.uint8), rgba[..., 3]], -1), "LA")
    g = images.decode(encode(la, "PNG"), 8, 1)
    assert (g[0, 4:] == 50).all() and (g[0, :4, 4:] == 255).all()
    # a palette with a transparent entry, and an RGB image with one colour marked transparent (tRNS)
    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    pal.putpalette([0, 0, 0, 255, 0, 0])
    p = images.decode(encode(pal, "PNG", transparency=0), 2, 3)
    assert (p[:, 0, 0] == 255).all() and p[:, 0, 1].tolist() == [255, 0, 0]
    trns = images.decode(encode(Image.fromarray(rgb(8, 8) * 0), "PNG", transparency=(0, 0, 0)), 8, 3)
    assert (trns == 255).all()


def png_rgb16(a: np.ndarray) -> bytes:
    """A 16-bit RGB PNG, which Pillow cannot write: signature, IHDR (bit depth 16, colour type 2), IDAT."""
    h, w, _ = a.shape
    rows = b"".join(b"\0" + a[y].astype(">u2").tobytes() for y in range(h))  # filter 0 per row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_16_bit_pngs_become_8_bits():
    a = np.arange(256, dtype=np.uint16).reshape(16, 16) * 257 + np.arange(256, dtype=np.uint16).reshape(16, 16) % 129
    img = Image.open(io.BytesIO(encode(Image.fromarray(a), "PNG")))
    assert img.mode.startswith("I")  # what Pillow gives for a 16-bit greyscale PNG
    x = images.decode(encode(Image.fromarray(a), "PNG"), 16, 1)
    assert np.array_equal(x[0], np.rint(a / 257).astype(np.uint8))  # rounded
    c = np.random.default_rng(0).integers(0, 65536, (8, 8, 3)).astype(np.uint16)
    assert np.array_equal(images.decode(png_rgb16(c), 8, 3), (c >> 8).astype(np.uint8).transpose(2, 0, 1))


def test_cmyk_jpeg_becomes_rgb():
    a = np.zeros((16, 16, 4), np.uint8)
    a[:, :8] = (0, 255, 255, 0)  # red
    a[:, 8:] = (0, 0, 0, 255)  # black
    x = images.decode(encode(Image.fromarray(a, "CMYK"), "JPEG", quality=95), 16, 3).astype(int)
    assert np.abs(x[:, :, 1:6] - np.array([255, 0, 0])[:, None, None]).max() < 8
    assert x[:, :, 10:].max() < 8


def test_a_jpeg_orientation_tag_is_applied():
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = 255  # white left half, black right half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    x = images.decode(encode(Image.fromarray(a), "JPEG", exif=exif, quality=95), 20, 1)
    assert x[0, :5].mean() > 240 and x[0, -5:].mean() < 15  # white on top once rotated


# -----------------------------------------------------------------------------
# bad files


def _cut_tail(b: bytes) -> bytes:
    return b[:int(len(b) * 0.9)]


def _cut_middle(b: bytes) -> bytes:
    return b[:len(b) // 2] + b[len(b) // 2 + len(b) // 10:]


@pytest.mark.parametrize("fmt, cut", [("PNG", _cut_tail), ("JPEG", _cut_tail), ("WEBP", _cut_tail),
                                      ("PNG", _cut_middle), ("WEBP", _cut_middle)])
def test_an_image_with_a_tenth_of_its_bytes_cut_is_bad(fmt, cut):
    whole = encode(Image.fromarray(rgb(64, 64)), fmt)
    assert images.decode(whole, 32, 3).shape == (3, 32, 32)
    with pytest.raises(images.BadImage, match="cannot be decoded"):
        images.decode(cut(whole), 32, 3)


@pytest.mark.parametrize("content, why", [
    (b"name,label\na.png,cat\n", "cannot be decoded"),
    (bytes(range(256)) * 8, "cannot be decoded"),
    (encode(Image.fromarray(rgb(40, 40)), "GIF"), "is a GIF image; only PNG, JPEG and WebP"),
    (encode(Image.fromarray(rgb(20, 40)), "PNG"), "is 40x20, smaller than data.image_size 32"),
])
def test_what_is_not_a_usable_image_says_why(content, why):
    with pytest.raises(images.BadImage, match=why):
        images.decode(content, 32, 3)


# -----------------------------------------------------------------------------
# split and order


def test_split_and_order_depend_on_the_path_alone():
    names = [f"class{i % 7}/img{i}.png" for i in range(10_000)]
    splits = [images.split_of(n, val_fraction=0.1, test_fraction=0.2) for n in names]
    share = {s: splits.count(s) / len(names) for s in ("train", "val", "test")}
    assert abs(share["test"] - 0.2) < 0.015 and abs(share["val"] - 0.1) < 0.015
    # a file's split does not depend on which other files exist
    assert [images.split_of(n, val_fraction=0.1, test_fraction=0.2) for n in names[::-3]] == splits[::-3]
    order = images.ordered(names)
    assert images.ordered(names[::-1]) == order and sorted(order) == sorted(names)
    # ordered by hash, not by folder: the first 70 cover every class
    assert {n.split("/")[0] for n in order[:70]} == {f"class{i}" for i in range(7)}


# -----------------------------------------------------------------------------
# folders and archives


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return photo_patches(tmp_path_factory.mktemp("photos") / "photos")


def spec(uri, **kw) -> DataSpec:
    return DataSpec(**{"source": "image_folder", "uri": str(uri), "image_size": 32, "labels": "subfolders",
                       "shard_size": 100, **kw})


def prepare(d: DataSpec, out: Path) -> dict:
    return data.prepare(d, seed=0, out_uri=str(out), parallel=False)


def arrays(m: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {s: tuple(t.numpy() for t in data.load_split(m, s)) for s in data.SPLITS}


def test_a_folder_becomes_shards(photos, tmp_path):
    m = prepare(spec(photos, shard_size=100), tmp_path / "a")
    assert m["shape"] == [3, 32, 32] and m["num_classes"] == 2
    assert m["source"] | {"uri": "-"} == {"kind": "image_folder", "uri": "-", "labels": "subfolders",
                                           "classes": ["china", "flower"], "files": 60, "bad": 0, "bad_first": []}
    counts = {s: m["splits"][s]["count"] for s in data.SPLITS}
    assert sum(counts.values()) == 60 and min(counts.values()) >= 1
    x, y = arrays(m)["train"]
    assert x.dtype == np.uint8 and x.shape[1:] == (3, 32, 32) and set(y) == {0, 1}
    # the photos' patches really are the photos': the temple's sky is bluer than the flower
    assert x[y == 0][:, 2].mean() > x[y == 1][:, 2].mean()
    # greyscale from the same folder: one channel, a new data version
    g = prepare(spec(photos, channels=1), tmp_path / "g")
    assert g["shape"] == [1, 32, 32] and g["data_hash"] != m["data_hash"]


def test_the_data_version_depends_on_the_images_not_on_order_mtimes_or_container(photos, tmp_path):
    m = prepare(spec(photos), tmp_path / "a")
    # the same files copied in reverse order with other mtimes, somewhere else
    copy = tmp_path / "copy"
    for i, p in enumerate(sorted((p for p in photos.rglob("*") if p.is_file()), reverse=True)):
        dst = copy / p.relative_to(photos)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dst)
        os.utime(dst, (1_000_000 + i, 1_000_000 + i))
    (copy / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden files are not images, nor bad ones
    assert prepare(spec(copy), tmp_path / "b")["data_hash"] == m["data_hash"]
    # a zip of the folder (everything under photos/, as zipping a folder makes it) and a .tar.gz
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as z:
        for p in sorted(photos.rglob("*"), reverse=True):
            z.write(p, p.relative_to(photos.parent))
    with tarfile.open(tmp_path / "photos.tar.gz", "w:gz") as t:
        t.add(photos, arcname=".")
    for archive in ("photos.zip", "photos.tar.gz"):
        a = prepare(spec(tmp_path / archive), tmp_path / archive.replace(".", "-"))
        assert a["data_hash"] == m["data_hash"], archive
    # one changed pixel in one file: a new version
    victim = sorted(copy.rglob("*.png"))[3]
    px = np.array(Image.open(victim))
    px[0, 0] ^= 0xFF
    Image.fromarray(px).save(victim)
    changed = prepare(spec(copy), tmp_path / "c")
    assert changed["data_hash"] != m["data_hash"]
    # the old version's shards are untouched: shard names carry their content hash
    assert all(Path(s["uri"]).exists() for s in m["splits"]["train"]["shards"])


def test_labels_files_give_the_labels_subfolders_do(photos, tmp_path):
    by_folder = prepare(spec(photos), tmp_path / "a")
    names = sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*") if p.is_file())
    folder = tmp_path / "flat"
    shutil.copytree(photos, folder)
    (folder / "labels.csv").write_text("file,label\n" + "".join(f"{n},{n.split('/')[0]}\n" for n in names))
    csv_m = prepare(spec(folder, labels="labels.csv"), tmp_path / "b")
    assert csv_m["data_hash"] == by_folder["data_hash"]
    # StyleGAN's dataset.json, outside the folder, with integer classes
    (folder / "labels.csv").unlink()  # else a file that is not an image: a bad one
    outside = tmp_path / "dataset.json"
    outside.write_text(json.dumps({"labels": [[n, int(n.startswith("flower"))] for n in names]}))
    js = prepare(spec(folder, labels=str(outside)), tmp_path / "c")
    assert js["source"]["classes"] == ["0", "1"]
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(arrays(js).values(), arrays(by_folder).values()))
    # no labels: one class
    none = prepare(spec(photos, labels=None), tmp_path / "d")
    assert none["num_classes"] == 1 and none["source"]["classes"] is None


def test_bad_labels_files(photos, tmp_path):
    names = sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*") if p.is_file())
    labels = tmp_path / "labels.csv"
    labels.write_text("".join(f"{n},a\n" for n in [*names[:5], "china/missing.png", *names[5:]]))
    with pytest.raises(InvalidInput, match="labels.csv names china/missing.png, which is not in"):
        prepare(spec(photos, labels=str(labels)), tmp_path / "a")
    labels.write_text("".join(f"{n},a\n" for n in names[1:]))  # the first image has no label
    with pytest.raises(InvalidInput, match=f"{names[0]} has no label in .*labels.csv .*on_bad_image: skip"):
        prepare(spec(photos, labels=str(labels)), tmp_path / "b")
    m = prepare(spec(photos, labels=str(labels), on_bad_image="skip"), tmp_path / "c")
    assert m["source"]["bad"] == 1 and sum(s["count"] for s in m["splits"].values()) == len(names) - 1
    labels.write_text("a.png,cat,extra\n")
    with pytest.raises(InvalidInput, match="row 1 has 3 fields"):
        prepare(spec(photos, labels=str(labels)), tmp_path / "d")
    with pytest.raises(InvalidInput, match="labels nope.csv: no such file in"):
        prepare(spec(photos, labels="nope.csv"), tmp_path / "e")


def test_bad_files_stop_prepare_or_are_skipped_and_counted(photos, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(photos, folder)
    first = sorted(folder.rglob("*.png"))[0]
    first.write_bytes(_cut_tail(first.read_bytes()))  # a tenth of its bytes cut
    (folder / "china" / "notes.txt").write_text("shot on a sunny day")
    Image.fromarray(rgb(20, 50)).save(folder / "flower" / "tiny.png")
    rel = first.relative_to(folder).as_posix()
    # the first offending file in listing order is named, with what is wrong
    with pytest.raises(InvalidInput, match=r"china/notes.txt is not a PNG, JPEG or WebP file"):
        prepare(spec(folder), tmp_path / "a")
    (folder / "china" / "notes.txt").unlink()
    # decoding meets files in the shards' order: whichever of the two comes first there is named
    why = {rel: r"cannot be decoded \(OSError: image file is truncated",
           "flower/tiny.png": "is 50x20, smaller than data.image_size 32"}
    named = images.ordered(list(why))[0]
    with pytest.raises(InvalidInput, match=f"{named} {why[named]}"):
        prepare(spec(folder), tmp_path / "b")
    m = prepare(spec(folder, on_bad_image="skip"), tmp_path / "c")
    assert m["source"]["bad"] == 2 and m["source"]["files"] == 61
    assert sum(s["count"] for s in m["splits"].values()) == 59
    assert any("tiny.png is 50x20" in b for b in m["source"]["bad_first"])


def test_nothing_to_read(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / ".hidden").write_bytes(b"x")
    with pytest.raises(InvalidInput, match="empty: no files in it"):
        prepare(spec(tmp_path / "empty"), tmp_path / "o")
    with pytest.raises(InvalidInput, match="does not exist"):
        prepare(spec(tmp_path / "nope"), tmp_path / "o")
    with pytest.raises(InvalidInput, match="does not exist"):
        prepare(spec(tmp_path / "nope.zip"), tmp_path / "o")
    (tmp_path / "broken.tar.gz").write_bytes(b"not gzip at all")
    with pytest.raises(InvalidInput, match=r"broken.tar.gz: not a readable .tar.gz archive"):
        prepare(spec(tmp_path / "broken.tar.gz"), tmp_path / "o")
    few = tmp_path / "few"
    few.mkdir()
    Image.fromarray(rgb(40, 40)).save(few / "only.png")
    with pytest.raises(InvalidInput, match="none of its 1 images falls in the (val|test|train) split"):
        prepare(spec(few, labels=None), tmp_path / "o")


def test_the_spec_checks_the_fields_of_its_source(tmp_path):
    with pytest.raises(ValueError, match="needs uri"):
        DataSpec(source="image_folder", image_size=32)
    with pytest.raises(ValueError, match="needs image_size"):
        DataSpec(source="image_folder", uri="s3://b/p")
    with pytest.raises(ValueError, match="uri is for source image_folder"):
        DataSpec(source="digits", uri="/x")
    with pytest.raises(ValueError, match="multiple of 4"):
        DataSpec(source="image_folder", uri="s3://b/p", image_size=30)
    with pytest.raises(ValueError, match="only local paths and s3://"):
        DataSpec(source="image_folder", uri="http://host/x", image_size=32)
    # unlabeled images cannot fit a classifier: asked for, it is refused at submission; the default needs no labels
    unlabeled = ["data.source=image_folder", "data.uri=s3://b/p", "data.image_size=32"]
    with pytest.raises(InvalidInput, match="extractor.kind classifier is fitted on labels and data.labels is none"):
        config.load(None, [*unlabeled, "extractor.kind=classifier"])
    assert config.load(None, unlabeled).extractor_kind(num_classes=1) == "rotation"
    assert config.load(None, [*unlabeled, "extractor.kind=inception",
                              "extractor.weights_uri=/w.pth"]).data.labels is None
    # a relative path is made absolute where the spec is read
    assert DataSpec(source="image_folder", uri="imgs", image_size=32).uri == os.path.abspath("imgs")
