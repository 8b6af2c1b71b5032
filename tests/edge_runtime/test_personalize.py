"""personalize(): the whole pipeline on real images, its outputs, resuming, interrupts and the final choice."""
from __future__ import annotations

import json
import math
import sqlite3

import numpy as np
import onnx
import pytest
import torch

from edge_runtime.latency import LatencyResult
from edge_runtime.measure import MeasureSettings
from edge_runtime.personalize import Finalist, Limits, choose_finalist, personalize
from edge_runtime.proxy_ranking import default_ranking
from edge_runtime.power import PowerSummary, SysfsPowerMeter, UnavailableMeter
from models.aggregation import Aggregator
from models.errors import EdgeNasError
from models.proxies import ProxyResult
from models.proxies._context import build_seeded
from models.spaces import get_space

FAST = MeasureSettings(warmup_runs=1, runs=5)
SUBNET_FIELDS = (
    "architecture", "proxies", "score", "forward_score", "measurements", "constraints", "preprocessing",
    "data_hash", "seeds", "code_version", "stage_seconds", "gradient_source", "finalists", "aggregation",
)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    result = personalize(
        "sklearn-digits", folder / "out", budget=6, finalists=2, batch_size=16, seed=0,
        cache=folder / "cache.sqlite", progress=False, measure=FAST,
    )
    return folder, result


def test_subnet_json_holds_fields(digits_run):
    _, result = digits_run
    subnet = json.loads((result.out_dir / "subnet.json").read_text())
    for key in SUBNET_FIELDS:
        assert key in subnet, key
    assert subnet["architecture"] == result.chosen.arch
    assert subnet["gradient_source"] == "local"
    ranking = default_ranking()
    assert set(subnet["proxies"]) == set(ranking.forward_proxies + ranking.gradient_proxies)
    assert all(entry["valid"] for entry in subnet["proxies"].values())
    latency = subnet["measurements"]["latency"]
    assert latency["p50_ms"] <= latency["p90_ms"]
    assert latency["execution_provider"] == "CPUExecutionProvider"
    assert subnet["measurements"]["power"]["available"] is False
    assert "reason" in subnet["measurements"]["power"]
    preprocessing = subnet["preprocessing"]
    assert preprocessing["size"] == [32, 32]
    assert len(preprocessing["mean"]) == 3
    assert len(preprocessing["std"]) == 3
    assert subnet["seeds"]["search"] == 0
    assert len(subnet["finalists"]) == 2
    assert set(subnet["stage_seconds"]) >= {"load", "search", "gradient_proxies", "measurement", "write"}


def test_written_model_is_chosen_network(digits_run):
    import onnxruntime as ort

    _, result = digits_run
    path = result.out_dir / "model.onnx"
    onnx.checker.check_model(onnx.load(str(path)))
    space = get_space("nb201", num_classes=10)
    network = build_seeded(lambda: space.build(space.parse(result.chosen.arch)), 0).eval()
    inputs = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = network(inputs).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {"input": inputs.numpy()})
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


def test_report_and_plot_written(digits_run):
    _, result = digits_run
    report = (result.out_dir / "report.md").read_text()
    assert result.chosen.arch.replace("|", "\\|") in report
    assert "(score_vs_latency.png)" in report
    assert (result.out_dir / "score_vs_latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    leftovers = [p.name for p in result.out_dir.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no temporary file of the atomic writes remains


def test_rerun_resumes_from_cache(digits_run, tmp_path, monkeypatch):
    folder, first = digits_run

    def fail(*args, **kwargs):
        raise AssertionError("a rerun with the same inputs must read every score from the cache")

    monkeypatch.setattr("edge_runtime.scoring.score_architecture", fail)
    # A calibrated aggregator with equal weights ranks like the label-free one.
    aggregator = tmp_path / "aggregator.json"
    Aggregator(name="fgnas", space="nb201").save(aggregator)
    second = personalize(
        "sklearn-digits", tmp_path / "again", budget=6, finalists=2, batch_size=16, seed=0,
        cache=folder / "cache.sqlite", progress=False, measure=FAST, aggregator=aggregator,
    )
    assert second.chosen.arch == first.chosen.arch
    assert second.subnet["aggregation"]["aggregator"] == str(aggregator)


def test_power_measured_from_sysfs(digits_run, tmp_path):
    folder, first = digits_run
    hwmon = tmp_path / "sys" / "class" / "hwmon" / "hwmon1"
    hwmon.mkdir(parents=True)
    for name, text in {"name": "ina3221", "in1_label": "VDD_IN", "in1_input": "5000", "curr1_input": "1000"}.items():
        (hwmon / name).write_text(text)
    meter = SysfsPowerMeter.discover(tmp_path / "sys")
    result = personalize(
        "sklearn-digits", tmp_path / "out", budget=6, finalists=2, batch_size=16, max_power_w=10.0,
        cache=folder / "cache.sqlite", progress=False, power_meter=meter,
        measure=MeasureSettings(warmup_runs=1, runs=5, min_power_seconds=0.05, power_interval_s=0.01),
    )
    measurements = result.subnet["measurements"]
    assert measurements["power"]["available"] is True
    assert measurements["power"]["total_w"] == pytest.approx(5.0)  # 5000 mV x 1000 mA
    mean_ms = measurements["latency"]["mean_ms"]
    assert measurements["energy_per_inference_mj"] == pytest.approx(5.0 * mean_ms)


def test_interrupt_keeps_scored_candidates(tmp_path, monkeypatch):
    import edge_runtime.scoring as scoring

    real = scoring.score_architecture
    calls = []

    def interrupt_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "score_architecture", interrupt_third)
    cache = tmp_path / "cache.sqlite"
    with pytest.raises(KeyboardInterrupt):
        personalize("sklearn-digits", tmp_path / "out", budget=5, finalists=1, batch_size=8,
                    cache=cache, progress=False, measure=FAST)
    assert not (tmp_path / "out" / "subnet.json").exists()
    with sqlite3.connect(str(cache)) as connection:
        archs = connection.execute("SELECT COUNT(DISTINCT arch) FROM scores").fetchone()[0]
    assert archs == 2


def test_power_limit_without_meter_raises(tmp_path):
    with pytest.raises(EdgeNasError) as error:
        personalize("sklearn-digits", tmp_path / "out", max_energy_mj=3.0, power_meter=UnavailableMeter("no sensor"))
    assert "--max-energy-mj" in str(error.value)
    assert "cannot be measured" in str(error.value)
    assert "no sensor" in str(error.value)


def _latency(p50: float) -> LatencyResult:
    return LatencyResult(p50, p50 * 1.1, p50, p50 * 0.9, p50 * 1.2, 5, 1, 1, "CPUExecutionProvider",
                         ("CPUExecutionProvider",), "test")


def _power(watts: float, energy: float) -> PowerSummary:
    return PowerSummary("fake", {"VDD_IN": watts}, watts, "rail VDD_IN", 2, 0.1, energy)


def _finalist(name: str, score: float, p50: float, watts=None, energy=None, forward: float = 0.0) -> Finalist:
    return Finalist(arch=name, params=1, flops=1, proxies={"params": ProxyResult.ok(1.0)}, forward_score=forward,
                    score=score, latency=_latency(p50), power=_power(watts, energy) if watts is not None else None)


def test_choice_takes_best_score_within_latency():
    finalists = [_finalist("a", -0.1, 9.0), _finalist("b", -0.5, 2.0), _finalist("c", -0.9, 1.0)]
    chosen = choose_finalist(finalists, Limits(max_latency_ms=5.0))
    assert chosen.arch == "b"
    assert finalists[0].limit_failures == ["latency"]


def test_choice_without_valid_score_uses_forward_score():
    finalists = [_finalist("a", math.nan, 1.0, forward=-2.0), _finalist("b", math.nan, 1.0, forward=-1.0)]
    assert choose_finalist(finalists, Limits()).arch == "b"


def test_no_finalist_meets_latency_names_fastest():
    finalists = [_finalist("a", 0.0, 3.25), _finalist("b", -1.0, 2.5)]
    with pytest.raises(EdgeNasError) as error:
        choose_finalist(finalists, Limits(max_latency_ms=1.0))
    message = str(error.value)
    assert "2.500 ms" in message
    assert "--max-latency-ms" in message


def test_no_finalist_meets_power_names_lowest():
    finalists = [_finalist("a", 0.0, 1.0, watts=7.5, energy=7.5), _finalist("b", -1.0, 1.0, watts=6.25, energy=6.25)]
    with pytest.raises(EdgeNasError, match="6.250 W"):
        choose_finalist(finalists, Limits(max_power_w=5.0))
    with pytest.raises(EdgeNasError, match="6.250 mJ"):
        choose_finalist(finalists, Limits(max_energy_mj=1.0))


def test_cache_key_includes_width_mult():
    from edge_runtime.scoring import ScoringProtocol

    plain = ScoringProtocol("nb201", 10, 32, "hash", 8, 0)
    narrow = ScoringProtocol("mobilenetv2", 10, 32, "hash", 8, 0, space_options={"width_mult": 0.35})
    wide = ScoringProtocol("mobilenetv2", 10, 32, "hash", 8, 0, space_options={"width_mult": 1.0})
    assert "space_options" not in plain.key_for("params")
    assert narrow.key_for("params") != wide.key_for("params")


def test_cache_key_follows_proxy_revision(monkeypatch):
    from dataclasses import replace

    from edge_runtime.scoring import ScoringProtocol
    from models.proxies import _registry

    protocol = ScoringProtocol("nb201", 10, 32, "hash", 8, 0)
    first = protocol.key_for("naswot")
    assert "revision" not in first
    monkeypatch.setitem(_registry._PROXIES, "naswot", replace(_registry._PROXIES["naswot"], revision=2))
    assert protocol.key_for("naswot") != first
    assert '"revision":2' in protocol.key_for("naswot")


class FakeCloudSource:
    """A gradient source that only reports a received aggregator."""

    name = "cloud"

    def __init__(self, received):
        self.received = received
        self.fetched = []

    def fetch_aggregator(self, space):
        self.fetched.append(space)
        return self.received


def test_received_aggregator_used_or_skipped(tmp_path):
    from edge_runtime.personalize import _load_aggregator
    from models.aggregation import label_free_aggregator

    ranking = default_ranking()
    good = tmp_path / "nb201.json"
    Aggregator(name="fgnas", space="nb201").save(good)
    wrong_aggregate = tmp_path / "forward.json"
    label_free_aggregator("fgnas-forward").save(wrong_aggregate)

    loaded, record = _load_aggregator(ranking, None, "nb201", FakeCloudSource((good, {"version": 3})))
    assert loaded is not None
    assert record["source"] == "cloud"
    assert record["file"] == str(good)
    assert record["received"]["version"] == 3

    loaded, record = _load_aggregator(ranking, None, "nb201", FakeCloudSource((wrong_aggregate, {"version": 4})))
    assert loaded is None
    assert record["source"] == "label-free"

    loaded, record = _load_aggregator(ranking, None, "nb201", FakeCloudSource(None))
    assert loaded is None
    assert record["source"] == "label-free"

    # A file given by the caller wins, and the cloud is not asked.
    source = FakeCloudSource((wrong_aggregate, {"version": 5}))
    loaded, record = _load_aggregator(ranking, good, "nb201", source)
    assert record == {"source": "file", "file": str(good), "received": None}
    assert source.fetched == []
