"""Your own images: one sub-folder per class (``data.name = "folder"``, ``data.path = ...``).

Classes, not images, are split into train / val / test (new classes at test time is the
point of few-shot learning). The split is a seeded permutation of the sorted class names,
so the same folder and seed always give the same split.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from metamap.data.dataset import ClassDataset
from metamap.data.images import ImageSpec, list_images
from metamap.data.sources import ClassDataSource
from metamap.errors import ConfigError, DataError
from metamap.registry import options, register_data

FOLDER_OPTIONS = {"path": "", "image_size": 28, "channels": 1, "invert": False, "resample": "lanczos",
                  "fractions": [0.6, 0.2, 0.2], "split_seed": 0, "on_bad_file": "error"}


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


def read_split(classes: dict[str, list[Path]], names: list[str], spec: ImageSpec, on_bad: str,
               description: str) -> ClassDataset:
    arrays, labels, kept = [], [], []
    for name in names:
        good = []
        for p in classes[name]:
            try:
                good.append(spec.load(p))
            except DataError:
                if on_bad != "skip":
                    raise
        if good:
            labels += [len(kept)] * len(good)
            arrays += good
            kept.append(name)
    data = torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros((0, *spec.shape), dtype=torch.uint8)
    return ClassDataset(data, torch.tensor(labels, dtype=torch.long), kept, spec, description)


@lru_cache(maxsize=4)
def load_folder(path: str, image_size: int, channels: int, invert: bool, resample: str,
                fractions: tuple, split_seed: int, on_bad_file: str) -> dict[str, ClassDataset]:
    if on_bad_file not in ("error", "skip"):
        raise ConfigError(f"data.on_bad_file must be 'error' or 'skip', not {on_bad_file!r}")
    root = Path(path).expanduser()
    classes = scan(root)
    split = split_classes(list(classes), fractions, split_seed)
    raw = ImageSpec(image_size, channels, invert, resample, (0.0,) * channels, (1.0,) * channels)
    out = {s: read_split(classes, split[s], raw, on_bad_file, f"image folder {root}, {s} classes ({len(split[s])})")
           for s in ("train", "val", "test")}
    # Normalise with the training images' own statistics, then use that spec everywhere (predict too).
    x = out["train"].data.to(torch.float64) / 255.0
    mean = tuple(float(m) for m in x.mean((0, 2, 3))) if len(x) else (0.0,) * channels
    std = tuple(max(float(s), 1e-3) for s in x.std((0, 2, 3))) if len(x) > 1 else (1.0,) * channels
    spec = ImageSpec(image_size, channels, invert, resample, mean, std)
    for ds in out.values():
        ds.spec = spec
    return out


@register_data("folder", defaults=FOLDER_OPTIONS)
class FolderSource(ClassDataSource):
    def datasets(self, data_cfg: dict) -> dict[str, ClassDataset]:
        o = options(data_cfg, FOLDER_OPTIONS, "data")
        if not o["path"]:
            raise ConfigError("data.name = 'folder' needs data.path: a folder with one sub-folder of images per class")
        return load_folder(str(o["path"]), o["image_size"], o["channels"], o["invert"], o["resample"],
                           tuple(o["fractions"]), o["split_seed"], o["on_bad_file"])
