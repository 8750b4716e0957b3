"""Reading the pickled data-set files a user points metamap at, without trusting them.

Loading a pickle can call any function the file names (``os.system``, ``eval``, ...), so a
plain ``pickle.load`` on a downloaded file runs whatever its author wanted. Several few-shot
benchmarks are nevertheless distributed as pickles:

* the CIFAR-100 python archive (``cifar-100-python/{train,test,meta}``),
* the mini-ImageNet cache (``mini-imagenet-cache-{train,val,test}.pkl``),
* tiered-ImageNet (``{split}_images_png.pkl`` and ``{split}_labels.pkl``).

metamap unpickles only those files, only when the user's config names their folder, and only
through :class:`RestrictedUnpickler`. It resolves a fixed allow-list of globals -- the numpy
functions that rebuild arrays, dtypes and scalars, and plain builtin containers and values --
and refuses every other name *before* anything is called, raising :class:`UnsafePickleError`.
Nothing else in metamap unpickles anything (checkpoints are safetensors + JSON).
"""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

from metamap.errors import DataError


class UnsafePickleError(DataError):
    """A pickle asked for a function or class outside the allow-list."""


# The builtins a data pickle may legitimately name (Python 3 ``builtins``, Python 2 ``__builtin__``).
# All are plain value constructors: none can reach the file system, the network or the interpreter.
_SAFE_BUILTINS = ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray",
                  "int", "float", "complex", "bool")


def _allowed() -> dict[tuple[str, str], Any]:
    """(module, name) -> object for every global a data pickle may name.

    numpy moved its internals from ``numpy.core`` to ``numpy._core`` in 2.0; files written by
    either version name their own spelling, so both map to whatever this numpy provides.
    """
    import builtins
    import codecs
    import collections

    import numpy as np
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric

    table: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 pickles bytes (protocol < 3) as _codecs.encode(text, "latin1"): a pure function.
        ("_codecs", "encode"): codecs.encode,
        # A dict subclass; some caches keep class order in one.
        ("collections", "OrderedDict"): collections.OrderedDict,
    }
    for module in ("numpy.core", "numpy._core"):
        table[(f"{module}.multiarray", "_reconstruct")] = multiarray._reconstruct
        table[(f"{module}.multiarray", "scalar")] = multiarray.scalar
        table[(f"{module}.numeric", "_frombuffer")] = numeric._frombuffer
    for name in _SAFE_BUILTINS:
        table[("builtins", name)] = table[("__builtin__", name)] = getattr(builtins, name)
    return table


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only rebuilds numpy arrays / dtypes / scalars and builtin values.

    ``encoding="latin1"`` makes Python 2 pickles (CIFAR-100, tiered-ImageNet) load: their byte
    strings become ``str`` and their numpy arrays keep their raw bytes intact.
    """

    def __init__(self, file, where: str = "pickle"):
        super().__init__(file, encoding="latin1")
        self.where = where
        self._table = _allowed()

    def find_class(self, module: str, name: str):
        obj = self._table.get((module, name))
        if obj is None:
            raise UnsafePickleError(
                f"{self.where}: refused to load - the file asks for {module}.{name}, which a data "
                "set has no need for (only numpy arrays and plain values are allowed). It is not "
                "the data set file it claims to be; do not open it with pickle. Replace it with a "
                "copy from the data set's official source")
        return obj

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.where}: refused to load - it uses persistent references, "
                                "which data set files never do")


def _unpickle(file, where: str) -> Any:
    """Run :class:`RestrictedUnpickler` on an open binary file; any failure is a :class:`DataError`."""
    try:
        return RestrictedUnpickler(file, where).load()
    except UnsafePickleError:
        raise
    except MemoryError:
        raise DataError(f"{where}: not enough memory to load this file") from None
    except Exception as e:  # a damaged pickle can raise almost anything
        raise DataError(f"{where}: cannot read this pickle ({e.__class__.__name__}: {e}); the file "
                        "is damaged or incomplete - download it again") from None


def loads(data: bytes, where: str = "pickle") -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`; any failure is a :class:`DataError`."""
    return _unpickle(io.BytesIO(data), where)


def load(path: str | os.PathLike) -> Any:
    """Unpickle the file at ``path`` safely (see the module docstring)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _unpickle(f, str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, but a pickle file was expected") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied; make the file readable") from None


def text(value: Any) -> str:
    """A key or name from an old pickle as ``str`` (Python 2 strings may arrive as bytes)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.decode("latin1")
    return str(value)


def text_keys(d: Any, where: str) -> dict:
    """``d`` (which must be a dict) with its keys as ``str``."""
    if not isinstance(d, dict):
        raise DataError(f"{where}: expected a pickled dict, found {type(d).__name__}; this is not "
                        "the expected data set file")
    return {text(k): v for k, v in d.items()}
