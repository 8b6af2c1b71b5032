"""The `edge-nas` command line: a thin layer over the library functions."""
from __future__ import annotations

import json
import logging
import sys
from typing import Any

import click

import edge_runtime
from models.errors import EdgeNasError

logger = logging.getLogger("edge_runtime")


class _Group(click.Group):
    """Turns expected mistakes into one line on stderr and a non-zero exit, without a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgeNasError as error:
            click.echo(f"error: {error}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted; finished results are cached, so the same command resumes", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(edge_runtime.__version__, prog_name="edge-nas")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Training-free neural architecture search for personalised models on edge devices."""
    level = logging.WARNING
    if verbose == 1:
        level = logging.INFO
    elif verbose > 1:
        level = logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@main.command("proxies")
@click.option("--json", "as_json", is_flag=True, help="Print the registry as JSON.")
def proxies_command(as_json: bool) -> None:
    """List the zero-cost proxies and the aggregates, with what each needs and where it may run."""
    from models.aggregation import AGGREGATES
    from models.proxies import get_proxy, list_proxies

    specs = [dict(get_proxy(name).describe(), aggregate=False) for name in list_proxies()]
    aggregates = [
        {"name": name, "aggregate": True, "components": list(parts),
         "description": "rank-combines its components over the architectures of one run"}
        for name, parts in AGGREGATES.items()
    ]
    if as_json:
        click.echo(json.dumps(specs + aggregates, indent=2))
        return
    for spec in specs:
        needs = ", ".join(
            word for word, flag in (("gradients", spec["needs_gradients"]), ("labels", spec["needs_labels"])) if flag
        )
        click.echo(f"{spec['name']:<16} {'/'.join(spec['runs_on']):<13} needs: {needs or 'forward pass only':<18} {spec['description']}")
    click.echo("\nAggregates (rank the architectures of one run together):")
    for entry in aggregates:
        click.echo(f"{entry['name']:<16} combines {', '.join(entry['components'])}")


def _register_commands() -> None:
    from edge_runtime.cli_cloud import cloud
    from edge_runtime.cli_daemon import daemon_command
    from edge_runtime.cli_personalize import personalize
    from edge_runtime.cli_remote import remote
    from edge_runtime.cli_score import score_command

    main.add_command(score_command)
    main.add_command(personalize)
    main.add_command(cloud)
    main.add_command(daemon_command)
    main.add_command(remote)
    try:
        from edge_runtime.cli_calibrate import calibrate
    except ModuleNotFoundError as error:
        if error.name != "edge_runtime.cli_calibrate":
            raise
    else:
        main.add_command(calibrate)


_register_commands()


if __name__ == "__main__":
    main()
