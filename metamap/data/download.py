"""Download a file over HTTP(S) and keep it only if it is complete and has the expected checksum.

The bytes go to a temporary file next to the destination; only after the length and the
checksums match is it renamed into place. So a failed, truncated or corrupt transfer never
leaves a half-written file where a later run would mistake it for the real one.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

from metamap.data.paths import atomic_write
from metamap.errors import DownloadError

USER_AGENT = "metamap-downloader/0.1"
CHUNK_BYTES = 1 << 16


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in chunks so large files need little memory."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: str | os.PathLike, sha256: str | None, *, md5: str | None = None,
             size: int | None = None, progress: bool = True, timeout: float = 60.0) -> Path:
    """Fetch ``url`` into ``dest`` and return ``dest``.

    The file is kept only if every check that is given passes: the ``Content-Length`` the
    server announced, the expected ``size`` in bytes, the ``sha256`` and the ``md5`` hex
    digests. ``sha256=None`` skips only that check (for sources that publish just an MD5);
    at least one checksum is required. Any failure raises :class:`DownloadError` saying
    what went wrong and where to put a hand-downloaded copy; ``dest`` is then untouched.
    """
    if not sha256 and not md5:
        raise ValueError("download() needs an expected sha256 or md5 to verify the file against")
    dest = Path(dest)
    try:
        with atomic_write(dest) as f:
            digests = _fetch(url, f, dest.name, progress, timeout)
            _verify(digests, sha256=sha256, md5=md5, size=size)
    except DownloadError as e:
        raise DownloadError(_advice(url, dest, str(e))) from None
    except urllib.error.HTTPError as e:
        raise DownloadError(_advice(url, dest, f"the server answered HTTP {e.code} {e.reason}")) from None
    except urllib.error.URLError as e:
        raise DownloadError(_advice(url, dest, f"cannot reach the server ({e.reason})")) from None
    except (http.client.HTTPException, ConnectionError, TimeoutError) as e:
        why = f"the transfer broke off ({e.__class__.__name__}: {e})"
        raise DownloadError(_advice(url, dest, why)) from None
    except OSError as e:
        # Reached only for local failures: the network errors are caught above.
        raise DownloadError(f"Cannot save {dest}: {e}. Choose a writable data folder "
                            f"(--data-root or METAMAP_DATA) and try again.") from None
    return dest


def _fetch(url: str, out, label: str, progress: bool, timeout: float) -> dict:
    """Stream ``url`` into the open binary file ``out``; returns byte count and digests."""
    from tqdm.auto import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    sha, md5, received = hashlib.sha256(), hashlib.md5(), 0
    with urllib.request.urlopen(request, timeout=timeout) as response:
        announced = response.headers.get("Content-Length")
        announced = int(announced) if announced and announced.isdigit() else None
        with tqdm(total=announced, unit="B", unit_scale=True, desc=f"downloading {label}",
                  disable=not progress, leave=False) as bar:
            for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                out.write(chunk)
                sha.update(chunk)
                md5.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if announced is not None and received != announced:
        raise DownloadError(f"the transfer was cut short: received {received:,} of "
                            f"{announced:,} bytes")
    return {"size": received, "sha256": sha.hexdigest(), "md5": md5.hexdigest()}


def _verify(got: dict, sha256: str | None, md5: str | None, size: int | None) -> None:
    if size is not None and got["size"] != size:
        raise DownloadError(f"received {got['size']:,} bytes but the file has {size:,}")
    for name, want in (("sha256", sha256), ("md5", md5)):
        if want and got[name] != want.strip().lower():
            raise DownloadError(f"the {name.upper()} checksum does not match (expected {want}, "
                                f"got {got[name]}): the file is corrupt or not the expected one")


def _advice(url: str, dest: Path, why: str) -> str:
    return (f"Could not download {url}: {why}. Nothing was saved. Try again later, or download "
            f"the file yourself and save it as {dest}")
