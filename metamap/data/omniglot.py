"""Omniglot: 1,623 handwritten characters from 50 alphabets, 20 drawings of each.

Source and licence
------------------
Omniglot was collected by Brenden Lake, Ruslan Salakhutdinov and Joshua Tenenbaum ("Human-level
concept learning through probabilistic program induction", Science 2015) and is published
under the MIT licence at https://github.com/brendenlake/omniglot. Its ``python`` folder holds
the two archives read here:

* ``images_background.zip``: 964 characters of 30 alphabets (for training and tuning),
* ``images_evaluation.zip``: 659 characters of 20 alphabets (for evaluation only),

laid out as ``images_background/<Alphabet>/<characterNN>/<NNNN_DD>.png`` (105x105, 1-bit).

Where the data comes from at run time
-------------------------------------
At 28x28 nothing is needed: ``metamap/data/bundled/omniglot28.npz`` holds both sets already
preprocessed (made by ``scripts/build_bundled_omniglot.py`` from the official archives; the
licence notice ships beside it as ``LICENSE-omniglot``). Other sizes are decoded from the
archives in the data root (see :mod:`metamap.data.paths`), in ``<root>/omniglot/`` or
``<root>/``; missing archives are downloaded from the official repository and checked
against published checksums. Archives placed by hand are checked by their structure instead,
so a re-packed copy of the same images works too. Decoded arrays are cached per resolution
beside the archives (or in the per-user cache if that folder is read-only).

Preprocessing
-------------
:func:`omniglot_spec`: grey, LANCZOS resize to ``image_size``, inverted so strokes are bright
on a dark background, then normalised by :data:`MEAN` and :data:`STD`. The same
:class:`~metamap.data.images.ImageSpec` built the cached arrays and travels with the data
set into checkpoints, so ``metamap predict`` treats user images identically.

Splits
------
``lake`` (default): train and val are disjoint groups of whole background alphabets
(:data:`LAKE_VAL_ALPHABETS` are val), test is the 20 evaluation alphabets, which are used for
nothing else. Rotated copies (90, 180, 270 degrees counter-clockwise) become extra classes in
the train split only.

``vinyals``: the published split of Vinyals et al. (2016), read from the class lists that Snell
et al. released with Prototypical Networks (shipped in :mod:`metamap.data.splits` with their MIT
notice): 1,028 train, 172 val and 423 test characters, each in four rotations that are classes
of their own in every part, as the lists say (4,112 / 688 / 1,692 classes). Training characters
come from all 30 background alphabets and 8 evaluation alphabets; the test characters from the
other 13 evaluation alphabets (Gurmukhi is shared between the two sides). ``vinyals-trainval``
trains on train + val (4,800 classes), as the papers' final models do; its val part is then the
(seen) val classes, useful to watch training, not for model selection. ``rotations = false``
keeps only the unrotated classes of every part.
"""
from __future__ import annotations

import io
import json
import os
import stat
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from metamap.data.dataset import ClassDataset
from metamap.data.download import download as _download
from metamap.data.download import file_digest
from metamap.data.images import MAX_PIXELS, ImageSpec
from metamap.data.memory import check_fits, image_bytes
from metamap.data.paths import atomic_write, data_root, user_cache_dir
from metamap.errors import ConfigError, DataError

SETS = ("background", "evaluation")
ARCHIVES = {"background": "images_background.zip", "evaluation": "images_evaluation.zip"}
# (alphabets, characters) in the official archives; a hand-placed archive must match them.
EXPECTED_COUNTS = {"background": (30, 964), "evaluation": (20, 659)}

OFFICIAL_BASE_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
URL_ENV = "METAMAP_OMNIGLOT_URL"
# The dataset's repository publishes no checksums. These describe its official archives as
# recorded by two independent projects that download them: the size and SHA-256 from
# TensorFlow Datasets (tensorflow_datasets/url_checksums/omniglot.txt), the MD5 from
# torchvision (torchvision/datasets/omniglot.py). A download must match all three. They were
# not re-computed here: this project's own copies were re-packed and differ byte-wise.
OFFICIAL_CHECKSUMS = {
    "images_background.zip": {
        "size": 9464212,
        "sha256": "ad41ab679c8b5d90b271ef46be6987cc81211774a695c29dcc5367b2b26ee640",
        "md5": "68d2efa1b9178cc56df9314c21c6e718",
    },
    "images_evaluation.zip": {
        "size": 6462886,
        "sha256": "1f61a8f3366785b057fc117d9228e78a16e3d976c8953b2a10fcc74cf0609cee",
        "md5": "6b91aef0f799c5bb55b94e3f2daec811",
    },
}

# Pixel mean and standard deviation of the 19,280 background drawings after 28x28 LANCZOS
# resizing and inversion, in [0, 1] units (computed once by scripts/build_bundled_omniglot.py
# --stats). Used for every image size so a model's input scale does not depend on it; the
# evaluation set is not involved.
MEAN = 0.081454
STD = 0.235903

# Whole background alphabets held out for validation in the lake split (151 characters):
# scripts of different families, none of them used for training.
LAKE_VAL_ALPHABETS = ("Bengali", "Futurama", "Hebrew", "Korean", "Tagalog")

SPLITS = ("lake", "vinyals", "vinyals-trainval")
VINYALS_LISTS = "omniglot-vinyals"       # metamap/data/splits/omniglot-vinyals-<part>.txt

BUNDLED_SIZE = 28
BUNDLED_PATH = Path(__file__).resolve().parent / "bundled" / "omniglot28.npz"
FORMAT_VERSION = 1
ROTATIONS = (90, 180, 270)
# No Omniglot PNG comes close; anything this large in a zip is not a drawing.
MAX_MEMBER_BYTES = 4 << 20


@dataclass
class CharacterSet:
    """The drawings of one Omniglot archive.

    images: ``uint8 [n, 1, S, S]``, sorted by (alphabet, character, file name).
    labels: ``int64 [n]``, index into ``names``.
    names:  one ``"Alphabet/characterNN"`` per character, sorted.
    """

    images: np.ndarray
    labels: np.ndarray
    names: list[str]

    def alphabets(self) -> list[str]:
        return sorted({n.split("/")[0] for n in self.names})


def omniglot_spec(image_size: int = BUNDLED_SIZE) -> ImageSpec:
    """The preprocessing of every Omniglot image at this resolution."""
    return ImageSpec(size=image_size, channels=1, invert=True, resample="lanczos",
                     mean=(MEAN,), std=(STD,))


# -- archives -> arrays ------------------------------------------------------------------
def _is_junk(name: str) -> bool:
    # Hidden files and macOS resource forks that zip tools add when re-packing.
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))


def _unsafe(info: zipfile.ZipInfo) -> bool:
    # Members are read in memory, never extracted, but an archive that names paths outside its
    # folder or carries symbolic links was not made by the dataset's authors: refuse it whole.
    name = info.filename.replace("\\", "/")
    is_link = stat.S_ISLNK(info.external_attr >> 16)
    return is_link or name.startswith("/") or ".." in name.split("/") or (len(name) > 1 and name[1] == ":")


def archive_members(zf: zipfile.ZipFile, top: str, where: str) -> list[zipfile.ZipInfo]:
    """The drawings of an open archive in sorted order, after checking its layout.

    Every file must be ``<top>/<Alphabet>/<character>/<name>.png``; anything else raises
    :class:`DataError` naming the first offending member.
    """
    layout = f"{top}/<Alphabet>/<character>/<drawing>.png"
    members = []
    for info in zf.infolist():
        if _unsafe(info):
            raise DataError(f"{where}: member {info.filename!r} is a link or a path outside the archive's "
                            "folder; refusing the archive. Use the unmodified official archive")
        if info.is_dir() or _is_junk(info.filename):
            continue
        parts = info.filename.split("/")
        if len(parts) != 4 or parts[0] != top or not parts[3].lower().endswith(".png") or not all(parts):
            raise DataError(f"{where}: unexpected member {info.filename!r}; the official archive holds "
                            f"only {layout}. Use the unmodified official archive")
        if info.file_size > MAX_MEMBER_BYTES:
            raise DataError(f"{where}: {info.filename} is {info.file_size:,} bytes, far too large for "
                            "an Omniglot drawing; use the unmodified official archive")
        members.append(info)
    if not members:
        raise DataError(f"{where}: holds no drawings; expected files {layout}")
    # By path components, not the whole string, so characters come out in sorted name order
    # even when one name is a prefix of another ("A/c" before "A/c-1").
    return sorted(members, key=lambda m: m.filename.split("/"))


def _decode(zf: zipfile.ZipFile, info: zipfile.ZipInfo, spec: ImageSpec, where: str) -> np.ndarray:
    """One member -> ``uint8 [1, S, S]`` by the same steps as ``spec.load`` on a file."""
    try:
        with Image.open(io.BytesIO(zf.read(info))) as im:
            if im.width * im.height > MAX_PIXELS:
                raise DataError(f"{where}: {info.filename} is {im.width}x{im.height} pixels, not a drawing")
            im.load()
            return spec.prepare(im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, zipfile.BadZipFile,
            Image.DecompressionBombError) as e:
        raise DataError(f"{where}: cannot read {info.filename} ({e.__class__.__name__}: {e}); the "
                        "archive is damaged - delete it and download it again") from None


def read_archive(path: str | os.PathLike, spec: ImageSpec, top: str | None = None,
                 progress: bool = False) -> CharacterSet:
    """Decode every drawing of one archive with ``spec``.

    ``top`` is the archive's single top folder (default: the file name without ``.zip``).
    The structure is validated (not the bytes), so any faithful re-pack of the official
    archive is accepted. Raises :class:`DataError` if the file is not such an archive.
    """
    from tqdm.auto import tqdm

    path = Path(path)
    top = top or path.stem
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path}: not a readable zip archive ({e}); it is damaged or incomplete - "
                        "delete it and download it again") from None
    with zf:
        members = archive_members(zf, top, str(path))
        class_of: dict[str, int] = {}
        labels = np.empty(len(members), dtype=np.int64)
        images = np.empty((len(members), *spec.shape), dtype=np.uint8)
        for i, info in enumerate(tqdm(members, desc=f"reading {path.name}", unit="img",
                                      disable=not progress, leave=False)):
            character = info.filename.rsplit("/", 1)[0].split("/", 1)[1]
            labels[i] = class_of.setdefault(character, len(class_of))
            images[i] = _decode(zf, info, spec, str(path))
    return CharacterSet(images, labels, list(class_of))


def check_counts(set_name: str, chars: CharacterSet, where: str) -> None:
    """Raise :class:`DataError` unless the set has the official number of alphabets and characters."""
    want_alphabets, want_chars = EXPECTED_COUNTS[set_name]
    got_alphabets, got_chars = len(chars.alphabets()), len(chars.names)
    if (got_alphabets, got_chars) != (want_alphabets, want_chars):
        raise DataError(f"{where}: holds {got_chars} characters in {got_alphabets} alphabets, but the "
                        f"official {ARCHIVES[set_name]} has {want_chars} in {want_alphabets}; use "
                        "the complete official archive")


# -- arrays <-> .npz (bundled copy and caches) ------------------------------------------
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


# -- finding, downloading and caching the archives ---------------------------------------
def archive_urls(base_url: str | None = None) -> dict[str, str]:
    """Set name -> download URL; ``base_url`` or ``$METAMAP_OMNIGLOT_URL`` replaces the official base."""
    base = (base_url or os.environ.get(URL_ENV, "").strip() or OFFICIAL_BASE_URL).rstrip("/")
    return {s: f"{base}/{ARCHIVES[s]}" for s in SETS}


def locate_archives(root: str | os.PathLike | None = None, download: bool = True, progress: bool = True,
                    base_url: str | None = None) -> dict[str, Path]:
    """Set name -> archive path, looking in ``<root>/omniglot`` then ``<root>``.

    Missing archives are downloaded into ``<root>/omniglot`` (and verified against
    :data:`OFFICIAL_CHECKSUMS`, whatever the URL) if ``download``; otherwise
    :class:`DataError` says where to put them.
    """
    base = data_root(root)
    folders = [base / "omniglot", base]
    found = {}
    for s in SETS:
        path = next((d / ARCHIVES[s] for d in folders if (d / ARCHIVES[s]).is_file()), None)
        if path is not None:
            found[s] = path
    missing = [s for s in SETS if s not in found]
    urls = archive_urls(base_url)
    if missing and not download:
        wanted = " and ".join(ARCHIVES[s] for s in missing)
        raise DataError(f"Omniglot archives not found: no {wanted} in {folders[0]} or {folders[1]}. "
                        f"Download {' and '.join(urls[s] for s in missing)} into {folders[0]} "
                        "(or choose another folder with --data-root or METAMAP_DATA), or allow downloading")
    for s in missing:
        check = OFFICIAL_CHECKSUMS[ARCHIVES[s]]
        found[s] = _download(urls[s], folders[0] / ARCHIVES[s], check["sha256"], md5=check["md5"],
                             size=check["size"], progress=progress)
    return found


def _cache_candidates(archives: dict[str, Path], image_size: int) -> list[Path]:
    name = f"omniglot{image_size}-cache.npz"
    folders = [archives["background"].parent, user_cache_dir() / "omniglot"]
    return list(dict.fromkeys(f / name for f in folders))


def read_archives(archives: dict[str, Path], spec: ImageSpec,
                  progress: bool = True) -> dict[str, CharacterSet]:
    """Decode both official archives with ``spec``, checking each one's structure and counts."""
    sets = {}
    for s in SETS:
        sets[s] = read_archive(archives[s], spec, top=Path(ARCHIVES[s]).stem, progress=progress)
        check_counts(s, sets[s], str(archives[s]))
    return sets


def cached_sets(archives: dict[str, Path], spec: ImageSpec, progress: bool = True) -> dict[str, CharacterSet]:
    """The decoded sets, from a cache made from these exact archive bytes with this spec if
    there is one, else decoded now and cached for next time."""
    fingerprint = {ARCHIVES[s]: file_digest(archives[s]) for s in SETS}
    candidates = _cache_candidates(archives, spec.size)
    for path in candidates:
        if not path.is_file():
            continue
        try:
            sets, meta = read_sets(path)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            continue  # a damaged cache is simply rebuilt
        if _matches(meta, spec, archives=fingerprint):
            return sets
    sets = read_archives(archives, spec, progress)
    for path in candidates:
        try:
            write_sets(path, sets, set_meta(spec, archives=fingerprint))
            break
        except OSError:
            continue
    else:
        warnings.warn(f"could not write an Omniglot cache to {' or '.join(map(str, candidates))}; "
                      "the archives will be decoded again next time", stacklevel=2)
    return sets


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


# -- sets -> splits ----------------------------------------------------------------------
def split_characters(sets: dict[str, CharacterSet], split: str) -> dict[str, list[str]]:
    """Split name -> sorted class names in that split: ``"Alphabet/characterNN"``, and for the
    Vinyals split also ``"Alphabet/characterNN@rotDD"`` for the rotated copies it lists."""
    background, evaluation = sets["background"].names, sets["evaluation"].names
    if split == "lake":
        missing = sorted(set(LAKE_VAL_ALPHABETS) - set(sets["background"].alphabets()))
        if missing:
            raise DataError(f"the Omniglot background set lacks the validation alphabets {missing}")
        is_val = lambda n: n.split("/")[0] in LAKE_VAL_ALPHABETS
        return {"train": [n for n in background if not is_val(n)],
                "val": [n for n in background if is_val(n)],
                "test": list(evaluation)}
    if split in ("vinyals", "vinyals-trainval"):
        return vinyals_classes(set(background) | set(evaluation), trainval=split == "vinyals-trainval")
    raise ConfigError(f"data.split must be one of {', '.join(SPLITS)}, not {split!r}")


def vinyals_classes(characters: set[str], trainval: bool = False) -> dict[str, list[str]]:
    """The published Vinyals lists as class names (``"Greek/character05@rot90"``; rot000 is the
    character itself), checked against the characters present."""
    from metamap.data.splits import published
    lists = published(VINYALS_LISTS, ("trainval" if trainval else "train", "val", "test"))
    out = {}
    for part, entries in lists.items():
        names = []
        for entry in entries:
            character, rotation = entry.rsplit("/", 1)
            if character not in characters:
                raise DataError(f"the Vinyals split lists {character!r}, which this Omniglot copy lacks; "
                                "use the complete official archives")
            degrees = int(rotation.removeprefix("rot"))
            names.append(character if degrees == 0 else f"{character}@rot{degrees}")
        out["train" if part == "trainval" else part] = sorted(names)
    return out


def _gather(sets: dict[str, CharacterSet], names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[n, 1, S, S]`` and labels ``[n]`` (position in ``names``) of these characters."""
    position = {n: i for i, n in enumerate(names)}
    images, labels = [], []
    for chars in sets.values():
        relabel = np.array([position.get(n, -1) for n in chars.names], dtype=np.int64)
        new = relabel[chars.labels]
        keep = new >= 0
        images.append(chars.images[keep])
        labels.append(new[keep])
    images, labels = np.concatenate(images), np.concatenate(labels)
    order = np.argsort(labels, kind="stable")
    return images[order], labels[order]


def _with_rotations(images: np.ndarray, labels: np.ndarray, names: list[str]):
    """Append each image rotated by 90/180/270 degrees counter-clockwise as new classes."""
    n = len(names)
    all_images, all_labels, all_names = [images], [labels], list(names)
    for k, degrees in enumerate(ROTATIONS, start=1):
        all_images.append(np.rot90(images, k, axes=(-2, -1)))
        all_labels.append(labels + k * n)
        all_names += [f"{c}@rot{degrees}" for c in names]
    return np.concatenate(all_images), np.concatenate(all_labels), all_names


def _with_listed_rotations(sets: dict[str, CharacterSet], names: list[str], rotations: bool):
    """Images and labels of classes named ``"Alphabet/characterNN[@rotDD]"`` (rotated copies
    counter-clockwise); without ``rotations`` only the unrotated classes are kept."""
    if not rotations:
        names = [n for n in names if "@" not in n]
    characters = sorted({n.split("@")[0] for n in names})
    images, labels = _gather(sets, characters)
    position = {n: i for i, n in enumerate(names)}
    out_images, out_labels = [], []
    for k, degrees in enumerate((0, *ROTATIONS)):
        suffix = f"@rot{degrees}" if degrees else ""
        relabel = np.array([position.get(c + suffix, -1) for c in characters], dtype=np.int64)
        new = relabel[labels]
        keep = new >= 0
        out_images.append(np.rot90(images[keep], k, axes=(-2, -1)))
        out_labels.append(new[keep])
    images, labels = np.concatenate(out_images), np.concatenate(out_labels)
    order = np.argsort(labels, kind="stable")
    return images[order], labels[order], names


def _describe(split: str, part: str, names: list[str], rotated: bool) -> str:
    alphabets = sorted({n.split("/")[0] for n in names})
    characters = {n.split("@")[0] for n in names}
    if split == "lake":
        chars = f"{len(names)} characters"
        if rotated:
            chars += f" x 4 rotations = {4 * len(names)} classes"
        what = {"train": f"{len(alphabets)} background alphabets",
                "val": "background alphabets " + ", ".join(alphabets),
                "test": "evaluation alphabets"}[part]
        return f"Omniglot {split} split, {part}: {what} ({chars})"
    what = f"{len(alphabets)} alphabets, {len(characters)} characters, {len(names)} classes"
    if split == "vinyals-trainval" and part == "val":
        what += ", all also in train"
    return f"Omniglot {split} split (published lists), {part}: {what}"


def make_splits(sets: dict[str, CharacterSet], split: str = "lake", rotations: bool = True,
                spec: ImageSpec | None = None) -> dict[str, ClassDataset]:
    """``{"train", "val", "test"}`` -> :class:`ClassDataset` (data ``uint8 [n, 1, S, S]``).

    Lake split: rotated copies are extra classes of the train split only. Vinyals split: the
    rotated copies the lists name are classes of every part.
    """
    spec = spec or omniglot_spec(sets["background"].images.shape[-1])
    out = {}
    for part, names in split_characters(sets, split).items():
        if split == "lake":
            images, labels = _gather(sets, names)
            rotate = rotations and part == "train"
            description = _describe(split, part, names, rotate)
            if rotate:
                images, labels, names = _with_rotations(images, labels, names)
        else:
            images, labels, names = _with_listed_rotations(sets, names, rotations)
            description = _describe(split, part, names, rotations)
        out[part] = ClassDataset(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels),
                                 list(names), spec, description)
    return out


def load_omniglot(split: str = "lake", image_size: int = BUNDLED_SIZE, rotations: bool = True,
                  root: str | os.PathLike | None = None, download: bool = True, progress: bool = True,
                  *, base_url: str | None = None) -> dict[str, ClassDataset]:
    """Omniglot as a dict ``{"train", "val", "test"} -> ClassDataset``.

    split: ``"lake"``, ``"vinyals"`` or ``"vinyals-trainval"`` (see the module docstring).
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
    return make_splits(sets, split, rotations, omniglot_spec(image_size))
