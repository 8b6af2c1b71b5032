"""Option parsing shared by the `edge-nas` commands."""
from __future__ import annotations

import json
import re
from typing import Any, Callable, List, Optional

import click

from models.errors import EdgeNasError

_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}


def parse_proxy_list(text: str) -> List[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise EdgeNasError("--proxies is empty; give a comma-separated list, e.g. --proxies naswot,zico")
    return list(dict.fromkeys(names))


def parse_count(text: Optional[str], option: str) -> Optional[int]:
    """Parse a positive count with an optional k/M/G suffix: '800k', '3M', '450M', '1.5G'."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]?)\s*", str(text))
    if match is None:
        raise EdgeNasError(f"{option} {text!r} is not a count; write e.g. 800000, 800k, 3M or 1.5G")
    value = float(match.group(1)) * _SUFFIXES[match.group(2).lower()]
    if value <= 0:
        raise EdgeNasError(f"{option} must be positive, got {text!r}")
    return int(round(value))


def broker_login_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """Add the broker credential options --username, --password-file and --ca-file to a command."""
    options = [
        click.option("--username", help="User name for the broker."),
        click.option("--password-file", type=click.Path(dir_okay=False), help="File whose first line is the broker password."),
        click.option("--ca-file", type=click.Path(dir_okay=False), help="CA certificate that signed the broker's TLS certificate."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def echo_json(payload: Any) -> None:
    click.echo(json.dumps(payload, indent=2, sort_keys=True))
