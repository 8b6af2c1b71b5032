"""Helpers of the correlation and short-training benchmarks: option variants, aggregate rows, augmentation, intervals."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import nb201_correlation  # noqa: E402  (tools/ is not a package)
import short_training  # noqa: E402

from models.aggregation import label_free_aggregator  # noqa: E402


def test_variants_parse_numbers_and_none():
    variants = nb201_correlation.parse_variants("fc_r0.4=fgnas_fc:r=0.4, exact=fgnas_fc:pca_dim=none:importance=term")
    assert [v.label for v in variants] == ["fc_r0.4", "exact"]
    assert variants[0].options == (("r", 0.4),)
    assert variants[1].options == (("pca_dim", None), ("importance", "term"))


def test_variant_without_proxy_rejected():
    with pytest.raises(SystemExit, match="LABEL=PROXY"):
        nb201_correlation.parse_variants("lonely")


def test_aggregate_rows_swap_variant_column():
    variants = nb201_correlation.parse_variants("fc_r1=fgnas_fc:r=1.0,zico_x=zico")
    rows = dict(nb201_correlation._aggregate_rows(["fgnas"], variants, ablations=True))
    assert list(rows) == ["fgnas", "fgnas -FP", "fgnas -GP", "fgnas -NL", "fgnas with fc_r1"]
    assert dict(rows["fgnas with fc_r1"].sources)["fgnas_fc"] == "fc_r1"
    assert "fgnas_fc" not in dict(rows["fgnas -FP"].sources)


def test_swapped_aggregate_equals_renamed_columns():
    rng = np.random.default_rng(3)
    columns = {name: list(rng.normal(size=40)) for name in ("fgnas_fc", "fgnas_gi", "fgnas_gc", "params")}
    columns["fc_r1"] = list(rng.normal(size=40))
    rows = dict(nb201_correlation._aggregate_rows(["fgnas"], nb201_correlation.parse_variants("fc_r1=fgnas_fc:r=1.0"), False))
    swapped = nb201_correlation._aggregate(rows["fgnas with fc_r1"], columns, 40)
    renamed = dict(columns, fgnas_fc=columns["fc_r1"])
    expected = label_free_aggregator("fgnas").score({k: np.array(renamed[k]) for k in renamed if k != "fc_r1"}).scores
    assert np.allclose(swapped, expected)


def test_augment_keeps_shape_and_content():
    batch = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8) + 1.0
    out = short_training.augment(batch, torch.Generator().manual_seed(0))
    assert out.shape == batch.shape
    for image, source in zip(out, batch):
        # Every kept pixel comes from the source image (possibly mirrored); the rest is the zero padding.
        pixels = set(image[image != 0].tolist())
        assert pixels <= set(source.flatten().tolist())
        assert len(pixels) >= 3 * 4 * 4  # A crop keeps at least half of each side.


def test_augment_crop_is_a_shifted_window():
    batch = torch.randn(16, 1, 6, 6)
    out = short_training.augment(batch, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(batch, (4, 4, 4, 4))
    for image, source in zip(out, padded):
        windows = [source[:, y:y + 6, x:x + 6] for y in range(9) for x in range(9)]
        assert any(torch.equal(image, w) or torch.equal(image, w.flip(2)) for w in windows)


def test_bootstrap_interval_contains_point_value():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=30)
    values = list(truth + rng.normal(scale=0.5, size=30))
    rho = stats.spearmanr(values, truth)[0]
    low, high = short_training.bootstrap_interval([values], list(truth), True, 2000, seed=0)
    assert low < rho < high
    assert high - low < 0.5


def test_bootstrap_interval_follows_direction():
    truth = list(range(20))
    low, high = short_training.bootstrap_interval([[-t for t in truth]] * 2, truth, False, 500, seed=0)
    assert low == pytest.approx(1.0)
    assert high == pytest.approx(1.0)


def test_trained_record_skips_cut_line(tmp_path):
    path = tmp_path / "run.trained.jsonl"
    short_training.append_record(path, {"arch": "a", "settings": "k1", "accuracy": 50.0})
    short_training.append_record(path, {"arch": "b", "settings": "k2", "accuracy": 40.0})
    with path.open("a") as handle:
        handle.write(json.dumps({"arch": "c", "settings": "k1"})[:10])
    done = short_training.load_trained(path, "k1")
    assert list(done) == ["a"]


def test_tenas_rank_sum_keeps_invalid_empty():
    values = nb201_correlation._tenas_rank([-3.0, None, -1.0, -2.0], [5.0, 9.0, 4.0, 6.0])
    assert values[1] is None
    assert values[0] == pytest.approx(1.0 + 2.0)
    assert values[2] == pytest.approx(3.0 + 1.0)
    assert values[3] == pytest.approx(2.0 + 3.0)


def test_sweep_points_grouped_by_kind():
    import plot_sweep

    table = [
        {"dataset": "cifar10", "proxy": "fc_r0.4", "rho_mean": 0.6, "rho_sd": 0.01},
        {"dataset": "cifar10", "proxy": "fc_r0.2", "rho_mean": 0.7, "rho_sd": 0.02},
        {"dataset": "cifar10", "proxy": "fgnas with fc_r0.2", "rho_mean": 0.9, "rho_sd": 0.0},
        {"dataset": "cifar10", "proxy": "fgnas_fc", "rho_mean": 0.5, "rho_sd": 0.0},
    ]
    series = plot_sweep.collect(table, "fc_r")
    assert series[("cifar10", "alone")] == [(0.2, 0.7, 0.02), (0.4, 0.6, 0.01)]
    assert series[("cifar10", "fgnas")] == [(0.2, 0.9, 0.0)]
    assert len(series) == 2
