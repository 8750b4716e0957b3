"""Backbones, registered by name for configs (``model.backbone``)."""
from metamap.nets.backbones import MLP, Conv4
from metamap.registry import DataInfo, options, register_backbone

__all__ = ["Conv4", "MLP"]


@register_backbone("conv4", defaults={"hidden": 64, "layers": 4, "norm": True})
def _conv4(cfg: dict, info: DataInfo) -> Conv4:
    o = options(cfg, {"hidden": 64, "layers": 4, "norm": True}, "model")
    c, h, w = info.example_shape
    return Conv4(in_channels=c, hidden=o["hidden"], layers=o["layers"], image_size=h, norm=o["norm"])


@register_backbone("mlp", defaults={"hidden": [40, 40]})
def _mlp(cfg: dict, info: DataInfo) -> MLP:
    o = options(cfg, {"hidden": [40, 40]}, "model")
    in_features = 1
    for d in info.example_shape:
        in_features *= d
    return MLP(in_features, tuple(o["hidden"]))
