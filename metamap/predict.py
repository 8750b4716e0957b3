"""Few-shot prediction on image folders: ``metamap predict`` and its Python twin."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from metamap.data.images import list_images
from metamap.errors import DataError


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


def predict_folders(checkpoint, support: str | Path, query: str | Path, batch_size: int = 256) -> list[Prediction]:
    """Adapt the learner of ``checkpoint`` to the ``support`` folder, classify every image in ``query``."""
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
    out: list[Prediction] = []
    with torch.set_grad_enabled(learner.adapts_with_gradients):
        predictor = learner.adapt(support_x, support_y, ways=len(names))
        for start in range(0, len(query_paths), batch_size):
            chunk = query_paths[start:start + batch_size]
            probs = predictor(spec.to_input(spec.load_many(chunk))).detach().softmax(-1)
            score, label = probs.max(-1)
            out += [Prediction(p.name, names[int(k)], float(s)) for p, k, s in zip(chunk, label, score)]
    return out
