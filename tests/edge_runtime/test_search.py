"""Search strategies: limits from the encoding, seeded sampling, and regularised evolution."""
from __future__ import annotations

import random
import statistics

import pytest

from edge_runtime.search import CostLimits, evolution_search, random_search, run_search, sample_within
from models.errors import EdgeNasError
from models.spaces import get_space


@pytest.fixture(scope="module")
def space():
    return get_space("nb201", num_classes=10, input_size=32)


class CountingEvaluate:
    """Scores an architecture by its negated parameter count and records every call."""

    def __init__(self, space):
        self.space = space
        self.calls = []

    def __call__(self, arch):
        self.calls.append(arch)
        return {"small": -float(self.space.params(arch))}


def rank_small(candidates):
    return [c.results["small"] for c in candidates]


def test_params_limit_below_space_minimum(space):
    smallest = space.cost_range()["params"][0]
    with pytest.raises(EdgeNasError) as error:
        CostLimits(max_params=smallest - 1).check(space)
    message = str(error.value)
    assert f"{smallest - 1:,}" in message
    assert f"{smallest:,}" in message
    assert "--max-params" in message


def test_flops_limit_below_space_minimum(space):
    smallest = space.cost_range()["flops"][0]
    with pytest.raises(EdgeNasError, match=f"{smallest:,}"):
        CostLimits(max_flops=1000).check(space)


@pytest.mark.parametrize("limits", [CostLimits(max_params=0), CostLimits(max_flops=-5)])
def test_non_positive_limits_raise(space, limits):
    with pytest.raises(EdgeNasError, match="must be positive"):
        limits.check(space)


def test_random_search_respects_limits(space):
    limit = 400_000
    evaluate = CountingEvaluate(space)
    candidates = random_search(space, 30, evaluate, random.Random(0), CostLimits(max_params=limit))
    assert len(candidates) == 30
    assert len({space.to_string(c.arch) for c in candidates}) == 30
    assert all(c.params <= limit for c in candidates)
    assert all(not space.is_degenerate(c.arch) for c in candidates)
    assert all(c.params == space.params(c.arch) and c.flops == space.flops(c.arch) for c in candidates)
    assert len(evaluate.calls) == 30  # only accepted architectures are scored


def test_rejected_archs_never_built(space, monkeypatch):
    def fail_build(arch):
        raise AssertionError("a search strategy must not build networks")

    monkeypatch.setattr(space, "build", fail_build)
    random_search(space, 10, CountingEvaluate(space), random.Random(1), CostLimits(max_flops=50_000_000))


def test_random_search_is_seeded(space):
    first = random_search(space, 10, CountingEvaluate(space), random.Random(7))
    second = random_search(space, 10, CountingEvaluate(space), random.Random(7))
    assert [c.arch for c in first] == [c.arch for c in second]


def test_tight_limit_stops_short(space):
    # At the minimum params only the conv-free cells fit: 3^6 = 729 codes, fewer without the degenerate ones.
    smallest = space.cost_range()["params"][0]
    candidates = random_search(space, 800, CountingEvaluate(space), random.Random(0), CostLimits(max_params=smallest))
    assert 0 < len(candidates) < 729
    assert all(c.params == smallest for c in candidates)


def test_sample_within_respects_limits(space):
    arch = sample_within(space, random.Random(3), CostLimits(max_flops=40_000_000))
    assert space.flops(arch) <= 40_000_000


def test_evolution_scores_budget_distinct(space):
    evaluate = CountingEvaluate(space)
    limits = CostLimits(max_params=800_000)
    candidates = evolution_search(
        space, 40, evaluate, rank_small, random.Random(0), limits, population_size=10, sample_size=3
    )
    assert len(candidates) == 40
    assert len({space.to_string(c.arch) for c in candidates}) == 40
    assert len(evaluate.calls) == 40
    assert all(c.params <= 800_000 for c in candidates)


def test_evolution_is_seeded(space):
    def run():
        return evolution_search(space, 25, CountingEvaluate(space), rank_small, random.Random(4), population_size=8, sample_size=3)

    assert [c.arch for c in run()] == [c.arch for c in run()]


def test_evolution_follows_fitness(space):
    # Fitness rewards fewer parameters: the children of evolution must be smaller than random picks.
    budget = 60
    evolved = evolution_search(space, budget, CountingEvaluate(space), rank_small, random.Random(2), population_size=10, sample_size=5)
    sampled = random_search(space, budget, CountingEvaluate(space), random.Random(2))
    children = evolved[10:]
    assert statistics.mean(c.params for c in children) < statistics.mean(c.params for c in sampled)


def test_run_search_rejects_unknown_strategy(space):
    with pytest.raises(EdgeNasError, match="unknown search strategy"):
        run_search("grid", space, 5, CountingEvaluate(space), rank_small, random.Random(0))


def test_run_search_checks_limits_first(space):
    evaluate = CountingEvaluate(space)
    with pytest.raises(EdgeNasError):
        run_search("random", space, 5, evaluate, rank_small, random.Random(0), CostLimits(max_params=10))
    assert evaluate.calls == []
