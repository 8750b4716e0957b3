"""tiered-ImageNet (Ren et al., ICLR 2018) in its released pickle format.

608 ImageNet classes grouped into 34 high-level categories; whole categories go to one split,
so test classes are far from training ones: 351 classes / 20 categories for training, 97 / 6
for validation, 160 / 8 for testing (779,165 images at 84x84). ``data.path`` is the folder
holding, for each split ``train``, ``val``, ``test``::

    {split}_images_png.pkl   a list with one PNG file per image, each a uint8 numpy array of
                             the encoded bytes (84x84 colour)
    {split}_labels.pkl       a dict: "label_specific" int [N] (class of each image),
                             "label_general" int [N] (its category), "label_specific_str" and
                             "label_general_str" (their names)

(both written by Python 2, as released). A folder ``tiered-imagenet/`` inside ``data.path`` is
looked into too. Instead of ``{split}_images_png.pkl``, the decompressed ``{split}_images.npz``
(key "images", uint8 [N, 84, 84, 3]) that the reference code writes is accepted; that code
decodes with OpenCV, so its channels are in BGR order and are flipped to RGB here.

The pickles are read with :mod:`metamap.data.safe_pickle`, never with plain ``pickle``. The
class split is the files' own (each split file holds its classes); a class count other than
the published one gives a warning. Preprocessing is that of mini-ImageNet (RGB, LANCZOS
resize to ``data.image_size``, ImageNet normalisation), and the decoded arrays are cached the
same way (``PATH/metamap-cache/``, memory-mapped when read back: about 16.5 GB at 84x84).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from metamap.data.cache import fingerprint
from metamap.data.dataset import ClassDataset
from metamap.data.decode import decode_image
from metamap.data.images import ImageSpec
from metamap.data.memory import images_array
from metamap.data.miniimagenet import (
    PARTS,
    SplitArrays,
    cached_arrays,
    check_image_size,
    hwc_to_spec,
    imagenet_spec,
)
from metamap.data.sources import ClassDataSource
from metamap.errors import ConfigError, DataError
from metamap.options import ARCHITECTURE, DATA, RUNTIME, Options, option
from metamap.registry import register_data


@dataclass(frozen=True, kw_only=True)
class TieredImageNetOptions(Options):
    section = "data"
    path: str = option("", role=DATA, doc="folder holding the split files")
    image_size: int = option(84, low=8, high=512, role=ARCHITECTURE)
    cache: bool = option(True, role=RUNTIME, doc="keep decoded arrays on disk for the next run")


# (classes, categories) of the released splits (Ren et al. 2018, Table 1 and the released files).
PUBLISHED_COUNTS = {"train": (351, 20), "val": (97, 6), "test": (160, 8)}
LABEL_KEYS = ("label_specific", "label_specific_str")


def find_root(path: Path) -> Path:
    """The folder that holds the split files: ``path`` or ``path/tiered-imagenet``."""
    if not path.is_dir():
        raise DataError(f"tiered-ImageNet folder {path} does not exist; set data.path to the folder "
                        "holding {train,val,test}_images_png.pkl and {train,val,test}_labels.pkl "
                        "(see docs/datasets.md)")
    for root in (path, path / "tiered-imagenet"):
        if (root / "train_labels.pkl").is_file():
            return root
    listing = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
    raise DataError(f"{path}: no train_labels.pkl here or in {path / 'tiered-imagenet'} (found: {listing}); "
                    "tiered-ImageNet needs {split}_images_png.pkl and {split}_labels.pkl for train, val "
                    "and test (see docs/datasets.md)")


def split_files(root: Path, part: str) -> tuple[Path, Path]:
    """(images file, labels file) of one split; the images file is the PNG pickle or the npz."""
    labels = root / f"{part}_labels.pkl"
    if not labels.is_file():
        raise DataError(f"{root}: no {labels.name}; tiered-ImageNet needs the labels file of every split")
    for name in (f"{part}_images_png.pkl", f"{part}_images.npz"):
        if (root / name).is_file():
            return root / name, labels
    raise DataError(f"{root}: no {part}_images_png.pkl (or its decompressed {part}_images.npz); "
                    "tiered-ImageNet needs the images file of every split")


def unique_names(names: list[str]) -> list[str]:
    """Make repeated class names distinct (ImageNet has two 'crane's) by numbering repeats."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n} #{seen[n]}")
    return out


def read_labels(path: Path) -> tuple[np.ndarray, list[str], int]:
    """``(labels [N] int64, class names, number of categories)`` from ``{split}_labels.pkl``."""
    from metamap.data import safe_pickle

    d = safe_pickle.text_keys(safe_pickle.load(path), str(path))
    missing = [k for k in LABEL_KEYS if k not in d]
    if missing:
        raise DataError(f"{path}: missing key(s) {', '.join(missing)} (found {', '.join(sorted(d))}); "
                        "this is not a tiered-ImageNet labels file")
    labels = np.asarray(d["label_specific"])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: 'label_specific' must be a list of class numbers, found "
                        f"{labels.dtype} {list(labels.shape)}")
    names = unique_names([safe_pickle.text(n) for n in d["label_specific_str"]])
    if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
        raise DataError(f"{path}: class numbers run outside 0..{len(names) - 1} (the number of names)")
    general = d.get("label_general_str")
    categories = len(general) if isinstance(general, (list, tuple)) else 0
    return labels.astype(np.int64), names, categories


def decode_png(item, spec: ImageSpec, where: str) -> np.ndarray:
    """One encoded image (uint8 array or bytes) -> ``uint8 [C, S, S]`` via ``spec.prepare``."""
    if isinstance(item, np.ndarray):
        data = item.tobytes()
    elif isinstance(item, str):  # a Python 2 byte string, read back as latin-1 text
        data = item.encode("latin1")
    else:
        data = item
    if not isinstance(data, (bytes, bytearray)):
        raise DataError(f"{where}: expected encoded PNG images, found a {type(item).__name__}")
    return decode_image(data, spec.prepare, where, "the file is damaged - download it again")


def read_images(path: Path, spec: ImageSpec) -> np.ndarray:
    """``uint8 [N, C, S, S]`` from ``{split}_images_png.pkl`` or ``{split}_images.npz``."""
    from tqdm.auto import tqdm

    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                images = npz["images"]
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"{path}: cannot read the 'images' array ({e}); the file is damaged") from None
        # Written by OpenCV (cv2.imdecode): BGR order.
        return hwc_to_spec(np.ascontiguousarray(images[..., ::-1]), spec, str(path))
    from metamap.data import safe_pickle

    items = safe_pickle.load(path)
    if not isinstance(items, (list, tuple, np.ndarray)):
        raise DataError(f"{path}: expected a list of PNG images, found {type(items).__name__}")
    out = images_array(len(items), spec.shape, str(path))
    for i, item in enumerate(tqdm(items, desc=f"decoding {path.name}", unit="img", leave=False, disable=None)):
        out[i] = decode_png(item, spec, f"{path}, image {i}")
    return out


def read_split(root: Path, part: str, spec: ImageSpec) -> SplitArrays:
    images_file, labels_file = split_files(root, part)
    labels, names, _ = read_labels(labels_file)
    images = read_images(images_file, spec)
    if len(images) != len(labels):
        raise DataError(f"{root}: {images_file.name} holds {len(images)} images but {labels_file.name} "
                        f"{len(labels)} labels; the two files are from different releases")
    return SplitArrays(images, labels, names)


def warn_unpublished(arrays: dict[str, SplitArrays], root: Path) -> None:
    for part, a in arrays.items():
        want = PUBLISHED_COUNTS[part][0]
        if len(a.names) != want:
            warnings.warn(f"{root}: the tiered-ImageNet {part} split has {len(a.names)} classes, the "
                          f"published one {want}; results will not be comparable with published ones",
                          stacklevel=3)


def load_tieredimagenet(path: str | os.PathLike, image_size: int = 84,
                        cache: bool = True) -> dict[str, ClassDataset]:
    """tiered-ImageNet as ``{"train", "val", "test"} -> ClassDataset`` (data uint8 ``[n, 3, S, S]``)."""
    if not str(path).strip():
        raise ConfigError("tiered-ImageNet needs data.path: --set data.path=FOLDER (see docs/datasets.md)")
    spec = imagenet_spec(check_image_size(image_size))
    root = find_root(Path(path).expanduser())
    files = [f for p in PARTS for f in split_files(root, p)]
    build = lambda: {p: read_split(root, p, spec) for p in PARTS}
    arrays = cached_arrays(root, "tieredimagenet", spec, fingerprint(files), build, cache)
    warn_unpublished(arrays, root)
    return {p: arrays[p].to_dataset(spec, f"tiered-ImageNet (Ren et al. split), {p}: {len(arrays[p].names)} "
                                          f"classes, {len(arrays[p].labels)} images")
            for p in PARTS}


@lru_cache(maxsize=2)
def _cached_load(path: str, image_size: int, cache: bool):
    return load_tieredimagenet(path, image_size, cache)


@register_data("tieredimagenet", options=TieredImageNetOptions)
class TieredImageNetSource(ClassDataSource):
    def datasets(self, o: TieredImageNetOptions) -> dict[str, ClassDataset]:
        return _cached_load(o.path, o.image_size, o.cache)
