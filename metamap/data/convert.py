"""Cross-domain data: another source's images in the form a model was trained on.

A checkpoint's :class:`ImageSpec` says what its model expects (channels, size, normalisation).
Scoring it on another domain converts that domain's stored images (``uint8``, each source in
its own polarity convention: bright strokes or objects on dark for Omniglot, the MNIST family
and printed glyphs) to the model's channels (grey <-> RGB by replication or ITU-R 601 luma)
and size (LANCZOS), and normalises them with the model's mean and standard deviation -- what
``metamap predict`` does with a user's image files.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from metamap.data.dataset import ClassDataset
from metamap.data.images import _RESAMPLE, ImageSpec
from metamap.data.sources import SPLITS, ClassDataSource

CHUNK = 4096


def convert_images(x: torch.Tensor, channels: int, size: int, resample: str = "lanczos") -> torch.Tensor:
    """``uint8 [n, C, H, W]`` -> ``uint8 [n, channels, size, size]``."""
    if x.shape[1] != channels:
        if channels == 3:
            x = x.expand(-1, 3, -1, -1)
        else:
            luma = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64).view(1, 3, 1, 1)
            x = (x.double() * luma).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    if x.shape[-2:] != (size, size):
        mode = "L" if channels == 1 else "RGB"
        out = np.empty((len(x), channels, size, size), np.uint8)
        for i, im in enumerate(x.numpy()):
            pil = Image.fromarray(im[0] if channels == 1 else im.transpose(1, 2, 0), mode)
            arr = np.asarray(pil.resize((size, size), _RESAMPLE[resample]))
            out[i] = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
        x = torch.from_numpy(out)
    return x.contiguous()


def same_form(a: ImageSpec | None, b: ImageSpec | None) -> bool:
    return a is not None and b is not None and a.to_dict() == b.to_dict()


def convert_dataset(ds: ClassDataset, spec: ImageSpec) -> ClassDataset:
    """``ds`` with its images in ``spec``'s channels and size, normalised as ``spec`` says."""
    if same_form(ds.spec, spec):
        return ds
    parts = [convert_images(ds.data[i:i + CHUNK], spec.channels, spec.size, spec.resample)
             for i in range(0, len(ds), CHUNK)]
    data = torch.cat(parts) if parts else torch.zeros((0, *spec.shape), dtype=torch.uint8)
    source = ds.spec.shape if ds.spec is not None else tuple(ds.example_shape)
    note = "" if tuple(source) == spec.shape else f"{'x'.join(map(str, source))} -> {'x'.join(map(str, spec.shape))}, "
    return ClassDataset(data, ds.labels, ds.class_names, replace(spec),
                        f"{ds.description} ({note}the model's normalisation)")


class ConvertedSource(ClassDataSource):
    """Another source whose every split is converted to ``spec`` (see the module docstring)."""

    def __init__(self, source: ClassDataSource, spec: ImageSpec):
        self.source, self.spec, self._done = source, spec, {}

    def datasets(self, data_cfg: dict) -> dict[str, ClassDataset]:
        return {s: self.dataset({"data": data_cfg}, s) for s in SPLITS}

    def dataset(self, config: dict, split: str) -> ClassDataset:
        if split not in self._done:
            self._done[split] = convert_dataset(self.source.dataset(config, split), self.spec)
        return self._done[split]

    def classes(self, config: dict, split: str) -> int | None:
        return self.source.classes(config, split)

    def __getattr__(self, name):
        return getattr(self.__dict__["source"], name)
