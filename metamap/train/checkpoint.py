"""Checkpoints: a folder with safetensors tensors and one JSON file. Nothing is ever unpickled.

    CHECKPOINT/
      checkpoint.json        format, version, learner, config, data info, step, metrics,
                             optimizer hyper-parameters, SHA-256 of each tensor file, and
                             ``meta_sha256``: the SHA-256 of the rest of this file's contents
      weights.safetensors    the learner's parameters and buffers
      training.safetensors   optimizer moments and RNG state (what exact resume needs)

A checkpoint is written to a temporary folder ``.NAME.tmp-PID``, fsynced, then renamed into
place; the previous one is first moved aside to ``.NAME.old-PID`` and deleted at the end.
A kill at any point leaves either the old or the new checkpoint intact, in place or in one
of those two folders: :func:`locate` finds it, :func:`recover` moves it back into place and
deletes the leftovers.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from metamap.data.download import file_digest as sha256_file
from metamap.errors import CheckpointError

FORMAT = "metamap-checkpoint"
VERSION = 2           # 2: checkpoint.json carries its own checksum (meta_sha256)
META = "checkpoint.json"
WEIGHTS = "weights.safetensors"
TRAINING = "training.safetensors"
SELF_SUM = "meta_sha256"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# The file-system steps of a save, as separate functions: the kill tests interrupt each one.
def _rename(src: Path, dst: Path) -> None:
    os.replace(src, dst)


def _remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def _write_json(file: Path, text: str) -> None:
    file.write_text(text)


def meta_digest(meta: dict) -> str:
    """SHA-256 of ``meta`` without its own checksum, in a canonical JSON form (key order and
    white space do not matter, every value does)."""
    body = {k: v for k, v in meta.items() if k != SELF_SUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_meta(folder: str | Path, meta: dict) -> None:
    """Write ``folder/checkpoint.json`` with its checksum (also for tools that edit a checkpoint
    on purpose: an edit made any other way is refused at load)."""
    meta = json.loads(json.dumps({k: v for k, v in meta.items() if k != SELF_SUM}))
    meta[SELF_SUM] = meta_digest(meta)
    _write_json(Path(folder) / META, json.dumps(meta, indent=2, sort_keys=True))


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


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict, where: Path | str = "checkpoint") -> dict:
    """The inverse of :func:`flatten_optimizer`; a malformed description raises :class:`CheckpointError`."""
    bad = CheckpointError(f"{where}: the optimizer state in {META} is malformed; resume from another "
                          "checkpoint, or start a new run from these weights")
    if not (isinstance(meta, dict) and isinstance(meta.get("param_groups"), list)
            and isinstance(meta.get("scalars"), dict) and all(isinstance(g, dict) for g in meta["param_groups"])):
        raise bad
    state: dict[int, dict[str, Any]] = {}
    try:
        for name, value in tensors.items():
            if name.startswith("optim."):
                _, idx, key = name.split(".", 2)
                state.setdefault(int(idx), {})[key] = value
        for name, value in meta["scalars"].items():
            idx, key = name.split(".", 1)
            state.setdefault(int(idx), {})[key] = value
    except ValueError:
        raise bad from None
    return {"state": state, "param_groups": meta["param_groups"]}


def staging_folders(path: Path) -> tuple[Path, Path]:
    """``(.NAME.tmp-PID, .NAME.old-PID)``: where :func:`save` writes the new checkpoint and parks the old one."""
    return (path.with_name(f".{path.name}.tmp-{os.getpid()}"), path.with_name(f".{path.name}.old-{os.getpid()}"))


def save(path: str | Path, learner: torch.nn.Module, meta: dict, optimizer: torch.optim.Optimizer | None = None,
         extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a checkpoint folder atomically. ``meta`` must be JSON-serialisable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = staging_folders(path)
    _remove(tmp)
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
    write_meta(tmp, meta)
    for f in (WEIGHTS, TRAINING, META):
        _fsync(tmp / f)
    _fsync(tmp)
    if path.exists():
        _rename(path, old)
    _rename(tmp, path)
    _fsync(path.parent)
    _remove(old)
    return path


# -- finding a checkpoint, also after a save was killed ----------------------------------------
def _leftovers(path: Path) -> list[Path]:
    """Staging folders of ``path`` left by saves of any process (newest first)."""
    found = [p for kind in ("tmp", "old") for p in path.parent.glob(f".{path.name}.{kind}-*") if p.is_dir()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def _intact(folder: Path) -> dict | None:
    """The metadata of ``folder`` if it is a complete checkpoint (its files match their checksums)."""
    try:
        _, meta = read_meta(folder, locate_staged=False)
        for name in (WEIGHTS, TRAINING):
            if sha256_file(folder / name) != meta["sha256"][name]:
                return None
        return meta
    except (CheckpointError, OSError, KeyError, TypeError):
        return None


def locate(path: str | Path) -> Path | None:
    """``path`` if it is a checkpoint, else the intact checkpoint that a killed save left beside
    it (the one with the highest step; the new one of an interrupted replacement), else ``None``."""
    path = Path(path)
    if (path / META).is_file():
        return path
    best, best_step = None, -1
    for folder in _leftovers(path):
        meta = _intact(folder)
        step = meta.get("step") if meta else None
        if isinstance(step, int) and step > best_step:
            best, best_step = folder, step
    return best


def recover(path: str | Path) -> Path | None:
    """Put back into ``path`` the checkpoint a killed save left in a staging folder, and delete
    every staging folder of ``path``. Returns ``path`` if a checkpoint is there afterwards.

    Only for a folder no running process writes to (the trainer holds the run folder's lock)."""
    path = Path(path)
    found = locate(path)
    if found is not None and found != path:
        if path.exists():      # an empty or foreign folder where the checkpoint belongs: keep it aside
            _rename(path, path.with_name(f".{path.name}.unknown-{os.getpid()}-{int(time.time())}"))
        _rename(found, path)
        _fsync(path.parent)
    for folder in _leftovers(path):      # what is left is older or incomplete
        _remove(folder)
    return path if found is not None else None


def resume_source(run_dir: str | Path) -> Path:
    """The checkpoint a run resumes from: its ``last/``, else its ``best/`` (each possibly one a
    killed save left in a staging folder)."""
    run_dir = Path(run_dir)
    for name in ("last", "best"):
        found = locate(run_dir / name)
        if found is not None:
            return found
    if not run_dir.is_dir():
        raise CheckpointError(f"cannot resume {run_dir}: no such run folder")
    raise CheckpointError(f"cannot resume {run_dir}: it holds no checkpoint (the run stopped before writing its "
                          f"first one); start it again after deleting {run_dir}, or choose another --run-dir")


def resolve_path(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (-> its ``best``, else ``last`` checkpoint)."""
    path = Path(path)
    if (path / META).is_file():
        return path
    for candidate in (path, path / "best", path / "last"):
        found = locate(candidate)
        if found is not None:
            return found
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: the path does not exist")
    raise CheckpointError(f"{path} is not a metamap checkpoint (no {META}, nor best/ or last/ inside); "
                          "pass a checkpoint folder or a run folder made by `metamap train`")


# -- checkpoint.json ---------------------------------------------------------------------------
def _whole(v: Any, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _checker(where: Path):
    def need(ok: bool, field: str, what: str) -> None:
        if not ok:
            raise CheckpointError(f"{where / META}: {field} {what}; the file was edited or damaged - "
                                  "use another checkpoint (a run folder keeps best/ and last/)")
    return need


def check_meta(meta: dict, where: Path) -> None:
    """The fields every loader reads have the type and range it needs; else :class:`CheckpointError`."""
    need = _checker(where)
    sums = meta.get("sha256")
    need(isinstance(sums, dict)
         and all(isinstance(sums.get(n), str) and len(sums[n]) == 64 for n in (WEIGHTS, TRAINING)),
         "sha256", f"must map {WEIGHTS} and {TRAINING} to their SHA-256 checksums")
    need(_whole(meta.get("step")), "step", f"must be a whole number >= 0, not {meta.get('step')!r}")
    need(_whole(meta.get("bad_steps", 0)), "bad_steps", f"must be a whole number >= 0, not {meta.get('bad_steps')!r}")
    need(meta.get("best") is None or isinstance(meta["best"], dict), "best", "must be a table or null")
    need(isinstance(meta.get("optimizer", {}), dict), "optimizer", "must be a table")
    need(isinstance(meta.get("learner", ""), str), "learner", "must be a learner name")
    if meta.get("python"):       # a learner built in Python: its modules come from the caller, not the config
        need(isinstance(meta.get("config"), dict) and isinstance(meta["config"].get("learner"), dict),
             "config.learner", "is missing or not a table")
    elif "config" in meta or "data_info" in meta:
        check_rebuild(meta, where)


def check_rebuild(meta: dict, where: Path) -> None:
    """What rebuilding the learner reads: ``config`` (with the learner's name) and ``data_info``."""
    from metamap.data.images import ImageSpec
    from metamap.registry import DataInfo

    need = _checker(where)
    config = meta.get("config")
    need(isinstance(config, dict), "config", "is missing or not a table")
    for section in ("learner", "model", "data", "train", "eval", "optim", "schedule", "episode"):
        need(isinstance(config.get(section), dict), f"config.{section}", "is missing or not a table")
    need(isinstance(meta.get("learner"), str) and meta["learner"] == config["learner"].get("name"), "learner",
         f"({meta.get('learner')!r}) must be the name in config.learner.name ({config['learner'].get('name')!r})")
    info = meta.get("data_info")
    need(isinstance(info, dict), "data_info", "is missing or not a table")
    known = {f.name for f in fields(DataInfo)}
    need(set(info) <= known, "data_info", f"has unknown key(s) {', '.join(sorted(map(str, set(info) - known)))}")
    shape = info.get("example_shape")
    need(isinstance(shape, list) and 0 < len(shape) <= 4 and all(_whole(d, 1) for d in shape),
         "data_info.example_shape", f"must be a list of 1 to 4 whole numbers >= 1, not {shape!r}")
    need(isinstance(info.get("problem", "classification"), str), "data_info.problem",
         f"must name a task kind (e.g. classification), not {info.get('problem')!r}")
    need(_whole(info.get("num_train_classes", 0)), "data_info.num_train_classes", "must be a whole number >= 0")
    need(_whole(info.get("output_dim", 1), 1), "data_info.output_dim", "must be a whole number >= 1")
    need(isinstance(info.get("description", ""), str), "data_info.description", "must be text")
    spec = info.get("spec")
    if spec is not None:
        spec_keys = {f.name for f in fields(ImageSpec)}
        need(isinstance(spec, dict) and set(spec) == spec_keys, "data_info.spec",
             f"must be a table with the keys {', '.join(sorted(spec_keys))}")
        numbers = lambda v: isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                       and math.isfinite(x) for x in v)
        need(numbers(spec["mean"]) and numbers(spec["std"]), "data_info.spec.mean/std",
             "must be lists of finite numbers")
        need(_whole(spec["size"], 1) and _whole(spec["channels"], 1) and isinstance(spec["invert"], bool)
             and isinstance(spec["resample"], str), "data_info.spec", f"has a value of the wrong type ({spec})")
        try:
            image = ImageSpec.from_dict(spec)
        except (ValueError, TypeError) as e:
            need(False, "data_info.spec", f"is invalid ({e})")
        need(list(image.shape) == shape, "data_info.spec", f"describes images of shape {list(image.shape)} but "
             f"example_shape is {shape}")


def read_meta(path: str | Path, locate_staged: bool = True) -> tuple[Path, dict]:
    """The checkpoint folder ``path`` resolves to and its checked ``checkpoint.json``."""
    path = resolve_path(path) if locate_staged else Path(path)
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path / META} is damaged ({e}); use another checkpoint "
                              "(a run folder keeps best/ and last/)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path / META} is not a metamap checkpoint description")
    version = meta.get("version")
    if not _whole(version, 1):
        raise CheckpointError(f"{path / META}: version must be a whole number, not {version!r}; the file was "
                              "edited or damaged - use another checkpoint (a run folder keeps best/ and last/)")
    if version > VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {version}, newer than this "
                              f"metamap understands ({VERSION}); upgrade metamap to load it")
    # A format-1 file never carries a checksum: one that does had its version lowered by an edit.
    if version >= 2 or SELF_SUM in meta:
        if meta.get(SELF_SUM) != meta_digest(meta):
            raise CheckpointError(f"{path / META} does not match its own checksum ({SELF_SUM}): it was edited "
                                  "or damaged after it was written; use another checkpoint (best/ or last/), or "
                                  "if the edit was intended, write the file with metamap.train.checkpoint.write_meta")
    if version < 2:
        warnings.warn(f"{path} was written by an older metamap (checkpoint format {version}): its settings "
                      "carry no checksum and cannot be verified; only its tensor files are checked", stacklevel=2)
    check_meta(meta, path)
    return path, meta


def read_tensors(path: Path, name: str, meta: dict) -> dict[str, torch.Tensor]:
    file = path / name
    if not file.is_file():
        raise CheckpointError(f"{file} is missing; the checkpoint is incomplete")
    if sha256_file(file) != meta["sha256"][name]:
        raise CheckpointError(f"{file} does not match the checksum recorded in {META}: the file is "
                              "truncated or corrupted; use another checkpoint (best/ or last/)")
    try:
        tensors = load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file} cannot be read ({e}); the file is damaged") from None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{file} holds NaN or infinite values in {', '.join(bad[:5])}"
                              f"{' ...' if len(bad) > 5 else ''}: the model had diverged when it was saved; use "
                              "an earlier checkpoint, or train again with a lower optim.lr")
    return tensors


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
    """The :class:`DataInfo` recorded in a checked ``checkpoint.json``."""
    from metamap.data.images import ImageSpec
    from metamap.registry import DataInfo
    info_d = dict(meta["data_info"])
    spec = ImageSpec.from_dict(info_d.pop("spec")) if info_d.get("spec") else None
    info_d.pop("spec", None)
    return DataInfo(**{**info_d, "example_shape": tuple(info_d["example_shape"]), "spec": spec})


def load_learner(path: str | Path, device: str = "cpu", learner=None) -> LoadedLearner:
    """Rebuild a learner from its checkpoint (its complete config and data info) and load its weights.

    ``learner``: load the weights into this learner instead of building one from the config
    (for learners built in Python around one's own modules, which no config can rebuild).
    """
    from metamap.config import resolve
    from metamap.data.memory import check_model_fits
    from metamap.errors import MetamapError
    from metamap.registry import build_learner

    path, meta = read_meta(path)
    if learner is None and meta.get("python"):
        raise CheckpointError(f"{path} holds a learner built in Python around your own modules, which its config "
                              "cannot rebuild; build it again and load the weights into it: "
                              "metamap.load(path, learner=metamap.MAML(my_model, ...))")
    if learner is None:
        check_rebuild(meta, path)
    info = data_info(meta) if isinstance(meta.get("data_info"), dict) else None
    try:
        # Older checkpoints: missing keys take today's defaults. A learner built in Python keeps its own.
        config = meta["config"] if meta.get("python") else resolve(base=meta["config"])
        if learner is None:
            check_model_fits(lambda: build_learner(config, info), f"the learner of {path}")
            learner = build_learner(config, info)
    except MetamapError as e:
        raise CheckpointError(f"{path}: cannot rebuild its learner from {META}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot rebuild its learner from the config in {META} "
                              f"({e.__class__.__name__}: {e}); the file was edited or written by another "
                              "version of metamap") from None
    load_state(learner, read_tensors(path, WEIGHTS, meta), path)
    learner.to(device).eval()
    return LoadedLearner(learner, None if info is None else info.spec, config, info, path, meta)
