"""Measure one architecture on this machine: build it, export it to ONNX, time it and read power while it runs."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Tuple

from edge_runtime.export import export_onnx
from edge_runtime.latency import DEFAULT_TIMED_RUNS, DEFAULT_WARMUP_RUNS, LatencyResult, measure_latency
from edge_runtime.power import DEFAULT_SAMPLE_INTERVAL_S, PowerMeter, PowerSampler, PowerSummary
from models.proxies._context import build_seeded

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MeasureSettings:
    """Timing settings for each finalist. `threads` None means every CPU this process may use."""

    warmup_runs: int = DEFAULT_WARMUP_RUNS
    runs: int = DEFAULT_TIMED_RUNS
    threads: Optional[int] = None
    # With a power meter, the timed runs last at least this long so the sampler collects
    # about min_power_seconds / interval readings (20 at the defaults).
    min_power_seconds: float = 1.0
    power_interval_s: float = DEFAULT_SAMPLE_INTERVAL_S


def measure_finalist(
    space: Any,
    arch: Any,
    seed: int,
    onnx_path: Path,
    meter: PowerMeter,
    settings: MeasureSettings = MeasureSettings(),
) -> Tuple[LatencyResult, Optional[PowerSummary]]:
    """Export the seeded network of `arch` to `onnx_path`, then time it and, where possible, read power.

    Returns the latency and the power summary, which is None when the meter is unavailable.
    """
    network = build_seeded(lambda: space.build(arch), seed)
    export_onnx(network, onnx_path, space.input_size)
    del network

    sampler = PowerSampler(meter, settings.power_interval_s) if meter.available else None
    latency = measure_latency(
        onnx_path,
        warmup_runs=settings.warmup_runs,
        runs=settings.runs,
        min_seconds=settings.min_power_seconds if sampler is not None else 0.0,
        threads=settings.threads,
        seed=seed,
        during_timing=sampler,
    )
    power = sampler.summary(mean_latency_ms=latency.mean_ms) if sampler is not None else None
    return latency, power
