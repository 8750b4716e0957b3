"""Your own images: one sub-folder per class (``data.name = "folder"``, ``data.path = ...``).

Classes, not images, are split into train / val / test (new classes at test time is the
point of few-shot learning). The first run draws the split (a seeded permutation of the
sorted class names) and writes it to a JSON file (``data.split_file``, default
``<folder>/metamap-split.json``, or the per-user cache if the folder is read-only); later
runs reuse that file, so adding images or re-running with another seed never moves a class
between train and test. Corrupt images are refused by path (``data.on_bad_file = "error"``)
or reported and skipped (``"skip"``).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from functools import lru_cache
from pathlib import Path

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from metamap.data.dataset import ClassDataset, check_disjoint
from metamap.data.decode import MAX_PIXELS
from metamap.data.images import ImageSpec, list_images
from metamap.data.memory import check_fits, image_bytes
from metamap.data.paths import atomic_write, user_cache_dir
from metamap.data.sources import ClassDataSource
from metamap.errors import ConfigError, DataError
from metamap.options import ARCHITECTURE, DATA, MAX_INT, Options, option
from metamap.registry import register_data

SPLIT_NAMES = ("train", "val", "test")


def scan(root: Path) -> dict[str, list[Path]]:
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; give --set data.path=FOLDER with one "
                        "sub-folder of images per class")
    classes = {c.name: list_images(c) for c in sorted(root.iterdir()) if c.is_dir() and not c.name.startswith(".")}
    classes = {k: v for k, v in classes.items() if v}
    if len(classes) < 2:
        raise DataError(f"image folder {root} has {len(classes)} class sub-folder(s) with images; "
                        "few-shot learning needs one sub-folder per class, at least a few classes")
    return classes


def split_classes(names: list[str], fractions, seed: int) -> dict[str, list[str]]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ConfigError(f"data.fractions must be three non-negative numbers (train, val, test), not {fractions}")
    order = np.random.default_rng(seed).permutation(len(names))
    f = np.asarray(fractions, dtype=float) / sum(fractions)
    n_train, n_val = int(round(f[0] * len(names))), int(round(f[1] * len(names)))
    parts = np.split(order, [n_train, n_train + n_val])
    return {s: sorted(names[i] for i in p) for s, p in zip(("train", "val", "test"), parts)}


def split_file_for(root: Path, given: str) -> Path:
    if given:
        return Path(given).expanduser()
    default = root / "metamap-split.json"
    if default.exists() or os.access(root, os.W_OK):
        return default
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return user_cache_dir() / "splits" / f"{root.name}-{digest}.json"


def load_or_make_split(root: Path, names: list[str], fractions, seed: int, given: str) -> dict[str, list[str]]:
    """The class split recorded in the split file, or a new one written there."""
    path = split_file_for(root, given)
    if path.exists():
        try:
            split = json.loads(path.read_text())["classes"]
            assert all(isinstance(split[s], list) and all(isinstance(c, str) for c in split[s]) for s in SPLIT_NAMES)
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            raise DataError(f"split file {path} is damaged; delete it to draw a new split") from None
        check_disjoint({s: split[s] for s in SPLIT_NAMES}, f"split file {path}",
                       "give each class one list, or delete the file to draw a new split")
        listed = {c for s in SPLIT_NAMES for c in split[s]}
        new = sorted(set(names) - listed)
        if new:
            raise DataError(f"{len(new)} class folder(s) of {root} are not in the split file {path}: "
                            f"{', '.join(new[:5])}{' ...' if len(new) > 5 else ''}; add them to one of its "
                            "lists, or delete the file to draw a new split")
        present = set(names)
        return {s: [c for c in split[s] if c in present] for s in SPLIT_NAMES}
    split = split_classes(names, fractions, seed)
    with atomic_write(path) as f:
        f.write(json.dumps({"folder": str(root.resolve()), "seed": seed, "fractions": list(fractions),
                            "classes": split}, indent=1).encode())
    return split


def read_split(classes: dict[str, list[Path]], names: list[str], spec: ImageSpec, on_bad: str,
               description: str) -> ClassDataset:
    arrays, labels, kept = [], [], []
    for name in names:
        good = []
        for p in classes[name]:
            try:
                good.append(spec.load(p))
            except DataError as e:
                if on_bad != "skip":
                    raise DataError(f"{e} (or set data.on_bad_file = 'skip' to leave such files out)") from None
                warnings.warn(f"skipped: {e}", stacklevel=2)
        if good:
            labels += [len(kept)] * len(good)
            arrays += good
            kept.append(name)
    data = torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros((0, *spec.shape), dtype=torch.uint8)
    return ClassDataset(data, torch.tensor(labels, dtype=torch.long), kept, spec, description)


def channel_statistics(data: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (sample) standard deviation of uint8 images ``[n, C, H, W]`` scaled to
    [0, 1], in float64, a chunk of images at a time (a float64 copy of all of them would need
    8 times their memory)."""
    n, c = data.shape[0], data.shape[1]
    if n == 0:
        return (0.0,) * c, (1.0,) * c
    count = n * data[0, 0].numel()
    total = sum(data[i:i + chunk].to(torch.float64).sum((0, 2, 3)) for i in range(0, n, chunk)) / 255.0
    mean = total / count
    if count < 2 or n < 2:
        return tuple(float(m) for m in mean), (1.0,) * c
    squares = sum(((data[i:i + chunk].to(torch.float64) / 255.0 - mean.view(1, c, 1, 1)) ** 2).sum((0, 2, 3))
                  for i in range(0, n, chunk))
    std = (squares / (count - 1)).sqrt()
    return tuple(float(m) for m in mean), tuple(max(float(s), 1e-3) for s in std)


@lru_cache(maxsize=4)
def load_folder(path: str, image_size: int, channels: int, invert: bool, resample: str,
                fractions: tuple, split_seed: int, on_bad_file: str, split_file: str = "") -> dict[str, ClassDataset]:
    if on_bad_file not in ("error", "skip"):
        raise ConfigError(f"data.on_bad_file must be 'error' or 'skip', not {on_bad_file!r}")
    side = MAX_PIXELS ** 0.5
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 1 <= image_size <= side:
        raise ConfigError(f"data.image_size must be a whole number from 1 to {side:.0f}, not {image_size!r}")
    root = Path(path).expanduser()
    classes = scan(root)
    split = load_or_make_split(root, list(classes), fractions, split_seed, split_file)
    raw = ImageSpec(image_size, channels, invert, resample, (0.0,) * channels, (1.0,) * channels)
    count = sum(len(classes[c]) for s in SPLIT_NAMES for c in split[s])
    check_fits(image_bytes(count, raw.shape), f"image folder {root}: {count:,} images at data.image_size = "
               f"{image_size} x {channels} channel(s)", "choose a smaller data.image_size")
    out = {s: read_split(classes, split[s], raw, on_bad_file, f"image folder {root}, {s} classes ({len(split[s])})")
           for s in ("train", "val", "test")}
    # Normalise with the training images' own statistics, then use that spec everywhere (predict too).
    mean, std = channel_statistics(out["train"].data)
    spec = ImageSpec(image_size, channels, invert, resample, mean, std)
    for ds in out.values():
        ds.spec = spec
    return out


@dataclass(frozen=True, kw_only=True)
class FolderOptions(Options):
    section = "data"
    path: str = option("", role=DATA, doc="a folder with one sub-folder of images per class")
    image_size: int = option(28, low=4, high=1024, role=ARCHITECTURE, doc="side of the square model inputs")
    channels: Literal[1, 3] = option(1, role=ARCHITECTURE, doc="1 = grey, 3 = RGB")
    invert: bool = option(False, role=ARCHITECTURE, doc="invert the grey levels (dark strokes become bright)")
    resample: Literal["lanczos", "bilinear", "bicubic", "nearest", "box"] = option(
        "lanczos", role=ARCHITECTURE, doc="the resize filter")
    fractions: list[float] = option([0.6, 0.2, 0.2], low=0, length=3, role=DATA,
                                    doc="shares of the classes for train, val and test")
    split_seed: int = option(0, low=0, high=MAX_INT, role=DATA, doc="seed of the class split")
    split_file: str = option("", role=DATA, doc="where the split is recorded; empty = DIR/metamap-split.json")
    on_bad_file: Literal["error", "skip"] = option("error", role=DATA, doc="a corrupt image stops the run or is skipped")

    def check(self) -> None:
        if sum(self.fractions) <= 0:
            self.fail(f"data.fractions must not all be 0 (train, val, test shares), not {self.fractions}")


@register_data("folder", options=FolderOptions)
class FolderSource(ClassDataSource):
    def datasets(self, o: FolderOptions) -> dict[str, ClassDataset]:
        if not o.path:
            raise ConfigError("data.name = 'folder' needs data.path: a folder with one sub-folder of images per class")
        return load_folder(o.path, o.image_size, o.channels, o.invert, o.resample, tuple(o.fractions),
                           o.split_seed, o.on_bad_file, o.split_file)
