"""Data sources: turn the ``[data]`` section of a config into task samplers.

A source answers two questions: what does one example look like and which kind of task is it
(:class:`DataInfo`), and which tasks make up a split (``train``, ``val``, ``test``).
Episode-based sources share :class:`EpisodeSampler`; task families such as sinusoid
regression bring their own sampler.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from metamap.data.dataset import ClassDataset
from metamap.options import ARCHITECTURE, DATA, Options, option
from metamap.registry import DataInfo, register_data, section_options
from metamap.tasks.sampler import EpisodeSampler, TaskSampler

SPLITS = ("train", "val", "test")


class DataSource:
    """What a ``[data] name`` stands for; registered with :func:`metamap.registry.register_data`."""

    def info(self, config: dict) -> DataInfo:
        """The shape of one example, the task kind (``problem``) and a description."""
        raise NotImplementedError

    def sampler(self, config: dict, split: str, ways: int, shots: int, queries: int,
                tasks_per_batch: int, seed: int) -> TaskSampler:
        """Seeded tasks of ``split``; sources whose tasks have no classes ignore ``ways``."""
        raise NotImplementedError

    def describe(self, config: dict, split: str) -> str:
        """Which data ``split`` is, for reports (e.g. the classes it holds)."""
        return f"{config['data']['name']} {split} split"

    def classes(self, config: dict, split: str) -> int | None:
        """How many classes ``split`` has (0 if it has none), or ``None`` if its tasks are not
        drawn from classes; validation episodes are sized by it."""
        return None


class ClassDataSource(DataSource):
    """Base for sources made of labelled classes: subclasses implement :meth:`datasets`, which
    gets the typed options of the ``[data]`` section."""

    def datasets(self, options: Options) -> dict[str, ClassDataset]:
        raise NotImplementedError

    def splits(self, config: dict) -> dict[str, ClassDataset]:
        return self.datasets(section_options(config, "data"))

    def info(self, config: dict) -> DataInfo:
        train = self.splits(config)["train"]
        return DataInfo(example_shape=train.example_shape, num_train_classes=train.num_classes,
                        spec=train.spec, description=train.description)

    def dataset(self, config: dict, split: str) -> ClassDataset:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        return self.splits(config)[split]

    def sampler(self, config: dict, split: str, ways: int, shots: int, queries: int,
                tasks_per_batch: int, seed: int) -> TaskSampler:
        return EpisodeSampler(self.dataset(config, split), ways, shots, queries, tasks_per_batch, seed)

    def describe(self, config: dict, split: str) -> str:
        return self.dataset(config, split).description

    def classes(self, config: dict, split: str) -> int | None:
        dataset = self.splits(config).get(split)
        return 0 if dataset is None else dataset.num_classes


@dataclass(frozen=True, kw_only=True)
class OmniglotOptions(Options):
    section = "data"
    split: Literal["lake", "vinyals", "vinyals-trainval"] = option(
        "lake", role=ARCHITECTURE, doc="lake; vinyals or vinyals-trainval: the published lists")
    image_size: int = option(28, low=4, high=512, role=ARCHITECTURE, doc="side of the square images")
    rotations: bool = option(True, role=ARCHITECTURE,
                             doc="rotations by 90/180/270 degrees as extra training classes")
    root: str = option("", role=DATA, doc="folder of the archives; empty = $METAMAP_DATA, else the per-user cache")
    download: bool = option(True, role=DATA, doc="fetch missing archives from the official repository")


@register_data("omniglot", options=OmniglotOptions)
class OmniglotSource(ClassDataSource):
    def datasets(self, o: OmniglotOptions) -> dict[str, ClassDataset]:
        return _omniglot(o.split, o.image_size, o.rotations, o.root, o.download)


@lru_cache(maxsize=4)
def _omniglot(split: str, image_size: int, rotations: bool, root: str, download: bool):
    from metamap.data.omniglot import load_omniglot
    return load_omniglot(split=split, image_size=image_size, rotations=rotations, root=root or None,
                         download=download)
