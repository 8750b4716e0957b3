"""Backbones, registered by name for configs (``model.backbone``)."""
from __future__ import annotations

from dataclasses import dataclass

from metamap.errors import ConfigError
from metamap.nets.backbones import MLP, Conv4
from metamap.options import Options, option
from metamap.registry import DataInfo, register_backbone

__all__ = ["Conv4", "MLP"]


@dataclass(frozen=True, kw_only=True)
class Conv4Options(Options):
    section = "model"
    hidden: int = option(64, low=1, high=65536, doc="channels of every block")
    layers: int = option(4, low=1, high=64, doc="conv blocks, each halving the image side")
    norm: bool = option(True, doc="batch norm after each convolution")


@dataclass(frozen=True, kw_only=True)
class MLPOptions(Options):
    section = "model"
    hidden: list[int] = option([40, 40], low=1, high=1 << 20, doc="sizes of the hidden layers")


@register_backbone("conv4", options=Conv4Options)
def _conv4(o: Conv4Options, info: DataInfo) -> Conv4:
    if len(info.example_shape) != 3:
        raise ConfigError(f"model.backbone = 'conv4' needs image data [channels, height, width], not examples "
                          f"of shape {list(info.example_shape)}; use model.backbone = 'mlp'")
    c, h, w = info.example_shape
    try:
        return Conv4(in_channels=c, hidden=o.hidden, layers=o.layers, image_size=h, norm=o.norm)
    except ValueError as e:
        raise ConfigError(f"{e}; use fewer model.layers or larger images") from None


@register_backbone("mlp", options=MLPOptions)
def _mlp(o: MLPOptions, info: DataInfo) -> MLP:
    in_features = 1
    for d in info.example_shape:
        in_features *= d
    return MLP(in_features, tuple(o.hidden))
