"""`edge-nas daemon`: run the device daemon, or check its configuration."""
from __future__ import annotations

from typing import Optional

import click

from edge_runtime.cli_common import echo_json


@click.command("daemon")
@click.option("--config", "config_path", metavar="PATH",
              help="Configuration file (TOML). Default: /etc/edge-nas/config.toml, else "
                   "$XDG_CONFIG_HOME/edge-nas/config.toml or ~/.config/edge-nas/config.toml.")
@click.option("--check", is_flag=True, help="Check the configuration, print the effective settings as JSON and exit.")
def daemon_command(config_path: Optional[str], check: bool) -> None:
    """Run the device daemon: personalisation jobs on request over MQTT, until SIGTERM.

    The daemon listens for commands on edge-nas/devices/<device id>/commands, runs one
    personalisation job at a time, publishes its progress, a heartbeat with telemetry and
    the device status, and resumes unfinished jobs after a restart. It logs one logfmt line
    per event on stderr and speaks the systemd notify protocol (see docs/daemon.md).
    """
    from edge_runtime.daemon_config import load_config
    from edge_runtime.daemon_systemd import configure_logging

    config = load_config(config_path)
    if check:
        echo_json(config.describe())
        return
    configure_logging(config.log_level)
    from edge_runtime.daemon import run_daemon

    status = run_daemon(config)
    if status:
        raise SystemExit(status)
