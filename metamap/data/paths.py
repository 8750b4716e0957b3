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

from metamap.errors import OutputError

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


def write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write` for text."""
    with atomic_write(path) as f:
        f.write(text.encode())


def _probe(folder: Path, what: str) -> None:
    # os.access says yes to root on a read-only mount; creating a file is the real test.
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".metamap-write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise OutputError(f"{what}: cannot write in {folder} ({e.strerror or e}); choose a writable "
                          "location") from None


def _is(test, path: Path, what: str) -> bool:
    try:
        return test(path)
    except OSError as e:            # a name too long, a loop of links...
        raise OutputError(f"{what} {path}: {e.strerror or e}; choose another location") from None


def check_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Create folder ``path`` (and its parents) and check that files can be written in it."""
    path = Path(path)
    for parent in (path, *path.parents):
        if _is(Path.exists, parent, what) and not _is(Path.is_dir, parent, what):
            raise OutputError(f"{what} {path}: {parent} is a file, not a folder; choose another location")
        if parent.exists():
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{what} {path}: cannot create the folder ({e.strerror or e}); choose a "
                          "writable location") from None
    _probe(path, f"{what} {path}")
    return path


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """Before any work: the file ``path`` can be written (replaced, if it exists)."""
    path = Path(path)
    if _is(Path.is_dir, path, what):
        raise OutputError(f"{what} {path} is a folder; give a file name (e.g. {path / 'out'}{path.suffix})")
    folder = path.parent
    if not _is(Path.is_dir, folder, what):
        raise OutputError(f"{what} {path}: the folder {folder} does not exist; create it first "
                          f"(mkdir -p {folder}) or choose another path")
    if len(path.name.encode()) > 255 or _is(Path.exists, path, what) and not _is(Path.is_file, path, what):
        raise OutputError(f"{what} {path}: the name is too long, or it exists and is not a regular file (a "
                          "device, a socket...); choose another path")
    _probe(folder, f"{what} {path}")
    return path
