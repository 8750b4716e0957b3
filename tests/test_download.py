"""download(): success, and every failure leaves nothing half-written (local server only)."""
from __future__ import annotations

import hashlib
import socket

import pytest

from metamap.data.download import download, file_digest
from metamap.data.paths import atomic_write
from metamap.errors import DownloadError

DATA = bytes(range(256)) * 1000  # several read chunks
SHA256 = hashlib.sha256(DATA).hexdigest()
MD5 = hashlib.md5(DATA).hexdigest()


def _only(folder, *names):
    assert sorted(p.name for p in folder.iterdir()) == sorted(names), "leftover temporary files"


def test_success(http_files, tmp_path):
    url = http_files("/files/a.zip", DATA)
    dest = tmp_path / "sub" / "a.zip"
    assert download(url, dest, SHA256, md5=MD5, size=len(DATA), progress=False) == dest
    assert dest.read_bytes() == DATA and file_digest(dest) == SHA256
    _only(dest.parent, "a.zip")


def test_md5_only(http_files, tmp_path):
    url = http_files("/a.zip", DATA)
    download(url, tmp_path / "a.zip", None, md5=MD5.upper(), progress=False)
    assert (tmp_path / "a.zip").read_bytes() == DATA


@pytest.mark.parametrize("checks, message", [
    ({"sha256": "0" * 64}, "SHA256 checksum does not match"),
    ({"sha256": SHA256, "md5": "0" * 32}, "MD5 checksum does not match"),
    ({"sha256": SHA256, "size": len(DATA) + 1}, "bytes but the file has"),
])
def test_mismatch_leaves_nothing(http_files, tmp_path, checks, message):
    url = http_files("/a.zip", DATA)
    sha256 = checks.pop("sha256")
    with pytest.raises(DownloadError, match=message) as e:
        download(url, tmp_path / "a.zip", sha256, progress=False, **checks)
    assert str(tmp_path / "a.zip") in str(e.value)  # says where a hand-downloaded copy goes
    _only(tmp_path)


def test_truncated_transfer(http_files, tmp_path):
    url = http_files("/a.zip", DATA, truncate=True)
    with pytest.raises(DownloadError, match="cut short|broke off"):
        download(url, tmp_path / "a.zip", SHA256, progress=False)
    _only(tmp_path)


def test_http_404(http_files, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(http_files.base + "/missing.zip", tmp_path / "a.zip", SHA256, progress=False)
    _only(tmp_path)


def test_unreachable_server(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match="cannot reach"):
        download(f"http://127.0.0.1:{port}/a.zip", tmp_path / "a.zip", SHA256, progress=False, timeout=5)
    _only(tmp_path)


def test_failed_download_keeps_existing_file(http_files, tmp_path):
    dest = tmp_path / "a.zip"
    dest.write_bytes(b"old")
    with pytest.raises(DownloadError):
        download(http_files("/a.zip", DATA), dest, "0" * 64, progress=False)
    assert dest.read_bytes() == b"old"
    _only(tmp_path, "a.zip")


def test_a_checksum_is_required(tmp_path):
    with pytest.raises(ValueError):
        download("http://127.0.0.1:1/a", tmp_path / "a", None)


def test_atomic_write_cleans_up_on_error(tmp_path):
    with pytest.raises(RuntimeError), atomic_write(tmp_path / "f.bin") as f:
        f.write(b"partial")
        raise RuntimeError("interrupted")
    _only(tmp_path)
    with atomic_write(tmp_path / "f.bin") as f:
        f.write(b"done")
    assert (tmp_path / "f.bin").read_bytes() == b"done"
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o644
