"""Data sources: turn the ``[data]`` section of a config into task samplers.

A source answers two questions: what does one example look like and which kind of task is it
(:class:`DataInfo`), and which tasks make up a split (``train``, ``val``, ``test``).
Episode-based sources share :class:`EpisodeSampler`; task families such as sinusoid
regression bring their own sampler.
"""
from __future__ import annotations

from functools import lru_cache

from metamap.data.dataset import ClassDataset
from metamap.registry import DataInfo, options, register_data
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
    """Base for sources made of labelled classes: subclasses implement :meth:`datasets`."""

    def datasets(self, data_cfg: dict) -> dict[str, ClassDataset]:
        raise NotImplementedError

    def info(self, config: dict) -> DataInfo:
        train = self.datasets(config["data"])["train"]
        return DataInfo(example_shape=train.example_shape, num_train_classes=train.num_classes,
                        spec=train.spec, description=train.description)

    def dataset(self, config: dict, split: str) -> ClassDataset:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        return self.datasets(config["data"])[split]

    def sampler(self, config: dict, split: str, ways: int, shots: int, queries: int,
                tasks_per_batch: int, seed: int) -> TaskSampler:
        return EpisodeSampler(self.dataset(config, split), ways, shots, queries, tasks_per_batch, seed)

    def describe(self, config: dict, split: str) -> str:
        return self.dataset(config, split).description

    def classes(self, config: dict, split: str) -> int | None:
        dataset = self.datasets(config["data"]).get(split)
        return 0 if dataset is None else dataset.num_classes


OMNIGLOT_OPTIONS = {
    "split": "lake",          # lake | vinyals | vinyals-trainval (published lists)
    "image_size": 28,
    "rotations": True,        # rotations by 90/180/270 degrees as extra training classes
    "root": "",               # folder of the archives; "" = $METAMAP_DATA, else the per-user cache
    "download": True,         # fetch missing archives from the official repository
}


@register_data("omniglot", defaults=OMNIGLOT_OPTIONS)
class OmniglotSource(ClassDataSource):
    def datasets(self, data_cfg: dict) -> dict[str, ClassDataset]:
        o = options(data_cfg, OMNIGLOT_OPTIONS, "data")
        return _omniglot(o["split"], o["image_size"], o["rotations"], o["root"], o["download"])


@lru_cache(maxsize=4)
def _omniglot(split: str, image_size: int, rotations: bool, root: str, download: bool):
    from metamap.data.omniglot import load_omniglot
    return load_omniglot(split=split, image_size=image_size, rotations=rotations, root=root or None,
                         download=download)
