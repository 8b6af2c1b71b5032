"""`edge-nas score`: score architectures with zero-cost proxies and write a CSV plus its protocol."""
from __future__ import annotations

import csv
import io
import json
import math
import random
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import click
import numpy as np

import edge_runtime
from edge_runtime.atomic import ensure_writable_dir, write_text_atomic
from edge_runtime.cli_common import echo_json, parse_proxy_list
from models.errors import EdgeNasError


def expand_proxies(names: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Split requested names into per-architecture proxies and population aggregates (e.g. `fgnas`)."""
    try:
        from models.aggregation import expand_proxy_names
    except ModuleNotFoundError as error:
        if error.name != "models.aggregation":
            raise
        per_arch, aggregates = list(names), []
    else:
        per_arch, aggregates = expand_proxy_names(names)
    from models.proxies import get_proxy

    for name in per_arch:
        get_proxy(name)  # raises with the list of known names
    return per_arch, aggregates


def select_archs(space: Any, archs_file: Optional[str], sample: Optional[int], use_all: bool, seed: int) -> List[Any]:
    selectors = (("--archs", archs_file), ("--sample", sample is not None), ("--all", use_all))
    chosen = [option for option, present in selectors if present]
    if len(chosen) != 1:
        raise EdgeNasError("choose the architectures with exactly one of --archs FILE, --sample N or --all")
    if archs_file:
        path = Path(archs_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise EdgeNasError(f"cannot read architecture file {archs_file}: {error}") from None
        archs = _parse_lines(space, lines, archs_file)
        if not archs:
            raise EdgeNasError(f"{archs_file} lists no architecture; write one architecture string per line")
        return archs
    if use_all:
        return list(space.enumerate())
    if sample is None or sample < 1:
        raise EdgeNasError(f"--sample must be a positive count, got {sample}")
    return sample_distinct(space, sample, random.Random(seed))


def _parse_lines(space: Any, lines: Sequence[str], source: str) -> List[Any]:
    archs = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            archs.append(space.parse(text))
        except EdgeNasError as error:
            raise EdgeNasError(f"{source}, line {number}: {error}") from None
    return archs


def sample_distinct(space: Any, count: int, rng: random.Random) -> List[Any]:
    """Draw `count` distinct architectures; a space that can be enumerated is sampled without replacement."""
    try:
        population = list(space.enumerate())
    except NotImplementedError:
        population = None
    if population is not None:
        if count > len(population):
            raise EdgeNasError(f"--sample {count} exceeds the {len(population)} architectures of the space")
        return rng.sample(population, count)
    seen: Dict[str, Any] = {}
    attempts = 0
    while len(seen) < count:
        arch = space.sample(rng)
        seen.setdefault(space.to_string(arch), arch)
        attempts += 1
        if attempts > 100 * count:
            raise EdgeNasError(f"could not draw {count} distinct architectures; ask for fewer")
    return list(seen.values())


def format_value(value: Optional[float]) -> str:
    return "" if value is None or not math.isfinite(value) else repr(float(value))


def render_csv(arch_texts: Sequence[str], columns: Dict[str, List[Optional[float]]], valid: Dict[str, List[bool]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    names = list(columns)
    writer.writerow(["arch"] + [item for name in names for item in (name, f"{name}_valid")])
    for row, arch in enumerate(arch_texts):
        cells = [arch]
        for name in names:
            cells += [format_value(columns[name][row]), "1" if valid[name][row] else "0"]
        writer.writerow(cells)
    return buffer.getvalue()


@click.command("score")
@click.option("--space", "space_name", default="nb201", show_default=True, help="Search space name.")
@click.option("--archs", "archs_file", type=str, default=None, help="File with one architecture string per line.")
@click.option("--sample", type=int, default=None, help="Score N distinct architectures drawn with --seed.")
@click.option("--all", "use_all", is_flag=True, help="Score every architecture of the space, in index order.")
@click.option("--data", required=True, help="An .npz file (x: uint8 NHWC, y: labels), an image folder, or a built-in sample name such as sklearn-digits.")
@click.option("--proxies", "proxy_text", required=True, help="Comma-separated proxy names (see `edge-nas proxies`), e.g. naswot,zico.")
@click.option("--out", "out_path", required=True, type=str, help="Output CSV; the protocol goes to <name>.meta.json beside it.")
@click.option("--batch-size", default=64, show_default=True, type=int, help="Probe batch size (images drawn from --data).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for the probe batch, network initialisation and --sample.")
@click.option("--num-classes", type=int, default=None, help="Classifier width; default: the data's class count.")
@click.option("--input-size", type=int, default=None, help="Network input resolution in pixels; default: the data's image size (32 for NB201 if not square).")
@click.option("--aggregator", "aggregator_path", type=str, default=None, help="Calibrated aggregator JSON for aggregate proxies such as fgnas.")
@click.option("--cache", "cache_path", type=str, default=None, help="Score cache (SQLite); default ~/.cache/edge-nas/scores.sqlite.")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the score cache.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
def score_command(
    space_name: str,
    archs_file: Optional[str],
    sample: Optional[int],
    use_all: bool,
    data: str,
    proxy_text: str,
    out_path: str,
    batch_size: int,
    seed: int,
    num_classes: Optional[int],
    input_size: Optional[int],
    aggregator_path: Optional[str],
    cache_path: Optional[str],
    no_cache: bool,
    as_json: bool,
) -> None:
    """Score architectures with zero-cost proxies on real images and write one CSV row per architecture."""
    from edge_runtime.data import load_dataset
    from edge_runtime.score_cache import ScoreCache
    from edge_runtime.scoring import ScoringProtocol, score_archs, timing_summary
    from models.spaces import get_space

    started = time.perf_counter()
    per_arch, aggregates = expand_proxies(parse_proxy_list(proxy_text))
    out = Path(out_path)
    if out.exists() and out.is_dir():
        raise EdgeNasError(f"--out {out_path} is a folder; give a file path such as {out_path.rstrip('/')}/scores.csv")
    ensure_writable_dir(out.parent)
    if batch_size < 1:
        raise EdgeNasError(f"--batch-size must be at least 1, got {batch_size}")

    dataset = load_dataset(data)
    gap = dataset.label_gap_warning() if num_classes is None else None
    if gap:
        click.echo(f"warning: {gap}", err=True)
    classes = num_classes if num_classes is not None else dataset.num_classes
    dataset.check_labels(classes)
    height, width = dataset.image_size
    size = input_size
    if size is None:
        size = height if height == width and height % 4 == 0 else 32
    space = get_space(space_name, num_classes=classes, input_size=size)
    archs = select_archs(space, archs_file, sample, use_all, seed)
    aggregator = _load_aggregator(aggregator_path, space_name) if aggregator_path else None
    if aggregator is not None and getattr(aggregator, "name", None) not in aggregates:
        # Checked before scoring, so that a long run does not end on this mistake.
        raise EdgeNasError(
            f"the aggregator combines the components of {aggregator.name!r}, which --proxies does not request; "
            f"add {aggregator.name} to --proxies or drop --aggregator"
        )
    inputs, labels = dataset.probe_batch(batch_size, seed=seed, size=size)

    protocol = ScoringProtocol(
        space=space_name,
        num_classes=classes,
        input_size=size,
        data_hash=dataset.data_hash,
        batch_size=batch_size,
        seed=seed,
    )
    cache = None
    if not no_cache:
        cache = ScoreCache(Path(cache_path) if cache_path else None)
    rows = []
    try:
        for _, results in score_archs(space, archs, inputs, labels, per_arch, protocol, cache=cache):
            rows.append(results)
    finally:
        if cache is not None:
            cache.close()

    arch_texts = [space.to_string(arch) for arch in archs]
    columns: Dict[str, List[Optional[float]]] = {}
    valid: Dict[str, List[bool]] = {}
    for name in aggregates:
        from models.aggregation import aggregate_population

        component_columns = {
            proxy: np.array([np.nan if r[proxy].value is None else r[proxy].value for r in rows], dtype=np.float64)
            for proxy in per_arch
        }
        calibrated = aggregator if aggregator is not None and aggregator.name == name else None
        scores = aggregate_population(name, component_columns, calibrated)
        columns[name] = [None if not np.isfinite(v) else float(v) for v in scores]
        valid[name] = [bool(np.isfinite(v)) for v in scores]
    for name in per_arch:
        columns[name] = [r[name].value for r in rows]
        valid[name] = [r[name].valid for r in rows]

    meta = {
        "tool": "edge-nas score",
        "code_version": edge_runtime.__version__,
        "protocol": protocol.as_dict(),
        "data": dataset.describe(),
        "proxies": per_arch,
        "aggregates": aggregates,
        "aggregator": aggregator.describe() if aggregator is not None and hasattr(aggregator, "describe") else aggregator_path,
        "architectures": len(archs),
        "valid_counts": {name: int(sum(flags)) for name, flags in valid.items()},
        "invalid_reasons": _reason_counts(rows, per_arch),
        "timings": timing_summary(rows, per_arch),
        "wall_seconds": time.perf_counter() - started,
    }
    write_text_atomic(out, render_csv(arch_texts, columns, valid))
    meta_path = out.with_name(out.stem + ".meta.json")
    write_text_atomic(meta_path, json.dumps(meta, indent=2, sort_keys=True) + "\n")

    if as_json:
        echo_json({"out": str(out), "meta": str(meta_path), **{k: meta[k] for k in ("architectures", "valid_counts", "timings")}})
        return
    counts = ", ".join(f"{name} {count}/{len(archs)} valid" for name, count in meta["valid_counts"].items())
    click.echo(f"scored {len(archs)} architectures -> {out} ({counts})")


def _reason_counts(rows: Sequence[Dict[str, Any]], proxies: Sequence[str]) -> Dict[str, Dict[str, int]]:
    counts: Dict[str, Dict[str, int]] = {}
    for name in proxies:
        for row in rows:
            if not row[name].valid:
                bucket = counts.setdefault(name, {})
                bucket[row[name].reason] = bucket.get(row[name].reason, 0) + 1
    return counts


def _load_aggregator(path: str, space_name: str) -> Any:
    try:
        from models.aggregation import Aggregator
    except ModuleNotFoundError:
        raise EdgeNasError("this installation has no aggregation module; --aggregator cannot be used") from None
    return Aggregator.load(path, space=space_name)
