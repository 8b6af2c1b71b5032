"""`edge-nas personalize`: search, measure and export one subnet for the user's own images."""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, Optional

import click

from edge_runtime.cli_common import echo_json, parse_count
from edge_runtime.personalize import DEFAULT_BATCH_SIZE, DEFAULT_BUDGET, DEFAULT_FINALISTS, PersonalizeResult
from edge_runtime.search import STRATEGIES
from models.errors import EdgeNasError

logger = logging.getLogger(__name__)


@click.command("personalize")
@click.option("--data", "data", required=True, metavar="PATH|SAMPLE",
              help="Your images: an .npz file (x: uint8 NHWC, y: labels), a folder with one sub-folder per class, "
                   "or a built-in sample such as sklearn-digits.")
@click.option("--space", default="nb201", show_default=True, help="Search space to search.")
@click.option("--out", "out_dir", required=True, metavar="DIR",
              help="Folder for model.onnx, subnet.json, report.md and the plot; created if missing.")
@click.option("--max-params", metavar="N", help="Largest parameter count; k/M/G suffixes allowed (800k, 3M).")
@click.option("--max-flops", metavar="N", help="Largest FLOPs (multiply-adds); k/M/G suffixes allowed (450M).")
@click.option("--max-latency-ms", type=float, metavar="MS", help="Largest p50 latency of one image, in milliseconds.")
@click.option("--max-power-w", type=float, metavar="W", help="Largest mean board power while the model runs, in watts.")
@click.option("--max-energy-mj", type=float, metavar="MJ", help="Largest energy per inference, in millijoules.")
@click.option("--budget", type=int, default=DEFAULT_BUDGET, show_default=True, help="Number of candidates scored.")
@click.option("--finalists", type=int, default=DEFAULT_FINALISTS, show_default=True,
              help="Number of best candidates that get gradient proxies and are measured.")
@click.option("--search", "strategy", type=click.Choice(STRATEGIES), default="random", show_default=True,
              help="Search strategy: uniform random sampling or regularised evolution.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the search, the network weights and the probe batch.")
@click.option("--aggregator", metavar="FILE", help="Calibrated aggregator file; without it the aggregation is label-free.")
@click.option("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, show_default=True,
              help="Images in the probe batch that the proxies read.")
@click.option("--cache", "cache_path", metavar="PATH",
              help="Score cache (SQLite); a rerun with the same inputs resumes from it. "
                   "Default: $EDGE_NAS_CACHE or ~/.cache/edge-nas/scores.sqlite.")
@click.option("--threads", type=int, metavar="N", help="onnxruntime intra-op threads for timing (default: all CPUs usable).")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
def personalize(
    data: str,
    space: str,
    out_dir: str,
    max_params: Optional[str],
    max_flops: Optional[str],
    max_latency_ms: Optional[float],
    max_power_w: Optional[float],
    max_energy_mj: Optional[float],
    budget: int,
    finalists: int,
    strategy: str,
    seed: int,
    aggregator: Optional[str],
    batch_size: int,
    cache_path: Optional[str],
    threads: Optional[int],
    as_json: bool,
) -> None:
    """Find the subnet that suits your images and this device, measure it and export it.

    Scores --budget candidates with forward-only proxies on your images, computes gradient
    proxies for the best --finalists, measures each finalist's latency (and power on a Jetson)
    with onnxruntime, and writes the best one that meets every limit to --out. Progress goes
    to stderr, the summary to stdout.
    """
    from edge_runtime.measure import MeasureSettings
    from edge_runtime.personalize import personalize as run_personalize

    try:
        for option, value in (("--max-latency-ms", max_latency_ms), ("--max-power-w", max_power_w),
                              ("--max-energy-mj", max_energy_mj)):
            _check_positive(option, value)
        if threads is not None and threads < 1:
            raise EdgeNasError(f"--threads must be at least 1, got {threads}")
        result = run_personalize(
            data,
            out_dir,
            space=space,
            max_params=parse_count(max_params, "--max-params"),
            max_flops=parse_count(max_flops, "--max-flops"),
            max_latency_ms=max_latency_ms,
            max_power_w=max_power_w,
            max_energy_mj=max_energy_mj,
            budget=budget,
            finalists=finalists,
            search=strategy,
            seed=seed,
            aggregator=aggregator,
            batch_size=batch_size,
            cache=cache_path,
            measure=MeasureSettings(threads=threads),
        )
    except EdgeNasError as error:
        click.echo(f"error: {error}", err=True)
        raise SystemExit(1)
    except KeyboardInterrupt:
        click.echo("interrupted; scored candidates are cached, so the same command resumes", err=True)
        raise SystemExit(130)

    if as_json:
        echo_json(result.summary())
    else:
        click.echo(format_summary(result))


def _check_positive(option: str, value: Optional[float]) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise EdgeNasError(f"{option} must be a positive number, got {value:g}")


def format_summary(result: PersonalizeResult) -> str:
    """Format the short human summary printed on stdout."""
    subnet: Dict[str, Any] = result.subnet
    latency = subnet["measurements"]["latency"]
    power = subnet["measurements"]["power"]
    score = subnet["score"]
    if power.get("available"):
        power_text = (f"{power['total_w']:.2f} W, {subnet['measurements']['energy_per_inference_mj']:.3f} mJ "
                      f"per inference ({power['source']})")
    else:
        power_text = f"not measured ({power.get('reason', 'no power meter')})"
    stages = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result.stage_seconds.items())
    lines = [
        f"chosen: {result.chosen.arch}",
        f"  params {result.chosen.params:,}, FLOPs {result.chosen.flops:,}, "
        f"score {score:.4g} among {len(result.finalists)} finalists of {result.candidates_scored} candidates"
        if score is not None else
        f"  params {result.chosen.params:,}, FLOPs {result.chosen.flops:,}, no valid aggregated score",
        f"  latency p50 {latency['p50_ms']:.3f} ms, p90 {latency['p90_ms']:.3f} ms "
        f"({latency['execution_provider']}, {latency['intra_op_threads']} threads)",
        f"  power: {power_text}",
        f"  gradient proxies: {subnet['gradient_source']}",
        f"wrote {', '.join(str(path) for path in result.files.values())}",
        f"time per stage: {stages}",
    ]
    return "\n".join(lines)
