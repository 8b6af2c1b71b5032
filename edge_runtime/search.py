"""Search strategies that draw candidates under params/FLOPs limits: random sampling and regularised evolution.

A strategy uses only the search-space interface and two callables: `evaluate`, which scores
one architecture, and `rank`, which turns the scores of a population into one fitness per
member. The limits are checked on the encoding (`space.params`, `space.flops`), so a rejected
architecture is never built. Architectures whose output cannot depend on their input
(`space.is_degenerate`) are rejected too.
"""
from __future__ import annotations

import collections
import logging
import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence

from models.errors import EdgeNasError

logger = logging.getLogger(__name__)

STRATEGIES = ("random", "evolution")

DEFAULT_POPULATION_SIZE = 20
DEFAULT_SAMPLE_SIZE = 5

# Draws allowed per accepted architecture before the search gives up on finding new ones.
MAX_DRAWS_PER_CANDIDATE = 200


@dataclass(frozen=True)
class CostLimits:
    """Upper limits on parameter count and FLOPs (multiply-adds); None means no limit."""

    max_params: Optional[int] = None
    max_flops: Optional[int] = None

    def check(self, space: Any) -> None:
        """Raise EdgeNasError for a limit that is not positive or that no architecture of `space` meets."""
        smallest = space.cost_range()
        for label, option, limit, key in (
            ("params", "--max-params", self.max_params, "params"),
            ("FLOPs", "--max-flops", self.max_flops, "flops"),
        ):
            if limit is None:
                continue
            if limit <= 0:
                raise EdgeNasError(f"the {label} limit ({option}) must be positive, got {limit}")
            minimum = smallest[key][0]
            if limit < minimum:
                raise EdgeNasError(
                    f"no architecture of search space {space.name!r} meets the {label} limit {limit:,} ({option}): "
                    f"the smallest {label} count the space reaches is {minimum:,}; raise the limit to at least {minimum:,}"
                )

    def allows(self, space: Any, arch: Any) -> bool:
        if self.max_params is not None and space.params(arch) > self.max_params:
            return False
        if self.max_flops is not None and space.flops(arch) > self.max_flops:
            return False
        return True

    def describe(self) -> Dict[str, Optional[int]]:
        return {"max_params": self.max_params, "max_flops": self.max_flops}


@dataclass
class Candidate:
    """One scored architecture: its cost from the encoding and the proxy results `evaluate` returned."""

    arch: Any
    params: int
    flops: int
    results: Mapping[str, Any] = field(default_factory=dict)


Evaluate = Callable[[Any], Mapping[str, Any]]
Rank = Callable[[Sequence[Candidate]], List[float]]


def acceptable(space: Any, arch: Any, limits: CostLimits) -> bool:
    return limits.allows(space, arch) and not space.is_degenerate(arch)


def sample_within(space: Any, rng: random.Random, limits: CostLimits, max_draws: int = 10_000) -> Any:
    """Draw architectures until one meets the limits and is not degenerate."""
    for _ in range(max_draws):
        arch = space.sample(rng)
        if acceptable(space, arch, limits):
            return arch
    raise EdgeNasError(
        f"no architecture of search space {space.name!r} within the limits {limits.describe()} "
        f"was found in {max_draws:,} random draws; raise --max-params or --max-flops"
    )


def random_search(
    space: Any,
    budget: int,
    evaluate: Evaluate,
    rng: random.Random,
    limits: CostLimits = CostLimits(),
    on_candidate: Optional[Callable[[Candidate], None]] = None,
) -> List[Candidate]:
    """Score `budget` distinct architectures drawn uniformly from those that meet the limits."""
    _check_budget(budget)
    seen: Dict[str, Candidate] = {}
    draws = 0
    while len(seen) < budget and draws < budget * MAX_DRAWS_PER_CANDIDATE:
        draws += 1
        arch = space.sample(rng)
        key = space.to_string(arch)
        if key in seen or not acceptable(space, arch, limits):
            continue
        seen[key] = _evaluate(space, arch, evaluate, on_candidate)
    _warn_if_short(len(seen), budget, limits)
    return list(seen.values())


def evolution_search(
    space: Any,
    budget: int,
    evaluate: Evaluate,
    rank: Rank,
    rng: random.Random,
    limits: CostLimits = CostLimits(),
    population_size: int = DEFAULT_POPULATION_SIZE,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    on_candidate: Optional[Callable[[Candidate], None]] = None,
) -> List[Candidate]:
    """Regularised evolution (Real et al., AAAI 2019) over distinct architectures.

    The population starts with random architectures. Each step draws `sample_size` members,
    mutates the fittest of them, scores the child and removes the oldest member (age-based
    removal). Fitness is `rank` over every candidate scored so far, so that a population-level
    aggregate compares each member with the whole history. A child that breaks the limits, is
    degenerate or was scored before is mutated again; after too many tries a random
    architecture is drawn instead.
    """
    _check_budget(budget)
    if population_size < 2:
        raise EdgeNasError(f"the evolution population must hold at least 2 architectures, got {population_size}")
    if not 1 <= sample_size <= population_size:
        raise EdgeNasError(f"the evolution sample size must be between 1 and the population size, got {sample_size}")
    population_size = min(population_size, budget)
    sample_size = min(sample_size, population_size)

    history: List[Candidate] = random_search(space, population_size, evaluate, rng, limits, on_candidate)
    seen = {space.to_string(c.arch) for c in history}
    population: Deque[Candidate] = collections.deque(history)
    sample_size = min(sample_size, len(population))
    if sample_size == 0:
        return history
    draws = 0
    while len(history) < budget and draws < budget * MAX_DRAWS_PER_CANDIDATE:
        fitness = _fitness_by_identity(history, rank)
        tournament = rng.sample(list(population), sample_size)
        parent = max(tournament, key=lambda c: fitness[id(c)])
        child = None
        for _ in range(MAX_DRAWS_PER_CANDIDATE):
            draws += 1
            arch = space.mutate(parent.arch, rng)
            if space.to_string(arch) not in seen and acceptable(space, arch, limits):
                child = arch
                break
        if child is None:
            child = _unseen_sample(space, rng, limits, seen)
            if child is None:
                break
        candidate = _evaluate(space, child, evaluate, on_candidate)
        seen.add(space.to_string(child))
        history.append(candidate)
        population.append(candidate)
        population.popleft()
    _warn_if_short(len(history), budget, limits)
    return history


def run_search(
    strategy: str,
    space: Any,
    budget: int,
    evaluate: Evaluate,
    rank: Rank,
    rng: random.Random,
    limits: CostLimits = CostLimits(),
    on_candidate: Optional[Callable[[Candidate], None]] = None,
    **strategy_options: Any,
) -> List[Candidate]:
    """Run the strategy named `random` or `evolution`; options go to the strategy."""
    limits.check(space)
    if strategy == "random":
        return random_search(space, budget, evaluate, rng, limits, on_candidate)
    if strategy == "evolution":
        return evolution_search(space, budget, evaluate, rank, rng, limits, on_candidate=on_candidate, **strategy_options)
    raise EdgeNasError(f"unknown search strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")


def _evaluate(space: Any, arch: Any, evaluate: Evaluate, on_candidate: Optional[Callable[[Candidate], None]]) -> Candidate:
    candidate = Candidate(arch=arch, params=space.params(arch), flops=space.flops(arch), results=evaluate(arch))
    if on_candidate is not None:
        on_candidate(candidate)
    return candidate


def _fitness_by_identity(history: Sequence[Candidate], rank: Rank) -> Dict[int, float]:
    scores = rank(history)
    # An invalid score (NaN) loses every tournament it enters.
    return {id(c): (s if not math.isnan(s) else -math.inf) for c, s in zip(history, scores)}


def _unseen_sample(space: Any, rng: random.Random, limits: CostLimits, seen: set) -> Optional[Any]:
    for _ in range(MAX_DRAWS_PER_CANDIDATE):
        arch = sample_within(space, rng, limits)
        if space.to_string(arch) not in seen:
            return arch
    return None


def _check_budget(budget: int) -> None:
    if budget < 1:
        raise EdgeNasError(f"the search budget (--budget) must be at least 1, got {budget}")


def _warn_if_short(found: int, budget: int, limits: CostLimits) -> None:
    if found < budget:
        logger.warning(
            "found only %d distinct architectures within the limits %s, fewer than the budget %d",
            found, limits.describe(), budget,
        )
