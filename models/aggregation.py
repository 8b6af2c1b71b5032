"""Dynamic nonlinear aggregation of FG-NAS component proxies over a population of architectures.

The aggregate ranks a population together. Each component proxy p ranks the N architectures
(r_p = 1 for the worst, N for the best, ties averaged), and

    score(a) = sum_p w_p * log(r_p(a) / N),    w_p = w0_p * agreement_p.

The log makes the sum nonlinear in the ranks: an architecture last on one proxy loses more
than a linear sum of ranks would take from it. `agreement_p` is the Kendall tau between
proxy p's ranks and the consensus (the w0-weighted mean rank) of the other proxies on this
population, clipped at 0, so that a proxy that disagrees with all the others is silenced.
`w0_p` is 1 in the label-free aggregator. `fit_aggregator` fits it on architectures of known
accuracy, and the fitted aggregator is saved as JSON (see `Aggregator.to_json`).

Entries of a component that are NaN (the proxy was invalid for that architecture) are ranked
below every valid entry, sharing the lowest ranks. An architecture invalid on every measured
component (every one other than params and FLOPs) gets a NaN score, because nothing about it
was measured.

This module imports numpy and scipy only, never torch.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from models.errors import EdgeNasError

logger = logging.getLogger(__name__)

# The component proxies each aggregate combines. S_FI is left out of both, because adding either
# of its readings lowered the aggregate's Spearman rho on a NAS-Bench-201 development sample
# (tools/fgnas_dev.py, docs/fgnas-dev.md).
AGGREGATES: Dict[str, Tuple[str, ...]] = {
    "fgnas": ("fgnas_fc", "fgnas_gi", "fgnas_gc", "params"),
    "fgnas-forward": ("fgnas_fc", "params"),
}

FEATURE_PROXIES = frozenset({"fgnas_fi", "fgnas_fc"})
GRADIENT_PROXIES = frozenset({"fgnas_gi", "fgnas_gc"})
# Counted from the encoding, so never invalid and not a measurement of the network.
COST_PROXIES = frozenset({"params", "flops"})
KNOWN_COMPONENTS = FEATURE_PROXIES | GRADIENT_PROXIES | COST_PROXIES

# Ablations of the slides' Table V: without feature proxies, without gradient proxies, and a
# linear sum of z-scores in place of the log-rank sum.
ABLATIONS = ("-FP", "-GP", "-NL")

FORMAT_NAME = "edge-nas-aggregator"
FORMAT_VERSION = 1

# Kendall tau needs at least this many architectures to say anything about agreement.
_MIN_AGREEMENT_POPULATION = 3
# Below this population size the base-weight fallback is logged at INFO instead of WARNING.
_QUIET_FALLBACK_POPULATION = 10

# Multipliers of w0 that the calibration's coordinate search tries for each proxy.
_WEIGHT_GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
# A weight change must raise the calibration Spearman rho by more than this to be kept, so that
# ties keep the simpler, equal weights.
_MIN_IMPROVEMENT = 1e-4


class AggregatorError(EdgeNasError, ValueError):
    """An aggregator file or fit that cannot be used: wrong format, space, proxies or data."""


def expand_proxy_names(names: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Split requested names into the per-architecture proxies to compute and the aggregates.

    Returns (proxies in request order without duplicates, aggregate names requested). An
    aggregate contributes its component proxies. Any other name is passed through unchanged.
    """
    proxies: List[str] = []
    aggregates: List[str] = []
    for name in names:
        components = AGGREGATES.get(name)
        if components is None:
            if name not in proxies:
                proxies.append(name)
            continue
        if name not in aggregates:
            aggregates.append(name)
        for component in components:
            if component not in proxies:
                proxies.append(component)
    return proxies, aggregates


# --------------------------------------------------------------------------------------
# Ranks, agreement and the two combination rules


def population_ranks(values: Sequence[float]) -> np.ndarray:
    """Rank a population, 1 = worst and N = best (higher values are better), ties averaged.

    NaN and infinite entries rank below every finite entry and share the lowest ranks.
    """
    from scipy.stats import rankdata

    array = np.asarray(values, dtype=np.float64)
    keyed = np.where(np.isfinite(array), array, -np.inf)
    return rankdata(keyed, method="average").astype(np.float64)


def _kendall_tau(first: np.ndarray, second: np.ndarray) -> float:
    from scipy.stats import kendalltau

    tau = kendalltau(first, second).correlation
    return float(tau) if tau is not None and math.isfinite(tau) else 0.0


def rank_agreements(ranks: Mapping[str, np.ndarray], base_weights: Mapping[str, float]) -> Dict[str, float]:
    """Return each proxy's Kendall tau with the w0-weighted mean rank of the other proxies, clipped at 0."""
    agreements: Dict[str, float] = {}
    for name, own in ranks.items():
        others = [other for other in ranks if other != name and base_weights.get(other, 0.0) > 0.0]
        if not others:
            agreements[name] = 1.0
            continue
        total = sum(base_weights[other] for other in others)
        consensus = sum(base_weights[other] * ranks[other] for other in others) / total
        agreements[name] = max(0.0, _kendall_tau(own, consensus))
    return agreements


def _z_scores(values: np.ndarray) -> np.ndarray:
    """Return z-scores of the finite entries. Non-finite entries get the lowest finite z-score (ranked last)."""
    finite = np.isfinite(values)
    scores = np.zeros_like(values)
    if not finite.any():
        return scores
    spread = float(np.std(values[finite]))
    if spread > 0.0:
        scores[finite] = (values[finite] - float(np.mean(values[finite]))) / spread
    scores[~finite] = float(scores[finite].min())
    return scores


@dataclass
class AggregateResult:
    """Scores of one population with the weights that produced them."""

    scores: np.ndarray  # float64, NaN where the architecture cannot be scored
    weights: Dict[str, float]  # w_p actually used
    agreements: Dict[str, float]  # Kendall tau with the others' consensus, clipped at 0
    fallback: bool = False  # every agreement was 0, so the base weights w0 were used


# --------------------------------------------------------------------------------------
# The aggregator


@dataclass(frozen=True)
class Aggregator:
    """The combination rule of an aggregate: its component proxies, their base weights and the rule.

    `space` is None for the label-free aggregator, which fits any space. A calibrated one
    names the space of its calibration architectures and rejects others.
    """

    name: str = "fgnas"
    proxies: Tuple[str, ...] = AGGREGATES["fgnas"]
    base_weights: Tuple[float, ...] = ()  # w0 per proxy in `proxies` order, empty for all 1
    nonlinear: bool = True  # log-rank sum, or False for the -NL ablation (a z-score sum)
    dynamic: bool = True  # multiply w0 by the rank agreement on the population
    agreement_power: float = 1.0  # w_p = w0_p * agreement_p ** agreement_power
    space: Optional[str] = None
    protocol: Dict[str, Any] = field(default_factory=dict)
    calibration_archs: Tuple[str, ...] = ()
    calibration_spearman: Optional[float] = None

    def __post_init__(self) -> None:
        if not self.proxies:
            raise AggregatorError(f"aggregate {self.name!r} has no component proxies left to combine")
        if len(set(self.proxies)) != len(self.proxies):
            raise AggregatorError(f"aggregate {self.name!r} lists a proxy twice: {list(self.proxies)}")
        unknown = [p for p in self.proxies if p not in KNOWN_COMPONENTS]
        if unknown:
            raise AggregatorError(
                f"aggregate {self.name!r} has unknown component proxies {unknown}; "
                f"known components: {', '.join(sorted(KNOWN_COMPONENTS))}"
            )
        if self.base_weights and len(self.base_weights) != len(self.proxies):
            raise AggregatorError(
                f"aggregate {self.name!r} has {len(self.base_weights)} base weights for {len(self.proxies)} proxies"
            )
        for weight in self.base_weights:
            if not (math.isfinite(weight) and weight >= 0.0):
                raise AggregatorError(f"base weights must be finite and non-negative, got {list(self.base_weights)}")
        if not (math.isfinite(self.agreement_power) and self.agreement_power > 0.0):
            raise AggregatorError(f"the agreement power must be a positive number, got {self.agreement_power}")
        if self.base_weights and not any(w > 0.0 for w in self.base_weights):
            raise AggregatorError(f"aggregate {self.name!r} has every base weight at 0, so it scores nothing")

    # ---- weights and ablations

    @property
    def weights(self) -> Dict[str, float]:
        """w0 per proxy."""
        values = self.base_weights or (1.0,) * len(self.proxies)
        return dict(zip(self.proxies, (float(v) for v in values)))

    @property
    def calibrated(self) -> bool:
        return bool(self.calibration_archs)

    @property
    def calibration_hash(self) -> str:
        """SHA-256 (hex) of the sorted calibration architecture strings, one per line."""
        return _hash_archs(self.calibration_archs)

    def ablated(self, *switches: str) -> "Aggregator":
        """Return a copy with ablations applied: '-FP' drops feature proxies, '-GP' gradient proxies, '-NL' the log."""
        result = self
        for switch in switches:
            if switch not in ABLATIONS:
                raise AggregatorError(f"unknown ablation {switch!r}; expected one of {', '.join(ABLATIONS)}")
            if switch == "-NL":
                result = replace(result, nonlinear=False)
                continue
            dropped = FEATURE_PROXIES if switch == "-FP" else GRADIENT_PROXIES
            kept = [(p, w) for p, w in result.weights.items() if p not in dropped]
            result = replace(
                result,
                proxies=tuple(p for p, _ in kept),
                base_weights=tuple(w for _, w in kept) if result.base_weights else (),
            )
        return result

    # ---- scoring

    def score(self, columns: Mapping[str, Sequence[float]]) -> AggregateResult:
        """Score a population. `columns[p]` contains proxy p's value per architecture, NaN where invalid."""
        arrays = _checked_columns(self.name, self.proxies, columns)
        count = len(next(iter(arrays.values())))
        base = self.weights
        if count == 0:
            return AggregateResult(np.zeros(0), dict(base), {p: 0.0 for p in self.proxies})

        ranks = {p: population_ranks(arrays[p]) for p in self.proxies}
        active = {p: ranks[p] for p in self.proxies if base[p] > 0.0}
        if self.dynamic and count >= _MIN_AGREEMENT_POPULATION and len(active) > 1:
            agreements = rank_agreements(active, base)
        else:
            agreements = {p: 1.0 for p in active}
        weights = {p: base[p] * agreements.get(p, 0.0) ** self.agreement_power for p in self.proxies}
        fallback = not any(w > 0.0 for w in weights.values())
        if fallback:
            # On a handful of architectures Kendall tau is mostly noise, so the fallback is expected there.
            level = logging.INFO if count < _QUIET_FALLBACK_POPULATION else logging.WARNING
            logger.log(
                level,
                "no proxy of %s agrees with the others on this population of %d (agreements %s); using the base weights",
                self.name,
                count,
                agreements,
            )
            weights = dict(base)

        total = np.zeros(count, dtype=np.float64)
        for proxy, weight in weights.items():
            if weight == 0.0:
                continue
            if self.nonlinear:
                total += weight * np.log(ranks[proxy] / count)
            else:
                total += weight * _z_scores(arrays[proxy])

        measured = [p for p in self.proxies if p not in COST_PROXIES]
        if measured:
            unmeasured = np.all([~np.isfinite(arrays[p]) for p in measured], axis=0)
            total[unmeasured] = np.nan
        return AggregateResult(total, weights, agreements, fallback)

    def check_disjoint(self, archs: Iterable[str]) -> None:
        """Raise AggregatorError when any architecture was in the calibration set.

        A correlation reported on calibration architectures would measure the fit, not the ranking.
        """
        seen = set(self.calibration_archs)
        overlap = [arch for arch in archs if arch in seen]
        if overlap:
            raise AggregatorError(
                f"{len(overlap)} of the evaluated architectures were used to calibrate the aggregator "
                f"(first: {overlap[0]}); evaluate on architectures outside its calibration set"
            )

    # ---- JSON

    def to_json(self) -> Dict[str, Any]:
        """Return the saved form, format version 1::

            {"format": "edge-nas-aggregator", "format_version": 1,
             "space": "nb201",            # search space of the calibration architectures, null when label-free
             "aggregate": "fgnas",        # the aggregate whose components it combines
             "proxies": ["fgnas_fc", ...],
             "parameters": {"base_weights": {"fgnas_fc": 1.0, ...}, "nonlinear": true,
                            "dynamic": true, "agreement_power": 1.0},
             "protocol": {...},           # how the calibration scores and accuracies were produced
             "calibration": {"count": 100, "spearman": 0.95,
                             "sha256": "<hex of the sorted architecture strings joined by newlines>",
                             "architectures": ["|nor_conv_3x3~0|+...", ...]}}

        `load` rejects another format name or version, another space, and an architecture list
        that does not match its SHA-256.
        """
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "space": self.space,
            "aggregate": self.name,
            "proxies": list(self.proxies),
            "parameters": {
                "base_weights": self.weights,
                "nonlinear": self.nonlinear,
                "dynamic": self.dynamic,
                "agreement_power": self.agreement_power,
            },
            "protocol": self.protocol,
            "calibration": {
                "count": len(self.calibration_archs),
                "sha256": self.calibration_hash,
                "spearman": self.calibration_spearman,
                "architectures": list(self.calibration_archs),
            },
        }

    def save(self, path: Union[str, "os.PathLike[str]"]) -> None:
        """Write the JSON file atomically: a reader sees the old file or the whole new one."""
        _write_text_atomic(Path(path), json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n")

    @classmethod
    def from_json(cls, data: Any, *, space: Optional[str] = None, source: str = "aggregator") -> "Aggregator":
        """Validate a loaded JSON object and build the aggregator. A calibrated one must match `space`."""
        if not isinstance(data, dict):
            raise AggregatorError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT_NAME:
            raise AggregatorError(
                f"{source}: not an edge-nas aggregator file (format {data.get('format')!r}, expected {FORMAT_NAME!r})"
            )
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise AggregatorError(
                f"{source}: unsupported aggregator format version {version!r}; this edge-nas reads version "
                f"{FORMAT_VERSION}, so re-create the file with `edge-nas calibrate`"
            )

        saved_space = data.get("space")
        if space is not None and saved_space is not None and saved_space != space:
            raise AggregatorError(
                f"{source}: the aggregator was calibrated on search space {saved_space!r}, not {space!r}; "
                f"calibrate one for {space!r} with `edge-nas calibrate --space {space}`"
            )

        try:
            name = str(data["aggregate"])
            proxies = tuple(str(p) for p in data["proxies"])
            parameters = data["parameters"]
            weights = parameters["base_weights"]
            calibration = data["calibration"]
            archs = tuple(str(a) for a in calibration["architectures"])
            recorded_hash = calibration["sha256"]
        except (KeyError, TypeError) as error:
            raise AggregatorError(f"{source}: invalid aggregator file, missing or malformed field {error}") from None
        if not isinstance(weights, dict) or set(weights) != set(proxies):
            raise AggregatorError(f"{source}: the base weights must name exactly the proxies {list(proxies)}")

        if recorded_hash != _hash_archs(archs):
            raise AggregatorError(
                f"{source}: the calibration architecture list does not match its recorded SHA-256; the file was edited or is corrupt"
            )
        try:
            base_weights = tuple(float(weights[p]) for p in proxies)
        except (TypeError, ValueError):
            raise AggregatorError(f"{source}: base weights must be numbers, got {weights}") from None
        protocol = data.get("protocol") or {}
        if not isinstance(protocol, dict):
            raise AggregatorError(f"{source}: 'protocol' must be a JSON object; re-create it with `edge-nas calibrate`")
        try:
            agreement_power = float(parameters.get("agreement_power", 1.0))
            spearman = calibration.get("spearman")
            spearman = None if spearman is None else float(spearman)
        except (TypeError, ValueError):
            raise AggregatorError(
                f"{source}: agreement_power and the calibration spearman must be numbers; re-create it with `edge-nas calibrate`"
            ) from None

        try:
            return cls(
                name=name,
                proxies=proxies,
                base_weights=base_weights,
                nonlinear=bool(parameters.get("nonlinear", True)),
                dynamic=bool(parameters.get("dynamic", True)),
                agreement_power=agreement_power,
                space=saved_space,
                protocol=dict(protocol),
                calibration_archs=archs,
                calibration_spearman=spearman,
            )
        except AggregatorError as error:
            raise AggregatorError(f"{source}: {error}") from None

    @classmethod
    def load(cls, path: Union[str, "os.PathLike[str]"], *, space: Optional[str] = None) -> "Aggregator":
        """Read and validate an aggregator file that must belong to search space `space` (any when None)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise AggregatorError(f"aggregator file not found: {path}") from None
        except UnicodeDecodeError:
            raise AggregatorError(f"{path}: not a UTF-8 text file; re-create it with `edge-nas calibrate`") from None
        except OSError as error:
            raise AggregatorError(f"{path}: cannot be read ({error})") from None
        try:
            data = json.loads(text)
        except RecursionError:
            raise AggregatorError(f"{path}: the JSON is nested too deeply; re-create it with `edge-nas calibrate`") from None
        except ValueError as error:
            raise AggregatorError(f"{path}: not valid JSON ({error}); re-create it with `edge-nas calibrate`") from None
        return cls.from_json(data, space=space, source=str(path))


def label_free_aggregator(name: str = "fgnas", *, ablations: Sequence[str] = ()) -> Aggregator:
    """Return the uncalibrated aggregator of `name` (all w0 = 1), with optional ablations."""
    if name not in AGGREGATES:
        raise AggregatorError(f"unknown aggregate {name!r}; known aggregates: {', '.join(AGGREGATES)}")
    return Aggregator(name=name, proxies=AGGREGATES[name]).ablated(*ablations)


def aggregate_population(
    name: str, columns: Mapping[str, Sequence[float]], aggregator: Optional[Aggregator] = None
) -> np.ndarray:
    """Score a population with aggregate `name`, returning float64 scores, NaN where an architecture cannot be scored.

    `columns` contains each component's values over the population, NaN where the proxy was
    invalid. Such entries rank below every valid one. Without `aggregator` the label-free one
    is used.
    """
    if aggregator is None:
        aggregator = label_free_aggregator(name)
    elif aggregator.name != name:
        raise AggregatorError(
            f"the aggregator combines the components of {aggregator.name!r}, not {name!r}; "
            f"calibrate one for {name!r} or request {aggregator.name!r}"
        )
    return aggregator.score(columns).scores


# --------------------------------------------------------------------------------------
# Calibration


def _spearman(scores: np.ndarray, targets: np.ndarray) -> float:
    from scipy.stats import spearmanr

    usable = np.isfinite(scores) & np.isfinite(targets)
    if usable.sum() < 3:
        return float("nan")
    rho = spearmanr(scores[usable], targets[usable]).correlation
    return float(rho) if rho is not None and math.isfinite(rho) else float("nan")


def fit_aggregator(
    space: str,
    archs: Sequence[str],
    columns: Mapping[str, Sequence[float]],
    accuracies: Sequence[float],
    protocol: Mapping[str, Any],
    *,
    name: str = "fgnas",
    ablations: Sequence[str] = (),
) -> Aggregator:
    """Fit the base weights w0 of aggregate `name` on architectures of known accuracy.

    A coordinate search multiplies one w0 at a time by each value of a small grid and keeps the
    change that most raises the Spearman rho between the aggregate (dynamic weights included,
    on this population) and the accuracies. It stops when no change gains more than 1e-4. The
    calibration architectures are recorded, so that a benchmark can refuse to report a
    correlation on them.
    """
    if name not in AGGREGATES:
        raise AggregatorError(f"unknown aggregate {name!r}; known aggregates: {', '.join(AGGREGATES)}")
    archs = [str(a) for a in archs]
    if len(set(archs)) != len(archs):
        raise AggregatorError("the calibration architectures contain duplicates. Give each architecture once")
    targets = np.asarray(accuracies, dtype=np.float64)
    if targets.shape != (len(archs),):
        raise AggregatorError(f"got {targets.size} accuracies for {len(archs)} calibration architectures")
    if int(np.isfinite(targets).sum()) < 3:
        raise AggregatorError("calibration needs at least 3 architectures with a finite accuracy")

    start = label_free_aggregator(name, ablations=ablations)
    _checked_columns(name, start.proxies, columns, expected=len(archs))
    weights = dict(start.weights)

    def rho_of(candidate: Dict[str, float]) -> float:
        trial = replace(start, base_weights=tuple(candidate[p] for p in start.proxies))
        return _spearman(trial.score(columns).scores, targets)

    best = rho_of(weights)
    if not math.isfinite(best):
        raise AggregatorError("the aggregate is constant or undefined on the calibration architectures, so there is nothing to fit")
    improved = True
    while improved:
        improved = False
        for proxy in start.proxies:
            for factor in _WEIGHT_GRID:
                candidate = dict(weights)
                candidate[proxy] = weights[proxy] * factor if weights[proxy] > 0.0 else factor
                if candidate == weights or not any(v > 0.0 for v in candidate.values()):
                    continue
                rho = rho_of(candidate)
                if math.isfinite(rho) and rho > best + _MIN_IMPROVEMENT:
                    best, weights, improved = rho, candidate, True
    largest = max(weights.values())
    return replace(
        start,
        base_weights=tuple(weights[p] / largest for p in start.proxies),
        space=space,
        protocol=dict(protocol),
        calibration_archs=tuple(archs),
        calibration_spearman=best,
    )


# --------------------------------------------------------------------------------------
# Helpers


def _checked_columns(
    name: str, proxies: Sequence[str], columns: Mapping[str, Sequence[float]], expected: Optional[int] = None
) -> Dict[str, np.ndarray]:
    missing = [p for p in proxies if p not in columns]
    if missing:
        raise AggregatorError(
            f"aggregate {name!r} needs the component columns {list(proxies)}; missing {missing}. "
            f"Score these proxies first"
        )
    arrays = {p: np.asarray(columns[p], dtype=np.float64).reshape(-1) for p in proxies}
    lengths = {p: len(a) for p, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise AggregatorError(f"the component columns of {name!r} differ in length: {lengths}")
    if expected is not None and next(iter(lengths.values())) != expected:
        raise AggregatorError(f"the component columns hold {next(iter(lengths.values()))} values for {expected} architectures")
    return arrays


def _hash_archs(archs: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(archs)).encode("utf-8")).hexdigest()


def _write_text_atomic(target: Path, text: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=str(target.parent))
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
