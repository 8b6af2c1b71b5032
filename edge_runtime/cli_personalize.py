"""`edge-nas personalize`: search, measure and export one subnet for the user's own images."""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import click

from cloud_sync.client import DEFAULT_TIMEOUT_S as DEFAULT_CLOUD_TIMEOUT_S
from cloud_sync.client import BrokerSettings, CloudGradientSource
from cloud_sync.protocol import SHARE_POLICIES, SHARE_SUMMARY
from edge_runtime.cli_common import broker_login_options, echo_json, parse_count
from edge_runtime.personalize import DEFAULT_BATCH_SIZE, DEFAULT_BUDGET, DEFAULT_FINALISTS, PersonalizeResult
from edge_runtime.report import describe_aggregator
from edge_runtime.search import STRATEGIES
from models.errors import EdgeNasError

logger = logging.getLogger(__name__)


@click.command("personalize")
@click.option("--data", "data", required=True, metavar="PATH|SAMPLE",
              help="Your images: an .npz file (x: uint8 NHWC, y: labels), a folder with one sub-folder per class, "
                   "or a built-in sample such as sklearn-digits.")
@click.option("--space", default="nb201", show_default=True,
              help="Search space: nb201, mobilenetv2, autoformer-tiny, autoformer-small or autoformer-base.")
@click.option("--input-size", type=int, metavar="PIXELS",
              help="Network input resolution (default: the space's own, 32 for nb201 and 224 for the others); "
                   "images of another size are resized to it.")
@click.option("--width-mult", type=float, metavar="X",
              help="Width multiplier of mobilenetv2, scaling every layer's channels (default 1.0).")
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
@click.option("--aggregator", metavar="FILE",
              help="Calibrated aggregator file. Without it, the last aggregator received from the cloud "
                   "(with --broker) is used, else the aggregation is label-free.")
@click.option("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, show_default=True,
              help="Images in the probe batch that the proxies read.")
@click.option("--cache", "cache_path", metavar="PATH",
              help="Score cache (SQLite); a rerun with the same inputs resumes from it. "
                   "Default: $EDGE_NAS_CACHE or ~/.cache/edge-nas/scores.sqlite.")
@click.option("--threads", type=int, metavar="N", help="onnxruntime intra-op threads for timing (default: all CPUs usable).")
@click.option("--broker", "broker_url", metavar="URL",
              help="Get the gradient proxies from the cloud coordinators through this MQTT broker: "
                   "mqtt://HOST[:PORT] (default port 1883) or mqtts://HOST[:PORT] (TLS, default 8883). "
                   "Without it they are computed here.")
@click.option("--share", type=click.Choice(SHARE_POLICIES),
              help="What the cloud gets of your images: none (it uses its own probe data), summary "
                   "(channel statistics, a PCA basis and the label histogram; the default) or raw (up to 64 images).")
@click.option("--cloud-timeout", type=float, metavar="SECONDS",
              help=f"How long to wait for the cloud's gradient proxies before computing them here "
                   f"(default {DEFAULT_CLOUD_TIMEOUT_S:g} s).")
@click.option("--device-id", metavar="NAME", help="This device's id and MQTT client id (default: the host name).")
@broker_login_options
@click.option("--state-dir", metavar="DIR",
              help="Folder for the cloud outbox and the last aggregator received (default: $EDGE_NAS_CLOUD_STATE, "
                   "else $XDG_CACHE_HOME/edge-nas/cloud or ~/.cache/edge-nas/cloud).")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
def personalize(
    data: str,
    space: str,
    input_size: Optional[int],
    width_mult: Optional[float],
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
    broker_url: Optional[str],
    share: Optional[str],
    cloud_timeout: Optional[float],
    device_id: Optional[str],
    username: Optional[str],
    password_file: Optional[str],
    ca_file: Optional[str],
    state_dir: Optional[str],
    as_json: bool,
) -> None:
    """Find the subnet that suits your images and this device, measure it and export it.

    Scores --budget candidates with forward-only proxies on your images, computes gradient
    proxies for the best --finalists, measures each finalist's latency (and power on a Jetson)
    with onnxruntime, and writes the best one that meets every limit to --out. Progress goes
    to stderr, the summary to stdout.

    With --broker, the gradient proxies come from the cloud coordinators, and without
    --aggregator the last aggregator received from the cloud weights the proxies. When no
    broker is reachable or no result arrives within --cloud-timeout, the proxies are computed
    here and subnet.json records gradient_source "local".
    """
    from edge_runtime.measure import MeasureSettings
    from edge_runtime.personalize import personalize as run_personalize

    try:
        for option, value in (("--max-latency-ms", max_latency_ms), ("--max-power-w", max_power_w),
                              ("--max-energy-mj", max_energy_mj)):
            _check_positive(option, value)
        if threads is not None and threads < 1:
            raise EdgeNasError(f"--threads must be at least 1, got {threads}")
        cloud_options = (("--share", share), ("--cloud-timeout", cloud_timeout), ("--device-id", device_id),
                         ("--username", username), ("--password-file", password_file), ("--ca-file", ca_file),
                         ("--state-dir", state_dir))
        gradient_source = None
        if broker_url:
            gradient_source = cloud_gradient_source(
                broker_url, share=share, timeout_s=cloud_timeout, device_id=device_id, username=username,
                password_file=password_file, ca_file=ca_file, state_dir=state_dir,
            )
        else:
            _check_no_cloud_options(cloud_options)
        result = run_personalize(
            data,
            out_dir,
            space=space,
            input_size=input_size,
            width_mult=width_mult,
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
            gradient_source=gradient_source,
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


def _check_no_cloud_options(options: Sequence[Tuple[str, Any]]) -> None:
    given = [option for option, value in options if value is not None]
    if given:
        verb = "applies" if len(given) == 1 else "apply"
        raise EdgeNasError(f"{', '.join(given)} {verb} only with --broker; add --broker mqtt://HOST:PORT or remove them")


def cloud_gradient_source(
    broker_url: str,
    *,
    share: Optional[str],
    timeout_s: Optional[float],
    device_id: Optional[str],
    username: Optional[str],
    password_file: Optional[str],
    ca_file: Optional[str],
    state_dir: Optional[str],
) -> CloudGradientSource:
    """Build the cloud gradient source of --broker; bad settings raise EdgeNasError before the search starts."""
    _check_positive("--cloud-timeout", timeout_s)
    settings = BrokerSettings(broker_url, username=username, password_file=password_file, ca_file=ca_file)
    return CloudGradientSource(
        settings,
        device_id=device_id,
        state_dir=state_dir,
        share=share or SHARE_SUMMARY,
        timeout_s=DEFAULT_CLOUD_TIMEOUT_S if timeout_s is None else timeout_s,
    )


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
        f"  gradient proxies: {_gradient_source_text(subnet)}",
        f"  aggregator: {describe_aggregator(subnet['aggregation'])}",
        f"wrote {', '.join(str(path) for path in result.files.values())}",
        f"time per stage: {stages}",
    ]
    return "\n".join(lines)


def _gradient_source_text(subnet: Dict[str, Any]) -> str:
    details = subnet.get("gradient_source_details") or {}
    if subnet["gradient_source"] == "cloud" and details.get("coordinator"):
        return f"cloud (coordinator {details['coordinator']}, round trip {details.get('round_trip_s', 0.0):.1f} s)"
    if details.get("fallback_reason"):
        return f"local, after the cloud fallback: {details['fallback_reason']}"
    return str(subnet["gradient_source"])
