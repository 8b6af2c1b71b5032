"""How well each zero-cost proxy ranks NAS-Bench-201 architectures against their true accuracy.

Scores a seeded sample of the development split (the architectures in accuracy.csv) with
each proxy on real probe images. Reports signed Spearman rho and Kendall tau against the
benchmark's 200-epoch test accuracy, as mean and sd over seeds. Each proxy's median time per
architecture is shown next to one forward+backward pass of the same networks on the same batch.

    python tools/nb201_correlation.py --datasets cifar10 --archs 1000 --seeds 0 --out docs/benchmarks/run

Scores go to a SQLite cache, so an interrupted run continues where it stopped. An invalid
proxy value (e.g. an undefined value on a network with no input-output path) is ranked below
every valid one, as a search would treat it; the count of such values is reported.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = Path(os.environ.get("EDGE_NAS_SHARED", REPO.parent / "shared"))

logger = logging.getLogger("nb201_correlation")


@dataclass(frozen=True)
class BenchmarkDataset:
    name: str
    images: str  # file under shared/data/images
    accuracy_column: str
    num_classes: int
    input_size: int
    note: str


DATASETS: Dict[str, BenchmarkDataset] = {
    "cifar10": BenchmarkDataset("cifar10", "cifar10.npz", "cifar10_test", 10, 32, "real CIFAR-10 images"),
    "cifar100": BenchmarkDataset(
        "cifar100",
        "cifar100_substitute_tinyimagenet32.npz",
        "cifar100_test",
        100,
        32,
        "probe images: Tiny ImageNet 32x32 stand-in (not CIFAR-100); ranked against CIFAR-100 accuracy",
    ),
    "imagenet16": BenchmarkDataset(
        "imagenet16",
        "imagenet16_120_substitute.npz",
        "imagenet16_120_test",
        120,
        16,
        "probe images: ImageNet 16x16 stand-in of the 120 classes; ranked against ImageNet16-120 accuracy",
    ),
}


@dataclass(frozen=True)
class Variant:
    """A proxy scored with non-default options, reported under its own label."""

    label: str
    proxy: str
    options: Tuple[Tuple[str, object], ...]


def parse_variants(text: str) -> List[Variant]:
    """Parse 'LABEL=PROXY:key=value:key=value,...' (values: numbers, none, or words)."""
    variants = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        label, _, spec = item.partition("=")
        proxy, *settings = spec.split(":")
        if not label or not proxy:
            raise SystemExit(f"error: variant {item!r} is not LABEL=PROXY:key=value, e.g. fc_r0.4=fgnas_fc:r=0.4")
        options = []
        for setting in settings:
            key, _, value = setting.partition("=")
            options.append((key, _option_value(value)))
        variants.append(Variant(label, proxy, tuple(options)))
    return variants


def _option_value(text: str) -> object:
    if text.lower() == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def load_accuracy(path: Path) -> Dict[str, Dict[str, float]]:
    with path.open(newline="") as handle:
        return {row["arch"]: {k: float(v) for k, v in row.items() if k != "arch" and v not in ("", None)} for row in csv.DictReader(handle)}


def sample_dev_archs(accuracy: Dict[str, Dict[str, float]], count: int, sample_seed: int) -> List[str]:
    """Return a prefix of a fixed permutation of the development split, so a smaller run is a prefix of a larger one."""
    archs = sorted(accuracy, key=lambda a: accuracy[a]["nb201_index"])
    random.Random(sample_seed).shuffle(archs)
    if count > len(archs):
        raise SystemExit(f"error: --archs {count} exceeds the {len(archs)} development-split architectures")
    return archs[:count]


def rank_with_invalid_last(values: Sequence[Optional[float]]) -> np.ndarray:
    array = np.array([-np.inf if v is None else v for v in values], dtype=np.float64)
    return stats.rankdata(array)


def correlations(values: Sequence[Optional[float]], accuracy: Sequence[float], higher_is_better: bool) -> Tuple[float, float]:
    oriented = [v if v is None or higher_is_better else -v for v in values]
    ranks = rank_with_invalid_last(oriented)
    rho = stats.spearmanr(ranks, accuracy)[0]
    tau = stats.kendalltau(ranks, accuracy)[0]
    return float(rho), float(tau)


def reference_seconds(space, arch_texts: Sequence[str], inputs, labels, seed: int) -> List[float]:
    """Time one forward+backward per architecture (after one untimed warm-up pass), same batch and init seed."""
    from edge_runtime.scoring import forward_backward_seconds
    from models.proxies._context import build_seeded

    timings = []
    for text in arch_texts:
        arch = space.parse(text)
        network = build_seeded(lambda: space.build(arch), seed)
        forward_backward_seconds(network, inputs, labels)
        timings.append(forward_backward_seconds(network, inputs, labels))
    return timings


def run_dataset(
    dataset: BenchmarkDataset,
    arch_texts: List[str],
    accuracy: Dict[str, Dict[str, float]],
    proxies: List[str],
    limits: Dict[str, int],
    seeds: List[int],
    batch_size: int,
    cache_path: Path,
    shared: Path,
    reference_count: int,
    aggregator=None,
    variants: Sequence[Variant] = (),
    ablations: bool = False,
) -> Dict[str, object]:
    from edge_runtime.data import load_dataset
    from edge_runtime.score_cache import ScoreCache
    from edge_runtime.scoring import ScoringProtocol, score_archs
    from models.proxies import get_proxy
    from models.spaces import get_space

    data = load_dataset(str(shared / "data" / "images" / dataset.images))
    space = get_space("nb201", num_classes=dataset.num_classes, input_size=dataset.input_size)
    per_seed: Dict[int, Dict[str, Dict[str, object]]] = {}
    reference_ms: List[float] = []
    scatter: Dict[str, Tuple[List[Optional[float]], List[float]]] = {}
    per_arch, aggregates = _expand(proxies)

    with ScoreCache(cache_path) as cache:
        for seed in seeds:
            inputs, labels = data.probe_batch(batch_size, seed=seed, size=dataset.input_size)
            protocol = ScoringProtocol(
                space="nb201",
                num_classes=dataset.num_classes,
                input_size=dataset.input_size,
                data_hash=data.data_hash,
                batch_size=batch_size,
                seed=seed,
            )
            columns: Dict[str, List[Optional[float]]] = {name: [] for name in per_arch}
            seconds: Dict[str, List[float]] = {name: [] for name in per_arch}
            for name in per_arch:
                subset = arch_texts[: limits.get(name, len(arch_texts))]
                archs = [space.parse(text) for text in subset]
                for _, results in score_archs(
                    space, archs, inputs, labels, [name], protocol, cache=cache,
                    description=f"{dataset.name} seed {seed} {name}",
                ):
                    columns[name].append(results[name].value)
                    seconds[name].append(float(results[name].details.get("seconds", 0.0)))
            higher_of = {name: get_proxy(name).higher_is_better for name in per_arch}
            for variant in variants:
                subset = arch_texts[: limits.get(variant.label, len(arch_texts))]
                variant_protocol = replace(protocol, proxy_options={variant.proxy: dict(variant.options)})
                columns[variant.label], seconds[variant.label] = [], []
                for _, results in score_archs(
                    space, [space.parse(text) for text in subset], inputs, labels, [variant.proxy], variant_protocol,
                    cache=cache, description=f"{dataset.name} seed {seed} {variant.label}",
                ):
                    columns[variant.label].append(results[variant.proxy].value)
                    seconds[variant.label].append(float(results[variant.proxy].details.get("seconds", 0.0)))
                higher_of[variant.label] = get_proxy(variant.proxy).higher_is_better
            for name, rule in _aggregate_rows(aggregates, variants, ablations, aggregator):
                columns[name] = _aggregate(rule, columns, len(arch_texts))
                seconds[name] = _summed_seconds(rule, seconds, len(arch_texts))
            if "tenas_ntk" in columns and "tenas_regions" in columns:
                columns[TENAS_RANK] = _tenas_rank(columns["tenas_ntk"], columns["tenas_regions"])
                seconds[TENAS_RANK] = [a + b for a, b in zip(seconds["tenas_ntk"], seconds["tenas_regions"])]
            rows: Dict[str, Dict[str, object]] = {}
            for name, values in columns.items():
                truth = [accuracy[a][dataset.accuracy_column] for a in arch_texts[: len(values)]]
                higher = higher_of.get(name, True)
                rho, tau = correlations(values, truth, higher)
                rows[name] = {
                    "rho": rho,
                    "tau": tau,
                    "archs": len(values),
                    "invalid": sum(v is None for v in values),
                    "median_ms": 1000 * statistics.median(seconds[name]) if seconds.get(name) else None,
                }
                if seed == seeds[0]:
                    scatter[name] = (values, truth)
            per_seed[seed] = rows
            if seed == seeds[0] and reference_count:
                count = min(reference_count, len(arch_texts))
                reference_ms = [1000 * s for s in reference_seconds(space, arch_texts[:count], inputs, labels, seed)]
                logger.info("%s: forward+backward median %.1f ms over %d architectures", dataset.name, statistics.median(reference_ms), count)

    return {"per_seed": per_seed, "reference_ms": reference_ms, "scatter": scatter}


def _expand(proxies: List[str]) -> Tuple[List[str], List[str]]:
    try:
        from models.aggregation import expand_proxy_names
    except ModuleNotFoundError:
        return proxies, []
    return expand_proxy_names(proxies)


TENAS_RANK = "tenas rank sum"


def _tenas_rank(ntk: Sequence[Optional[float]], regions: Sequence[Optional[float]]) -> List[Optional[float]]:
    """Rank-combine tenas_ntk and tenas_regions over the population, as TE-NAS orders architectures."""
    from models.proxies.tenas import tenas_rank_combine

    pairs = list(zip(ntk, regions))
    valid = [i for i, (a, b) in enumerate(pairs) if a is not None and b is not None]
    combined = tenas_rank_combine([pairs[i][0] for i in valid], [pairs[i][1] for i in valid])
    values: List[Optional[float]] = [None] * len(pairs)
    for position, index in enumerate(valid):
        values[index] = float(combined[position])
    return values


@dataclass(frozen=True)
class AggregateRule:
    """An aggregator and, for each of its components, the column that feeds it."""

    aggregator: object
    sources: Tuple[Tuple[str, str], ...]  # (component, column)

    @classmethod
    def own_columns(cls, aggregator) -> "AggregateRule":
        """Return the rule that feeds each component from the column of the same name."""
        return cls(aggregator, tuple((p, p) for p in aggregator.proxies))


def _aggregate_rows(aggregates: Sequence[str], variants: Sequence[Variant], ablations: bool, calibrated=None):
    """Yield (row name, AggregateRule): each aggregate, its ablations, its calibrated form, and each variant swapped in."""
    from models.aggregation import ABLATIONS, label_free_aggregator

    for name in aggregates:
        base = label_free_aggregator(name)
        yield name, AggregateRule.own_columns(base)
        if ablations:
            for switch in ABLATIONS:
                ablated = base.ablated(switch)
                yield f"{name} {switch}", AggregateRule.own_columns(ablated)
        if calibrated is not None and calibrated.name == name:
            yield f"{name} calibrated", AggregateRule.own_columns(calibrated)
        for variant in variants:
            if variant.proxy in base.proxies:
                swapped = tuple((p, variant.label if p == variant.proxy else p) for p in base.proxies)
                yield f"{name} with {variant.label}", AggregateRule(base, swapped)


def _aggregate(rule: AggregateRule, columns: Dict[str, List[Optional[float]]], count: int) -> List[Optional[float]]:
    arrays = {
        component: np.array([np.nan if v is None else v for v in columns[column][:count]], dtype=np.float64)
        for component, column in rule.sources
    }
    scores = rule.aggregator.score(arrays).scores
    return [float(v) if np.isfinite(v) else None for v in scores]


def _summed_seconds(rule: AggregateRule, seconds: Dict[str, List[float]], count: int) -> List[float]:
    """Per-architecture time of an aggregate: the sum of its measured components (params and FLOPs cost nothing)."""
    parts = [seconds[column][:count] for _, column in rule.sources if seconds.get(column)]
    return [float(sum(values)) for values in zip(*parts)] if parts else []


def summarise(results: Dict[str, Dict[str, object]], seeds: List[int]) -> List[Dict[str, object]]:
    table = []
    for dataset_name, outcome in results.items():
        per_seed = outcome["per_seed"]
        names = list(per_seed[seeds[0]])
        reference = outcome["reference_ms"]
        for name in names:
            rhos = [per_seed[s][name]["rho"] for s in seeds]
            taus = [per_seed[s][name]["tau"] for s in seeds]
            first = per_seed[seeds[0]][name]
            table.append(
                {
                    "dataset": dataset_name,
                    "proxy": name,
                    "archs": first["archs"],
                    "seeds": len(seeds),
                    "rho_mean": statistics.mean(rhos),
                    "rho_sd": statistics.stdev(rhos) if len(rhos) > 1 else 0.0,
                    "tau_mean": statistics.mean(taus),
                    "tau_sd": statistics.stdev(taus) if len(taus) > 1 else 0.0,
                    "invalid": first["invalid"],
                    "median_ms": first["median_ms"],
                    "fwd_bwd_ms": statistics.median(reference) if reference else None,
                }
            )
    return table


def render_markdown(table: List[Dict[str, object]], command: str, notes: List[str]) -> str:
    lines = [
        "| dataset | proxy | archs | seeds | Spearman rho | Kendall tau | invalid | ms/arch | fwd+bwd ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        sd = f" ± {row['rho_sd']:.3f}" if row["seeds"] > 1 else ""
        tau_sd = f" ± {row['tau_sd']:.3f}" if row["seeds"] > 1 else ""
        ms = "-" if row["median_ms"] is None else f"{row['median_ms']:.1f}"
        ref = "-" if row["fwd_bwd_ms"] is None else f"{row['fwd_bwd_ms']:.1f}"
        lines.append(
            f"| {row['dataset']} | {row['proxy']} | {row['archs']} | {row['seeds']} | {row['rho_mean']:.3f}{sd} | "
            f"{row['tau_mean']:.3f}{tau_sd} | {row['invalid']} | {ms} | {ref} |"
        )
    header = [
        f"Command: `{command}`",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch threads {_torch_threads()}, Python {platform.python_version()}",
        "",
    ]
    return "\n".join(header + lines + [""] + [f"- {note}" for note in notes]) + "\n"


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def scatter_grid(panels: Dict[str, Tuple[Sequence[Optional[float]], Sequence[float]]], path: Path,
                 ylabel: str = "test accuracy (%)", point_size: float = 3) -> None:
    """Draw one scatter panel per proxy (value against accuracy, invalid values left out) and save it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(panels)
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    figure, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    for axis, name in zip(axes.flat, names):
        values, truth = panels[name]
        pairs = [(v, t) for v, t in zip(values, truth) if v is not None]
        if pairs:
            axis.scatter([p[0] for p in pairs], [p[1] for p in pairs], s=point_size, alpha=0.5)
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("proxy value", fontsize=8)
        axis.set_ylabel(ylabel, fontsize=8)
    for axis in list(axes.flat)[len(names):]:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_scatter(results: Dict[str, Dict[str, object]], out_dir: Path) -> List[Path]:
    written = []
    for dataset_name, outcome in results.items():
        path = out_dir / f"scatter_{dataset_name}.png"
        scatter_grid(outcome["scatter"], path)
        written.append(path)
    return written


def parse_limits(text: str) -> Dict[str, int]:
    limits = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, count = item.partition("=")
        limits[name] = int(count)
    return limits


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="cifar10,cifar100,imagenet16", help="comma-separated: cifar10, cifar100, imagenet16")
    parser.add_argument("--proxies", default="params,flops,grad_norm,snip,synflow,naswot,jacob_cov,zico,zen,tenas")
    parser.add_argument("--archs", type=int, default=300, help="architectures from the development split")
    parser.add_argument("--limit", default="", help="fewer architectures for expensive proxies, e.g. tenas=200")
    parser.add_argument("--seeds", default="0", help="comma-separated scoring seeds (probe batch and initialisation)")
    parser.add_argument("--sample-seed", type=int, default=0, help="seed of the architecture sample")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--reference-archs", type=int, default=100, help="architectures timed for forward+backward")
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="folder with data/nb201 and data/images")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "edge-nas" / "benchmark.sqlite")
    parser.add_argument(
        "--aggregator", action="append", default=[], metavar="[DATASET=]PATH",
        help="calibrated aggregator JSON, reported as '<aggregate> calibrated' next to the label-free one; "
        "DATASET= gives one per dataset. Its calibration architectures must not be in the sample",
    )
    parser.add_argument("--ablations", action="store_true", help="also report each aggregate with -FP, -GP and -NL")
    parser.add_argument(
        "--variants", default="", metavar="LABEL=PROXY:key=value,...",
        help="score a proxy with other options under its own label, alone and swapped into each aggregate that uses it, "
        "e.g. fc_r0.4=fgnas_fc:r=0.4",
    )
    parser.add_argument("--out", type=Path, required=True, help="output prefix: writes PREFIX.md, PREFIX.json, PREFIX_scatter_*.png")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    accuracy_path = args.shared / "data" / "nb201" / "accuracy.csv"
    if not accuracy_path.exists():
        print(f"error: {accuracy_path} not found; pass --shared with the folder that holds data/nb201", file=sys.stderr)
        return 2
    accuracy = load_accuracy(accuracy_path)
    arch_texts = sample_dev_archs(accuracy, args.archs, args.sample_seed)
    seeds = [int(s) for s in args.seeds.split(",")]
    proxies = [p.strip() for p in args.proxies.split(",") if p.strip()]
    limits = parse_limits(args.limit)
    args.cache.parent.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    variants = parse_variants(args.variants)
    dataset_names = [name.strip() for name in args.datasets.split(",") if name.strip()]
    unknown = [name for name in dataset_names if name not in DATASETS]
    if unknown:
        print(f"error: unknown dataset {unknown[0]!r}; choose from {', '.join(DATASETS)}", file=sys.stderr)
        return 2
    aggregators: Dict[str, object] = {}
    for item in args.aggregator:
        dataset_name, _, path = item.rpartition("=")
        from models.aggregation import Aggregator
        from models.errors import EdgeNasError

        try:
            aggregator = Aggregator.load(Path(path), space="nb201")
            # A correlation over architectures the aggregator was fitted on would overstate its quality.
            aggregator.check_disjoint(arch_texts)
        except EdgeNasError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        for name in [dataset_name] if dataset_name else dataset_names:
            aggregators[name] = aggregator

    started = time.time()
    results = {}
    for name in dataset_names:
        dataset = DATASETS[name]
        results[dataset.name] = run_dataset(
            dataset, arch_texts, accuracy, proxies, limits, seeds, args.batch_size, args.cache, args.shared, args.reference_archs,
            aggregators.get(name), variants, args.ablations,
        )
    table = summarise(results, seeds)
    command = "python tools/nb201_correlation.py " + " ".join(sys.argv[1:] if argv is None else argv)
    notes = [DATASETS[name].note for name in results]
    notes.append("Signed correlations against the 200-epoch test accuracy; invalid values ranked last.")
    notes.append(f"Wall time {time.time() - started:.0f} s.")
    args.out.with_suffix(".md").write_text(render_markdown(table, command, notes))
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "table": table}, indent=2) + "\n")
    prefix_dir = args.out.parent
    for path in plot_scatter(results, prefix_dir):
        path.rename(prefix_dir / f"{args.out.name}_{path.name}")
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
