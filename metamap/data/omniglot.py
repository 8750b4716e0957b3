"""Omniglot: 1,623 handwritten characters from 50 alphabets, 20 drawings of each.

The data set, its licence and the official archives are described in
:mod:`metamap.data.omniglot_archives` (which also reads them); its class splits (``lake``,
``vinyals``, ``vinyals-trainval``) in :mod:`metamap.data.omniglot_splits`. This module puts
them together: :func:`load_omniglot` is what ``data.name = "omniglot"`` runs.

Where the data comes from at run time
-------------------------------------
At 28x28 nothing is needed: ``metamap/data/bundled/omniglot28.npz`` holds both sets already
preprocessed (made by ``scripts/build_bundled_omniglot.py`` from the official archives; the
licence notice ships beside it as ``LICENSE-omniglot``). Other sizes are decoded from the
archives in the data root (see :mod:`metamap.data.paths`), in ``<root>/omniglot/`` or
``<root>/``, downloaded if missing. Decoded arrays are cached per resolution by
:mod:`metamap.data.cache`, beside the archives (or in the per-user cache if that folder is
read-only), and used again as long as the archives' bytes and the preprocessing are the same.

Preprocessing
-------------
:func:`omniglot_spec`: grey, LANCZOS resize to ``image_size``, inverted so strokes are bright
on a dark background, then normalised by :data:`MEAN` and :data:`STD`. The same
:class:`~metamap.data.images.ImageSpec` built the cached arrays and travels with the data
set into checkpoints, so ``metamap predict`` treats user images identically.
"""
from __future__ import annotations

import io
import json
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np

from metamap.data import cache
from metamap.data.dataset import ClassDataset
from metamap.data.download import file_digest
from metamap.data.images import ImageSpec
from metamap.data.memory import check_fits, image_bytes
from metamap.data.omniglot_archives import (
    ARCHIVES,
    EXPECTED_COUNTS,
    SETS,
    CharacterSet,
    locate_archives,
    read_archives,
)
from metamap.data.omniglot_splits import SPLITS, make_splits
from metamap.data.paths import atomic_write
from metamap.errors import ConfigError

# Pixel mean and standard deviation of the 19,280 background drawings after 28x28 LANCZOS
# resizing and inversion, in [0, 1] units (computed once by scripts/build_bundled_omniglot.py
# --stats). Used for every image size so a model's input scale does not depend on it; the
# evaluation set is not involved.
MEAN = 0.081454
STD = 0.235903

BUNDLED_SIZE = 28
BUNDLED_PATH = Path(__file__).resolve().parent / "bundled" / "omniglot28.npz"
FORMAT_VERSION = 1


def omniglot_spec(image_size: int = BUNDLED_SIZE) -> ImageSpec:
    """The preprocessing of every Omniglot image at this resolution."""
    return ImageSpec(size=image_size, channels=1, invert=True, resample="lanczos",
                     mean=(MEAN,), std=(STD,))


# -- the bundled copy: arrays <-> a reproducible .npz -------------------------------------
def write_sets(path: str | os.PathLike, sets: dict[str, CharacterSet], meta: dict) -> None:
    """Save character sets as a compressed ``.npz``, atomically and byte-reproducibly.

    ``numpy.savez_compressed`` stamps members with the current time; here every member gets
    a fixed time, mode and order, so the same arrays always give the same bytes.
    """
    arrays = {"meta": np.array(json.dumps(meta, sort_keys=True))}
    for name, chars in sets.items():
        arrays[f"{name}_images"] = chars.images
        arrays[f"{name}_labels"] = chars.labels.astype(np.int16)
        arrays[f"{name}_classes"] = np.array(chars.names, dtype=str)
    with atomic_write(path) as f, zipfile.ZipFile(f, "w") as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arrays[key], order="C"), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def read_sets(path: str | os.PathLike) -> tuple[dict[str, CharacterSet], dict]:
    """Inverse of :func:`write_sets`: ``(sets, meta)``.

    A damaged file raises ``OSError``, ``ValueError``, ``KeyError`` or ``zipfile.BadZipFile``.
    """
    with np.load(path, allow_pickle=False) as npz:
        meta = json.loads(str(npz["meta"].item()))
        sets = {}
        for name in meta["sets"]:
            images, labels = npz[f"{name}_images"], npz[f"{name}_labels"].astype(np.int64)
            names = [str(s) for s in npz[f"{name}_classes"]]
            if images.shape[0] != labels.shape[0] or (len(labels) and labels.max() >= len(names)):
                raise ValueError(f"{path}: {name} arrays are inconsistent")
            sets[name] = CharacterSet(images, labels, names)
    return sets, meta


def set_meta(spec: ImageSpec, **extra) -> dict:
    """What an ``.npz`` of Omniglot arrays records about how it was made."""
    return {"format": FORMAT_VERSION, "dataset": "omniglot", "sets": list(SETS),
            "spec": spec.to_dict(), **extra}


def _matches(meta: dict, spec: ImageSpec, **extra) -> bool:
    return meta == json.loads(json.dumps(set_meta(spec, **extra)))


def load_bundled(spec: ImageSpec | None = None, path: str | os.PathLike = BUNDLED_PATH):
    """The shipped 28x28 sets, or ``None`` if absent or made with a different spec."""
    spec = spec or omniglot_spec(BUNDLED_SIZE)
    if not Path(path).is_file():
        return None
    try:
        sets, meta = read_sets(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        warnings.warn(f"{path}: the bundled Omniglot copy is damaged ({e}); using the archives instead",
                      stacklevel=2)
        return None
    if not _matches(meta, spec):
        warnings.warn(f"{path}: the bundled Omniglot copy was made with different preprocessing; "
                      "using the archives instead (rebuild it with scripts/build_bundled_omniglot.py)",
                      stacklevel=2)
        return None
    return sets


# -- decoded archives, cached ------------------------------------------------------------
def cached_sets(archives: dict[str, Path], spec: ImageSpec, progress: bool = True) -> dict[str, CharacterSet]:
    """The decoded sets, from a cache made from these exact archive bytes with this spec if
    there is one, else decoded now and cached for next time."""
    key = set_meta(spec, archives={ARCHIVES[s]: file_digest(archives[s]) for s in SETS})

    def decode():
        sets = read_archives(archives, spec, progress)
        arrays = {f"{s}-{field}": getattr(sets[s], field) for s in SETS for field in ("images", "labels")}
        return arrays, {"names": {s: sets[s].names for s in SETS}}

    def consistent(arrays, extra) -> bool:
        try:
            return all(len(arrays[f"{s}-images"]) == len(arrays[f"{s}-labels"]) and
                       (not len(arrays[f"{s}-labels"]) or arrays[f"{s}-labels"].max() < len(extra["names"][s]))
                       for s in SETS)
        except (KeyError, TypeError):
            return False

    folders = cache.cache_folders(archives["background"].parent, f"omniglot-{spec.size}")
    arrays, extra = cache.cached(folders, key, decode, "Omniglot", consistent)
    return {s: CharacterSet(arrays[f"{s}-images"], arrays[f"{s}-labels"], list(extra["names"][s])) for s in SETS}


def load_omniglot_sets(image_size: int = BUNDLED_SIZE, root: str | os.PathLike | None = None,
                       download: bool = True, progress: bool = True,
                       base_url: str | None = None) -> dict[str, CharacterSet]:
    """Both sets at ``image_size``: the bundled copy at 28, else the archives (via the cache)."""
    spec = omniglot_spec(image_size)
    if image_size == BUNDLED_SIZE:
        sets = load_bundled(spec)
        if sets is not None:
            return sets
    archives = locate_archives(root, download, progress, base_url)
    return cached_sets(archives, spec, progress)


def load_omniglot(split: str = "lake", image_size: int = BUNDLED_SIZE, rotations: bool = True,
                  root: str | os.PathLike | None = None, download: bool = True, progress: bool = True,
                  *, base_url: str | None = None) -> dict[str, ClassDataset]:
    """Omniglot as a dict ``{"train", "val", "test"} -> ClassDataset``.

    split: ``"lake"``, ``"vinyals"`` or ``"vinyals-trainval"`` (see :mod:`metamap.data.omniglot_splits`).
    image_size: side of the square images; 28 comes from the bundled copy.
    rotations: rotated copies as classes (``"Greek/character05@rot90"``): extra train classes
    of the lake split; the listed ones of every part of the Vinyals split.
    root, download, base_url: where archives are looked for / fetched from when needed.
    """
    if split not in SPLITS:
        raise ConfigError(f"data.split must be one of {', '.join(SPLITS)}, not {split!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 4 <= image_size <= 512:
        raise ConfigError(f"data.image_size must be a whole number from 4 to 512, not {image_size!r}")
    # The decoded sets (32,460 drawings) and the splits gathered from them (with rotations: at most
    # 4 x as many again) are in memory at once; known before the first image is decoded.
    drawings = 20 * sum(chars for _, chars in EXPECTED_COUNTS.values())
    check_fits(image_bytes(5 * drawings, (1, image_size, image_size)), f"Omniglot at data.image_size = {image_size}",
               "choose a smaller data.image_size (28 is bundled; 84 and 105 are common)")
    sets = load_omniglot_sets(image_size, root, download, progress, base_url)
    return make_splits(sets, split, rotations, spec=omniglot_spec(image_size))
