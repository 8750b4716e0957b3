"""Few-shot prediction on image folders: ``metamap predict`` and its Python twin."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from metamap.data.dataset import ClassDataset
from metamap.data.images import list_images
from metamap.errors import DataError
from metamap.tasks.sampler import EpisodeSampler
from metamap.train import test_time


@dataclass
class Prediction:
    file: str
    prediction: str
    score: float           # the predicted class's softmax probability


def read_support(folder: str | Path, spec) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """One sub-folder per class -> inputs ``[S, C, H, W]``, labels ``[S]``, class names."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"support folder {folder} does not exist or is not a folder")
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"support folder {folder} has {len(classes)} class sub-folder(s); put the few "
                        "labelled images of each new class in its own sub-folder (at least two classes)")
    paths, labels = [], []
    for label, c in enumerate(classes):
        images = list_images(c)
        if not images:
            raise DataError(f"class folder {c} holds no image files; add at least one labelled image")
        paths += images
        labels += [label] * len(images)
    return spec.to_input(spec.load_many(paths)), torch.tensor(labels), [c.name for c in classes]


def read_classes(folder: str | Path, spec) -> ClassDataset:
    """One sub-folder per class -> a :class:`ClassDataset` of ``uint8`` images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"folder {folder} does not exist or is not a folder")
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths, labels = [], []
    for label, c in enumerate(classes):
        images = list_images(c)
        paths += images
        labels += [label] * len(images)
    return ClassDataset(spec.load_many(paths), torch.tensor(labels, dtype=torch.long), [c.name for c in classes], spec,
                        f"labelled images of {folder}")


def finetune_settings(lr=None, steps=None, seed: int = 0, norm=None, select: bool = False,
                      episodes: int | None = None) -> dict:
    """The ``eval.finetune*`` keys for ``predict`` (None = chosen automatically). The weight of
    the support set's batch-norm statistics (``norm``) is chosen only with a folder to choose
    on (``select``); without one it is 0, the checkpoint's statistics."""
    from metamap.config import EvalOptions
    norm = ("auto" if select else 0.0) if norm is None else norm
    more = {} if episodes is None else {"finetune_episodes": episodes}
    e = EvalOptions(finetune=True, finetune_lr="auto" if lr is None else lr,
                    finetune_steps="auto" if steps is None else steps, finetune_norm=norm, seed=seed, **more).to_dict()
    return {k: v for k, v in e.items() if k.startswith("finetune") or k == "seed"}


def choose_finetuning(learner, spec, settings: dict, support_y: Tensor, names: list[str], select=None):
    """Given values, or values picked on episodes of ``select`` (labelled images of other classes)."""
    if not test_time.needs_selection(settings):
        return test_time.choose(learner, settings, None, "given")
    if select is None:
        raise DataError("test-time fine-tuning needs its learning rate, steps and batch-norm weight, or a folder "
                        "of labelled images of OTHER classes to choose them on: give --finetune-lr and "
                        "--finetune-steps (and --finetune-norm), or --finetune-select FOLDER")
    other = read_classes(select, spec)
    shared = sorted(set(other.class_names) & set(names))
    if shared:
        raise DataError(f"--finetune-select shares class(es) {', '.join(shared[:3])} with the support set; the "
                        "choice must be made on other classes")
    counts = other.class_counts()
    shots = int(torch.bincount(support_y).min())
    queries = min(15, int(counts.min()) - shots) if len(counts) else 0
    if len(counts) < len(names) or queries < 1:
        raise DataError(f"--finetune-select needs at least {len(names)} class folders with at least {shots + 1} "
                        f"images each ({len(names)}-way {shots}-shot episodes with a query); it has "
                        f"{len(counts)} classes, the smallest with {int(counts.min()) if len(counts) else 0}")
    sampler = EpisodeSampler(other, len(names), shots, queries, 1, int(settings["seed"]) + 7919)
    return test_time.choose(learner, settings, sampler,
                            f"chosen on {settings['finetune_episodes']} episodes of {select}")


def predict_folders(checkpoint, support: str | Path, query: str | Path, batch_size: int = 256,
                    finetune: dict | None = None, select: str | Path | None = None, echo=None,
                    record: dict | None = None) -> list[Prediction]:
    """Adapt the learner of ``checkpoint`` to the ``support`` folder, classify every image in ``query``.

    ``finetune`` (:func:`finetune_settings`) fine-tunes the learner on the support set first (test-time
    fine-tuning); learning rate and steps left to choose are picked on ``select``, a folder of labelled
    images of other classes. ``echo`` receives the line saying what was used, ``record`` (a dict) the
    values and how they were chosen.
    """
    import metamap
    loaded = metamap.load(checkpoint)
    learner, spec = loaded.learner, loaded.spec
    if spec is None:
        raise DataError("this checkpoint was not trained on images, so it cannot classify image folders")
    support_x, support_y, names = read_support(support, spec)
    query = Path(query)
    if not query.is_dir():
        raise DataError(f"query folder {query} does not exist or is not a folder")
    query_paths = list_images(query)
    if not query_paths:
        raise DataError(f"query folder {query} holds no image files to classify")
    tuning = None
    if finetune is not None:
        tuning, chosen = choose_finetuning(learner, spec, finetune, support_y, names, select)
        if echo is not None:
            echo(chosen.summary())
        if record is not None:
            record.update(chosen.to_dict())
    out: list[Prediction] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.set_grad_enabled(learner.adapts_with_gradients))
        if tuning is None:
            predictor = loaded.adapt(support_x, support_y, ways=len(names))
        else:
            learner.eval()
            tuned = stack.enter_context(test_time.finetuned(learner, support_x[None], support_y[None], len(names),
                                                            tuning))
            predictor = lambda x: tuned(x[None])[0]
        for start in range(0, len(query_paths), batch_size):
            chunk = query_paths[start:start + batch_size]
            probs = predictor(spec.to_input(spec.load_many(chunk))).detach().softmax(-1)
            score, label = probs.max(-1)
            out += [Prediction(p.name, names[int(k)], float(s)) for p, k, s in zip(chunk, label, score)]
    return out
