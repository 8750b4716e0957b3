"""One image preprocessing pipeline, shared by dataset caches, training and `predict`.

An :class:`ImageSpec` says how a raw image file becomes a model input. It is stored in
every checkpoint, so images given to ``metamap predict`` go through exactly the steps the
training images went through.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metamap.data.decode import MAX_PIXELS, BadPixels, decode_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_RESAMPLE = {"lanczos": Image.Resampling.LANCZOS, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST,
             "box": Image.Resampling.BOX}


@dataclass(frozen=True)
class ImageSpec:
    """How an image becomes a ``[channels, size, size]`` float tensor.

    ``prepare`` does the lossy part once (mode, resize, inversion) and yields ``uint8``,
    which is what datasets keep in memory; ``to_input`` does the cheap part per batch
    (scale to [0, 1], then ``(x - mean) / std`` per channel).
    """

    size: int = 28
    channels: int = 1
    invert: bool = False
    resample: str = "lanczos"
    mean: tuple[float, ...] = field(default=(0.0,))
    std: tuple[float, ...] = field(default=(1.0,))

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"ImageSpec.channels must be 1 (grey) or 3 (RGB), not {self.channels}")
        if self.size < 1:
            raise ValueError(f"ImageSpec.size must be positive, not {self.size}")
        if self.size * self.size > MAX_PIXELS:
            raise ValueError(f"ImageSpec.size {self.size} makes images of more than {MAX_PIXELS:,} pixels")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"ImageSpec.resample must be one of {sorted(_RESAMPLE)}, not {self.resample!r}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"ImageSpec: mean {self.mean} and std {self.std} need one value per channel "
                             f"({self.channels})")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"ImageSpec.std must be positive, not {self.std}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ImageSpec:
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)

    # -- raw image -> uint8 ------------------------------------------------------------
    def prepare(self, image: Image.Image) -> np.ndarray:
        """A PIL image of any size and mode -> ``uint8`` array ``[channels, size, size]``."""
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
            # Transparent pixels are composited onto white, as a viewer would show them.
            rgba = image.convert("RGBA") if image.mode != "La" else image.convert("LA").convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        elif image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            image = _rescaled_to_8_bits(image)
        elif image.mode == "LAB":
            image = _lab_to_rgb(image)       # then to grey like any colour image (Pillow has no LAB -> L)
        image = image.convert("L" if self.channels == 1 else "RGB")
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), _RESAMPLE[self.resample])
        arr = np.asarray(image, dtype=np.uint8)
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        if self.invert:
            arr = 255 - arr
        return np.ascontiguousarray(arr)

    def load(self, path: str | os.PathLike) -> np.ndarray:
        """Read and prepare one image file; a bad file raises :class:`DataError` naming it."""
        return decode_image(path, self.prepare)

    def load_many(self, paths) -> torch.Tensor:
        """Several image files -> ``uint8`` tensor ``[n, channels, size, size]``."""
        paths = list(paths)
        if not paths:
            return torch.empty((0, *self.shape), dtype=torch.uint8)
        return torch.from_numpy(np.stack([self.load(p) for p in paths]))

    # -- uint8 -> model input ------------------------------------------------------------
    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        """``uint8 [..., C, H, W]`` -> normalised ``float32 [..., C, H, W]``."""
        mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        return (x.to(torch.float32) / 255.0 - mean) / std


def _rescaled_to_8_bits(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float images: their range rescaled to 8 bits instead of clipped."""
    arr = np.asarray(image, dtype=np.float64)
    bad = int((~np.isfinite(arr)).sum())
    if bad:
        raise BadPixels(f"{bad} of its {arr.size} pixels are NaN or infinite (a {image.mode} image); no grey "
                        "value stands for them - fix or remove those pixels, or remove the image")
    lo, hi = float(arr.min()), float(arr.max())
    arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
    return Image.fromarray(arr.round().astype(np.uint8), mode="L")


def _lab_to_rgb(image: Image.Image) -> Image.Image:
    try:
        return image.convert("RGB")
    except ValueError:            # older Pillow: through a colour profile
        from PIL import ImageCms
        lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
        return ImageCms.applyTransform(image, ImageCms.buildTransform(lab, srgb, "LAB", "RGB"))


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (hidden files skipped)."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
