"""Inference latency of an ONNX model with onnxruntime: warm-up runs, then timed runs.

The execution provider is the best one the installed onnxruntime offers, in the order
TensorRT, CUDA, CPU, and the result records the provider that the session actually used.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from models.errors import EdgeNasError

logger = logging.getLogger(__name__)

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
PROVIDER_PREFERENCE: Tuple[str, ...] = (TENSORRT, CUDA, CPU)

DEFAULT_WARMUP_RUNS = 10
DEFAULT_TIMED_RUNS = 50

MISSING_ONNXRUNTIME = (
    "onnxruntime is not installed, so latency cannot be measured; install the package `onnxruntime` "
    "(pip install 'edge-nas[cpu]') or, on a GPU or Jetson, `onnxruntime-gpu` "
    "(pip install 'edge-nas[gpu]', or NVIDIA's wheel for your JetPack)"
)


@dataclass(frozen=True)
class LatencyResult:
    """Per-inference wall time of the timed runs, in milliseconds, and how it was measured."""

    p50_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    runs: int
    warmup_runs: int
    threads: int
    execution_provider: str
    session_providers: Tuple[str, ...]
    onnxruntime_version: str
    samples_ms: Tuple[float, ...] = field(default=(), repr=False)

    def describe(self) -> Dict[str, Any]:
        return {
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "mean_ms": self.mean_ms,
            "min_ms": self.min_ms,
            "max_ms": self.max_ms,
            "runs": self.runs,
            "warmup_runs": self.warmup_runs,
            "intra_op_threads": self.threads,
            "execution_provider": self.execution_provider,
            "session_providers": list(self.session_providers),
            "onnxruntime_version": self.onnxruntime_version,
        }


def import_onnxruntime():
    """Import onnxruntime, or raise EdgeNasError naming the packages that provide it."""
    try:
        import onnxruntime
    except ImportError:
        raise EdgeNasError(MISSING_ONNXRUNTIME) from None
    return onnxruntime


def preferred_providers(available: Sequence[str]) -> List[str]:
    """Return the providers to request, best first, from those available, with the CPU provider always last."""
    chosen = [name for name in PROVIDER_PREFERENCE if name in available]
    if CPU not in chosen:
        chosen.append(CPU)
    return chosen


def default_thread_count() -> int:
    """Count the CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def create_session(
    model: Union[str, Path, bytes],
    *,
    threads: int,
    providers: Optional[Sequence[str]] = None,
):
    """Open an inference session with a fixed intra-op thread count and sequential execution.

    When the preferred providers fail to start (for example a TensorRT library missing on
    a desktop GPU), the session is opened again on the CPU provider alone and a warning is logged.
    """
    ort = import_onnxruntime()
    if threads < 1:
        raise EdgeNasError(f"the thread count must be at least 1, got {threads}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: onnxruntime's warnings would break the progress display
    requested = list(providers) if providers is not None else preferred_providers(ort.get_available_providers())
    source = str(model) if isinstance(model, Path) else model
    try:
        return ort.InferenceSession(source, sess_options=options, providers=requested)
    except Exception as error:  # onnxruntime raises its own exception types, which differ by version
        if requested == [CPU]:
            raise EdgeNasError(f"onnxruntime cannot load the model: {error}") from None
        logger.warning("onnxruntime providers %s failed to start (%s); measuring on the CPU provider", requested, error)
        return ort.InferenceSession(source, sess_options=options, providers=[CPU])


def measure_latency(
    model: Union[str, Path, bytes],
    *,
    warmup_runs: int = DEFAULT_WARMUP_RUNS,
    runs: int = DEFAULT_TIMED_RUNS,
    min_seconds: float = 0.0,
    threads: Optional[int] = None,
    providers: Optional[Sequence[str]] = None,
    seed: int = 0,
    during_timing: Optional[ContextManager[Any]] = None,
) -> LatencyResult:
    """Time single-image inference of an ONNX model.

    After `warmup_runs` untimed runs (TensorRT builds its engine during the first), the model
    runs at least `runs` times and for at least `min_seconds`. The time floor gives a power
    meter enough readings: `during_timing` is entered around the timed runs only. The input is
    Gaussian noise drawn with `seed`, in the shape the model declares.
    """
    if runs < 1:
        raise EdgeNasError(f"the number of timed runs must be at least 1, got {runs}")
    if warmup_runs < 0:
        raise EdgeNasError(f"the number of warm-up runs must not be negative, got {warmup_runs}")
    ort = import_onnxruntime()
    threads = threads or default_thread_count()
    session = create_session(model, threads=threads, providers=providers)
    feed = {session.get_inputs()[0].name: _example_input(session, seed)}
    output_names = [session.get_outputs()[0].name]

    for _ in range(warmup_runs):
        session.run(output_names, feed)

    samples: List[float] = []
    with during_timing if during_timing is not None else contextlib.nullcontext():
        started = time.perf_counter()
        while len(samples) < runs or time.perf_counter() - started < min_seconds:
            start = time.perf_counter()
            session.run(output_names, feed)
            samples.append((time.perf_counter() - start) * 1000.0)

    values = np.asarray(samples, dtype=np.float64)
    used = tuple(session.get_providers())
    return LatencyResult(
        p50_ms=float(np.percentile(values, 50)),
        p90_ms=float(np.percentile(values, 90)),
        mean_ms=float(values.mean()),
        min_ms=float(values.min()),
        max_ms=float(values.max()),
        runs=len(samples),
        warmup_runs=warmup_runs,
        threads=threads,
        execution_provider=used[0] if used else CPU,
        session_providers=used,
        onnxruntime_version=str(ort.__version__),
        samples_ms=tuple(samples),
    )


def _example_input(session: Any, seed: int) -> np.ndarray:
    declared = session.get_inputs()[0].shape
    # A symbolic dimension (a string or None) is taken as 1: one image per inference.
    shape = [dim if isinstance(dim, int) and dim > 0 else 1 for dim in declared]
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
