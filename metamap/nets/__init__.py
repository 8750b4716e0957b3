"""Backbones, registered by name for configs (``model.backbone``)."""
from __future__ import annotations

from dataclasses import dataclass

from metamap.errors import ConfigError
from metamap.nets.backbones import MLP, Conv4, Flatten
from metamap.options import MAX_STEP, Options, option
from metamap.registry import DataInfo, register_backbone

__all__ = ["Conv4", "Flatten", "MLP"]


@dataclass(frozen=True, kw_only=True)
class Conv4Options(Options):
    section = "model"
    hidden: int = option(64, low=1, high=65536, doc="channels of every block")
    layers: int = option(4, low=1, high=64, doc="conv blocks, each halving the image side unless unpooled")
    norm: bool = option(True, doc="batch norm after each convolution")
    unpooled: int = option(0, low=0, high=64, doc="the last blocks that keep the image side (no pooling)")
    feature_maps: bool = option(False, doc="return feature maps [B, C, H, W] instead of flat features")

    def check(self) -> None:
        if self.unpooled > self.layers:
            self.fail(f"model.unpooled ({self.unpooled}) cannot exceed model.layers ({self.layers})")


@dataclass(frozen=True, kw_only=True)
class MLPOptions(Options):
    section = "model"
    hidden: list[int] = option([40, 40], low=1, high=1 << 20, doc="sizes of the hidden layers")


@dataclass(frozen=True, kw_only=True)
class FlattenOptions(Options):
    section = "model"
    scale: float = option(0.2, low=0, low_open=True, high=MAX_STEP, doc="inputs are multiplied by this (see Flatten)")

    @classmethod
    def upgrade_checkpoint(cls, section: dict) -> dict:
        # Checkpoints written before the typed options carried the conv4 keys here, unused.
        return {k: v for k, v in section.items() if k not in ("hidden", "layers", "norm", "unpooled", "feature_maps")}


def _features(info: DataInfo) -> int:
    n = 1
    for d in info.example_shape:
        n *= d
    return n


@register_backbone("conv4", options=Conv4Options)
def _conv4(o: Conv4Options, info: DataInfo) -> Conv4:
    c, h, w = info.image_shape("conv4", hint="; use model.backbone = 'mlp'")
    try:
        return Conv4(in_channels=c, hidden=o.hidden, layers=o.layers, image_size=h, norm=o.norm,
                     unpooled=o.unpooled, feature_maps=o.feature_maps)
    except ValueError as e:
        raise ConfigError(f"model: {e}; use fewer model.layers or larger images") from None


@register_backbone("mlp", options=MLPOptions)
def _mlp(o: MLPOptions, info: DataInfo) -> MLP:
    return MLP(_features(info), tuple(o.hidden))


@register_backbone("flatten", options=FlattenOptions)
def _flatten(o: FlattenOptions, info: DataInfo) -> Flatten:
    return Flatten(_features(info), o.scale)
