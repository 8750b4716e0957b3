"""Decoded data kept on disk for the next run: one cache, shared by every data set that decodes.

A cache entry is a folder holding one ``<name>.npy`` per array and ``meta.json``. The meta
records the entry's *key* -- everything the arrays were made from (source files' fingerprints,
the preprocessing, a format version) -- and JSON extras such as class names. It is written
last, so a half-written entry is never valid; an entry whose key differs, or that is damaged,
is simply rebuilt. Arrays are memory-mapped copy-on-write when read back, so a large data set
costs no decoding and little memory on later runs, and a caller cannot change the files.

Entries live beside the data when that folder is writable (``<data>/metamap-cache/<name>``),
else in the per-user cache (:func:`metamap.data.paths.user_cache_dir`), keyed by the data's
location. Delete either folder to force decoding again.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from metamap.data.paths import atomic_write, user_cache_dir

FORMAT = 1
META = "meta.json"
Arrays = dict[str, np.ndarray]


def cache_folders(data: str | os.PathLike, name: str) -> list[Path]:
    """Where the entry ``name`` of the data in folder ``data`` may live, in the order tried."""
    data = Path(data)
    key = hashlib.sha256(str(data.resolve()).encode()).hexdigest()[:16]
    return [data / "metamap-cache" / name, user_cache_dir() / name / key]


def fingerprint(paths) -> dict[str, list[int]]:
    """What identifies source files cheaply: resolved path -> ``[size, mtime_ns]`` (folders: size 0)."""
    out = {}
    for p in paths:
        st = Path(p).stat()
        out[str(Path(p).resolve())] = [st.st_size if Path(p).is_file() else 0, st.st_mtime_ns]
    return out


def _canonical(key: dict) -> dict:
    return json.loads(json.dumps(key, sort_keys=True))      # tuples -> lists, as JSON gives them back


def read_entry(folder: str | os.PathLike, key: dict, mmap: bool = True) -> tuple[Arrays, dict] | None:
    """``(arrays, extra)`` of the entry in ``folder`` if it was made with ``key``; else ``None``."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / META).read_text())
        if meta.get("format") != FORMAT or meta.get("key") != _canonical(key):
            return None
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="c" if mmap else None, allow_pickle=False)
                  for name in meta["arrays"]}
        return arrays, meta.get("extra", {})
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or damaged: the caller rebuilds it


def write_entry(folder: str | os.PathLike, key: dict, arrays: Arrays, extra: dict | None = None) -> None:
    """Write an entry (each file atomically, ``meta.json`` last). Raises ``OSError`` if it cannot."""
    folder = Path(folder)
    # An earlier entry here stops being valid before its arrays are replaced, not after.
    (folder / META).unlink(missing_ok=True)
    for name, array in arrays.items():
        with atomic_write(folder / f"{name}.npy") as f:
            np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
    meta = {"format": FORMAT, "key": _canonical(key), "arrays": sorted(arrays), "extra": extra or {}}
    with atomic_write(folder / META) as f:
        f.write(json.dumps(meta, sort_keys=True).encode())


def cached(folders: list[Path], key: dict, build: Callable[[], tuple[Arrays, dict]], what: str,
           valid: Callable[[Arrays, dict], bool] = lambda arrays, extra: True,
           mmap: bool = True) -> tuple[Arrays, dict]:
    """``(arrays, extra)`` from the first entry in ``folders`` made with ``key`` (and ``valid``),
    else ``build()`` them now and store them in the first folder that can be written.

    ``what`` names the data in the warning given when no folder can be written (the data is then
    decoded again next time).
    """
    for folder in folders:
        entry = read_entry(folder, key, mmap)
        if entry is not None and valid(*entry):
            return entry
    arrays, extra = build()
    for folder in folders:
        try:
            write_entry(folder, key, arrays, extra)
            return arrays, extra
        except OSError:
            continue
    warnings.warn(f"could not write a {what} cache to {' or '.join(map(str, folders))}; the data will "
                  "be decoded again next time", stacklevel=2)
    return arrays, extra
