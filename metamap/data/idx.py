"""The MNIST family (MNIST, Fashion-MNIST, EMNIST, KMNIST) from IDX files in a local folder.

IDX (LeCun et al.'s format for MNIST) is a header -- two zero bytes, a type code, the number of
dimensions, then each dimension as a big-endian 32-bit count -- followed by the values,
big-endian, row-major. The files may be gzip-compressed (``*.gz``). A file whose magic number,
type code or length disagrees with its header is refused with an error naming it.

As a few-shot source, *classes* are split, not images: the train and test files are pooled
and the classes ordered by a keyed hash of their names, then cut by ``data.fractions``
(``[train, val, test]``). The default ``[0, 0.5, 0.5]`` makes the data set a target domain:
no meta-training classes, half its classes for choosing test-time hyper-parameters (val), the
other half for evaluation (test). Images keep their own polarity (bright on dark, like
Omniglot after inversion); EMNIST's transposed storage is undone.

Where the files are: ``data.path`` (the folder holding them, or a parent with a sub-folder named
after the data set); else ``<data root>/<name>``; Fashion-MNIST also looks in
``/usr/share/datasets/fashion-mnist``, where the Debian package ``dataset-fashion-mnist``
installs its four files.
"""
from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from metamap.data.dataset import ClassDataset
from metamap.data.images import ImageSpec
from metamap.data.paths import data_root
from metamap.data.sources import ClassDataSource
from metamap.errors import ConfigError, DataError
from metamap.options import ARCHITECTURE, DATA, MAX_INT, Options, option
from metamap.registry import register_data

# type code -> numpy dtype (big-endian)
IDX_TYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
             0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
# No MNIST-family file comes close; a header asking for more is damaged, not data.
MAX_IDX_BYTES = 1 << 31
SPLIT_KEY = "metamap-idx-classes-v1"


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (optionally gzipped) -> array in native byte order."""
    path = Path(path)
    try:
        with _open(path) as f:
            head = f.read(4)
            if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in IDX_TYPES:
                raise DataError(f"{path}: not an IDX file (magic number {head.hex() or 'missing'}; expected "
                                "00 00, a type code and the number of dimensions); is it the right file?")
            dtype, ndim = IDX_TYPES[head[2]], head[3]
            raw_dims = f.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise DataError(f"{path}: truncated IDX header (needs {ndim} dimension sizes); "
                                "the file is incomplete, fetch it again")
            dims = tuple(int(d) for d in np.frombuffer(raw_dims, ">u4"))
            need = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
            if need > MAX_IDX_BYTES:
                raise DataError(f"{path}: its header announces {need:,} bytes of values, more than any "
                                "MNIST-family file; the file is damaged")
            body = f.read(need + 1)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read it ({e.__class__.__name__}: {e}); the file is damaged, "
                        "fetch it again") from None
    if len(body) < need:
        raise DataError(f"{path}: truncated: the header announces {dims} values ({need:,} bytes) but the "
                        f"file holds {len(body):,}; fetch it again")
    if len(body) > need:
        raise DataError(f"{path}: longer than its header says ({dims}); it is not a valid IDX file")
    return np.frombuffer(body, dtype).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzipped if ``path`` ends in ``.gz``)."""
    array = np.asarray(array)
    codes = {v.newbyteorder("="): k for k, v in IDX_TYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX cannot hold {array.dtype}")
    data = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes() + \
        array.astype(IDX_TYPES[code]).tobytes()
    path = Path(path)
    with (gzip.open(path, "wb") if path.suffix == ".gz" else open(path, "wb")) as f:
        f.write(data)


# -- the family ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class IdxDataset:
    title: str
    folder: str                      # sub-folder name under a data root
    prefix: str = ""                 # file name prefix (EMNIST: "emnist-<subset>-")
    transposed: bool = False         # EMNIST stores images transposed
    classes: tuple[str, ...] = ()
    label_offset: int = 0            # EMNIST letters count from 1
    get: str = ""                    # where to obtain the files

    def files(self) -> dict[str, str]:
        return {f"{part}-{kind}": f"{self.prefix}{part}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
                for part in ("train", "t10k" if not self.prefix else "test") for kind in ("images", "labels")}


DIGITS = tuple("0123456789")
UPPER = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
LOWER = tuple("abcdefghijklmnopqrstuvwxyz")
# EMNIST's merged lower-case letters (the rest look like their capitals): its mapping files.
EMNIST_CLASSES = {
    "byclass": DIGITS + UPPER + LOWER,
    "bymerge": DIGITS + UPPER + tuple("abdefghnqrt"),
    "balanced": DIGITS + UPPER + tuple("abdefghnqrt"),
    "letters": tuple(f"{u}{lo}" for u, lo in zip(UPPER, LOWER)),
    "digits": DIGITS,
    "mnist": DIGITS,
}
EMNIST_GET = ("the EMNIST gzip archive from NIST (https://www.nist.gov/itl/products-and-services/"
              "emnist-dataset), unpacked: emnist-<subset>-{train,test}-{images-idx3,labels-idx1}-ubyte.gz")


def family(name: str, subset: str = "balanced") -> IdxDataset:
    if name == "mnist":
        return IdxDataset("MNIST", "mnist", classes=DIGITS,
                          get="the four files of http://yann.lecun.com/exdb/mnist/")
    if name == "fashionmnist":
        return IdxDataset("Fashion-MNIST", "fashion-mnist",
                          classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                   "Sneaker", "Bag", "Ankle boot"),
                          get="`apt-get install dataset-fashion-mnist` (Debian), or the four files of "
                              "https://github.com/zalandoresearch/fashion-mnist")
    if name == "kmnist":
        return IdxDataset("Kuzushiji-MNIST", "kmnist", classes=tuple("おきすつなはまやれを"),
                          get="the four KMNIST files of https://github.com/rois-codh/kmnist")
    if name == "emnist":
        if subset not in EMNIST_CLASSES:
            raise ConfigError(f"data.subset must be one of {', '.join(EMNIST_CLASSES)}, not {subset!r}")
        return IdxDataset(f"EMNIST {subset}", "emnist", prefix=f"emnist-{subset}-", transposed=True,
                          classes=EMNIST_CLASSES[subset], label_offset=1 if subset == "letters" else 0,
                          get=EMNIST_GET)
    raise ConfigError(f"unknown MNIST-family data set {name!r}")


DEBIAN_FOLDERS = {"fashionmnist": Path("/usr/share/datasets/fashion-mnist")}


def candidate_folders(name: str, ds: IdxDataset, path: str, root: str) -> list[Path]:
    if path:
        base = Path(path).expanduser()
        return [base, base / ds.folder, base / "gzip"]
    base = data_root(root or None)
    out = [base / ds.folder, base / ds.folder / "gzip"]
    if name in DEBIAN_FOLDERS:
        out.append(DEBIAN_FOLDERS[name])
    return out


def find_file(folders: list[Path], stem: str) -> Path | None:
    for folder in folders:
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None


def locate(name: str, ds: IdxDataset, path: str, root: str) -> dict[str, Path]:
    folders = candidate_folders(name, ds, path, root)
    found = {key: find_file(folders, stem) for key, stem in ds.files().items()}
    missing = [ds.files()[k] for k, v in found.items() if v is None]
    if missing:
        where = ", ".join(str(f) for f in folders)
        raise DataError(f"{ds.title}: cannot find {', '.join(missing)} (or .gz) in {where}; get {ds.get}, "
                        "and give its folder with --set data.path=FOLDER")
    return found


def read_images_labels(files: dict[str, Path], ds: IdxDataset) -> tuple[np.ndarray, np.ndarray]:
    """Both parts pooled: images ``uint8 [n, 28, 28]`` (upright), labels ``int64 [n]`` from 0."""
    images, labels = [], []
    for part in ("train", "test" if ds.prefix else "t10k"):
        x, y = read_idx(files[f"{part}-images"]), read_idx(files[f"{part}-labels"])
        where = files[f"{part}-images"]
        if x.ndim != 3 or x.dtype != np.uint8:
            raise DataError(f"{where}: expected unsigned bytes [images, rows, columns], found {x.dtype} "
                            f"{x.shape}; is it an image file?")
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"{files[f'{part}-labels']}: {len(y) if y.ndim == 1 else y.shape} labels for the "
                            f"{len(x)} images of {where}; the two files do not belong together")
        y = y.astype(np.int64) - ds.label_offset
        if len(y) and (y.min() < 0 or y.max() >= len(ds.classes)):
            raise DataError(f"{files[f'{part}-labels']}: labels must lie in {ds.label_offset}.."
                            f"{len(ds.classes) - 1 + ds.label_offset} for {ds.title}, found "
                            f"{y.min() + ds.label_offset}..{y.max() + ds.label_offset}")
        images.append(x.transpose(0, 2, 1) if ds.transposed else x)
        labels.append(y)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def split_classes(names, fractions, seed: int) -> dict[str, list[int]]:
    """Class indices per split: names ordered by a keyed hash, cut by ``fractions`` (rounded)."""
    if len(fractions) != 3 or any(not isinstance(f, (int, float)) or f < 0 for f in fractions) \
            or sum(fractions) <= 0:
        raise ConfigError(f"data.fractions must be three non-negative numbers (train, val, test), not {fractions}")
    key = lambda i: hashlib.sha256(f"{SPLIT_KEY}:{seed}:{names[i]}".encode()).hexdigest()
    order = sorted(range(len(names)), key=key)
    f = np.asarray(fractions, dtype=float) / sum(fractions)
    n_train, n_val = int(round(f[0] * len(names))), int(round(f[1] * len(names)))
    parts = (order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:])
    return {s: sorted(p) for s, p in zip(("train", "val", "test"), parts)}


def resize(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[-1] == size:
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.LANCZOS))
                     for im in images]) if len(images) else np.zeros((0, size, size), np.uint8)


@lru_cache(maxsize=4)
def load_idx_family(name: str, path: str = "", root: str = "", image_size: int = 28,
                    fractions: tuple = (0.0, 0.5, 0.5), split_seed: int = 0,
                    subset: str = "balanced") -> dict[str, ClassDataset]:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 4 <= image_size <= 512:
        raise ConfigError(f"data.image_size must be a whole number from 4 to 512, not {image_size!r}")
    ds = family(name, subset)
    images, labels = read_images_labels(locate(name, ds, path, root), ds)
    images = resize(images, image_size)[:, None]
    split = split_classes(list(ds.classes), list(fractions), split_seed)
    # Normalise by the training images, or by all of them for a target-only split.
    basis = np.isin(labels, split["train"]) if split["train"] else np.ones(len(labels), bool)
    pixels = images[basis].astype(np.float32) / 255.0
    spec = ImageSpec(image_size, 1, False, "lanczos", (float(pixels.mean()),), (max(float(pixels.std()), 1e-3),))
    out = {}
    for part, classes in split.items():
        relabel = np.full(len(ds.classes), -1)
        relabel[classes] = np.arange(len(classes))
        keep = np.flatnonzero(relabel[labels] >= 0)
        names = [ds.classes[c] for c in classes]
        out[part] = ClassDataset(torch.from_numpy(images[keep]), torch.from_numpy(relabel[labels[keep]]), names,
                                 spec, f"{ds.title}, {part}: {len(names)} classes ({', '.join(names[:10])}"
                                       f"{' ...' if len(names) > 10 else ''}), {len(keep):,} images")
    return out


@dataclass(frozen=True, kw_only=True)
class IdxOptions(Options):
    section = "data"
    path: str = option("", role=DATA, doc="folder of the IDX files; empty = <data root>/<name>, Debian's folder")
    root: str = option("", role=DATA, doc="the data root; empty = $METAMAP_DATA, else the per-user cache")
    image_size: int = option(28, low=4, high=512, role=ARCHITECTURE)
    fractions: list[float] = option([0.0, 0.5, 0.5], low=0, length=3, role=DATA,
                                    doc="shares of the classes for train, val and test; default: a target domain")
    split_seed: int = option(0, low=0, high=MAX_INT, role=DATA)

    def check(self) -> None:
        if sum(self.fractions) <= 0:
            self.fail(f"data.fractions must not all be 0 (train, val, test shares), not {self.fractions}")


@dataclass(frozen=True, kw_only=True)
class EmnistOptions(IdxOptions):
    subset: Literal["balanced", "byclass", "bymerge", "letters", "digits", "mnist"] = option(
        "balanced", role=ARCHITECTURE, doc="which EMNIST split")


class IdxSource(ClassDataSource):
    name = ""

    def datasets(self, o: IdxOptions) -> dict[str, ClassDataset]:
        return load_idx_family(self.name, o.path, o.root, o.image_size, tuple(o.fractions), o.split_seed,
                               getattr(o, "subset", "balanced"))


for _name in ("mnist", "fashionmnist", "kmnist"):
    register_data(_name, options=IdxOptions)(type(f"{_name}Source", (IdxSource,), {"name": _name}))

register_data("emnist", options=EmnistOptions)(type("emnistSource", (IdxSource,), {"name": "emnist"}))
