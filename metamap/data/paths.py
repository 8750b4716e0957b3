"""Where data lives on disk, and how files there are replaced safely.

The data root is chosen in this order (first one set wins):

1. the ``root`` argument (the CLI's ``--data-root``),
2. the ``METAMAP_DATA`` environment variable,
3. the per-user cache: ``$XDG_CACHE_HOME/metamap``, else ``~/.cache/metamap``.

Each data set keeps its files in a sub-folder of the root named after it (``<root>/omniglot``).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

ENV_DATA_ROOT = "METAMAP_DATA"
FILE_MODE = 0o644


def user_cache_dir() -> Path:
    """The per-user cache folder for metamap (not created here)."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    # XDG says a relative value is invalid and must be ignored.
    if not base or not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "metamap"


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: ``root`` if given, else ``$METAMAP_DATA``, else :func:`user_cache_dir`.

    Empty strings count as "not given", so an empty config value or environment variable
    falls through to the next choice.
    """
    if root is not None and str(root).strip():
        return Path(os.path.expanduser(str(root)))
    env = os.environ.get(ENV_DATA_ROOT, "").strip()
    if env:
        return Path(os.path.expanduser(env))
    return user_cache_dir()


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every platform lets a folder be opened.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike):
    """Write ``path`` all at once: yields a binary file in the same folder, then renames it.

    Readers see either the old file or the complete new one, never a partial one: the data
    is flushed and fsynced before ``os.replace``. If the body raises, the temporary file is
    removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); the result is an ordinary shared data file.
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
