"""Corruptions of any image source at chosen severities (a transform on a data source).

``data.name = "corrupted"`` wraps another source (``data.base``, e.g. ``{name = "omniglot"}``)
and corrupts the images of the chosen splits once, when the data set is built:

=============  ====================================================================  =================
corruption     what                                                                  severity 1 .. 5
=============  ====================================================================  =================
``noise``      additive Gaussian noise, clipped (ImageNet-C's standard deviations)    sd 0.08 .. 0.38
``blur``       Gaussian blur                                                         sd 0.5 .. 2.0 px
``contrast``   pixels pulled toward the image mean (ImageNet-C's factors)            x 0.4 .. 0.05
``elastic``    a smooth random displacement field (Simard et al. 2003)               up to 1.5 .. 5 px
``rotation``   rotation by a fixed angle, clockwise or counter-clockwise at random   10 .. 50 degrees
=============  ====================================================================  =================

Pixel sizes are for 28x28 images and scale with the image size. Every random draw comes
from ``(data.seed, corruption, image position)`` and the severity only scales it, so the
corrupted data set is fixed by the config and a higher severity is the same corruption,
stronger (tested: the distance to the clean images grows with the severity).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from metamap.data.dataset import ClassDataset
from metamap.data.sources import SPLITS, ClassDataSource
from metamap.errors import ConfigError
from metamap.options import ARCHITECTURE, MAX_INT, Options, option
from metamap.registry import data_source, register_data

SEVERITIES = {
    "noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "blur": (0.5, 0.8, 1.1, 1.5, 2.0),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    "elastic": (1.5, 2.25, 3.0, 4.0, 5.0),
    "rotation": (10.0, 20.0, 30.0, 40.0, 50.0),
}
KIND_CODE = {k: i for i, k in enumerate(SEVERITIES)}
ELASTIC_SMOOTHING = 3.0        # px at 28x28: the displacement field's Gaussian smoothing
CHUNK = 1024


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x [n, C, H, W]`` float, separable Gaussian of standard deviation ``sigma`` px, reflected edges."""
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    n, c, h, w = x.shape
    y = x.reshape(n * c, 1, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect" if w > radius else "replicate"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect" if h > radius else "replicate"), k.view(1, 1, -1, 1))
    return y.reshape(n, c, h, w)


def _warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _identity(n: int, h: int, w: int, dtype) -> torch.Tensor:
    theta = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=dtype).expand(n, 2, 3)
    return F.affine_grid(theta, (n, 1, h, w), align_corners=False)


def corrupt(images: torch.Tensor, kind: str, severity: int, seed: int = 0, start: int = 0) -> torch.Tensor:
    """``uint8 [n, C, H, W]`` -> corrupted ``uint8``.

    Image ``i`` draws its noise, field or direction from ``(seed, kind, start + i)``, the same at
    every severity: the severity only scales it, so a stronger corruption is the same one, stronger.
    """
    if kind not in SEVERITIES:
        raise ConfigError(f"data.corruption must be one of {', '.join(SEVERITIES)}, not {kind!r}")
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
        raise ConfigError(f"data.severity must be a whole number from 1 to 5, not {severity!r}")
    if len(images) == 0:
        return images.clone()
    level = SEVERITIES[kind][severity - 1]
    x = images.to(torch.float64) / 255.0
    n, c, h, w = x.shape
    px = h / 28.0                      # pixel parameters are given for 28x28 images
    rngs = [np.random.default_rng([seed, KIND_CODE[kind], start + i]) for i in range(n)]
    if kind == "noise":
        noise = torch.from_numpy(np.stack([r.standard_normal((c, h, w)) for r in rngs]))
        y = x + level * noise
    elif kind == "blur":
        y = gaussian_blur(x, level * px)
    elif kind == "contrast":
        mean = x.mean((1, 2, 3), keepdim=True)
        y = (x - mean) * level + mean
    elif kind == "elastic":
        field = torch.from_numpy(np.stack([r.uniform(-1, 1, (2, h, w)) for r in rngs]))
        field = gaussian_blur(field, ELASTIC_SMOOTHING * px)
        # scale each image's field so its largest displacement is `level` px: severity is the size of the warp
        peak = field.flatten(1).abs().amax(1).clamp_min(1e-12).view(n, 1, 1, 1)
        field = field / peak * level * px
        scale = torch.tensor([2.0 / w, 2.0 / h], dtype=x.dtype).view(1, 2, 1, 1)   # px -> grid units
        y = _warp(x, _identity(n, h, w, x.dtype) + (field * scale).permute(0, 2, 3, 1))
    else:  # rotation
        sign = torch.tensor([1.0 if r.random() < 0.5 else -1.0 for r in rngs], dtype=x.dtype)
        a = sign * math.radians(level)
        cos, sin = torch.cos(a), torch.sin(a)
        theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(a)], 1),
                             torch.stack([sin, cos, torch.zeros_like(a)], 1)], 1)
        y = _warp(x, F.affine_grid(theta, (n, c, h, w), align_corners=False))
    return (y.clamp(0, 1) * 255.0).round().to(torch.uint8)


def corrupt_dataset(ds: ClassDataset, kind: str, severity: int, seed: int = 0) -> ClassDataset:
    """The same classes and labels, every image corrupted (in chunks, so memory stays small)."""
    parts = [corrupt(ds.data[i:i + CHUNK], kind, severity, seed, i) for i in range(0, len(ds), CHUNK)]
    data = torch.cat(parts) if parts else ds.data.clone()
    return ClassDataset(data, ds.labels.clone(), list(ds.class_names), ds.spec,
                        f"{ds.description} -- corrupted: {kind}, severity {severity}")


@dataclass(frozen=True, kw_only=True)
class CorruptedOptions(Options):
    section = "data"
    base: dict = option({"name": "omniglot"}, role=ARCHITECTURE,
                        doc="the source to corrupt, with its own options, e.g. data.base.name = 'omniglot'")
    corruption: Literal["noise", "blur", "contrast", "elastic", "rotation"] = option("noise", role=ARCHITECTURE)
    severity: int = option(3, low=1, high=5, role=ARCHITECTURE, doc="1 (mild) .. 5 (strong)")
    seed: int = option(0, low=0, high=MAX_INT, role=ARCHITECTURE)
    splits: list[Literal["train", "val", "test"]] = option(["train", "val", "test"], role=ARCHITECTURE,
                                                           doc="which splits are corrupted; the others stay clean")

    def check(self) -> None:
        # The wrapped source's section, checked by its own options and completed with its defaults.
        from metamap.registry import plugin
        name = self.base.get("name")
        if not isinstance(name, str) or name == "corrupted":
            self.fail("data.base must be a table naming the source to corrupt, e.g. data.base.name = 'omniglot'")
        options = plugin("data", name).options
        rest = options.from_section({k: v for k, v in self.base.items() if k != "name"},
                                    where=f"data.base (data.base.name = {name!r})")
        object.__setattr__(self, "base", {"name": name, **rest.to_dict()})


def base_config(o: CorruptedOptions) -> dict:
    """A config whose ``[data]`` is the wrapped source's, its defaults filled in."""
    return {"data": dict(o.base)}


@lru_cache(maxsize=8)
def _corrupted(base_key: str, kind: str, severity: int, seed: int, split: str) -> ClassDataset:
    cfg = json.loads(base_key)
    return corrupt_dataset(data_source(cfg).dataset(cfg, split), kind, severity, seed)


@register_data("corrupted", options=CorruptedOptions)
class CorruptedSource(ClassDataSource):
    def datasets(self, o: CorruptedOptions) -> dict[str, ClassDataset]:
        cfg = base_config(o)
        source = data_source(cfg)
        key = json.dumps(cfg, sort_keys=True)
        return {s: _corrupted(key, o.corruption, o.severity, o.seed, s)
                if s in o.splits else source.dataset(cfg, s) for s in SPLITS}
