"""mini-ImageNet (Vinyals et al. 2016) with the class split of Ravi & Larochelle (2017).

100 ImageNet synsets, 600 images each, split into 64 train / 16 val / 20 test classes (the
lists ship in :mod:`metamap.data.splits`). ``data.path`` is a folder in one of two layouts:

``csv`` -- Ravi & Larochelle's release::

    PATH/train.csv  val.csv  test.csv       header "filename,label", rows like
                                            "n0153282900000005.jpg,n01532829"
    PATH/images/n0153282900000005.jpg ...   the 60,000 ImageNet JPEGs (any size)

``pickle`` -- the widely shared pre-resized cache (used e.g. by learn2learn)::

    PATH/mini-imagenet-cache-train.pkl      dict: "image_data" uint8 [N, 84, 84, 3] (RGB),
    PATH/mini-imagenet-cache-val.pkl        "class_dict" {wnid: [row indices]}
    PATH/mini-imagenet-cache-test.pkl       (the val file may be named ...-validation.pkl)

``data.format = "auto"`` takes the pickle cache when both are there (it is already 84x84).
The pickles are read with :mod:`metamap.data.safe_pickle`, never with plain ``pickle``.

Preprocessing: RGB, LANCZOS resize to ``data.image_size`` (84 by default, as in the
literature), normalised by the ImageNet mean and standard deviation
(:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`). The decoded arrays are cached beside the data
(``PATH/metamap-cache/``, else the per-user cache) and memory-mapped on later runs; delete
that folder to force decoding again.

``data.split = "ravi"`` (default) checks the files' classes against the published lists: a
class in the wrong split (e.g. val and test files swapped, or Vinyals' split) is an error, a
missing class a warning. ``"files"`` uses whatever classes the files hold.
"""
from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from metamap.data.cache import cache_folders, cached, fingerprint
from metamap.data.dataset import ClassDataset, check_disjoint
from metamap.data.images import ImageSpec
from metamap.data.memory import images_array
from metamap.data.sources import ClassDataSource
from metamap.errors import ConfigError, DataError
from metamap.options import ARCHITECTURE, DATA, RUNTIME, Options, option
from metamap.registry import register_data

PARTS = ("train", "val", "test")
# The usual ImageNet channel statistics (torchvision's), in [0, 1] units; used for every
# ImageNet-derived benchmark so that features transfer between them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)



@dataclass(frozen=True, kw_only=True)
class MiniImageNetOptions(Options):
    section = "data"
    path: str = option("", role=DATA, doc="folder holding the csv or pickle layout")
    image_size: int = option(84, low=8, high=512, role=ARCHITECTURE)
    format: Literal["auto", "csv", "pickle"] = option("auto", role=DATA)
    split: Literal["ravi", "files"] = option(
        "ravi", role=DATA, doc="ravi: check the classes against the published split; files: trust the files")
    cache: bool = option(True, role=RUNTIME, doc="keep decoded arrays on disk for the next run")

PICKLE_NAMES = {"train": ("mini-imagenet-cache-train.pkl",),
                "val": ("mini-imagenet-cache-val.pkl", "mini-imagenet-cache-validation.pkl"),
                "test": ("mini-imagenet-cache-test.pkl",)}
CSV_HEADER = ("filename", "label")
CACHE_VERSION = 1


def imagenet_spec(image_size: int = 84) -> ImageSpec:
    """RGB at ``image_size``, LANCZOS resize, ImageNet normalisation."""
    return ImageSpec(size=image_size, channels=3, invert=False, resample="lanczos",
                     mean=IMAGENET_MEAN, std=IMAGENET_STD)


def check_image_size(image_size) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 8 <= image_size <= 512:
        raise ConfigError(f"data.image_size must be a whole number from 8 to 512, not {image_size!r}")
    return image_size


# -- decoded arrays and their on-disk cache ----------------------------------------------
@dataclass
class SplitArrays:
    """One split, decoded: ``images`` uint8 ``[n, C, S, S]``, ``labels`` int64 ``[n]`` (index
    into ``names``), ``names`` one per class."""

    images: np.ndarray
    labels: np.ndarray
    names: list[str]

    def to_dataset(self, spec: ImageSpec, description: str) -> ClassDataset:
        return ClassDataset(torch.from_numpy(self.images), torch.from_numpy(self.labels.astype(np.int64)),
                            list(self.names), spec, description)


def hwc_to_spec(images: np.ndarray, spec: ImageSpec, where: str) -> np.ndarray:
    """uint8 RGB images ``[n, H, W, 3]`` -> ``[n, C, S, S]`` exactly as ``spec.prepare`` would.

    When no resize or mode change is needed that is a transpose, done for all images at once.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DataError(f"{where}: images must be uint8 [N, height, width, 3], found {images.dtype} "
                        f"{list(images.shape)}")
    n, h, w, _ = images.shape
    if spec.channels == 3 and h == w == spec.size and not spec.invert:
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    out = images_array(n, spec.shape, where)
    for i in tqdm(range(n), desc=f"resizing {Path(where).name}", unit="img", leave=False, disable=None):
        out[i] = spec.prepare(Image.fromarray(images[i]))
    return out


def cached_arrays(root: Path, tag: str, spec: ImageSpec, sources: dict, build: Callable[[], dict],
                  use_cache: bool = True) -> dict[str, SplitArrays]:
    """The decoded splits from a cache (:mod:`metamap.data.cache`) made from the same ``sources``
    with the same ``spec``, else ``build()`` them and cache them for next time (memory-mapped
    when read back)."""
    if not use_cache:
        return build()

    def build_entry():
        splits = build()
        arrays = {f"{p}-{field}": getattr(a, field) for p, a in splits.items() for field in ("images", "labels")}
        return arrays, {"names": {p: a.names for p, a in splits.items()}}

    def consistent(arrays, extra) -> bool:
        try:
            return all(len(arrays[f"{p}-images"]) == len(arrays[f"{p}-labels"]) and
                       (not len(arrays[f"{p}-labels"]) or arrays[f"{p}-labels"].max() < len(extra["names"][p]))
                       for p in PARTS)
        except (KeyError, TypeError):
            return False

    key = {"version": CACHE_VERSION, "dataset": tag, "spec": spec.to_dict(), "sources": sources}
    arrays, extra = cached(cache_folders(root, f"{tag}-{spec.size}"), key, build_entry, tag, consistent)
    return {p: SplitArrays(arrays[f"{p}-images"], arrays[f"{p}-labels"], list(extra["names"][p])) for p in PARTS}


def check_published(found: dict[str, list[str]], published: dict[str, list[str]], dataset: str,
                    where: str) -> None:
    """Refuse classes that the published split puts elsewhere (or nowhere); warn on missing ones."""
    owner = {c: part for part, names in published.items() for c in names}
    for part, names in found.items():
        wrong = [c for c in names if owner.get(c) != part]
        if not wrong:
            continue
        elsewhere = [f"{c} (a {owner[c]} class)" for c in wrong if c in owner][:5]
        unknown = [c for c in wrong if c not in owner][:5]
        detail = "; ".join(([", ".join(elsewhere)] if elsewhere else []) +
                           ([f"not {dataset} classes: {', '.join(unknown)}"] if unknown else []))
        raise DataError(f"{where}: the {part} split holds {len(wrong)} class(es) that the published "
                        f"{dataset} split does not put there: {detail}. Are the files swapped or from "
                        "another split? To use the files' own classes anyway, set --set data.split='files'")
    # Only once every class is known to be in its place: a partial copy still works, with a warning.
    for part, names in found.items():
        missing = len(set(published[part]) - set(names))
        if missing:
            warnings.warn(f"{where}: the {part} split has {len(names)} of the {len(published[part])} "
                          f"published {dataset} classes ({missing} missing); results will not be "
                          "comparable with published ones", stacklevel=3)


# -- the two layouts ---------------------------------------------------------------------
def detect_format(root: Path, fmt: str) -> str:
    if fmt not in ("auto", "csv", "pickle"):
        raise ConfigError(f"data.format must be auto, csv or pickle, not {fmt!r}")
    if not root.is_dir():
        raise DataError(f"mini-ImageNet folder {root} does not exist; set data.path to the folder "
                        "holding train.csv/val.csv/test.csv and images/, or the "
                        "mini-imagenet-cache-*.pkl files (see docs/datasets.md)")
    has_pickle = (root / PICKLE_NAMES["train"][0]).is_file()
    has_csv = (root / "train.csv").is_file()
    if fmt == "auto":
        if not (has_pickle or has_csv):
            listing = ", ".join(sorted(p.name for p in root.iterdir())[:8]) or "nothing"
            raise DataError(f"{root} holds neither mini-ImageNet layout (it has: {listing}). Expected "
                            "train.csv, val.csv, test.csv and images/ (Ravi & Larochelle's release) or "
                            "mini-imagenet-cache-{train,val,test}.pkl (see docs/datasets.md)")
        return "pickle" if has_pickle else "csv"
    return fmt


def read_csv(path: Path) -> list[tuple[str, str]]:
    """Rows ``(filename, label)`` of one of Ravi & Larochelle's split files."""
    if not path.is_file():
        raise DataError(f"{path}: no such file; the csv layout needs train.csv, val.csv and test.csv")
    with open(path, newline="", encoding="utf-8") as f:
        rows = [[cell.strip() for cell in row] for row in csv.reader(f) if any(c.strip() for c in row)]
    if not rows or tuple(rows[0][:2]) != CSV_HEADER or len(rows[0]) != 2:
        first = ",".join(rows[0]) if rows else "(empty file)"
        raise DataError(f"{path}: the first line must be the header 'filename,label', found {first!r}; "
                        "this is not one of Ravi & Larochelle's split files")
    out = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 2 or not all(row):
            raise DataError(f"{path}, line {line}: expected 'filename,label', found {','.join(row)!r}")
        out.append((row[0], row[1]))
    if not out:
        raise DataError(f"{path}: lists no images")
    return out


def _class_order(labels) -> list[str]:
    return list(dict.fromkeys(labels))


def csv_arrays(root: Path, spec: ImageSpec, rows: dict[str, list[tuple[str, str]]]) -> dict[str, SplitArrays]:
    """Decode the images each split file lists from ``root/images``."""
    from tqdm.auto import tqdm

    images_dir = root / "images"
    out = {}
    for part in PARTS:
        missing = [f for f, _ in rows[part] if not (images_dir / f).is_file()]
        if missing:
            raise DataError(f"{images_dir}: {len(missing)} image(s) listed in {part}.csv are missing, e.g. "
                            f"{', '.join(missing[:3])}; the csv layout needs every listed JPEG in images/")
        names = _class_order(label for _, label in rows[part])
        index = {c: i for i, c in enumerate(names)}
        images = images_array(len(rows[part]), spec.shape, f"mini-ImageNet {part}")
        for i, (filename, _) in enumerate(tqdm(rows[part], desc=f"decoding mini-ImageNet {part}", unit="img",
                                               leave=False, disable=None)):
            images[i] = spec.load(images_dir / filename)
        labels = np.array([index[label] for _, label in rows[part]], dtype=np.int64)
        out[part] = SplitArrays(images, labels, names)
    return out


def pickle_files(root: Path) -> dict[str, Path]:
    files = {}
    for part, candidates in PICKLE_NAMES.items():
        path = next((root / c for c in candidates if (root / c).is_file()), None)
        if path is None:
            raise DataError(f"{root}: no {' or '.join(candidates)}; the pickle layout needs the train, "
                            "val and test cache files side by side")
        files[part] = path
    return files


def read_cache_pickle(path: Path, spec: ImageSpec) -> SplitArrays:
    """One ``mini-imagenet-cache-*.pkl`` -> arrays, after checking its structure."""
    from metamap.data import safe_pickle

    d = safe_pickle.text_keys(safe_pickle.load(path), str(path))
    if "image_data" not in d or "class_dict" not in d:
        raise DataError(f"{path}: expected the keys 'image_data' and 'class_dict', found {sorted(d)}; "
                        "this is not a mini-ImageNet cache file")
    images, class_dict = d["image_data"], d["class_dict"]
    if not isinstance(images, np.ndarray) or not isinstance(class_dict, dict):
        raise DataError(f"{path}: 'image_data' must be an array and 'class_dict' a dict")
    names = [safe_pickle.text(k) for k in class_dict]
    labels = np.full(len(images), -1, dtype=np.int64)
    for c, members in enumerate(class_dict.values()):
        members = np.asarray(members, dtype=np.int64).reshape(-1)
        if members.size and (members.min() < 0 or members.max() >= len(images)):
            raise DataError(f"{path}: class {names[c]} lists image indices outside 0..{len(images) - 1}")
        if (labels[members] >= 0).any():
            raise DataError(f"{path}: class {names[c]} shares images with another class; the file is damaged")
        labels[members] = c
    keep = labels >= 0  # images no class claims carry no label: leave them out
    return SplitArrays(hwc_to_spec(images[keep] if not keep.all() else images, spec, str(path)),
                       labels[keep], names)


# -- putting it together -------------------------------------------------------------------
def load_miniimagenet(path: str | os.PathLike, image_size: int = 84, format: str = "auto",
                      split: str = "ravi", cache: bool = True) -> dict[str, ClassDataset]:
    """mini-ImageNet as ``{"train", "val", "test"} -> ClassDataset`` (data uint8 ``[n, 3, S, S]``)."""
    from metamap.data import splits

    if not str(path).strip():
        raise ConfigError("mini-ImageNet needs data.path: --set data.path=FOLDER (see docs/datasets.md)")
    if split not in ("ravi", "files"):
        raise ConfigError(f"data.split must be 'ravi' or 'files', not {split!r}")
    spec = imagenet_spec(check_image_size(image_size))
    root = Path(path).expanduser()
    fmt = detect_format(root, format)
    if fmt == "pickle":
        files = pickle_files(root)
        build = lambda: {p: read_cache_pickle(files[p], spec) for p in PARTS}
        sources = fingerprint(files.values())
    else:
        rows = {p: read_csv(root / f"{p}.csv") for p in PARTS}
        check_disjoint({p: _class_order(lab for _, lab in rows[p]) for p in PARTS}, f"the split files of {root}",
                       "give each class one of train.csv, val.csv and test.csv")
        if split == "ravi":  # check classes before the long decode
            check_published({p: _class_order(lab for _, lab in rows[p]) for p in PARTS},
                            splits.published("miniimagenet-ravi"), "mini-ImageNet (Ravi)", str(root))
        build = lambda: csv_arrays(root, spec, rows)
        sources = {**fingerprint([root / f"{p}.csv" for p in PARTS] + [root / "images"]),
                   "rows": {p: len(rows[p]) for p in PARTS}}
    arrays = cached_arrays(root, f"miniimagenet-{fmt}", spec, sources, build, cache)
    check_disjoint({p: arrays[p].names for p in PARTS}, f"the mini-ImageNet files of {root}",
                   "use files whose splits hold different classes")
    if split == "ravi" and fmt == "pickle":
        check_published({p: arrays[p].names for p in PARTS}, splits.published("miniimagenet-ravi"),
                        "mini-ImageNet (Ravi)", str(root))
    what = "Ravi & Larochelle split" if split == "ravi" else "split of the files"
    return {p: arrays[p].to_dataset(spec, f"mini-ImageNet ({what}), {p}: {len(arrays[p].names)} classes, "
                                          f"{len(arrays[p].labels)} images")
            for p in PARTS}


@lru_cache(maxsize=2)
def _cached_load(path: str, image_size: int, format: str, split: str, cache: bool):
    return load_miniimagenet(path, image_size, format, split, cache)


@register_data("miniimagenet", options=MiniImageNetOptions)
class MiniImageNetSource(ClassDataSource):
    def datasets(self, o: MiniImageNetOptions) -> dict[str, ClassDataset]:
        return _cached_load(o.path, o.image_size, o.format, o.split, o.cache)
