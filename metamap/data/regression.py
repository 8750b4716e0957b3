"""Few-shot regression data sources: ``[data] name = "sinusoid" | "linear"``.

The tasks themselves (families, seeded sampling) are in :mod:`metamap.tasks.regression`; a
source turns the ``[data]`` section into their samplers. Splits differ only in their random
streams.
"""
from __future__ import annotations

from metamap.data.sources import DataSource
from metamap.registry import DataInfo, options, register_data
from metamap.tasks.regression import FAMILIES, RegressionSampler


def source_options(family: str) -> dict:
    """The ``[data]`` keys of a regression family, with their defaults."""
    names, defaults, _ = FAMILIES[family]
    return {"x_range": [-5.0, 5.0], "noise": 0.0, **{f"{n}_range": list(d) for n, d in zip(names, defaults)}}


class RegressionSource(DataSource):
    """``[data] name = "sinusoid" | "linear"``; splits differ only in their random streams."""

    family = "sinusoid"

    def settings(self, config: dict) -> dict:
        return options(config["data"], source_options(self.family), "data")

    def info(self, config: dict) -> DataInfo:
        self.settings(config)
        return DataInfo(example_shape=(1,), problem="regression", output_dim=1,
                        description=f"{self.family} regression tasks")

    def sampler(self, config: dict, split: str, ways: int, shots: int, queries: int, tasks_per_batch: int,
                seed: int) -> RegressionSampler:
        """``ways`` means nothing for regression and is ignored; ``queries`` is per task."""
        o = self.settings(config)
        names = FAMILIES[self.family][0]
        return RegressionSampler(self.family, shots, queries, tasks_per_batch, seed, split,
                                 {n: tuple(o[f"{n}_range"]) for n in names}, tuple(o["x_range"]), o["noise"])


@register_data("sinusoid", defaults=source_options("sinusoid"))
class SinusoidSource(RegressionSource):
    family = "sinusoid"


@register_data("linear", defaults=source_options("linear"))
class LinearSource(RegressionSource):
    family = "linear"
