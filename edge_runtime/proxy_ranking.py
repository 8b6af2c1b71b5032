"""The proxies that personalisation computes at each stage and how their values become one score.

Every candidate is scored on the device with the forward-only proxies of FORWARD_AGGREGATE;
the finalists also get the proxies that FINAL_AGGREGATE adds (the gradient proxies). Both
aggregates rank a population together (all candidates, then the finalists), never one
architecture alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional, Sequence, Union

from models.errors import EdgeNasError
from models.proxies import ProxyResult, get_proxy

# The two aggregates of the pipeline, named as in models.aggregation.AGGREGATES.
FORWARD_AGGREGATE = "fgnas-forward"
FINAL_AGGREGATE = "fgnas"

Rows = Sequence[Mapping[str, ProxyResult]]


@dataclass(frozen=True)
class ProxyRanking:
    """The forward and final aggregates, the proxies each needs, and the function that scores a population.

    `aggregate(name, columns, aggregator=None)` returns one score per architecture, NaN where
    it cannot score one; `loader(path, space)` reads a calibrated aggregator file.
    """

    forward_name: str
    final_name: str
    forward_proxies: List[str]
    final_proxies: List[str]
    aggregate: Callable[..., Sequence[float]]
    loader: Optional[Callable[[Union[str, Path], str], Any]] = None

    @property
    def gradient_proxies(self) -> List[str]:
        """The proxies computed for the finalists only: those of the final aggregate missing from the forward one."""
        return [p for p in self.final_proxies if p not in self.forward_proxies]

    def rank_forward(self, rows: Rows) -> List[float]:
        """Score each row of proxy results with the forward aggregate; NaN where it cannot score one."""
        return self._rank(self.forward_name, rows, self.forward_proxies, None)

    def rank_all(self, rows: Rows, aggregator: Any = None) -> List[float]:
        """Score each row with the final aggregate over every proxy, with the calibrated aggregator when given."""
        return self._rank(self.final_name, rows, self.final_proxies, aggregator)

    def load_aggregator(self, path: Union[str, Path], space: str) -> Any:
        """Read a calibrated aggregator for `space` and check that it combines the final aggregate."""
        if self.loader is None:
            raise EdgeNasError(f"the aggregate {self.final_name!r} takes no calibrated aggregator, so {path} cannot be used")
        aggregator = self.loader(path, space)
        name = getattr(aggregator, "name", self.final_name)
        if name != self.final_name:
            raise EdgeNasError(
                f"{path}: the aggregator combines the proxies of {name!r}, but personalisation ranks with "
                f"{self.final_name!r}; calibrate one with `edge-nas calibrate` for {self.final_name!r}"
            )
        return aggregator

    def including(self, proxies: Sequence[str]) -> "ProxyRanking":
        """Return a copy whose final stage also computes `proxies` (those a calibrated aggregator reads)."""
        extra = [p for p in proxies if p not in self.final_proxies]
        for proxy in extra:
            get_proxy(proxy)
        return replace(self, final_proxies=self.final_proxies + extra) if extra else self

    def _rank(self, name: str, rows: Rows, proxies: Sequence[str], aggregator: Any) -> List[float]:
        if not rows:
            return []
        columns = {proxy: [_value(row.get(proxy)) for row in rows] for proxy in proxies}
        scores = self.aggregate(name, columns, aggregator=aggregator)
        return [float(score) for score in scores]


def _value(result: Optional[ProxyResult]) -> float:
    if result is None or not result.valid or result.value is None:
        return math.nan
    return float(result.value)


def default_ranking() -> ProxyRanking:
    """Build the ranking of FORWARD_AGGREGATE and FINAL_AGGREGATE with models.aggregation."""
    from models.aggregation import Aggregator, aggregate_population, expand_proxy_names

    forward, _ = expand_proxy_names([FORWARD_AGGREGATE])
    final, _ = expand_proxy_names([FINAL_AGGREGATE])
    needs_gradients = [p for p in forward if get_proxy(p).needs_gradients]
    if needs_gradients:
        raise EdgeNasError(f"the forward aggregate {FORWARD_AGGREGATE!r} includes gradient proxies {needs_gradients}")

    def load(path: Union[str, Path], space: str) -> Any:
        return Aggregator.load(path, space=space)

    return ProxyRanking(
        forward_name=FORWARD_AGGREGATE,
        final_name=FINAL_AGGREGATE,
        forward_proxies=list(forward),
        final_proxies=list(forward) + [p for p in final if p not in forward],
        aggregate=aggregate_population,
        loader=load,
    )
