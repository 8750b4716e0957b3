"""A labelled data set held in memory, grouped by class."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from metamap.data.images import ImageSpec
from metamap.errors import DataError


@dataclass
class ClassDataset:
    """Examples and their class labels.

    data:   ``[n, *example_shape]``; ``uint8 [n, C, H, W]`` for images (turned into model
            inputs by ``spec.to_input``), or float features used as they are.
    labels: ``long [n]`` with values ``0 .. num_classes-1``.
    class_names: one name per class, e.g. ``"Greek/character05"`` or ``"Greek/character05@rot90"``.
    spec: the :class:`ImageSpec` that made ``data`` (``None`` for non-image data).
    description: a line for reports, e.g. ``"Omniglot lake split: evaluation alphabets"``.
    """

    data: Tensor
    labels: Tensor
    class_names: list[str]
    spec: ImageSpec | None = None
    description: str = ""
    _index: list[np.ndarray] = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.labels = torch.as_tensor(self.labels, dtype=torch.long)
        if self.data.shape[0] != self.labels.shape[0]:
            raise ValueError(f"ClassDataset: {self.data.shape[0]} examples but {self.labels.shape[0]} labels")
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.class_names)):
            raise ValueError(f"ClassDataset: labels must lie in 0..{len(self.class_names) - 1}")
        labels = self.labels.numpy()
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(len(self.class_names) + 1))
        self._index = [order[bounds[c]:bounds[c + 1]] for c in range(len(self.class_names))]

    def __len__(self) -> int:
        return self.data.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def example_shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[1:])

    def indices_of(self, c: int) -> np.ndarray:
        """Positions in ``data`` of the examples of class ``c`` (in data order)."""
        return self._index[c]

    def class_counts(self) -> np.ndarray:
        return np.array([len(ix) for ix in self._index])

    def inputs(self, index: Tensor) -> Tensor:
        """Model inputs for ``data[index]`` (any index shape), as float32."""
        x = self.data[index]
        return self.spec.to_input(x) if self.spec is not None else x.to(torch.float32)

    def subset(self, classes, description: str | None = None) -> ClassDataset:
        """Only the given classes, relabelled ``0 .. len(classes)-1`` in the order given."""
        classes = [int(c) for c in classes]
        index = np.concatenate([self._index[c] for c in classes]) if classes else np.zeros(0, dtype=np.int64)
        relabel = np.full(self.num_classes, -1)
        relabel[classes] = np.arange(len(classes))
        index_t = torch.from_numpy(index)
        return ClassDataset(self.data[index_t], torch.from_numpy(relabel[self.labels.numpy()[index]]),
                            [self.class_names[c] for c in classes], self.spec,
                            self.description if description is None else description)


def check_disjoint(parts: dict[str, list[str]], where: str, fix: str) -> None:
    """Refuse a class split that puts one class in several parts (or twice in one): "test" accuracy
    would then be measured on training classes."""
    owners: dict[str, list[str]] = {}
    for part, names in parts.items():
        for name in names:
            owners.setdefault(name, []).append(part)
    shared = {name: owner for name, owner in owners.items() if len(owner) > 1}
    if shared:
        listed = "; ".join(f"{name} in {' and '.join(owner)}" for name, owner in list(shared.items())[:5])
        raise DataError(f"{where} puts {len(shared)} class(es) in more than one split ({listed}"
                        f"{' ...' if len(shared) > 5 else ''}): test classes must never be training classes; {fix}")
