"""Checkpoints: a folder with safetensors tensors and one JSON file. Nothing is ever unpickled.

    CHECKPOINT/
      checkpoint.json        format, version, learner, config, data info, step, metrics,
                             optimizer hyper-parameters, SHA-256 of each tensor file
      weights.safetensors    the learner's parameters and buffers
      training.safetensors   optimizer moments and RNG state (what exact resume needs)

A checkpoint is written to a temporary folder, fsynced, then renamed into place, so a crash
leaves either the previous checkpoint or the new one, never a mixture.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from metamap.data.download import file_digest as sha256_file
from metamap.errors import CheckpointError

FORMAT = "metamap-checkpoint"
VERSION = 1
META = "checkpoint.json"
WEIGHTS = "weights.safetensors"
TRAINING = "training.safetensors"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer ``state_dict`` -> (tensors for safetensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for idx, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save(path: str | Path, learner: torch.nn.Module, meta: dict, optimizer: torch.optim.Optimizer | None = None,
         extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a checkpoint folder atomically. ``meta`` must be JSON-serialisable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {k: v.detach().cpu().contiguous() for k, v in learner.state_dict().items()}
    save_file(weights, tmp / WEIGHTS)
    training = dict(extra_tensors or {})
    meta = dict(meta)
    if optimizer is not None:
        tensors, optim_meta = flatten_optimizer(optimizer.state_dict())
        training.update(tensors)
        meta["optimizer"] = optim_meta
    training["rng.torch"] = torch.get_rng_state()
    save_file(training, tmp / TRAINING)
    meta.update(format=FORMAT, version=VERSION, saved_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                torch_version=torch.__version__,
                sha256={WEIGHTS: sha256_file(tmp / WEIGHTS), TRAINING: sha256_file(tmp / TRAINING)})
    (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True))
    for f in (WEIGHTS, TRAINING, META):
        _fsync(tmp / f)
    _fsync(tmp)
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync(path.parent)
    shutil.rmtree(old, ignore_errors=True)
    return path


def resolve_path(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (-> its ``best``, else ``last`` checkpoint)."""
    path = Path(path)
    if (path / META).is_file():
        return path
    for name in ("best", "last"):
        if (path / name / META).is_file():
            return path / name
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: the path does not exist")
    raise CheckpointError(f"{path} is not a metamap checkpoint (no {META}, nor best/ or last/ inside); "
                          "pass a checkpoint folder or a run folder made by `metamap train`")


def read_meta(path: str | Path) -> tuple[Path, dict]:
    path = resolve_path(path)
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / META} is damaged ({e}); use another checkpoint "
                              "(a run folder keeps best/ and last/)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path / META} is not a metamap checkpoint description")
    if not isinstance(meta.get("version"), int) or meta["version"] > VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {meta.get('version')}, newer than this "
                              f"metamap understands ({VERSION}); upgrade metamap to load it")
    return path, meta


def read_tensors(path: Path, name: str, meta: dict) -> dict[str, torch.Tensor]:
    file = path / name
    if not file.is_file():
        raise CheckpointError(f"{file} is missing; the checkpoint is incomplete")
    expected = meta.get("sha256", {}).get(name)
    if expected and sha256_file(file) != expected:
        raise CheckpointError(f"{file} does not match the checksum recorded in {META}: the file is "
                              "truncated or corrupted; use another checkpoint (best/ or last/)")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file} cannot be read ({e}); the file is damaged") from None


def load_state(learner: torch.nn.Module, weights: dict[str, torch.Tensor], where: Path) -> None:
    """Load weights, naming what differs if the checkpoint is for another architecture."""
    if hasattr(learner, "upgrade_state"):
        weights = learner.upgrade_state(weights)
    own = learner.state_dict()
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    wrong = [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in weights and weights[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append("shape mismatch " + "; ".join(wrong[:5]))
        raise CheckpointError(f"{where} does not fit this model ({'; '.join(parts)}); it was made for "
                              "another architecture or learner configuration")
    learner.load_state_dict(weights)


@dataclass
class LoadedLearner:
    """What :func:`metamap.load` returns: a trained learner and what it needs to be used.

    ``learner``: the :class:`~metamap.MetaLearner`, in evaluation mode (``learner.adapt(support_x,
    support_y)`` -> predictor). ``spec``: the image preprocessing of its training data (file ->
    uint8 -> float input; ``None`` for non-image data). ``config``: the complete resolved config it
    was trained with. ``info``: what the learner was built for (example shape, classes...).
    ``path`` and ``meta``: the checkpoint folder and its description (step, best metric...).
    """

    learner: Any
    spec: Any
    config: dict
    info: Any
    path: Path
    meta: dict

    def adapt(self, support_x, support_y, ways: int | None = None):
        """``learner.adapt``, with gradients enabled only for learners that adapt by gradient steps."""
        import torch
        with torch.set_grad_enabled(self.learner.adapts_with_gradients):
            return self.learner.adapt(support_x, support_y, ways)

    def inputs(self, files) -> Any:
        """Image files -> model inputs ``[n, C, H, W]`` through the training preprocessing."""
        from metamap.errors import DataError
        if self.spec is None:
            raise DataError("this checkpoint was not trained on images, so it has no image preprocessing")
        return self.spec.to_input(self.spec.load_many(files))


def data_info(meta: dict):
    """The :class:`~metamap.registry.DataInfo` recorded in a checkpoint's description."""
    from metamap.data.images import ImageSpec
    from metamap.registry import DataInfo

    info_d = dict(meta["data_info"])
    spec = ImageSpec.from_dict(info_d.pop("spec")) if info_d.get("spec") else None
    return DataInfo(**{**info_d, "example_shape": tuple(info_d["example_shape"]), "spec": spec})


def load_learner(path: str | Path, device: str = "cpu", learner=None) -> LoadedLearner:
    """Rebuild a learner from its checkpoint (its complete config and data info) and load its weights.

    ``learner``: load the weights into this learner instead of building one from the config
    (for learners built in Python around one's own modules, which no config can rebuild).
    """
    from metamap.config import resolve
    from metamap.registry import build_learner

    path, meta = read_meta(path)
    config = resolve(base=meta["config"])            # older checkpoints: missing keys take the defaults
    info = data_info(meta)
    if learner is None:
        learner = build_learner(config, info)
    load_state(learner, read_tensors(path, WEIGHTS, meta), path)
    learner.to(device).eval()
    return LoadedLearner(learner, info.spec, config, info, path, meta)
