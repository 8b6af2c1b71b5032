"""`edge-nas calibrate`: fit an aggregator's base weights on architectures of known accuracy."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Dict, List, Optional

import click
import numpy as np

from edge_runtime.atomic import ensure_writable_dir
from models.errors import EdgeNasError


def _read_csv(path: str, what: str) -> List[Dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except FileNotFoundError:
        raise EdgeNasError(f"{what} file not found: {path}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise EdgeNasError(f"cannot read {what} file {path}: {error}") from None
    if not rows or "arch" not in rows[0]:
        raise EdgeNasError(f"{what} file {path} needs a header with an 'arch' column and at least one row")
    return rows


def _number(text: Optional[str]) -> float:
    try:
        value = float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan
    return value


@click.command("calibrate")
@click.option("--space", "space_name", default="nb201", show_default=True, help="Search space of the architectures.")
@click.option("--scores", "scores_path", required=True, help="CSV written by `edge-nas score` with the aggregate's component columns.")
@click.option("--accuracy", "accuracy_path", required=True, help="CSV with an 'arch' column and the accuracy column.")
@click.option("--column", required=True, help="Accuracy column to fit against, e.g. cifar10_test.")
@click.option("--aggregate", "aggregate_name", default="fgnas", show_default=True, help="Aggregate to calibrate: fgnas or fgnas-forward.")
@click.option("--max-archs", type=int, default=None, help="Use at most this many architectures (the first ones of --scores).")
@click.option("--out", "out_path", required=True, help="Aggregator JSON to write.")
def calibrate(
    space_name: str,
    scores_path: str,
    accuracy_path: str,
    column: str,
    aggregate_name: str,
    max_archs: Optional[int],
    out_path: str,
) -> None:
    """Fit the aggregate's base weights on scored architectures with known accuracy and save the aggregator."""
    from models.aggregation import AGGREGATES, fit_aggregator

    if aggregate_name not in AGGREGATES:
        raise EdgeNasError(f"unknown aggregate {aggregate_name!r}; known: {', '.join(AGGREGATES)}")
    ensure_writable_dir(Path(out_path).parent)
    scores = _read_csv(scores_path, "scores")
    accuracy_rows = _read_csv(accuracy_path, "accuracy")
    if column not in accuracy_rows[0]:
        columns = ", ".join(k for k in accuracy_rows[0] if k != "arch")
        raise EdgeNasError(f"accuracy file {accuracy_path} has no column {column!r}; columns: {columns}")
    accuracy = {row["arch"]: _number(row[column]) for row in accuracy_rows}

    components = AGGREGATES[aggregate_name]
    missing = [p for p in components if p not in scores[0]]
    if missing:
        raise EdgeNasError(
            f"{scores_path} lacks the component columns {missing}; score them with "
            f"`edge-nas score --proxies {aggregate_name}`"
        )
    usable = [row for row in scores if row["arch"] in accuracy and math.isfinite(accuracy[row["arch"]])]
    if max_archs is not None:
        usable = usable[:max_archs]
    if len(usable) < 3:
        raise EdgeNasError(
            f"only {len(usable)} architectures of {scores_path} have a {column} value in {accuracy_path}; need at least 3"
        )
    from models.spaces import get_space

    space = get_space(space_name)
    for number, row in enumerate(usable, start=2):
        try:
            space.parse(row["arch"])
        except EdgeNasError as error:
            raise EdgeNasError(f"{scores_path}, line {number}: not a {space_name} architecture: {error}") from None
    archs = [row["arch"] for row in usable]
    columns_by_proxy = {p: np.array([_number(row[p]) for row in usable], dtype=np.float64) for p in components}
    meta_path = Path(scores_path).with_name(Path(scores_path).stem + ".meta.json")
    protocol: Dict[str, object] = {"accuracy_column": column, "scores": str(scores_path)}
    if meta_path.exists():
        try:
            protocol["scoring"] = json.loads(meta_path.read_text()).get("protocol", {})
        except ValueError:
            pass
    aggregator = fit_aggregator(
        space_name, archs, columns_by_proxy, [accuracy[a] for a in archs], protocol, name=aggregate_name
    )
    aggregator.save(out_path)
    weights = ", ".join(f"{p}={w:.3g}" for p, w in zip(aggregator.proxies, aggregator.base_weights))
    click.echo(
        f"calibrated {aggregate_name} on {len(archs)} architectures (Spearman {aggregator.calibration_spearman:.3f} "
        f"on them): {weights} -> {out_path}"
    )
