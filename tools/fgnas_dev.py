"""Measure FG-NAS on a seeded sample of the NAS-Bench-201 development split: ranking and cost.

`measure` scores each sampled architecture on a real CIFAR-10 probe batch and appends one JSON
line per architecture, so an interrupted run resumes. Each line has the accuracies, the component
values with their per-block terms, and the wall time of each part next to one plain forward pass
and one forward+backward pass of the same network on the same batch. With `--research` it uses
options that keep every per-block term and adds option variants and baseline proxies, so that the
report can rebuild any variant from one pass. `report` reads both runs and writes a Markdown page
with the signed Spearman rho per proxy, aggregate and variant, and the cost ratios.

    nice python tools/fgnas_dev.py measure --research --out runs/fgnas_dev/raw.jsonl
    nice python tools/fgnas_dev.py measure --out runs/fgnas_dev/defaults.jsonl
    python tools/fgnas_dev.py report --out docs/fgnas-dev.md
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

logger = logging.getLogger("fgnas_dev")

DEFAULT_ACCURACY = REPO.parent / "shared" / "data" / "nb201" / "accuracy.csv"
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "images" / "cifar10.npz"
ACCURACY_COLUMNS = ("cifar10_test", "cifar100_test", "imagenet16_120_test")
COMPONENTS = ("fgnas_fc", "fgnas_fi", "fgnas_gc", "fgnas_gi")
BASELINES = ("zico", "naswot")

# The research run computes every per-block term (r = 1, no gain interval) and the gradient
# statistics on all 64 samples, so that the report can rebuild any layer subset, gain interval and
# gain sample size from one pass. The defaults run uses the registered defaults, as `edge-nas score`
# would.
RESEARCH_OPTIONS: Dict[str, Dict[str, Any]] = {
    "fgnas_fc": {"r": 1.0},
    "fgnas_fi": {"r": 1.0},
    "fgnas_gc": {"gain_samples": 16},
    "fgnas_gi": {"k": 0.0, "m": math.inf, "samples": None},
}

# Features per sample of the 17 NAS-Bench-201 block outputs at 32 x 32 input. The five stage-1
# cells output 16 x 32 x 32, the first reduction and stage 2 output 32 x 16 x 16, the rest 64 x 8 x 8.
NB201_WIDTHS = [16384] * 5 + [8192] * 6 + [4096] * 6


def read_accuracy(path: Path) -> List[Dict[str, Any]]:
    with open(path, newline="") as handle:
        return [
            {"arch": row["arch"], **{column: float(row[column]) for column in ACCURACY_COLUMNS}}
            for row in csv.DictReader(handle)
        ]


def sample_rows(rows: Sequence[Dict[str, Any]], choose: int, confirm: int, seed: int) -> List[Dict[str, Any]]:
    picked = random.Random(seed).sample(range(len(rows)), choose + confirm)
    return [dict(rows[index], split="choose" if position < choose else "confirm") for position, index in enumerate(picked)]


# --------------------------------------------------------------------------------------
# measure


def _timed(function: Callable[[], Any]) -> Tuple[float, Any]:
    start = time.perf_counter()
    value = function()
    return time.perf_counter() - start, value


def _result_entry(result: Any) -> Dict[str, Any]:
    return {"value": result.value, "valid": result.valid, "reason": result.reason, "details": result.details}


def measure_architecture(
    space: Any, arch_text: str, inputs: Any, labels: Any, seed: int, repeats: int, research: bool, with_pca: bool
) -> Dict[str, Any]:
    """Score one architecture, timing each FG-NAS part beside a plain forward and a forward+backward.

    With `research`, the components use RESEARCH_OPTIONS and the variants and baselines are
    added. Otherwise the registered defaults are used and nothing else is computed.
    """
    import torch

    from edge_runtime.scoring import forward_backward_seconds
    from models.errors import UnknownNameError
    from models.proxies import fgnas, get_proxy
    from models.proxies._context import ProbeContext, scoring_mode
    from models.proxies._registry import NEEDS_BLOCK_OUTPUTS
    from models.proxies.scoring import run_proxy, score_architecture

    arch = space.parse(arch_text)
    timings: Dict[str, List[float]] = {}
    context = None
    results: Dict[str, Any] = {}
    for _ in range(repeats):
        context = ProbeContext(space, arch, inputs, labels, seed=seed, forward_needs={NEEDS_BLOCK_OUTPUTS})
        network = context.network  # built outside every clock

        def plain_forward() -> None:
            with scoring_mode(network), torch.no_grad():
                network(inputs)

        options = RESEARCH_OPTIONS if research else {}

        def component(name: str) -> Callable[[], Any]:
            return lambda: run_proxy(get_proxy(name), context, options.get(name))

        steps: List[Tuple[str, Callable[[], Any]]] = [
            ("forward", plain_forward),
            ("forward_backward", lambda: None),
            ("record", lambda: context.forward_record()),
            ("fgnas_fc", component("fgnas_fc")),
            ("fgnas_fi", component("fgnas_fi")),
        ]
        if research:
            steps.append(("gains", lambda: fgnas.block_gains(context, gain_samples=16)))
        steps.extend([("fgnas_gc", component("fgnas_gc")), ("fgnas_gi", component("fgnas_gi"))])
        for name, step in steps:
            if name == "forward_backward":
                seconds, value = forward_backward_seconds(network, inputs, labels), None
            else:
                seconds, value = _timed(step)
            timings.setdefault(name, []).append(seconds)
            if name in COMPONENTS:
                results[name] = value

    assert context is not None
    entry: Dict[str, Any] = {
        "seconds": {name: min(values) for name, values in timings.items()},
        "components": {name: _result_entry(result) for name, result in results.items()},
    }

    if not research:
        context.release()
        return entry

    # Variants of the options, untimed unless their cost is the question.
    variants: Dict[str, Any] = {}
    calls = [("fi_variance", lambda: run_proxy(get_proxy("fgnas_fi"), context, {"reading": "variance", "r": 1.0}))]
    if with_pca:
        calls.append(("fc_pca16", lambda: run_proxy(get_proxy("fgnas_fc"), context, {"pca_dim": 16, "r": 1.0})))
        calls.append(("fc_pca32", lambda: run_proxy(get_proxy("fgnas_fc"), context, {"pca_dim": 32, "r": 1.0})))
    for name, call in calls:
        seconds, result = _timed(call)
        variants[name] = dict(_result_entry(result), seconds=seconds)
    if not context.degenerate:
        for label, options in (
            ("gains8", {"gain_samples": 8}),
            ("gains64", {"gain_samples": None}),
            ("gains16_p4", {"gain_samples": 16, "probes": 4}),
        ):
            seconds, gains = _timed(lambda: fgnas.block_gains(context, **options))
            variants[label] = {"gains": gains, "seconds": seconds}
        seconds, signals = _timed(lambda: fgnas.block_gradient_signal(context, micro_batches=2, samples=32))
        variants["signals32"] = {"signals": signals, "seconds": seconds}
        seconds, signals = _timed(lambda: fgnas.block_gradient_signal(context, micro_batches=4, samples=None))
        variants["signals64_m4"] = {"signals": signals, "seconds": seconds}
    entry["variants"] = variants
    if results["fgnas_fc"].valid:
        entry["energy"] = [fgnas._tap_statistics(context, block).energy for block in range(len(NB201_WIDTHS))]
    else:
        entry["energy"] = None

    context.release()

    # Baselines get their own context, so that each one's shared forward pass records what it declares.
    available = []
    for name in BASELINES:
        try:
            get_proxy(name)
        except UnknownNameError:
            continue
        available.append(name)
    scored = score_architecture(space, arch, inputs, labels, available, seed=seed)
    entry["baselines"] = {
        name: {"value": result.value, "valid": result.valid, "seconds": result.details.get("seconds")}
        for name, result in scored.items()
    }
    return entry


def command_measure(arguments: argparse.Namespace) -> int:
    import torch

    from edge_runtime.data import load_dataset
    from models.spaces import get_space

    torch.set_num_threads(arguments.threads)
    rows = sample_rows(read_accuracy(arguments.accuracy), arguments.choose, arguments.confirm, arguments.sample_seed)
    out = Path(arguments.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        with open(out) as handle:
            done = {json.loads(line)["arch"] for line in handle if line.strip()}
    space = get_space("nb201")
    dataset = load_dataset(str(arguments.images))
    inputs, labels = dataset.probe_batch(arguments.batch_size, seed=arguments.batch_seed, size=32)
    protocol = {
        "data_hash": dataset.data_hash,
        "batch_size": arguments.batch_size,
        "batch_seed": arguments.batch_seed,
        "network_seed": arguments.seed,
        "sample_seed": arguments.sample_seed,
        "threads": arguments.threads,
        "torch": torch.__version__,
        "options": RESEARCH_OPTIONS if arguments.research else "registered defaults",
    }
    logger.info("measuring %d architectures (%d already in %s)", len(rows), len(done), out)
    with open(out, "a") as handle:
        for number, row in enumerate(rows, start=1):
            if row["arch"] in done:
                continue
            started = time.perf_counter()
            with_pca = number <= arguments.pca_count
            entry = measure_architecture(
                space, row["arch"], inputs, labels, arguments.seed, arguments.repeats, arguments.research, with_pca
            )
            arch = space.parse(row["arch"])
            entry.update(row)
            entry.update({"params": space.params(arch), "flops": space.flops(arch), "protocol": protocol})
            handle.write(json.dumps(entry) + "\n")
            handle.flush()
            logger.info("%d/%d %.1f s %s", number, len(rows), time.perf_counter() - started, row["arch"])
    return 0


# --------------------------------------------------------------------------------------
# report


def spearman(values: Sequence[float], targets: Sequence[float]) -> Tuple[float, int]:
    """Signed Spearman rho over the entries where the value is finite, and how many entries that is."""
    from scipy.stats import spearmanr

    pairs = [(v, t) for v, t in zip(values, targets) if v is not None and math.isfinite(v)]
    if len(pairs) < 3:
        return float("nan"), len(pairs)
    return float(spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).correlation), len(pairs)


def bootstrap_sd(values: Sequence[float], targets: Sequence[float], rounds: int = 1000, seed: int = 0) -> float:
    """Standard deviation of Spearman rho over `rounds` resamples (with replacement) of the finite entries."""
    from scipy.stats import spearmanr

    pairs = np.array([(v, t) for v, t in zip(values, targets) if v is not None and math.isfinite(v)])
    if len(pairs) < 10:
        return float("nan")
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(rounds):
        sample = pairs[rng.integers(0, len(pairs), len(pairs))]
        draws.append(spearmanr(sample[:, 0], sample[:, 1]).correlation)
    return float(np.nanstd(draws))


def load_raw(path: Path) -> List[Dict[str, Any]]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _nan(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _component(entry: Dict[str, Any], name: str) -> float:
    """Return a measured value (a component, a baseline, params or FLOPs), NaN where invalid."""
    if name in ("params", "flops"):
        return float(entry[name])
    if name in entry.get("baselines", {}):
        found = entry["baselines"][name]
        return _nan(found["value"]) if found["valid"] else float("nan")
    if name == "fgnas_fi_variance":
        found = entry["variants"]["fi_variance"]
        return _nan(found["value"]) if found["valid"] else float("nan")
    found = entry["components"][name]
    return _nan(found["value"]) if found["valid"] else float("nan")


# ---- rebuilding variants from the research run's per-block records


def _gains(entry: Dict[str, Any], variant: str = "gains16") -> Optional[List[float]]:
    if variant == "gains16":
        component = entry["components"]["fgnas_gc"]
        return component["details"].get("gains") if component["valid"] else None
    found = entry["variants"].get(variant)
    return None if found is None else found["gains"]


def _log_signals(entry: Dict[str, Any], variant: str = "signals64") -> Optional[List[Optional[float]]]:
    if variant == "signals64":
        component = entry["components"]["fgnas_gi"]
        return component["details"].get("layer_terms") if component["valid"] else None
    found = entry["variants"].get(variant)
    if found is None:
        return None
    return [None if signal is None else math.log(signal) for signal in found["signals"]]


def _subset(terms: Sequence[float], r: float, importance: str, entry: Dict[str, Any], gains: Optional[Sequence[float]]) -> float:
    """Sum the terms of the ceil(r L) blocks that `importance` ranks first, as the proxies do."""
    from models.proxies.fgnas import select_layers

    if importance == "term":
        measure = list(terms)
    elif importance == "width":
        measure = [float(w) for w in NB201_WIDTHS[: len(terms)]]
    elif importance == "energy":
        if entry.get("energy") is None:
            return float("nan")
        measure = entry["energy"]
    else:
        if gains is None:
            return float("nan")
        measure = [-abs(math.log(g)) if g > 0 else -math.inf for g in gains]
    return float(sum(terms[i] for i in select_layers(measure, r)))


def feature_value(entry: Dict[str, Any], name: str, r: float, importance: str) -> float:
    component = entry["components"][name]
    if not component["valid"]:
        return float("nan")
    return _subset(component["details"]["layer_terms"], r, importance, entry, _gains(entry, "gains8"))


def gi_value(
    entry: Dict[str, Any],
    k: float,
    m: float,
    signals: str = "signals32",
    gains: str = "gains8",
    r: float = 1.0,
    importance: str = "term",
) -> float:
    """Rebuild S_GI from per-block log G_l and gains, as fgnas_gi computes it."""
    from models.proxies.fgnas import select_layers

    logs, block_gains = _log_signals(entry, signals), _gains(entry, gains)
    if logs is None or block_gains is None or any(g <= 0 for g in block_gains):
        return float("nan")
    with_signal = [i for i, value in enumerate(logs) if value is not None]
    if not with_signal:
        return float("nan")
    qualifying = [i for i in with_signal if k <= block_gains[i] <= m] or with_signal
    if importance == "gain":
        measure = [-abs(math.log(block_gains[i])) for i in qualifying]
    elif importance == "width":
        measure = [float(NB201_WIDTHS[i]) for i in qualifying]
    else:
        measure = [logs[i] for i in qualifying]
    return float(sum(logs[qualifying[i]] for i in select_layers(measure, r)))


def gc_value(entry: Dict[str, Any], gains: str = "gains8", r: float = 1.0, importance: str = "term") -> float:
    from models.proxies.fgnas import stability_term

    block_gains = _gains(entry, gains)
    if block_gains is None or any(g <= 0 for g in block_gains):
        return float("nan")
    return _subset([stability_term(g) for g in block_gains], r, importance, entry, block_gains)


# The registered defaults, rebuilt from the research run (they reproduce the defaults run exactly).
DEFAULT_COLUMNS: Dict[str, Callable[[Dict[str, Any]], float]] = {
    "fgnas_fc": lambda e: feature_value(e, "fgnas_fc", 0.25, "width"),
    "fgnas_fi": lambda e: feature_value(e, "fgnas_fi", 0.25, "width"),
    "fgnas_gi": lambda e: gi_value(e, 1.0 / 3.0, 3.0),
    "fgnas_gc": lambda e: gc_value(e),
    "params": lambda e: float(e["params"]),
    "flops": lambda e: float(e["flops"]),
}


class Table:
    def __init__(self, headers: Sequence[str]) -> None:
        self.lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]

    def add(self, *cells: Any) -> None:
        self.lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")

    def text(self) -> str:
        return "\n".join(self.lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:+.3f}"
    return str(value)


class Evaluator:
    """Spearman rho of proxies and aggregates on the choose, confirm and whole sample."""

    SPLITS = ("choose", "confirm", "all")

    def __init__(self, entries: List[Dict[str, Any]], target: str = "cifar10_test") -> None:
        self.target = target
        self.splits = {
            "choose": [e for e in entries if e["split"] == "choose"],
            "confirm": [e for e in entries if e["split"] == "confirm"],
            "all": entries,
        }

    def single(self, split: str, value_of: Callable[[Dict[str, Any]], float], column: Optional[str] = None) -> Tuple[float, int]:
        rows = self.splits[split]
        return spearman([value_of(e) for e in rows], [e[column or self.target] for e in rows])

    def scores(self, split: str, columns_of: Mapping[str, Callable[[Dict[str, Any]], float]], aggregator: Any) -> List[float]:
        rows = self.splits[split]
        columns = {name: np.array([get(e) for e in rows]) for name, get in columns_of.items() if name in aggregator.proxies}
        return list(aggregator.score(columns).scores)

    def aggregate(
        self, split: str, columns_of: Mapping[str, Callable[[Dict[str, Any]], float]], aggregator: Any, column: Optional[str] = None
    ) -> Tuple[float, int]:
        scores = self.scores(split, columns_of, aggregator)
        return spearman(scores, [e[column or self.target] for e in self.splits[split]])

    def single_row(self, label: str, value_of: Callable[[Dict[str, Any]], float]) -> List[Any]:
        results = [self.single(split, value_of) for split in self.SPLITS]
        return [label] + [rho for rho, _ in results] + [results[-1][1]]

    def aggregate_row(
        self, label: str, columns_of: Mapping[str, Callable[[Dict[str, Any]], float]], aggregator: Any, with_sd: bool = False
    ) -> List[Any]:
        results = [self.aggregate(split, columns_of, aggregator) for split in self.SPLITS]
        cells: List[Any] = [label] + [rho for rho, _ in results] + [results[-1][1]]
        if with_sd:
            scores = self.scores("all", columns_of, aggregator)
            cells.append(f"{bootstrap_sd(scores, [e[self.target] for e in self.splits['all']]):.3f}")
        return cells


def _aggregates() -> List[Tuple[str, Any]]:
    from models.aggregation import Aggregator, label_free_aggregator

    default = label_free_aggregator("fgnas")
    return [
        ("**fgnas** (fc, gi, gc, params; label-free)", default),
        ("**fgnas-forward** (fc, params; device only)", label_free_aggregator("fgnas-forward")),
        ("fgnas -FP (no feature proxies)", default.ablated("-FP")),
        ("fgnas -GP (no gradient proxies)", default.ablated("-GP")),
        ("fgnas -NL (z-score sum)", default.ablated("-NL")),
        ("fgnas, static weights (w = 1)", Aggregator(dynamic=False)),
        ("fgnas, weights = agreement^2", Aggregator(agreement_power=2.0)),
        ("fgnas + fi", Aggregator(proxies=("fgnas_fc", "fgnas_fi", "fgnas_gi", "fgnas_gc", "params"))),
        ("fgnas without gc", Aggregator(proxies=("fgnas_fc", "fgnas_gi", "params"))),
        ("fgnas without params", Aggregator(proxies=("fgnas_fc", "fgnas_gi", "fgnas_gc"))),
        ("fgnas, flops for params", Aggregator(proxies=("fgnas_fc", "fgnas_gi", "fgnas_gc", "flops"))),
    ]


def _defaults_sections(entries: List[Dict[str, Any]]) -> List[str]:
    from models.aggregation import fit_aggregator, label_free_aggregator

    evaluator = Evaluator(entries)
    columns_of = {name: (lambda e, n=name: _component(e, n)) for name in COMPONENTS + ("params", "flops")}
    sections = []

    table = Table(["aggregate", "rho choose", "rho confirm", "rho all", "n all", "bootstrap sd all"])
    for label, aggregator in _aggregates():
        table.add(*evaluator.aggregate_row(label, columns_of, aggregator, with_sd=True))
    sections.append(
        "## Ranking with the registered defaults\n\n"
        "Each aggregate ranks the population of its split (150, 100 or all 250 architectures). The default "
        "aggregate's weights are dynamic: each proxy's Kendall tau with the others' consensus, clipped at 0.\n\n"
        + table.text() + "\n"
    )

    table = Table(["component (defaults)", "rho choose", "rho confirm", "rho all", "n all"])
    for name in COMPONENTS + ("params",):
        table.add(*evaluator.single_row(name, columns_of[name]))
    sections.append("### Components alone\n\n" + table.text() + "\n")

    table = Table(["aggregate", "cifar10_test", "cifar100_test", "imagenet16_120_test"])
    for label, aggregator in _aggregates()[:2]:
        table.add(label, *[evaluator.aggregate("all", columns_of, aggregator, column)[0] for column in ACCURACY_COLUMNS])
    sections.append(
        "### Other accuracy columns (all 250 architectures, the same CIFAR-10 probe batch)\n\n" + table.text() + "\n"
    )

    calibration = evaluator.splits["choose"][:100]
    held_out = evaluator.splits["confirm"]
    if len(calibration) >= 10 and held_out:
        columns = {name: np.array([get(e) for e in calibration]) for name, get in columns_of.items()}
        fitted = fit_aggregator(
            "nb201", [e["arch"] for e in calibration], columns, [e["cifar10_test"] for e in calibration], {"accuracy": "cifar10_test"}
        )
        fitted.check_disjoint(e["arch"] for e in held_out)
        calibrated = evaluator.aggregate("confirm", columns_of, fitted)[0]
        free = evaluator.aggregate("confirm", columns_of, label_free_aggregator("fgnas"))[0]
        weights = json.dumps({name: round(weight, 3) for name, weight in fitted.weights.items()})
        sections.append(
            "### Calibrated aggregate\n\n"
            f"Base weights fitted on the first {len(calibration)} choose architectures (training rho "
            f"{fitted.calibration_spearman:+.3f}): `{weights}`. On the {len(held_out)} confirm architectures, "
            f"which the fit never saw: calibrated {calibrated:+.3f}, label-free {free:+.3f}.\n"
        )

    sections.append(_cost_section(entries))
    return sections


def _cost_section(entries: List[Dict[str, Any]]) -> str:
    def median(values: Sequence[float]) -> float:
        return float(np.median(np.asarray(values, dtype=np.float64)))

    seconds = [e["seconds"] for e in entries]
    gradient = [s.get("gains", 0.0) + s["fgnas_gc"] + s["fgnas_gi"] for s in seconds]
    device = [s["record"] + s["fgnas_fc"] for s in seconds]
    whole = [d + g for d, g in zip(device, gradient)]
    table = Table(["part", "median ms", "median ratio"])
    table.add("one forward (reference)", f"{1000 * median([s['forward'] for s in seconds]):.0f}", "1.00 x fwd")
    table.add("one forward+backward (reference)", f"{1000 * median([s['forward_backward'] for s in seconds]):.0f}", "1.00 x fwd+bwd")
    table.add("shared forward pass with block taps", f"{1000 * median([s['record'] for s in seconds]):.0f}", f"{median([s['record'] / s['forward'] for s in seconds]):.2f} x fwd")
    for part, label in (
        ("fgnas_fc", "fgnas_fc on the recorded taps"),
        ("fgnas_fi", "fgnas_fi on the recorded taps (not aggregated)"),
        ("gains", "block gains"),
        ("fgnas_gc", "fgnas_gc (with the block gains)"),
        ("fgnas_gi", "fgnas_gi (micro-batch gradients; reuses the gains)"),
    ):
        if part in seconds[0]:
            table.add(label, f"{1000 * median([s[part] for s in seconds]):.0f}", f"{median([s[part] / s['forward_backward'] for s in seconds]):.2f} x fwd+bwd")
    table.add("**device part**: forward + fgnas_fc", f"{1000 * median(device):.0f}", f"**{median([d / s['forward'] for d, s in zip(device, seconds)]):.2f} x fwd**")
    table.add("**whole fgnas**: forward + fc + gc + gi", f"{1000 * median(whole):.0f}", f"**{median([w / s['forward_backward'] for w, s in zip(whole, seconds)]):.2f} x fwd+bwd**")
    return (
        f"### Cost ({len(entries)} architectures, medians of the per-architecture ratios)\n\n"
        "Every part runs on the same network and probe batch after the network is built; each is timed twice "
        "and the faster run kept. One torch thread on a 2-core machine shared with other jobs, so absolute "
        "times are noisy: read the ratios.\n\n" + table.text() + "\n"
    )


def _research_sections(entries: List[Dict[str, Any]]) -> List[str]:
    from models.aggregation import Aggregator, label_free_aggregator

    evaluator = Evaluator(entries)
    default = label_free_aggregator("fgnas")
    sections = []

    def swapped(name: str, value_of: Callable[[Dict[str, Any]], float]) -> Dict[str, Callable[[Dict[str, Any]], float]]:
        columns = dict(DEFAULT_COLUMNS)
        columns[name] = value_of
        return columns

    def variant_row(label: str, name: str, value_of: Callable[[Dict[str, Any]], float]) -> List[Any]:
        cells: List[Any] = [label]
        cells += [evaluator.single(split, value_of)[0] for split in ("choose", "confirm")]
        aggregator = default if name != "fgnas_fi" else Aggregator(proxies=("fgnas_fc", "fgnas_fi", "fgnas_gi", "fgnas_gc", "params"))
        cells += [evaluator.aggregate(split, swapped(name, value_of), aggregator)[0] for split in ("choose", "confirm")]
        return cells

    headers = ["variant", "alone choose", "alone confirm", "in fgnas choose", "in fgnas confirm"]

    table = Table(["proxy", "rho choose", "rho confirm", "rho all", "n all"])
    for name in ("zico", "naswot", "params", "flops"):
        table.add(*evaluator.single_row(name, lambda e, n=name: _component(e, n)))
    naswot_columns = {"fgnas_fc": lambda e: _component(e, "naswot"), "params": lambda e: float(e["params"])}
    table.add(*evaluator.aggregate_row("naswot + params, the fgnas-forward rule", naswot_columns, label_free_aggregator("fgnas-forward")))
    sections.append("### Baselines on the same sample, batch and seed\n\n" + table.text() + "\n")

    table = Table(headers)
    table.add(*variant_row("S_FC, every block (r = 1)", "fgnas_fc", lambda e: feature_value(e, "fgnas_fc", 1.0, "term")))
    table.add(*variant_row("S_FC, r = 0.25 by width (default)", "fgnas_fc", DEFAULT_COLUMNS["fgnas_fc"]))
    table.add(*variant_row("S_FI spectrum, every block", "fgnas_fi", lambda e: feature_value(e, "fgnas_fi", 1.0, "term")))
    table.add(*variant_row("S_FI spectrum, r = 0.25 by width", "fgnas_fi", DEFAULT_COLUMNS["fgnas_fi"]))
    table.add(*variant_row("S_FI literal: entropy of the output variance", "fgnas_fi", lambda e: _component(e, "fgnas_fi_variance")))
    sections.append(
        "### Feature proxy readings\n\n'in fgnas' swaps the reading into the default aggregate (S_FI rows: added to it).\n\n"
        + table.text() + "\n"
    )

    table = Table(["proxy", "importance", "r"] + headers[1:])
    for importance in ("width", "term", "energy", "gain"):
        for ratio in (0.2, 0.25, 0.4, 0.6, 0.8, 1.0):
            table.add(*([f"fgnas_fc", importance] + variant_row(str(ratio), "fgnas_fc", lambda e, r=ratio, i=importance: feature_value(e, "fgnas_fc", r, i))))
    for importance in ("term", "width", "gain"):
        for ratio in (0.2, 0.4, 0.6, 0.8, 1.0):
            table.add(*(["fgnas_gi", importance] + variant_row(str(ratio), "fgnas_gi", lambda e, r=ratio, i=importance: gi_value(e, 1.0 / 3.0, 3.0, r=r, importance=i))))
    for importance in ("term", "width"):
        for ratio in (0.2, 0.4, 0.6, 0.8, 1.0):
            table.add(*(["fgnas_gc", importance] + variant_row(str(ratio), "fgnas_gc", lambda e, r=ratio, i=importance: gc_value(e, r=r, importance=i))))
    sections.append(
        "### Layer ratio r: the ceil(r L) blocks that the importance measure ranks first\n\n"
        "width: features per sample, earlier block first on ties; term: the proxy's own per-block term; "
        "energy: mean squared activation; gain: -|ln sigma|. For S_GC, 'gain' orders blocks exactly as "
        "'term' does, so it is not repeated.\n\n" + table.text() + "\n"
    )

    table = Table(headers)
    for k, m in ((1.0 / 3.0, 3.0), (0.5, 2.0), (0.25, 4.0), (0.8, 1.25), (0.5, math.inf), (0.0, math.inf)):
        label = f"S_GI, gain in [{k:.2f}, {m}]" + (" (default)" if (k, m) == (1.0 / 3.0, 3.0) else "")
        table.add(*variant_row(label, "fgnas_gi", lambda e, k=k, m=m: gi_value(e, k, m)))
    for signals, label in (("signals32", "2 x 16 samples (default)"), ("signals64", "2 x 32 samples"), ("signals64_m4", "4 x 16 samples")):
        table.add(*variant_row(f"S_GI [0.33, 3], {label}", "fgnas_gi", lambda e, s=signals: gi_value(e, 1.0 / 3.0, 3.0, signals=s)))
    for gains, label in (("gains8", "8 samples, 1 probe (default)"), ("gains16", "16 samples, 1 probe"), ("gains16_p4", "16 samples, 4 probes"), ("gains64", "64 samples, 1 probe")):
        table.add(*variant_row(f"S_GC, gains from {label}", "fgnas_gc", lambda e, g=gains: gc_value(e, gains=g)))
        table.add(*variant_row(f"S_GI filtered by gains from {label}", "fgnas_gi", lambda e, g=gains: gi_value(e, 1.0 / 3.0, 3.0, gains=g)))
    sections.append("### Gradient proxy variants\n\n" + table.text() + "\n")

    with_pca = [e for e in entries if "fc_pca16" in e["variants"]]
    if with_pca:
        table = Table(["S_FC route, every block", "rho (n)", "median ms"])
        targets = [e["cifar10_test"] for e in with_pca]
        rho, count = spearman([feature_value(e, "fgnas_fc", 1.0, "term") for e in with_pca], targets)
        table.add("exact B x B Gram", f"{rho:+.3f} ({count})", f"{1000 * float(np.median([e['seconds']['fgnas_fc'] for e in with_pca])):.0f}")
        for variant in ("fc_pca16", "fc_pca32"):
            values = [_nan(e["variants"][variant]["value"]) if e["variants"][variant]["valid"] else float("nan") for e in with_pca]
            rho, count = spearman(values, targets)
            seconds = float(np.median([e["variants"][variant]["seconds"] for e in with_pca]))
            table.add(f"randomized PCA to d = {variant[6:]}", f"{rho:+.3f} ({count})", f"{1000 * seconds:.0f}")
        sections.append(
            f"### PCA before S_FC (the first {len(with_pca)} architectures of the sample)\n\n" + table.text()
            + "\n\nTimes exclude the shared forward pass. At batch 64 the B x B Gram matrix gives the exact nuclear "
            "norm, and PCA to d < B components loses ranking quality and time.\n"
        )
    return sections


DECISIONS = """## Defaults and why

The tables below hold the evidence; each choice was made on the choose split.

- **Aggregate `fgnas`** = S_FC + S_GI + S_GC + #params, log-rank sum with dynamic weights (Kendall tau of each
  proxy with the others' consensus, clipped at 0). The dynamic weights beat static ones, and the log-rank sum
  beats the z-score sum (-NL). **S_FI is left out**: adding either reading (the spectrum entropy or the literal
  variance entropy) lowers the aggregate. `fgnas-forward` (device only) = S_FC + #params.
- **S_FC keeps the ceil(r L) widest blocks, r = 0.25, earlier first on ties**: on NAS-Bench-201 these are the five
  stage-1 cells. The per-block S_FC rho falls with depth, so summing over every block dilutes the signal; term-,
  energy- and gain-ranked subsets help less. S_FI uses the same subset.
- **S_GI sums over blocks with gain in [1/3, 3]** rather than [0.5, 2]. The narrow interval drops blocks of good
  networks: on this sample the first cell's gain exceeds 2 in 55% of the top-quartile networks and in 10% of the
  bottom half. It reads 2 micro-batches of 16 samples (the first 32 of the
  64): in the aggregate this ranks as well as 2 x 32 for half the cost (alone it is a little lower on the confirm
  split), and it keeps the whole score under 1.5 x forward+backward.
- **Gains**: RMS singular value, one Rademacher probe, on the first 8 recorded block inputs: S_GC and the S_GI
  filter rank the same as with 16 or 64 samples or 4 probes, at a fraction of the cost. S_GC alone is weak here,
  yet it adds to the aggregate.
- **The exact B x B Gram route** at batch 64. Randomized PCA to d < B components lost both rho and time; it stays an
  option (`pca_dim`) for batches larger than the feature width.
"""


def command_report(arguments: argparse.Namespace) -> int:
    sections = [
        "# FG-NAS on the NAS-Bench-201 development split\n\n"
        "Written by `python tools/fgnas_dev.py report`. A seeded sample (`--sample-seed 0`) of 250 of the 11,625 "
        "development-split architectures: the first 150 (choose) set the defaults, the other 100 (confirm) "
        "check them. Probe batch: 64 CIFAR-10 images at 32 x 32 (`--batch-seed 0`), network seed 0, BatchNorm in "
        "training mode. Signed Spearman rho against `cifar10_test` (200-epoch CIFAR-10 test accuracy, mean of "
        "seeds) over the architectures with a finite value; n counts them. Architectures whose cell has no path "
        "from input to output are invalid for every FG-NAS component and drop out.\n",
        DECISIONS,
    ]
    if arguments.defaults.exists():
        entries = load_raw(arguments.defaults)
        sections.append(
            f"Measured by `nice python tools/fgnas_dev.py measure` ({len(entries)} architectures). Protocol: `"
            + json.dumps(entries[0]["protocol"], sort_keys=True) + "`\n"
        )
        sections.extend(_defaults_sections(entries))
    if arguments.raw.exists():
        entries = load_raw(arguments.raw)
        sections.append(
            "## How the defaults were chosen\n\n"
            f"Measured by `nice python tools/fgnas_dev.py measure --research --out {arguments.raw.relative_to(REPO) if arguments.raw.is_absolute() and REPO in arguments.raw.parents else arguments.raw}` "
            f"({len(entries)} architectures, the same sample), which records every per-block term, so each variant "
            "below is rebuilt from one pass. Choices were made on the choose split; confirm was read afterwards.\n"
        )
        sections.extend(_research_sections(entries))
    text = "\n".join(sections)
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(text)
    print(text)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    measure = commands.add_parser("measure", help="score the sample and append one JSON line per architecture")
    measure.add_argument("--out", type=Path, default=REPO / "runs" / "fgnas_dev" / "defaults.jsonl")
    measure.add_argument("--accuracy", type=Path, default=DEFAULT_ACCURACY, help="NAS-Bench-201 accuracy CSV")
    measure.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="probe images (.npz)")
    measure.add_argument("--choose", type=int, default=150, help="architectures used to choose settings")
    measure.add_argument("--confirm", type=int, default=100, help="architectures used to confirm the choice")
    measure.add_argument("--sample-seed", type=int, default=0, help="seed of the architecture sample")
    measure.add_argument("--batch-size", type=int, default=64)
    measure.add_argument("--batch-seed", type=int, default=0, help="seed of the probe batch draw")
    measure.add_argument("--seed", type=int, default=0, help="seed of the network initialisation")
    measure.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    measure.add_argument("--repeats", type=int, default=2, help="timed repeats; the minimum is kept")
    measure.add_argument("--pca-count", type=int, default=50, help="time the PCA route on this many first architectures")
    measure.add_argument(
        "--research", action="store_true", help="record every per-block term, the option variants and the baselines"
    )
    report = commands.add_parser("report", help="write the rho and cost page from the measured lines")
    report.add_argument("--raw", type=Path, default=REPO / "runs" / "fgnas_dev" / "raw.jsonl", help="the research run")
    report.add_argument(
        "--defaults", type=Path, default=REPO / "runs" / "fgnas_dev" / "defaults.jsonl", help="the run with the registered defaults"
    )
    report.add_argument("--out", type=Path, default=REPO / "docs" / "fgnas-dev.md")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if arguments.command == "measure":
        return command_measure(arguments)
    return command_report(arguments)


if __name__ == "__main__":
    sys.exit(main())
