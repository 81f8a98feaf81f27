"""Your own images: what prepare reads from a folder, an archive or an S3 prefix, and how it decodes them.

A source is listed once, its files named by their path relative to the source's root. Each file's split
and place within the split come from a hash of that path, so they are known before a byte is read and do
not depend on listing order, mtimes or where the source lives. Decoding turns any PNG, JPEG or WebP into
the C x S x S uint8 array the shards hold: colour converted, shorter side resized to S, centre cropped.

No torch here: the driver imports this module to fingerprint a source for the prepare stage's cache key.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import posixpath
import shutil
import tarfile
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipelines import storage
from pipelines.errors import InvalidInput

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
FORMATS = ("PNG", "JPEG", "WEBP")  # as Pillow names them
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
# Transparent pixels are composited on white, the background an image viewer shows them on; the colour a
# file stores under alpha 0 is arbitrary (often black, sometimes leftovers of an edit).
BACKGROUND = (255, 255, 255)


class BadImage(Exception):
    """One file that cannot become a training image; the message says why."""


# -----------------------------------------------------------------------------
# decoding and conversion


def decode(data: bytes, image_size: int, channels: int) -> np.ndarray:
    """A PNG, JPEG or WebP file -> uint8 (channels, image_size, image_size), or BadImage."""
    from PIL import Image, ImageOps

    try:
        img = Image.open(io.BytesIO(data))
        if img.format not in FORMATS:
            raise BadImage(f"is a {img.format} image; only PNG, JPEG and WebP are read")
        # A JPEG decodes at 1/2, 1/4 or 1/8 scale while that still covers image_size: a 12-megapixel
        # photo bound for 64x64 then costs a few milliseconds instead of a hundred.
        img.draft(None, (image_size, image_size))
        img.load()  # the whole file: a truncated or corrupt one fails here, not later
        img = ImageOps.exif_transpose(img)  # phone photos are stored sideways with an orientation tag
    except (BadImage, MemoryError):  # out of memory is this machine's problem, not the file's
        raise
    except Exception as e:  # whatever else a damaged file makes Pillow raise is a property of that file
        raise BadImage(f"cannot be decoded ({type(e).__name__}: {e})") from None
    return to_array(img, image_size, channels)


def to_array(img, image_size: int, channels: int) -> np.ndarray:
    """A decoded Pillow image -> uint8 (channels, image_size, image_size): convert, resize, centre-crop.

    The built-in sets go through here too when a spec sets their size or channels, so a folder of their
    PNGs and the set itself give the same pixels."""
    from PIL import Image

    w, h = img.size
    if min(w, h) < image_size:
        raise BadImage(f"is {w}x{h}, smaller than data.image_size {image_size} (images are never upscaled)")
    img = _grey_or_rgb(img)
    img = img.convert("L" if channels == 1 else "RGB")  # L = (299 R + 587 G + 114 B) / 1000; L -> RGB repeats it
    # Shorter side to image_size, then the centre: Pillow's box scales just the centred square, its filter
    # reading the pixels around it as a resize of the whole image would (an image_size square is copied).
    m = min(w, h)
    left, top = (w - m) // 2, (h - m) // 2
    img = img.resize((image_size, image_size), Image.LANCZOS, box=(left, top, left + m, top + m))
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1).copy()


def _grey_or_rgb(img):
    """Any mode PNG, JPEG or WebP decodes to -> L or RGB, alpha composited on BACKGROUND."""
    from PIL import Image

    if img.mode.startswith("I"):  # 16-bit greyscale PNG: 0..65535 -> 0..255, rounded
        a = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.rint(np.clip(a, 0, 65535) / 257).astype(np.uint8), "L")
    if img.mode == "1":
        img = img.convert("L")
    # palette, alpha, premultiplied alpha, or one colour marked transparent (a tRNS chunk)
    if img.mode in ("P", "PA", "LA", "La", "RGBA", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND + (255,)), rgba).convert("RGB")
    if img.mode not in ("L", "RGB"):  # CMYK (Pillow's conversion; embedded colour profiles are not applied), YCbCr
        img = img.convert("RGB")
    return img


def decode_batch(files: list[bytes | str], image_size: int, channels: int) -> list[np.ndarray | str]:
    """Each file's array, or why it is bad (a file that could not be read comes as that reason): the
    body of one Ray task."""
    out: list[np.ndarray | str] = []
    for data in files:
        try:
            out.append(data if isinstance(data, str) else decode(data, image_size, channels))
        except BadImage as e:
            out.append(str(e))
    return out


# -----------------------------------------------------------------------------
# split and order


def _unit(name: str) -> float:
    """A file's place in [0, 1), from its relative path alone."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64


def split_of(name: str, *, val_fraction: float, test_fraction: float) -> str:
    """test, val or train, from the path alone: adding or removing other files never moves this one."""
    u = _unit(name)
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def ordered(names: list[str]) -> list[str]:
    """The order the shards hold the images in: by path hash, which mixes classes and folders across
    shards (and so across DDP ranks' slices) and does not depend on the listing's order."""
    return sorted(names, key=lambda n: (hashlib.sha256(n.encode()).digest(), n))


# -----------------------------------------------------------------------------
# sources


def _hidden(name: str) -> bool:
    """Dot files and folders (.DS_Store, .git) and the __MACOSX folder macOS puts in zips."""
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))


def is_archive(uri: str) -> bool:
    return uri.lower().endswith(ARCHIVE_SUFFIXES)


class Source:
    """The files of an image folder, archive or S3 prefix, by relative path ('/'-separated), sorted.

    Archives are opened for the source's lifetime (S3 ones downloaded, .tar.gz ones decompressed to a
    temporary .tar first, so members can be read in any order); use it as a context manager."""

    def __init__(self, uri: str):
        self.uri = uri
        self._tmp = tempfile.TemporaryDirectory(prefix="genpipe-source-")
        self._zip: zipfile.ZipFile | None = None
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tuple[str, object]] = {}  # archive: name -> (name in the archive, Zip/TarInfo)
        try:
            if is_archive(uri):
                self._open_archive()
                names = list(self._members)
            else:
                names = [n for n, _, _ in storage.list_files(uri)]
        except BaseException:
            self.close()
            raise
        self.names = sorted(n for n in names if not _hidden(n))

    def _open_archive(self) -> None:
        path = self.uri
        if storage.is_s3(path):
            path = str(Path(self._tmp.name, "archive" + _suffix(self.uri)))
            storage.download(self.uri, path)
        try:
            if path.lower().endswith(".zip"):
                self._zip = zipfile.ZipFile(path)
                members = [(i.filename, i) for i in self._zip.infolist() if not i.is_dir()]
            else:
                if path.lower().endswith((".gz", ".tgz")):
                    plain = str(Path(self._tmp.name, "archive.tar"))
                    with gzip.open(path) as src, open(plain, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    path = plain
                self._tar = tarfile.open(path, "r:")
                members = [(m.name, m) for m in self._tar.getmembers() if m.isfile()]
        except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError) as e:
            raise InvalidInput(f"data.uri {self.uri}: not a readable {_suffix(self.uri)} archive "
                               f"({type(e).__name__}: {e})") from None
        # Names are only looked up, never extracted to disk: a member named ../x cannot escape anywhere.
        named = {posixpath.normpath(n.lstrip("/")): (n, m) for n, m in members}
        # Zipping a folder puts everything under that folder's name: read it as the folder itself, so an
        # archive and the folder it was made from give the same paths, labels and data version.
        visible = [n for n in named if not _hidden(n)]
        tops = {n.split("/")[0] for n in visible}
        if len(tops) == 1 and all("/" in n for n in visible):
            top = tops.pop() + "/"
            named = {n.removeprefix(top): m for n, m in named.items() if n.startswith(top)}
        self._members = named

    @property
    def parallel_reads(self) -> bool:
        """Files of a folder or prefix are read by many threads; an archive's through one handle."""
        return not self._members

    def read(self, name: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(self._members[name][1])
        if self._tar is not None:
            return self._tar.extractfile(self._members[name][1]).read()
        return storage.read_bytes(storage.join(self.uri, name))

    def where(self, name: str) -> str:
        """How messages name a file: its path, or the archive and the member."""
        return f"{self.uri}:{self._members[name][0]}" if self._members else storage.join(self.uri, name)

    def close(self) -> None:
        for f in (self._zip, self._tar):
            if f is not None:
                f.close()
        self._tmp.cleanup()

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _suffix(uri: str) -> str:
    return next(s for s in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True) if uri.lower().endswith(s))


def check_uri(uri: str) -> None:
    """InvalidInput unless data.uri names an archive, a folder or an S3 prefix (whose listing tells)."""
    if is_archive(uri):
        if storage.stat(uri) is None:
            raise InvalidInput(f"data.uri {uri} does not exist")
    elif not storage.is_s3(uri) and not Path(uri).is_dir():
        raise InvalidInput(f"data.uri {uri} " + (f"is a file, not a folder or a {', '.join(ARCHIVE_SUFFIXES)} archive"
                                                 if Path(uri).exists() else "does not exist"))


def open_source(uri: str) -> Source:
    """The source at data.uri, or InvalidInput when there is nothing there to read."""
    check_uri(uri)
    source = Source(uri)
    if not source.names:
        source.close()
        raise InvalidInput(f"data.uri {uri}: no files in it (PNG, JPEG or WebP images, in nested folders)")
    return source


def read_many(source: Source, names: list[str], pool: ThreadPoolExecutor) -> list[bytes | str]:
    """Each file's bytes, or why it could not be read."""
    def one(name: str) -> bytes | str:
        try:
            return source.read(name)
        except (OSError, KeyError, tarfile.TarError, zipfile.BadZipFile) as e:
            return f"cannot be read ({type(e).__name__}: {e})"

    return list(pool.map(one, names) if source.parallel_reads else map(one, names))


def fingerprint(uri: str, labels: str | None) -> str:
    """Changes when a file under the source (or its labels file) does: names, sizes and mtimes (ETags on
    S3). Only the prepare stage's cache key uses it; the data version depends on pixels alone."""
    check_uri(uri)
    h = hashlib.sha256()
    if is_archive(uri):
        h.update(json.dumps([uri, storage.stat(uri)]).encode())
    else:
        h.update(json.dumps(storage.list_files(uri)).encode())
    if labels not in (None, "subfolders") and is_external(labels):
        h.update(json.dumps([labels, storage.stat(labels)]).encode())
    return h.hexdigest()[:16]


# -----------------------------------------------------------------------------
# labels


def is_external(labels: str) -> bool:
    """A labels file given by absolute path or s3:// URI; anything else is a path inside the source."""
    return storage.is_s3(labels) or Path(labels).is_absolute()


def read_labels(source: Source, labels: str | None) -> tuple[dict[str, int | None], list[str] | None]:
    """image name -> class index (None: the image has no label, a bad image), and the class names by
    index (None: unlabeled data, every index 0). A labels file inside the source is not an image."""
    if labels is None:
        return dict.fromkeys(source.names, 0), None
    if labels == "subfolders":
        table = {n: n.split("/")[0] for n in source.names if "/" in n}
        where, images = "data.labels subfolders", source.names
    else:
        if is_external(labels):
            where = labels
            try:
                text = storage.read_bytes(labels)
            except (FileNotFoundError, IsADirectoryError):
                raise InvalidInput(f"data.labels {labels} does not exist") from None
            images = source.names
        else:
            inside = posixpath.normpath(labels)
            if inside not in source.names:
                raise InvalidInput(f"data.labels {labels}: no such file in {source.uri}")
            where, text = source.where(inside), source.read(inside)
            images = [n for n in source.names if n != inside]
        table = _parse_labels(text, where)
        present = set(images)
        for name in table:
            if name not in present:
                raise InvalidInput(f"{where} names {name}, which is not in {source.uri}")
    if not table:
        raise InvalidInput(f"{where}: no image has a label")
    # Integer labels are their own index (0..max, as StyleGAN's dataset.json has them, so `--label 3` is
    # class 3); names are indexed in sorted order, as torchvision's ImageFolder does.
    if all(c.isdigit() for c in table.values()):
        index = {c: int(c) for c in table.values()}
        classes = [str(i) for i in range(max(index.values()) + 1)]
    else:
        classes = sorted(set(table.values()))
        index = {c: i for i, c in enumerate(classes)}
    return {n: index[table[n]] if n in table else None for n in images}, classes


def _parse_labels(text: bytes, where: str) -> dict[str, str]:
    """file -> class from a CSV (file,class rows; a first row starting `file`, `filename`, `path` or
    `image` is a header) or a JSON file ({file: class}, or StyleGAN's {"labels": [[file, class], ...]})."""
    try:
        s = text.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidInput(f"{where}: a labels file must be UTF-8 text") from None
    if where.lower().endswith(".json"):
        try:
            doc = json.loads(s)
        except json.JSONDecodeError as e:
            raise InvalidInput(f"{where}: not valid JSON ({e})") from None
        pairs = doc.get("labels") if isinstance(doc, dict) and isinstance(doc.get("labels"), list) else doc
        pairs = list(pairs.items()) if isinstance(pairs, dict) else pairs
        if not isinstance(pairs, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
            raise InvalidInput(f'{where}: expected {{"file": class, ...}} or {{"labels": [["file", class], ...]}}')
        rows = [(str(f), c) for f, c in pairs]
    elif where.lower().endswith(".csv"):
        rows = [tuple(r) for r in csv.reader(io.StringIO(s)) if r]
        if rows and rows[0][0].strip().lower() in ("file", "filename", "path", "image"):
            rows = rows[1:]
        for i, r in enumerate(rows):
            if len(r) != 2:
                raise InvalidInput(f"{where}: row {i + 1} has {len(r)} fields; expected file,class")
    else:
        raise InvalidInput(f"data.labels {where}: a labels file ends in .csv or .json")
    table: dict[str, str] = {}
    for f, c in rows:
        if isinstance(c, bool) or not isinstance(c, (str, int)) or str(c).strip() == "":
            raise InvalidInput(f"{where}: {f} has no class (got {c!r})")
        name, c = posixpath.normpath(f.strip().replace("\\", "/")), str(c).strip()
        c = str(int(c)) if c.isdigit() else c  # "07" and 7 are the same class
        if table.setdefault(name, c) != c:
            raise InvalidInput(f"{where}: {name} is given two classes, {table[name]} and {c}")
    return table

