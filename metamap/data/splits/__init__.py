"""The published class splits of the standard few-shot benchmarks, shipped as package data.

Each split is three text files ``<name>-{train,val,test}.txt`` beside this module: one class
per line, ``#`` lines are comments naming the source. Class names are facts about the data
sets, taken from the papers' released split files:

* ``miniimagenet-ravi``: the 64 / 16 / 20 ImageNet synsets of Ravi & Larochelle's
  ``train.csv`` / ``val.csv`` / ``test.csv`` (ICLR 2017), the split everyone reports on;
* ``cifarfs-bertinetto``: the 64 / 16 / 20 CIFAR-100 fine classes of CIFAR-FS
  (Bertinetto et al., ICLR 2019);
* ``fc100-oreshkin``: the 12 / 4 / 4 CIFAR-100 superclasses of FC100 (Oreshkin et al.,
  NeurIPS 2018), i.e. 60 / 20 / 20 fine classes;
* ``omniglot-vinyals``: Vinyals et al.'s (NeurIPS 2016) Omniglot split as Snell et al.
  published it with Prototypical Networks (MIT licence, ``LICENSE-omniglot-vinyals``):
  4112 / 688 / 1692 classes ``Alphabet/characterNN/rotDDD`` (rotated copies are classes), and
  ``trainval`` = train + val (4800), the part the papers train on.
"""
from __future__ import annotations

from functools import cache
from pathlib import Path

SPLIT_DIR = Path(__file__).resolve().parent
PARTS = ("train", "val", "test")
# Parts beyond the three that some splits publish (Omniglot's train + val).
EXTRA_PARTS = ("trainval",)


@cache
def _read(name: str, part: str) -> tuple[str, ...]:
    path = SPLIT_DIR / f"{name}-{part}.txt"
    if not path.is_file():
        # Only a broken installation gets here: the files are package data.
        raise FileNotFoundError(f"{path}: the published split list is missing from the installed "
                                "package; reinstall metamap")
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


def published(name: str, parts: tuple[str, ...] = PARTS) -> dict[str, list[str]]:
    """``{"train", "val", "test"}`` (or ``parts``) -> class names of the published split ``name``."""
    return {part: list(_read(name, part)) for part in parts}


def available() -> list[str]:
    """Names of the shipped splits (``"cifarfs-bertinetto"``, ...)."""
    return sorted({p.name.rsplit("-", 1)[0] for p in SPLIT_DIR.glob("*-train.txt")})
