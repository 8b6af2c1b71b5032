"""The search-quality benchmark: draws restricted to the development split, and its reference statistics."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from edge_runtime.search import CostLimits, evolution_search, random_search
from models.spaces import get_space

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import search_quality  # noqa: E402  (tools/ is not a package)


@pytest.fixture(scope="module")
def space():
    return get_space("nb201", num_classes=10, input_size=32)


@pytest.fixture(scope="module")
def split(space):
    rng = random.Random(7)
    archs = set()
    while len(archs) < 300:
        arch = space.sample(rng)
        if not space.is_degenerate(arch):
            archs.add(space.to_string(arch))
    return sorted(archs)


def negated_params(space):
    return lambda arch: {"small": -float(space.params(arch))}


def test_random_search_stays_in_split(space, split):
    restricted = search_quality.DevelopmentSplitSpace(space, split)
    candidates = random_search(restricted, 40, negated_params(space), random.Random(0), CostLimits(max_params=500_000))
    texts = [space.to_string(c.arch) for c in candidates]
    assert len(texts) == 40
    assert set(texts) <= set(split)
    assert all(c.params <= 500_000 for c in candidates)


def test_evolution_children_stay_in_split(space, split):
    restricted = search_quality.DevelopmentSplitSpace(space, split)

    def rank(population):
        return [c.results["small"] for c in population]

    candidates = evolution_search(
        restricted, 30, negated_params(space), rank, random.Random(1), population_size=8, sample_size=3
    )
    texts = [space.to_string(c.arch) for c in candidates]
    assert len(texts) == 30
    assert len(set(texts)) == 30
    assert set(texts) <= set(split)


def test_restricted_space_keeps_name(space, split):
    restricted = search_quality.DevelopmentSplitSpace(space, split)
    assert restricted.name == space.name
    assert restricted.cost_range() == space.cost_range()


def test_reference_stats_under_limit(space, split):
    accuracy = {text: float(index) for index, text in enumerate(split)}
    stats = search_quality.reference_stats(space, accuracy, 300_000)
    eligible = [text for text in split if space.params(space.parse(text)) <= 300_000]
    assert stats["eligible"] == len(eligible)
    assert stats["best_accuracy"] == max(accuracy[text] for text in eligible)
    assert search_quality.percentile_of(stats["best_accuracy"], stats) == 100.0


def test_parse_limit_words():
    assert search_quality.parse_limit("none") is None
    assert search_quality.parse_limit("800k") == 800_000
    assert search_quality.limit_label(300_000) == "300k"
    assert search_quality.limit_label(None) == "none"


def test_search_once_runs_the_pipeline(space, split, tmp_path):
    from edge_runtime.data import load_dataset
    from edge_runtime.proxy_ranking import default_ranking
    from edge_runtime.score_cache import ScoreCache
    from edge_runtime.scoring import ScoringProtocol

    accuracy = {text: float(index) for index, text in enumerate(split)}
    restricted = search_quality.DevelopmentSplitSpace(space, split)
    inputs, labels = load_dataset("sklearn-digits").probe_batch(8, seed=0, size=32)
    protocol = ScoringProtocol(space="nb201", num_classes=10, input_size=32, data_hash="digits", batch_size=8, seed=0)
    with ScoreCache(tmp_path / "scores.sqlite") as opened:
        run = search_quality.search_once(restricted, accuracy, inputs, labels, protocol,
                                         search_quality.CountingCache(opened), default_ranking(),
                                         None, 4, 2, "random", 0)
    assert run["candidates"] == 4
    assert run["finalists"] == 2
    assert run["chosen"] in split
    assert run["fresh_rows"] >= 4
