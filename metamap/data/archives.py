"""Zip and tar archives of data sets, read in memory after checking every member.

Data-set archives are never extracted: their members are listed and read into memory. Still,
an archive that names a path outside its own folder (absolute, ``..``, a drive letter) or
holds links, devices or pipes was not made by a data set's authors, and is refused whole
before any member is read. So is an archive with a member larger than the caller's limit
(a decompression bomb, or not the data set at all). Hidden files and the ``__MACOSX`` folders
that zip tools add when re-packing are skipped, so a faithful re-pack of an archive reads
like the original.

Every refusal is a :class:`~metamap.errors.DataError` naming the archive, the member and what
to do (the caller's ``advice``, e.g. "use the unmodified official archive").
"""
from __future__ import annotations

import os
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from metamap.errors import DataError

DAMAGED = "it is damaged or incomplete - delete it and download it again"


@dataclass(frozen=True)
class Member:
    """One regular file of an archive: its ``/``-separated name and size in bytes."""

    name: str
    size: int


def escapes(name: str) -> bool:
    """Whether a member name points outside the archive's folder (absolute, ``..``, ``C:``)."""
    name = name.replace("\\", "/")
    return name.startswith("/") or ".." in name.split("/") or (len(name) > 1 and name[1] == ":")


def is_junk(name: str) -> bool:
    """Hidden files and macOS resource forks that re-packing adds."""
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/") if part)


class Archive:
    """An open zip or tar archive whose members all passed the checks (see the module docstring).

    ``files``: the regular-file members that are not junk, in archive order; ``read(member)``
    returns one member's bytes. Use it as a context manager; open it with :func:`open_zip` or
    :func:`open_tar`.
    """

    def __init__(self, path: Path, handle, files: list[Member], read):
        self.path, self._handle, self.files, self._read = path, handle, files, read

    def read(self, member: Member | str) -> bytes:
        name = member.name if isinstance(member, Member) else member
        try:
            return self._read(name)
        except KeyError:
            raise DataError(f"{self.path}: has no member {name}") from None
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, ValueError) as e:
            raise DataError(f"{self.path}: cannot read {name} ({e.__class__.__name__}: {e}); "
                            f"the archive {DAMAGED}") from None

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check(path: Path, name: str, kind: str | None, size: int, max_member_bytes: int, advice: str) -> bool:
    """Raise for an unsafe member; return whether it is a regular file worth listing.

    ``kind``: ``"file"``, ``"dir"`` or what else it is (``"link"``, ``"device"``...).
    """
    if escapes(name) or kind == "link":
        raise DataError(f"{path}: member {name!r} is a link or a path outside the archive's folder; "
                        f"refusing the archive: {advice}")
    if kind not in ("file", "dir"):
        raise DataError(f"{path}: member {name!r} is a device or a pipe, not a file; refusing the "
                        f"archive: {advice}")
    if kind == "dir" or is_junk(name):
        return False
    if size > max_member_bytes:
        raise DataError(f"{path}: {name} is {size:,} bytes, more than the {max_member_bytes:,} any member "
                        f"of this archive may have; {advice}")
    return True


def _zip_kind(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16          # the Unix mode, when the archive was made on Unix
    if info.is_dir():
        return "dir"
    if stat.S_IFMT(mode) in (0, stat.S_IFREG):
        return "file"
    return "link" if stat.S_ISLNK(mode) else "special file"


def _tar_kind(info: tarfile.TarInfo) -> str:
    if info.isdir():
        return "dir"
    if info.isfile():
        return "file"
    return "link" if (info.issym() or info.islnk()) else "special file"


def _missing(path: Path) -> DataError:
    return DataError(f"{path}: no such file")


def open_zip(path: str | os.PathLike, max_member_bytes: int, advice: str) -> Archive:
    """Open and check a zip archive (see the module docstring)."""
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise _missing(path) from None
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable zip archive ({e}); {DAMAGED}") from None
    try:
        files = [Member(i.filename, i.file_size) for i in zf.infolist()
                 if _check(path, i.filename, _zip_kind(i), i.file_size, max_member_bytes, advice)]
    except BaseException:
        zf.close()
        raise
    return Archive(path, zf, files, zf.read)


def open_tar(path: str | os.PathLike, max_member_bytes: int, advice: str) -> Archive:
    """Open and check a tar archive, compressed or not (see the module docstring)."""
    path = Path(path)
    try:
        tar = tarfile.open(path, "r:*")
    except FileNotFoundError:
        raise _missing(path) from None
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable tar archive ({e}); {DAMAGED}") from None
    try:
        try:
            infos = tar.getmembers()     # reads the whole archive once: every member is checked
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            raise DataError(f"{path}: not a readable tar archive ({e}); {DAMAGED}") from None
        files = [Member(i.name, i.size) for i in infos
                 if _check(path, i.name, _tar_kind(i), i.size, max_member_bytes, advice)]
    except BaseException:
        tar.close()
        raise
    by_name = {i.name: i for i in infos}

    def read(name: str) -> bytes:
        info = by_name[name]
        if not info.isfile():
            raise KeyError(name)
        return tar.extractfile(info).read()     # in memory: nothing touches the disk
    return Archive(path, tar, files, read)
