"""metamap.data.archives: zip and tar members are checked before anything is read."""
from __future__ import annotations

import io
import stat
import tarfile
import zipfile

import pytest

from metamap.data.archives import Member, escapes, is_junk, open_tar, open_zip
from metamap.errors import DataError

ADVICE = "use the official archive"


def write_zip(path, members: dict[str, bytes], links: dict[str, str] | None = None, mode=None):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("top/", b"")
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            if mode is not None:
                info.external_attr = mode << 16
            zf.writestr(info, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def write_tar(path, members: dict[str, bytes], kinds: dict[str, bytes] | None = None):
    """``kinds``: member name -> tarfile type (SYMTYPE, LNKTYPE, CHRTYPE, FIFOTYPE...)."""
    with tarfile.open(path, "w:gz") as tar:
        folder = tarfile.TarInfo("top")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, kind in (kinds or {}).items():
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return path


def test_names_that_escape_and_junk():
    assert [escapes(n) for n in ("top/a", "/top/a", "top/../x", "..", "C:/x", "top\\..\\x", "a..b/c")] == \
        [False, True, True, True, True, True, False]
    assert [is_junk(n) for n in ("top/a.png", "top/.DS_Store", "__MACOSX/top/._a", "top/x/")] == \
        [False, True, True, False]


def test_zip_lists_regular_files_and_reads_them(tmp_path):
    path = write_zip(tmp_path / "a.zip", {"top/b.txt": b"bee", "top/a.txt": b"a", "top/.hidden": b"x",
                                          "__MACOSX/top/._a.txt": b"fork"}, mode=stat.S_IFREG | 0o644)
    with open_zip(path, 10, ADVICE) as archive:
        assert archive.files == [Member("top/b.txt", 3), Member("top/a.txt", 1)]
        assert archive.read("top/b.txt") == b"bee" and archive.read(archive.files[1]) == b"a"
        with pytest.raises(DataError, match="has no member top/c.txt"):
            archive.read("top/c.txt")


def test_zip_made_without_unix_modes_is_read(tmp_path):
    path = write_zip(tmp_path / "a.zip", {"top/a.txt": b"a"})          # external_attr 0 (e.g. Windows)
    with open_zip(path, 10, ADVICE) as archive:
        assert [m.name for m in archive.files] == ["top/a.txt"]


@pytest.mark.parametrize("name", ["/top/a.txt", "top/../../a.txt", "C:/top/a.txt", "top\\..\\..\\a.txt"])
def test_zip_with_a_path_outside_is_refused_whole(tmp_path, name):
    path = write_zip(tmp_path / "a.zip", {"top/ok.txt": b"ok", name: b"evil"})
    with pytest.raises(DataError, match=r"a.zip: member .* is a link or a path outside the archive's folder; "
                                        "refusing the archive: use the official archive"):
        open_zip(path, 10, ADVICE)


def test_zip_with_links_or_devices_is_refused(tmp_path):
    with pytest.raises(DataError, match="'top/l.txt' is a link or a path outside"):
        open_zip(write_zip(tmp_path / "a.zip", {"top/ok.txt": b"ok"}, links={"top/l.txt": "/etc/passwd"}), 10, ADVICE)
    with pytest.raises(DataError, match="'top/d' is a device or a pipe"):
        open_zip(write_zip(tmp_path / "b.zip", {"top/d": b""}, mode=stat.S_IFCHR | 0o644), 10, ADVICE)


def test_zip_with_an_oversized_member_is_refused(tmp_path):
    path = write_zip(tmp_path / "a.zip", {"top/big.bin": b"x" * 11})
    with pytest.raises(DataError, match=r"top/big.bin is 11 bytes, more than the 10 any member of this "
                                        "archive may have; use the official archive"):
        open_zip(path, 10, ADVICE)
    with open_zip(path, 11, ADVICE) as archive:
        assert archive.read("top/big.bin") == b"x" * 11


def test_damaged_or_missing_zip(tmp_path):
    good = write_zip(tmp_path / "good.zip", {"top/a.txt": b"a" * 1000})
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="junk.zip: not a readable zip archive"):
        open_zip(tmp_path / "junk.zip", 10_000, ADVICE)
    (tmp_path / "cut.zip").write_bytes(good.read_bytes()[:60])
    with pytest.raises(DataError, match="cut.zip: not a readable zip archive"):
        open_zip(tmp_path / "cut.zip", 10_000, ADVICE)
    with pytest.raises(DataError, match="missing.zip: no such file"):
        open_zip(tmp_path / "missing.zip", 10, ADVICE)
    corrupt = bytearray(good.read_bytes())
    corrupt[corrupt.index(b"a" * 100) + 50] = ord("b")          # stored data no longer matches its CRC
    (tmp_path / "crc.zip").write_bytes(bytes(corrupt))
    with open_zip(tmp_path / "crc.zip", 10_000, ADVICE) as archive, \
            pytest.raises(DataError, match="crc.zip: cannot read top/a.txt .* damaged"):
        archive.read("top/a.txt")


def test_tar_lists_regular_files_and_reads_them(tmp_path):
    path = write_tar(tmp_path / "a.tar.gz", {"top/meta": b"m", "top/train": b"tt", "top/._x": b"fork"})
    with open_tar(path, 10, ADVICE) as archive:
        assert archive.files == [Member("top/meta", 1), Member("top/train", 2)]
        assert archive.read("top/train") == b"tt"
        with pytest.raises(DataError, match="has no member top"):
            archive.read("top")                                   # a folder is not a file


@pytest.mark.parametrize("kind,message", [(tarfile.SYMTYPE, "is a link or a path outside"),
                                          (tarfile.LNKTYPE, "is a link or a path outside"),
                                          (tarfile.CHRTYPE, "is a device or a pipe"),
                                          (tarfile.FIFOTYPE, "is a device or a pipe")])
def test_tar_with_links_or_devices_is_refused(tmp_path, kind, message):
    path = write_tar(tmp_path / "a.tar.gz", {"top/meta": b"m"}, kinds={"top/train": kind})
    with pytest.raises(DataError, match=f"'top/train' {message}"):
        open_tar(path, 10, ADVICE)


@pytest.mark.parametrize("name", ["/top/train", "top/../../train", "../train"])
def test_tar_with_a_path_outside_is_refused(tmp_path, name):
    path = write_tar(tmp_path / "a.tar.gz", {"top/meta": b"m", name: b"evil"})
    with pytest.raises(DataError, match="is a link or a path outside the archive's folder; refusing"):
        open_tar(path, 10, ADVICE)


def test_tar_oversized_damaged_or_missing(tmp_path):
    path = write_tar(tmp_path / "a.tar.gz", {"top/train": b"x" * 20})
    with pytest.raises(DataError, match="top/train is 20 bytes, more than the 19"):
        open_tar(path, 19, ADVICE)
    (tmp_path / "junk.tar.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match="junk.tar.gz: not a readable tar archive"):
        open_tar(tmp_path / "junk.tar.gz", 10, ADVICE)
    (tmp_path / "cut.tar.gz").write_bytes(path.read_bytes()[:40])
    with pytest.raises(DataError, match="cut.tar.gz: not a readable tar archive"):
        open_tar(tmp_path / "cut.tar.gz", 100, ADVICE)
    with pytest.raises(DataError, match="no such file"):
        open_tar(tmp_path / "missing.tar.gz", 10, ADVICE)
