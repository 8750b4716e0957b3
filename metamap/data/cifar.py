"""CIFAR-FS and FC100: few-shot splits of CIFAR-100, read from its python archive.

CIFAR-100 (Krizhevsky 2009) has 100 fine classes of 600 32x32 colour images, grouped into 20
superclasses of 5. Both benchmarks use all 600 images of a class (the archive's ``train`` and
``test`` parts together) and split the *classes*:

* **CIFAR-FS** (Bertinetto et al., ICLR 2019): 64 / 16 / 20 fine classes, chosen at random;
* **FC100** (Oreshkin et al., NeurIPS 2018): whole superclasses, 12 / 4 / 4 of them, i.e.
  60 / 20 / 20 fine classes, so test classes are unlike training ones.

The published lists ship in :mod:`metamap.data.splits`. ``data.path`` is any of: the
official ``cifar-100-python.tar.gz`` (read in place, nothing is extracted), the folder it
unpacks to (``cifar-100-python/`` holding ``meta``, ``train``, ``test``), or the folder that
holds either. Those three files are Python 2 pickles of dicts -- ``train``/``test``:
``data`` uint8 [N, 3072] (1024 red, then green, then blue values, rows top to bottom),
``fine_labels``, ``coarse_labels``; ``meta``: ``fine_label_names``, ``coarse_label_names`` --
and are read with :mod:`metamap.data.safe_pickle`, never with plain ``pickle``.

Preprocessing: RGB, 32x32 by default (``data.image_size`` resizes with LANCZOS), normalised by
the CIFAR-100 channel mean and standard deviation (:data:`CIFAR_MEAN`, :data:`CIFAR_STD`).
Decoding is a reshape, so nothing is cached on disk.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from metamap.data.archives import open_tar
from metamap.data.dataset import ClassDataset
from metamap.data.images import ImageSpec
from metamap.data.memory import images_array
from metamap.data.sources import ClassDataSource
from metamap.errors import ConfigError, DataError
from metamap.options import ARCHITECTURE, DATA, Options, option
from metamap.registry import register_data

# CIFAR-100 training-set channel statistics in [0, 1] units, as commonly used.
CIFAR_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR_STD = (0.2673, 0.2564, 0.2762)
ARCHIVE = "cifar-100-python.tar.gz"
TOP = "cifar-100-python"
MEMBERS = ("meta", "train", "test")
# The real files are 0.2 MB-150 MB; anything far larger is not CIFAR-100.
MAX_MEMBER_BYTES = 512 << 20
PARTS = ("train", "val", "test")


@dataclass
class Cifar100:
    """The whole of CIFAR-100: ``images`` uint8 ``[60000, 3, 32, 32]`` (train part, then test),
    ``fine`` / ``coarse`` int64 ``[60000]``, and the class and superclass names."""

    images: np.ndarray
    fine: np.ndarray
    coarse: np.ndarray
    fine_names: list[str]
    coarse_names: list[str]


def cifar_spec(image_size: int = 32) -> ImageSpec:
    return ImageSpec(size=image_size, channels=3, invert=False, resample="lanczos", mean=CIFAR_MEAN, std=CIFAR_STD)


# -- finding and reading the archive -------------------------------------------------------
def locate(path: Path) -> Path:
    """The archive file or the ``cifar-100-python`` folder that ``path`` means."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise DataError(f"{path} does not exist; set data.path to {ARCHIVE} or the {TOP}/ folder it "
                        "unpacks to (see docs/datasets.md)")
    for candidate in (path, path / TOP):
        if all((candidate / m).is_file() for m in MEMBERS):
            return candidate
    if (path / ARCHIVE).is_file():
        return path / ARCHIVE
    listing = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
    raise DataError(f"{path} holds no CIFAR-100 python version (found: {listing}). Expected {ARCHIVE}, or "
                    f"a {TOP}/ folder with the files meta, train and test (see docs/datasets.md)")


def read_members(source: Path) -> dict[str, bytes]:
    """The raw bytes of ``meta``, ``train`` and ``test`` from the folder or the tar archive
    (read in memory after :mod:`metamap.data.archives` checked every member)."""
    if source.is_dir():
        return {m: (source / m).read_bytes() for m in MEMBERS}
    with open_tar(source, MAX_MEMBER_BYTES, f"use the official {ARCHIVE}") as tar:
        present = {f.name for f in tar.files}
        missing = [m for m in MEMBERS if f"{TOP}/{m}" not in present]
        if missing:
            raise DataError(f"{source}: has no {TOP}/{missing[0]}; use the official CIFAR-100 python "
                            f"version ({ARCHIVE})")
        return {m: tar.read(f"{TOP}/{m}") for m in MEMBERS}


def _field(d: dict, key: str, where: str):
    if key not in d:
        raise DataError(f"{where}: missing key {key!r} (found {', '.join(sorted(d))}); this is not the "
                        "CIFAR-100 python version (CIFAR-10's files look similar but have other keys)")
    return d[key]


def parse_part(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``train`` or ``test`` -> images ``[N, 3, 32, 32]``, fine labels, coarse labels."""
    from metamap.data import safe_pickle

    d = safe_pickle.text_keys(safe_pickle.loads(raw, where), where)
    data = _field(d, "data", where)
    fine = np.asarray(_field(d, "fine_labels", where), dtype=np.int64)
    coarse = np.asarray(_field(d, "coarse_labels", where), dtype=np.int64)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = list(data.shape) if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{where}: 'data' must be uint8 [N, 3072], found {shape}")
    if not len(fine) == len(coarse) == len(data):
        raise DataError(f"{where}: {len(data)} images but {len(fine)} fine and {len(coarse)} coarse labels")
    return data.reshape(-1, 3, 32, 32), fine, coarse


def read_cifar100(path: str | os.PathLike) -> Cifar100:
    """Read and check the whole CIFAR-100 python version at ``path``."""
    from metamap.data import safe_pickle

    source = locate(Path(path).expanduser())
    raw = read_members(source)
    where = lambda m: f"{source}:{m}" if source.is_file() else str(source / m)
    meta = safe_pickle.text_keys(safe_pickle.loads(raw["meta"], where("meta")), where("meta"))
    fine_names = [safe_pickle.text(n) for n in _field(meta, "fine_label_names", where("meta"))]
    coarse_names = [safe_pickle.text(n) for n in _field(meta, "coarse_label_names", where("meta"))]
    parts = [parse_part(raw[m], where(m)) for m in ("train", "test")]
    images = np.concatenate([p[0] for p in parts])
    fine, coarse = np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])
    for labels, names, what in ((fine, fine_names, "fine"), (coarse, coarse_names, "coarse")):
        if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
            raise DataError(f"{source}: {what} labels run outside 0..{len(names) - 1}; the archive is damaged")
    return Cifar100(images, fine, coarse, fine_names, coarse_names)


# -- class splits --------------------------------------------------------------------------
def _index_of(names: list[str], wanted: list[str], what: str, where: str) -> list[int]:
    position = {n: i for i, n in enumerate(names)}
    missing = [w for w in wanted if w not in position]
    if missing:
        raise DataError(f"{where}: the archive has no {what} named {', '.join(missing[:5])}; it is not the "
                        "official CIFAR-100 python version")
    return [position[w] for w in wanted]


def superclass_members(data: Cifar100, where: str) -> dict[int, list[int]]:
    """Superclass -> its fine classes, as the labels of the images say."""
    members: dict[int, set[int]] = {}
    for f, c in set(zip(data.fine.tolist(), data.coarse.tolist(), strict=True)):
        members.setdefault(c, set()).add(f)
    owners = {}
    for c, fs in members.items():
        for f in fs:
            if f in owners:
                raise DataError(f"{where}: fine class {data.fine_names[f]} belongs to two superclasses; the "
                                "archive is damaged")
            owners[f] = c
    return {c: sorted(fs) for c, fs in members.items()}


def split_classes(data: Cifar100, benchmark: str, where: str) -> dict[str, list[int]]:
    """Split -> fine class indices of ``benchmark`` (``cifarfs`` or ``fc100``)."""
    from metamap.data import splits

    if benchmark == "cifarfs":
        lists = splits.published("cifarfs-bertinetto")
        return {p: _index_of(data.fine_names, lists[p], "fine class", where) for p in PARTS}
    lists = splits.published("fc100-oreshkin")
    members = superclass_members(data, where)
    return {p: [f for c in _index_of(data.coarse_names, lists[p], "superclass", where) for f in members.get(c, [])]
            for p in PARTS}


def make_split(data: Cifar100, classes: list[int], spec: ImageSpec, description: str) -> ClassDataset:
    """The images of ``classes`` (relabelled in that order) as a :class:`ClassDataset`."""
    from PIL import Image

    relabel = np.full(len(data.fine_names), -1, dtype=np.int64)
    relabel[classes] = np.arange(len(classes))
    keep = np.flatnonzero(relabel[data.fine] >= 0)
    keep = keep[np.argsort(relabel[data.fine[keep]], kind="stable")]  # grouped by class, data order within
    images = data.images[keep]
    if spec.size != 32:
        resized = images_array(len(images), spec.shape, description)
        for i, im in enumerate(images):
            resized[i] = spec.prepare(Image.fromarray(im.transpose(1, 2, 0)))
        images = resized
    return ClassDataset(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(relabel[data.fine[keep]]),
                        [data.fine_names[c] for c in classes], spec, description)


TITLES = {"cifarfs": "CIFAR-FS (Bertinetto et al. split)", "fc100": "FC100 (Oreshkin et al. split)"}


def load_cifar_benchmark(benchmark: str, path: str | os.PathLike, image_size: int = 32) -> dict[str, ClassDataset]:
    """``benchmark`` (``"cifarfs"`` or ``"fc100"``) as ``{"train", "val", "test"} -> ClassDataset``."""
    if benchmark not in TITLES:
        raise ConfigError(f"unknown CIFAR benchmark {benchmark!r}; choose cifarfs or fc100")
    if not str(path).strip():
        raise ConfigError(f"{benchmark} needs data.path: --set data.path=FILE_OR_FOLDER, the CIFAR-100 python "
                          f"version ({ARCHIVE}, or the folder it unpacks to; see docs/datasets.md)")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 8 <= image_size <= 512:
        raise ConfigError(f"data.image_size must be a whole number from 8 to 512, not {image_size!r}")
    data = _read_cached(str(path))
    spec = cifar_spec(image_size)
    classes = split_classes(data, benchmark, str(path))
    out = {}
    for p in PARTS:
        ds = make_split(data, classes[p], spec, "")
        ds.description = f"{TITLES[benchmark]}, {p}: {ds.num_classes} classes, {len(ds)} images"
        out[p] = ds
    return out


@lru_cache(maxsize=1)
def _read_cached(path: str) -> Cifar100:
    # Both benchmarks (and every image size) share one read of the archive.
    return read_cifar100(path)


@lru_cache(maxsize=4)
def _cached_load(benchmark: str, path: str, image_size: int):
    return load_cifar_benchmark(benchmark, path, image_size)


@dataclass(frozen=True, kw_only=True)
class CifarOptions(Options):
    section = "data"
    path: str = option("", role=DATA, doc=f"{ARCHIVE}, the folder it unpacks to, or the folder holding either")
    image_size: int = option(32, low=8, high=512, role=ARCHITECTURE)


@register_data("cifarfs", options=CifarOptions)
class CifarFSSource(ClassDataSource):
    def datasets(self, o: CifarOptions) -> dict[str, ClassDataset]:
        return _cached_load("cifarfs", o.path, o.image_size)


@register_data("fc100", options=CifarOptions)
class FC100Source(ClassDataSource):
    def datasets(self, o: CifarOptions) -> dict[str, ClassDataset]:
        return _cached_load("fc100", o.path, o.image_size)
