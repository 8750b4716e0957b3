"""Few-shot regression data sources: ``[data] name = "sinusoid" | "linear"``.

The tasks themselves (families, seeded sampling) are in :mod:`metamap.tasks.regression`; a
source turns the ``[data]`` section into their samplers. Splits differ only in their random
streams.
"""
from __future__ import annotations

from dataclasses import dataclass

from metamap.data.sources import DataSource
from metamap.options import ARCHITECTURE, Options, option
from metamap.registry import DataInfo, register_data, section_options
from metamap.tasks.regression import FAMILIES, RegressionSampler


def _range(default: tuple[float, float], doc: str):
    return option(list(default), length=2, role=ARCHITECTURE, doc=doc)


@dataclass(frozen=True, kw_only=True)
class RegressionOptions(Options):
    section = "data"
    x_range: list[float] = _range((-5.0, 5.0), "inputs x ~ U[low, high]")
    noise: float = option(0.0, low=0, role=ARCHITECTURE, doc="standard deviation of Gaussian noise on y")

    def check(self) -> None:
        lo, hi = self.x_range
        if not lo < hi:
            self.fail(f"data.x_range [{lo}, {hi}] is empty; give [low, high] with low < high")
        for f in self.ranges():
            lo, hi = getattr(self, f)
            if not lo <= hi:
                self.fail(f"data.{f} [{lo}, {hi}] is empty; give [low, high] with low <= high")

    def ranges(self) -> list[str]:
        return [f for f in self.__dataclass_fields__ if f.endswith("_range") and f != "x_range"]


@dataclass(frozen=True, kw_only=True)
class SinusoidOptions(RegressionOptions):
    amplitude_range: list[float] = _range(FAMILIES["sinusoid"][1][0], "amplitude A ~ U[low, high]")
    phase_range: list[float] = _range(FAMILIES["sinusoid"][1][1], "phase ~ U[low, high]")


@dataclass(frozen=True, kw_only=True)
class LinearOptions(RegressionOptions):
    slope_range: list[float] = _range(FAMILIES["linear"][1][0], "slope a ~ U[low, high]")
    intercept_range: list[float] = _range(FAMILIES["linear"][1][1], "intercept b ~ U[low, high]")


class RegressionSource(DataSource):
    """``[data] name = "sinusoid" | "linear"``; splits differ only in their random streams."""

    family = "sinusoid"

    def settings(self, config: dict) -> RegressionOptions:
        return section_options(config, "data")

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
                                 {n: tuple(getattr(o, f"{n}_range")) for n in names}, tuple(o.x_range), o.noise)


# A task is a function of one real input: an MLP is the backbone unless the config says otherwise.
@register_data("sinusoid", options=SinusoidOptions, defaults={"model": {"backbone": "mlp"}})
class SinusoidSource(RegressionSource):
    family = "sinusoid"


@register_data("linear", options=LinearOptions, defaults={"model": {"backbone": "mlp"}})
class LinearSource(RegressionSource):
    family = "linear"
