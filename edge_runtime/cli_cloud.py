"""`edge-nas cloud`: commands that run on the cloud side; the coordinator is imported only when one runs."""
from __future__ import annotations

import signal
import threading
from typing import Optional

import click

from edge_runtime.cli_common import broker_login_options
from models.errors import EdgeNasError


@click.group("cloud")
def cloud() -> None:
    """Run the cloud side of edge-nas: coordinators that compute gradient proxies for devices."""


@cloud.command("serve")
@click.option("--broker", "broker_url", required=True, metavar="URL",
              help="MQTT broker: mqtt://HOST[:PORT] (default port 1883) or mqtts://HOST[:PORT] (TLS, default 8883).")
@click.option("--group", default="edge-nas", show_default=True,
              help="Shared-subscription group; the workers of one group split the device requests between them.")
@click.option("--calibration", metavar="FILE",
              help="Calibration CSV (arch, accuracy and proxy columns): fit the aggregator from it, publish it, "
                   "and refit when the file changes.")
@click.option("--data", metavar="PATH|SAMPLE",
              help="Probe images for requests that share no data (.npz, image folder or built-in sample); "
                   "without it such requests get seeded Gaussian inputs.")
@click.option("--id", "coordinator_id", metavar="NAME",
              help="This worker's id, also its MQTT client id (default: coord-<host>-<pid>).")
@click.option("--threads", type=int, metavar="N",
              help="torch intra-op threads of this worker (default: torch's choice); use 1 per worker when "
                   "several workers share a machine.")
@broker_login_options
def serve_command(
    broker_url: str,
    group: str,
    calibration: Optional[str],
    data: Optional[str],
    coordinator_id: Optional[str],
    threads: Optional[int],
    username: Optional[str],
    password_file: Optional[str],
    ca_file: Optional[str],
) -> None:
    """Compute gradient proxies for the devices' finalists until interrupted (Ctrl-C or SIGTERM).

    Logs go to stderr; pass -v to the edge-nas command for one line per request.
    """
    from cloud_sync.client import BrokerSettings
    from cloud_sync.coordinator import serve

    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        settings = BrokerSettings(broker_url, username=username, password_file=password_file, ca_file=ca_file)
        serve(settings, group, calibration, data, coordinator_id=coordinator_id, stop=stop, threads=threads)
    except EdgeNasError as error:
        click.echo(f"error: {error}", err=True)
        raise SystemExit(1)
