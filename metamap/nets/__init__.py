"""Backbones, registered by name for configs (``model.backbone``)."""
from metamap.errors import ConfigError
from metamap.nets.backbones import MLP, Conv4, Flatten
from metamap.registry import DataInfo, options, register_backbone

__all__ = ["Conv4", "Flatten", "MLP"]


CONV4_OPTIONS = {"hidden": 64, "layers": 4, "norm": True, "unpooled": 0, "feature_maps": False}


@register_backbone("conv4", defaults=CONV4_OPTIONS)
def _conv4(cfg: dict, info: DataInfo) -> Conv4:
    o = options(cfg, CONV4_OPTIONS, "model")
    if len(info.example_shape) != 3:
        raise ConfigError(f"model.backbone = 'conv4' needs image data [channels, height, width], not examples "
                          f"of shape {list(info.example_shape)}; use model.backbone = 'mlp'")
    c, h, w = info.example_shape
    try:
        return Conv4(in_channels=c, hidden=o["hidden"], layers=o["layers"], image_size=h, norm=o["norm"],
                     unpooled=o["unpooled"], feature_maps=bool(o["feature_maps"]))
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


@register_backbone("mlp", defaults={"hidden": [40, 40]})
def _mlp(cfg: dict, info: DataInfo) -> MLP:
    o = options(cfg, {"hidden": [40, 40]}, "model")
    in_features = 1
    for d in info.example_shape:
        in_features *= d
    return MLP(in_features, tuple(o["hidden"]))


@register_backbone("flatten", defaults={"scale": 0.2})
def _flatten(cfg: dict, info: DataInfo) -> Flatten:
    # The conv settings of the default [model] section mean nothing here; accept and ignore them.
    o = options(cfg, {**CONV4_OPTIONS, "scale": 0.2}, "model")
    features = 1
    for d in info.example_shape:
        features *= d
    return Flatten(features, float(o["scale"]))
