"""onnxruntime latency: percentiles, thread count, provider choice, and the missing-package error."""
from __future__ import annotations

import sys

import pytest
from torch import nn

from edge_runtime.export import export_onnx
from edge_runtime.latency import (
    CPU,
    CUDA,
    TENSORRT,
    measure_latency,
    preferred_providers,
)
from models.errors import EdgeNasError


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    network = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    path = tmp_path_factory.mktemp("latency") / "tiny.onnx"
    export_onnx(network, path, 8)
    return path


def test_latency_reports_percentiles(tiny_model):
    result = measure_latency(tiny_model, warmup_runs=2, runs=20, threads=1)
    assert result.runs == 20
    assert len(result.samples_ms) == 20
    assert 0 < result.min_ms <= result.p50_ms <= result.p90_ms <= result.max_ms
    assert result.min_ms <= result.mean_ms <= result.max_ms
    assert result.threads == 1
    assert result.execution_provider == CPU


def test_latency_runs_for_min_seconds(tiny_model):
    result = measure_latency(tiny_model, warmup_runs=0, runs=1, min_seconds=0.05, threads=1)
    assert result.runs >= 1
    assert sum(result.samples_ms) >= 40.0  # most of the 50 ms window is spent inside run()


def test_latency_enters_context_around_timed_runs(tiny_model):
    events = []

    class Recorder:
        def __enter__(self):
            events.append("enter")

        def __exit__(self, *exc_info):
            events.append("exit")

    measure_latency(tiny_model, warmup_runs=1, runs=3, threads=1, during_timing=Recorder())
    assert events == ["enter", "exit"]


def test_latency_accepts_model_bytes(tiny_model):
    result = measure_latency(tiny_model.read_bytes(), warmup_runs=0, runs=2, threads=1)
    assert result.runs == 2


@pytest.mark.parametrize(
    "available, expected",
    [
        ([CPU], [CPU]),
        ([CUDA, CPU], [CUDA, CPU]),
        (["AzureExecutionProvider", CPU, CUDA, TENSORRT], [TENSORRT, CUDA, CPU]),
        ([], [CPU]),
    ],
)
def test_provider_preference_order(available, expected):
    assert preferred_providers(available) == expected


def test_missing_onnxruntime_names_both_packages(tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    with pytest.raises(EdgeNasError) as error:
        measure_latency(tiny_model, runs=1)
    message = str(error.value)
    assert "`onnxruntime`" in message
    assert "`onnxruntime-gpu`" in message
    assert "edge-nas[cpu]" in message
    assert "edge-nas[gpu]" in message


def test_invalid_run_count_raises(tiny_model):
    with pytest.raises(EdgeNasError, match="at least 1"):
        measure_latency(tiny_model, runs=0)
