"""Decoding one image without trusting it: an image file, or encoded bytes from an archive or pickle.

Every image metamap reads (a user's folder, ``metamap predict``'s queries, the members of the
Omniglot archives, tiered-ImageNet's PNG pickles) goes through :func:`decode_image`:

* the pixel count is read from the header and refused above :data:`MAX_PIXELS` before any
  pixel is decoded (a decompression bomb cannot allocate);
* the image is turned upright by its EXIF orientation, as a viewer shows it (a damaged EXIF
  block is metadata only and is ignored);
* whatever Pillow raises on a corrupt, truncated or unknown file becomes one
  :class:`~metamap.errors.DataError` naming the file (or archive member) and the fix.

The caller's ``prepare`` turns the decoded PIL image into its array (``ImageSpec.prepare``).
"""
from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from metamap.errors import DataError

# Far larger than any few-shot image; an image above it is refused from its header alone.
MAX_PIXELS = 64_000_000
REPLACE_FILE = "it is corrupt, not an image, or of a kind Pillow cannot decode - remove or replace it (e.g. by a PNG)"


class BadPixels(DataError):
    """An image that decodes but whose pixel values cannot be shown (NaN or infinite)."""


def upright(image: Image.Image) -> Image.Image:
    """The image as a viewer shows it: photos often carry an EXIF orientation."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:            # a damaged EXIF block is metadata only: the pixels stand as stored
        return image


def decode_image(source: str | os.PathLike | bytes, prepare: Callable[[Image.Image], np.ndarray],
                 where: str | None = None, fix: str = REPLACE_FILE) -> np.ndarray:
    """``prepare(image)`` of the image in ``source`` (a file path, or its encoded bytes).

    ``where`` names the image in messages (default: the path); ``fix`` says what to do about a
    damaged one. Raises :class:`DataError` for an empty, missing, oversized or undecodable image.
    """
    if isinstance(source, (bytes, bytearray)):
        where, stream = where or "image", io.BytesIO(source)
        if not source:
            raise DataError(f"{where}: the image is empty; {fix}")
    else:
        path = Path(source)
        where, stream = where or str(path), path
    try:
        if isinstance(stream, Path) and stream.stat().st_size == 0:
            raise DataError(f"{where}: the file is empty; remove it or replace it with a real image")
        with warnings.catch_warnings():
            # The limit below is stricter than Pillow's own; its warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(stream)
        with im:
            if im.width * im.height > MAX_PIXELS:
                raise DataError(f"{where}: {im.width}x{im.height} pixels is larger than the "
                                f"{MAX_PIXELS:,}-pixel limit; shrink the image first")
            im.load()
            try:
                return prepare(upright(im))
            except BadPixels as e:
                raise DataError(f"{where}: {e}") from None
    except DataError:
        raise
    except Image.DecompressionBombError:
        raise DataError(f"{where}: the image is larger than the {MAX_PIXELS:,}-pixel limit; "
                        "shrink it first") from None
    except FileNotFoundError:
        raise DataError(f"{where}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise DataError(f"{where}: cannot read this image ({e.__class__.__name__}: {e}); {fix}") from None
