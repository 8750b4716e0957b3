"""Multi-domain meta-training: a mixture of data sources, each episode drawn from one domain.

``data.name = "mixture"`` with ``data.domains``, a list of ``[data]`` tables of other sources
(each may carry a ``label``; default its ``name``), e.g.::

    [data]
    name = "mixture"
    domains = [{name = "omniglot"}, {name = "glyphs"}, {name = "fashionmnist"}]
    weights = [2, 1, 1]          # per-episode domain probabilities (normalised); [] = equal
    holdout = "fashionmnist"     # leave-one-domain-out

Every domain's images are converted to one form (``data.image_size``, ``data.channels``) and
normalised with the mean and standard deviation of all training images. As in Meta-Dataset, an
episode's domain is drawn first (by ``weights``, from ``(seed, batch index, task position)``),
then its classes and examples from that domain alone, so episodes stay pure functions of the
seed and their index. Class ids are global across domains (the fine-tuning baseline's
classifier spans all training classes).

Leave-one-domain-out (``data.holdout``): the held-out domain is never trained on -- train and
validation episodes come from the other domains' train and val classes, test episodes from the
held-out domain's test classes, and test-time fine-tuning picks its hyper-parameters on the
held-out domain's validation classes. Without a holdout each split mixes the domains' same splits.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import torch

from metamap.data.convert import convert_images
from metamap.data.dataset import ClassDataset
from metamap.data.images import ImageSpec
from metamap.data.sources import SPLITS, ClassDataSource
from metamap.errors import ConfigError, EpisodeError
from metamap.options import ARCHITECTURE, Options, option
from metamap.registry import data_source, register_data, section_options
from metamap.tasks.sampler import EpisodeSampler

DOMAIN_TAG = 0x6D6978       # separates the domain draw from the episode's own draws


class DomainEpisodeSampler(EpisodeSampler):
    """Episodes of a dataset made of several domains: each task's domain is drawn by ``weights``,
    then its ``ways`` classes from that domain (classes ``bounds[d]:bounds[d+1]`` of the dataset)."""

    def __init__(self, dataset: ClassDataset, bounds: list[int], weights, names: list[str], ways: int,
                 shots: int, queries: int, tasks_per_batch: int = 1, seed: int = 0):
        super().__init__(dataset, ways, shots, queries, tasks_per_batch, seed)
        w = np.asarray(weights, dtype=float)
        self.bounds, self.weights, self.names = list(bounds), w / w.sum(), list(names)
        for d, name in enumerate(names):
            n = bounds[d + 1] - bounds[d]
            if self.weights[d] > 0 and n < ways:
                raise EpisodeError(f"cannot draw {ways}-way tasks from domain {name!r}: it has {n} classes in this "
                                   f"split; ask for at most {n} ways or give it weight 0")

    def domain_of(self, index: int, position: int) -> int:
        rng = np.random.default_rng([self.seed, index, position, DOMAIN_TAG])
        return int(rng.choice(len(self.weights), p=self.weights))

    def task_indices(self, index: int, position: int) -> tuple[np.ndarray, np.ndarray]:
        d = self.domain_of(index, position)
        rng = np.random.default_rng([self.seed, index, position])
        lo, hi = self.bounds[d], self.bounds[d + 1]
        classes = lo + rng.choice(hi - lo, self.ways, replace=False)
        picks = np.stack([self.dataset.indices_of(c)[rng.choice(len(self.dataset.indices_of(c)),
                                                                self.shots + self.queries, replace=False)]
                          for c in classes])
        return picks, classes

    def describe(self) -> str:
        share = ", ".join(f"{n} {100 * w:.0f}%" for n, w in zip(self.names, self.weights))
        return f"{super().describe()}, one domain per episode ({share})"


@dataclass(frozen=True, kw_only=True)
class MixtureOptions(Options):
    section = "data"
    domains: list[dict] = option([{"name": "omniglot"}, {"name": "glyphs"}], role=ARCHITECTURE,
                                 doc="[data] tables of the mixed sources, each with an optional label")
    weights: list[float] = option([], low=0, role=ARCHITECTURE,
                                  doc="per-episode domain probabilities, one per domain (normalised); [] = equal")
    holdout: str = option("", role=ARCHITECTURE, doc="label of the domain left out of training and tested on")
    image_size: int = option(28, low=4, high=512, role=ARCHITECTURE, doc="the common form of every domain's images")
    channels: Literal[1, 3] = option(1, role=ARCHITECTURE)

    def check(self) -> None:
        # Each domain's table is checked and completed by its own source's options.
        from metamap.registry import plugin
        if len(self.domains) < 2 or any(not isinstance(d.get("name"), str) for d in self.domains):
            self.fail("data.domains must list at least two [data] tables, e.g. "
                      "[{name = 'omniglot'}, {name = 'glyphs'}]")
        completed = []
        for d in self.domains:
            if d["name"] == "mixture":
                self.fail("a mixture cannot contain another mixture")
            body = {k: v for k, v in d.items() if k not in ("name", "label")}
            rest = plugin("data", d["name"]).options.from_section(body, where=f"data.domains ({d['name']!r})")
            completed.append({"name": d["name"], **({"label": d["label"]} if "label" in d else {}), **rest.to_dict()})
        object.__setattr__(self, "domains", completed)
        check(self.to_dict(), [label for label, _ in domain_configs(self.to_dict())])


def domain_configs(o: dict) -> list[tuple[str, dict]]:
    """``(label, config)`` of each domain (its table completed by :class:`MixtureOptions`)."""
    out = [(str(d.get("label", d["name"])), {"data": {k: v for k, v in d.items() if k != "label"}})
           for d in o["domains"]]
    labels = [label for label, _ in out]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"data.domains: labels must differ ({labels}); give repeated sources a `label`")
    return out


def check(o: dict, labels: list[str]) -> np.ndarray:
    weights = o["weights"] or [1.0] * len(labels)
    if len(weights) != len(labels) or any(isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0
                                          for w in weights):
        raise ConfigError(f"data.weights must be {len(labels)} numbers >= 0 (one per domain: {', '.join(labels)}), "
                          f"or [] for equal weights; got {o['weights']!r}")
    if o["holdout"] and o["holdout"] not in labels:
        raise ConfigError(f"data.holdout {o['holdout']!r} is not a domain; choose one of: {', '.join(labels)}")
    if o["channels"] not in (1, 3):
        raise ConfigError(f"data.channels must be 1 or 3, not {o['channels']!r}")
    w = np.asarray(weights, dtype=float)
    if o["holdout"]:
        w[labels.index(o["holdout"])] = 0.0
    if w.sum() <= 0:
        raise ConfigError("data.weights give no weight to any training domain")
    return w


def combine(parts: list[tuple[str, ClassDataset]], size: int, channels: int) -> tuple[ClassDataset, list[int]]:
    """One dataset of several domains' classes (in the common form), and where each domain's classes start."""
    data, labels, names, bounds = [], [], [], [0]
    for label, ds in parts:
        data.append(torch.cat([convert_images(ds.data[i:i + 4096], channels, size)
                               for i in range(0, len(ds), 4096)]) if len(ds) else
                    torch.zeros((0, channels, size, size), dtype=torch.uint8))
        labels.append(ds.labels + bounds[-1])
        names += [f"{label}:{n}" for n in ds.class_names]
        bounds.append(bounds[-1] + ds.num_classes)
    what = ", ".join(f"{label} {ds.num_classes}" for label, ds in parts)
    return ClassDataset(torch.cat(data), torch.cat(labels), names, None, f"mixture of {what} classes"), bounds


@lru_cache(maxsize=2)
def _build(key: str):
    o = json.loads(key)
    domains = domain_configs(o)
    labels = [label for label, _ in domains]
    weights = check(o, labels)
    holdout = o["holdout"]
    sources = {label: (data_source(cfg), cfg) for label, cfg in domains}

    def split_of(label: str, split: str) -> ClassDataset:
        source, cfg = sources[label]
        return source.dataset(cfg, split)

    trained = [label for label in labels if label != holdout]
    out, bounds = {}, {}
    for split in SPLITS:
        members = [holdout] if holdout and split == "test" else trained if holdout else labels
        out[split], bounds[split] = combine([(m, split_of(m, split)) for m in members], o["image_size"], o["channels"])
        out[split].description = (f"{'held-out domain ' + holdout if holdout and split == 'test' else 'mixture'}, "
                                  f"{split}: " + "; ".join(f"{m}: {split_of(m, split).description}" for m in members))
    if holdout:
        out["tune"], bounds["tune"] = combine([(holdout, split_of(holdout, "val"))], o["image_size"], o["channels"])
        out["tune"].description = f"held-out domain {holdout}, val: {split_of(holdout, 'val').description}"
    basis = out["train"].data if len(out["train"]) else out["test"].data
    x = basis.to(torch.float64) / 255.0
    spec = ImageSpec(o["image_size"], o["channels"], False, "lanczos",
                     tuple(float(m) for m in x.mean((0, 2, 3))), tuple(max(float(s), 1e-3) for s in x.std((0, 2, 3))))
    for ds in out.values():
        ds.spec = spec
    members = {s: ([holdout] if holdout and s in ("test", "tune") else trained if holdout else labels) for s in out}
    w = {s: [weights[labels.index(m)] if len(members[s]) > 1 else 1.0 for m in members[s]] for s in out}
    return out, bounds, members, w


@register_data("mixture", options=MixtureOptions)
class MixtureSource(ClassDataSource):
    def _parts(self, o: MixtureOptions):
        return _build(json.dumps(o.to_dict(), sort_keys=True))

    def datasets(self, o: MixtureOptions) -> dict[str, ClassDataset]:
        out = self._parts(o)[0]
        return {s: out[s] for s in SPLITS}

    def held_out(self, config: dict) -> str:
        return section_options(config, "data").holdout

    def tuning_split(self, config: dict) -> str:
        """Where test-time fine-tuning picks its hyper-parameters: the held-out domain's val classes
        (split ``"tune"``), else the mixed val split."""
        return "tune" if self.held_out(config) else "val"

    def dataset(self, config: dict, split: str) -> ClassDataset:
        out = self._parts(section_options(config, "data"))[0]
        if split not in out:
            raise ValueError(f"split must be one of {', '.join(out)}, not {split!r}")
        return out[split]

    def sampler(self, config: dict, split: str, ways: int, shots: int, queries: int,
                tasks_per_batch: int, seed: int) -> DomainEpisodeSampler:
        out, bounds, members, weights = self._parts(section_options(config, "data"))
        self.dataset(config, split)                      # names the splits if this one does not exist
        return DomainEpisodeSampler(out[split], bounds[split], weights[split], members[split], ways, shots,
                                    queries, tasks_per_batch, seed)
