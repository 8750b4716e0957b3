"""The official Omniglot archives: where they come from, and how they become arrays.

Omniglot was collected by Brenden Lake, Ruslan Salakhutdinov and Joshua Tenenbaum ("Human-level
concept learning through probabilistic program induction", Science 2015) and is published
under the MIT licence at https://github.com/brendenlake/omniglot. Its ``python`` folder holds
the two archives read here:

* ``images_background.zip``: 964 characters of 30 alphabets (for training and tuning),
* ``images_evaluation.zip``: 659 characters of 20 alphabets (for evaluation only),

laid out as ``images_background/<Alphabet>/<characterNN>/<NNNN_DD>.png`` (105x105, 1-bit).

Missing archives are downloaded from the official repository (:func:`locate_archives`) and
checked against published checksums. Archives placed by hand are checked by their structure
instead (:func:`archive_members`, on top of the member checks every archive gets in
:mod:`metamap.data.archives`), so a re-packed copy of the same images works too. Each drawing
is decoded by :func:`metamap.data.decode.decode_image`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metamap.data.archives import Archive, Member, open_zip
from metamap.data.decode import decode_image
from metamap.data.download import download as fetch
from metamap.data.images import ImageSpec
from metamap.data.paths import data_root
from metamap.errors import DataError

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
# No Omniglot PNG comes close; anything this large in a zip is not a drawing.
MAX_MEMBER_BYTES = 4 << 20
USE_OFFICIAL = "use the unmodified official archive"


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


def archive_members(archive: Archive, top: str) -> list[Member]:
    """The drawings of an open archive in sorted order, after checking its layout.

    Every file must be ``<top>/<Alphabet>/<character>/<name>.png``; anything else raises
    :class:`DataError` naming the first offending member.
    """
    layout = f"{top}/<Alphabet>/<character>/<drawing>.png"
    members = []
    for member in archive.files:
        parts = member.name.split("/")
        if len(parts) != 4 or parts[0] != top or not parts[3].lower().endswith(".png") or not all(parts):
            raise DataError(f"{archive.path}: unexpected member {member.name!r}; the official archive holds "
                            f"only {layout}. Use the unmodified official archive")
        members.append(member)
    if not members:
        raise DataError(f"{archive.path}: holds no drawings; expected files {layout}")
    # By path components, not the whole string, so characters come out in sorted name order
    # even when one name is a prefix of another ("A/c" before "A/c-1").
    return sorted(members, key=lambda m: m.name.split("/"))


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
    with open_zip(path, MAX_MEMBER_BYTES, USE_OFFICIAL) as archive:
        members = archive_members(archive, top)
        class_of: dict[str, int] = {}
        labels = np.empty(len(members), dtype=np.int64)
        images = np.empty((len(members), *spec.shape), dtype=np.uint8)
        for i, member in enumerate(tqdm(members, desc=f"reading {path.name}", unit="img",
                                        disable=not progress, leave=False)):
            character = member.name.rsplit("/", 1)[0].split("/", 1)[1]
            labels[i] = class_of.setdefault(character, len(class_of))
            images[i] = decode_image(archive.read(member), spec.prepare, f"{path}: {member.name}",
                                     "the archive is damaged - delete it and download it again")
    return CharacterSet(images, labels, list(class_of))


def check_counts(set_name: str, chars: CharacterSet, where: str) -> None:
    """Raise :class:`DataError` unless the set has the official number of alphabets and characters."""
    want_alphabets, want_chars = EXPECTED_COUNTS[set_name]
    got_alphabets, got_chars = len(chars.alphabets()), len(chars.names)
    if (got_alphabets, got_chars) != (want_alphabets, want_chars):
        raise DataError(f"{where}: holds {got_chars} characters in {got_alphabets} alphabets, but the "
                        f"official {ARCHIVES[set_name]} has {want_chars} in {want_alphabets}; use "
                        "the complete official archive")


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
        found[s] = fetch(urls[s], folders[0] / ARCHIVES[s], check["sha256"], md5=check["md5"],
                         size=check["size"], progress=progress)
    return found


def read_archives(archives: dict[str, Path], spec: ImageSpec,
                  progress: bool = True) -> dict[str, CharacterSet]:
    """Decode both official archives with ``spec``, checking each one's structure and counts."""
    sets = {}
    for s in SETS:
        sets[s] = read_archive(archives[s], spec, top=Path(ARCHIVES[s]).stem, progress=progress)
        check_counts(s, sets[s], str(archives[s]))
    return sets
