"""Omniglot's class splits: which characters (and rotated copies) are train, val and test.

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

The input is the decoded sets (``{"background", "evaluation"}`` ->
:class:`~metamap.data.omniglot_archives.CharacterSet`); the output one
:class:`~metamap.data.dataset.ClassDataset` per part.
"""
from __future__ import annotations

import numpy as np
import torch

from metamap.data.dataset import ClassDataset
from metamap.data.images import ImageSpec
from metamap.data.omniglot_archives import CharacterSet
from metamap.errors import ConfigError, DataError

# Whole background alphabets held out for validation in the lake split (151 characters):
# scripts of different families, none of them used for training.
LAKE_VAL_ALPHABETS = ("Bengali", "Futurama", "Hebrew", "Korean", "Tagalog")

SPLITS = ("lake", "vinyals", "vinyals-trainval")
VINYALS_LISTS = "omniglot-vinyals"       # metamap/data/splits/omniglot-vinyals-<part>.txt
ROTATIONS = (90, 180, 270)


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


def make_splits(sets: dict[str, CharacterSet], split: str = "lake", rotations: bool = True, *,
                spec: ImageSpec) -> dict[str, ClassDataset]:
    """``{"train", "val", "test"}`` -> :class:`ClassDataset` (data ``uint8 [n, 1, S, S]``).

    Lake split: rotated copies are extra classes of the train split only. Vinyals split: the
    rotated copies the lists name are classes of every part.
    """
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
