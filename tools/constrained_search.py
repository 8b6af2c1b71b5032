"""Constrained zero-cost search on the MobileNetV2 and AutoFormer spaces under params and FLOPs limits.

Each setting names a search space and an upper limit on parameters and FLOPs (multiply-adds
at 224x224, 1000-class ImageNet head). The search draws candidates that meet both limits,
checked on the encoding before any network is built. It scores each candidate with
forward-only proxies on real CIFAR-10 images resized to 224x224. The winner is the
candidate with the largest sum of per-proxy ranks over everything scored. The CIFAR-10
images only probe the untrained networks, and the head keeps 1000 classes so that the
costs compare with the limits.

    nice python tools/constrained_search.py --budget 20 --population-size 8 --sample-size 3 \
        --out docs/benchmarks/constrained_search.md

Default proxies: NASWOT and params on MobileNetV2; FG-NAS feature diversity (fgnas_fc) and
params on AutoFormer, because NASWOT reads ReLU activation patterns and the transformers
have GELU units only. The search strategy is regularised evolution from
edge_runtime.search, with the population seeded by random candidates.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from models.errors import EdgeNasError  # noqa: E402  (needs the repository on sys.path)

DEFAULT_SHARED = Path(os.environ.get("EDGE_NAS_SHARED", REPO.parent / "shared"))
DEFAULT_DATA = DEFAULT_SHARED / "data" / "images" / "cifar10.npz"

logger = logging.getLogger("constrained_search")


@dataclass(frozen=True)
class SearchSetting:
    """One search: a space, its limits and the proxies whose rank sum picks the winner."""

    key: str
    space: str
    max_params: int
    max_flops: int
    proxies: Tuple[str, ...]
    width_mult: float = 1.0  # MobileNetV2 only


CONV_PROXIES = ("naswot", "params")
TRANSFORMER_PROXIES = ("fgnas_fc", "params")

SETTINGS: Tuple[SearchSetting, ...] = (
    # At width 1.0 even the largest MobileNetV2-space network (4.34 M params, 526 M FLOPs) meets
    # (5 M, 600 M), so that search is unconstrained. At width 1.2 the same limits bind.
    SearchSetting("mbv2-5m-600m", "mobilenetv2", 5_000_000, 600_000_000, CONV_PROXIES),
    SearchSetting("mbv2-w1.2-5m-600m", "mobilenetv2", 5_000_000, 600_000_000, CONV_PROXIES, width_mult=1.2),
    SearchSetting("mbv2-3m-450m", "mobilenetv2", 3_000_000, 450_000_000, CONV_PROXIES),
    SearchSetting("autoformer-small-25m-5g", "autoformer-small", 25_000_000, 5_000_000_000, TRANSFORMER_PROXIES),
    SearchSetting("autoformer-tiny-5m-1.5g", "autoformer-tiny", 5_000_000, 1_500_000_000, TRANSFORMER_PROXIES),
)
SETTINGS_BY_KEY = {setting.key: setting for setting in SETTINGS}


@dataclass
class SearchOutcome:
    setting: SearchSetting
    chosen: str
    params: int
    flops: int
    proxy_values: Dict[str, Optional[float]]
    candidates: int
    invalid: Dict[str, int]
    seconds: float
    space_cost_range: Dict[str, Tuple[int, int]]


class LimitedSampling:
    """A search space whose `sample` returns only architectures within the limits.

    A uniform draw that breaks a limit is shrunk one choice at a time (`space.shrink`) until
    it fits. Uniform rejection sampling alone almost never meets a limit close to the
    smallest network of a space (AutoFormer-Tiny at 5 M params, with a smallest network of
    4.83 M). The draws lean towards the limit, where the candidates of interest lie.
    Every other attribute is the wrapped space's.
    """

    def __init__(self, space: Any, limits: Any) -> None:
        self._space = space
        self._limits = limits

    def __getattr__(self, name: str) -> Any:
        return getattr(self._space, name)

    def sample(self, rng: random.Random) -> Any:
        arch = self._space.sample(rng)
        while arch is not None and not self._limits.allows(self._space, arch):
            arch = self._space.shrink(arch, rng)
        if arch is None:
            raise EdgeNasError(f"no architecture of {self._space.name!r} meets the limits {self._limits.describe()}; raise the limits")
        return arch


def rank_sum(population: Sequence[Any], proxies: Sequence[str]) -> List[float]:
    """Sum over proxies of each candidate's rank (1 = worst), an invalid value ranking below every valid one."""
    from models.aggregation import population_ranks
    from models.proxies import get_proxy

    total = np.zeros(len(population), dtype=np.float64)
    for name in proxies:
        sign = 1.0 if get_proxy(name).higher_is_better else -1.0
        values = [_value(candidate.results[name]) for candidate in population]
        total += population_ranks([sign * value for value in values])
    return total.tolist()


def _value(result: Any) -> float:
    return float(result.value) if result.valid else float("nan")


def run_setting(
    setting: SearchSetting,
    inputs: Any,
    *,
    input_size: int,
    budget: int,
    strategy: str,
    population_size: int,
    sample_size: int,
    seed: int,
    proxies: Optional[Sequence[str]] = None,
) -> SearchOutcome:
    from edge_runtime.search import CostLimits, run_search
    from models.proxies.scoring import score_architecture
    from models.spaces import get_space

    options: Dict[str, Any] = {"input_size": input_size, "num_classes": 1000}
    if setting.space == "mobilenetv2":
        options["width_mult"] = setting.width_mult
    limits = CostLimits(max_params=setting.max_params, max_flops=setting.max_flops)
    space = LimitedSampling(get_space(setting.space, **options), limits)
    names = tuple(proxies or setting.proxies)

    def evaluate(arch: Any) -> Mapping[str, Any]:
        return score_architecture(space, arch, inputs, None, names, seed=seed)

    def report(candidate: Any) -> None:
        values = ", ".join(f"{name}={_value(candidate.results[name]):.4g}" for name in names)
        logger.info("%s: %s params=%d flops=%d %s", setting.key, space.to_string(candidate.arch), candidate.params, candidate.flops, values)

    start = time.perf_counter()
    strategy_options = {"population_size": population_size, "sample_size": sample_size} if strategy == "evolution" else {}
    history = run_search(
        strategy, space, budget, evaluate, lambda population: rank_sum(population, names),
        random.Random(seed), limits, report, **strategy_options,
    )
    seconds = time.perf_counter() - start

    scores = rank_sum(history, names)
    best = history[int(np.argmax(scores))]
    invalid = {name: sum(1 for c in history if not c.results[name].valid) for name in names}
    return SearchOutcome(
        setting=setting,
        chosen=space.to_string(best.arch),
        params=best.params,
        flops=best.flops,
        proxy_values={name: (best.results[name].value if best.results[name].valid else None) for name in names},
        candidates=len(history),
        invalid=invalid,
        seconds=seconds,
        space_cost_range=space.cost_range(),
    )


def machine_description() -> str:
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.machine()} {platform.processor() or 'CPU'}, {os.cpu_count()} CPU cores (shared with other jobs, "
        f"load average {load:.1f} at start), torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"Python {platform.python_version()}"
    )


def _count(value: float) -> str:
    """Write a parameter or FLOPs count in M, or in G from 1e9 on."""
    if value >= 1e9:
        return f"{value / 1e9:.2f} G"
    return f"{value / 1e6:.2f} M"


def _space_label(setting: SearchSetting) -> str:
    if setting.space == "mobilenetv2":
        return f"mobilenetv2 (width {setting.width_mult:g})"
    return setting.space


def render_markdown(outcomes: Sequence[SearchOutcome], protocol: Mapping[str, Any]) -> str:
    lines = [
        "# Constrained zero-cost search: MobileNetV2 and AutoFormer",
        "",
        "Each row is one search under an upper limit on parameters and FLOPs (multiply-adds at "
        f"{protocol['input_size']}x{protocol['input_size']}, 1000-class head). Candidates were drawn within the limits, "
        "scored with forward-only proxies on real CIFAR-10 images resized to "
        f"{protocol['input_size']}x{protocol['input_size']}, and the candidate with the largest sum of per-proxy "
        "ranks was chosen. No network was trained: the chosen configurations are the proxies' picks, "
        "not verified accuracies.",
        "",
        "| Space | Limit (params, FLOPs) | Proxies | Candidates scored | Search time (s) | Chosen params | Chosen FLOPs | Space range (params; FLOPs) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for outcome in outcomes:
        setting = outcome.setting
        ranges = outcome.space_cost_range
        lines.append(
            f"| {_space_label(setting)} | {_count(setting.max_params)}, {_count(setting.max_flops)} "
            f"| {' + '.join(outcome.proxy_values)} | {outcome.candidates} | {outcome.seconds:.0f} "
            f"| {_count(outcome.params)} | {_count(outcome.flops)} "
            f"| {_count(ranges['params'][0])} to {_count(ranges['params'][1])}; "
            f"{_count(ranges['flops'][0])} to {_count(ranges['flops'][1])} |"
        )
    lines += [
        "",
        "Search time is the wall-clock time to build and score every candidate, on the machine named under "
        "Protocol, while other jobs shared its cores.",
    ]
    for outcome in outcomes:
        ranges = outcome.space_cost_range
        if ranges["params"][1] <= outcome.setting.max_params and ranges["flops"][1] <= outcome.setting.max_flops:
            lines.append(
                f"In `{outcome.setting.key}` even the largest network of the space ({_count(ranges['params'][1])}, "
                f"{_count(ranges['flops'][1])}) meets both limits, so that search is unconstrained."
            )
    lines += ["", "## Chosen configurations", ""]
    for outcome in outcomes:
        values = ", ".join(
            f"{name} {value:.4g}" if value is not None else f"{name} invalid" for name, value in outcome.proxy_values.items()
        )
        invalid = ", ".join(f"{name} {count}" for name, count in outcome.invalid.items() if count)
        lines += [
            f"- `{outcome.setting.key}`: {values}" + (f" (invalid values among the candidates: {invalid})" if invalid else ""),
            "",
            f"  `{outcome.chosen}`",
            "",
        ]
    lines += [
        "MobileNetV2-space strings list the stages after the fixed first block, joined by `_`, each block "
        "`k<kernel>e<expand ratio>`. AutoFormer strings are `e<embedding dim>_` and each layer `h<heads>m<MLP ratio>`.",
        "",
        "For scale: MobileNetV2 1.0 has 3.50 M params and 300.8 M FLOPs; the released AutoFormer-T has 5.77 M params "
        "and 1.28 G FLOPs, AutoFormer-S 22.79 M and 4.77 G (counted by these spaces).",
        "",
        "## Protocol",
        "",
        f"- Command: `{protocol['command']}`",
        f"- Machine: {protocol['machine']}",
        f"- Data: {protocol['data']} (hash {protocol['data_hash']}), probe batch of {protocol['batch_size']} images, "
        f"seed {protocol['seed']} for the batch, the initial weights and the search",
        f"- Strategy: {protocol['strategy']}, budget {protocol['budget']} candidates per search"
        + (f", population {protocol['population_size']}, tournament {protocol['sample_size']}" if protocol["strategy"] == "evolution" else ""),
        f"- Date: {protocol['date']}",
        "",
    ]
    return "\n".join(lines)


def outcome_json(outcome: SearchOutcome) -> Dict[str, Any]:
    return {
        "setting": outcome.setting.key,
        "space": outcome.setting.space,
        "width_mult": outcome.setting.width_mult if outcome.setting.space == "mobilenetv2" else None,
        "max_params": outcome.setting.max_params,
        "max_flops": outcome.setting.max_flops,
        "chosen": outcome.chosen,
        "params": outcome.params,
        "flops": outcome.flops,
        "proxies": outcome.proxy_values,
        "candidates": outcome.candidates,
        "invalid": outcome.invalid,
        "seconds": outcome.seconds,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=[s.key for s in SETTINGS], choices=sorted(SETTINGS_BY_KEY),
                        help="which searches to run (default: all)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="probe images: an .npz file, image folder or built-in sample")
    parser.add_argument("--budget", type=int, default=24, help="candidates scored per search (default: 24)")
    parser.add_argument("--strategy", choices=("evolution", "random"), default="evolution")
    parser.add_argument("--population-size", type=int, default=8, help="evolution population (default: 8)")
    parser.add_argument("--sample-size", type=int, default=3, help="evolution tournament size (default: 3)")
    parser.add_argument("--batch-size", type=int, default=16, help="probe images per candidate (default: 16)")
    parser.add_argument("--input-size", type=int, default=224, help="image side in pixels that the networks read (default: 224)")
    parser.add_argument("--proxies", nargs="+", help="override every setting's proxies (default: per space, see the module help)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the markdown table to this file")
    parser.add_argument("--json", action="store_true", help="print the outcomes as JSON on stdout")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)

    from edge_runtime.data import load_dataset

    try:
        dataset = load_dataset(args.data)
        inputs, _ = dataset.probe_batch(args.batch_size, seed=args.seed, size=args.input_size)
        machine = machine_description()
        outcomes = []
        for key in args.settings:
            outcome = run_setting(
                SETTINGS_BY_KEY[key], inputs, input_size=args.input_size,
                budget=args.budget, strategy=args.strategy, population_size=args.population_size,
                sample_size=args.sample_size, seed=args.seed, proxies=args.proxies,
            )
            logger.info("%s: chose %s (%d params, %d FLOPs) after %d candidates in %.0f s", key, outcome.chosen,
                        outcome.params, outcome.flops, outcome.candidates, outcome.seconds)
            outcomes.append(outcome)
    except EdgeNasError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    protocol = {
        "command": "python tools/constrained_search.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine,
        "data": Path(args.data).name,
        "data_hash": dataset.data_hash,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "strategy": args.strategy,
        "budget": args.budget,
        "population_size": args.population_size,
        "sample_size": args.sample_size,
        "input_size": args.input_size,
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(render_markdown(outcomes, protocol))
        logger.info("wrote %s", args.out)
    if args.json:
        print(json.dumps({"protocol": protocol, "outcomes": [outcome_json(o) for o in outcomes]}, indent=2))
    else:
        for outcome in outcomes:
            print(f"{outcome.setting.key}: {outcome.chosen}  params {outcome.params:,}  FLOPs {outcome.flops:,}  "
                  f"({outcome.candidates} candidates, {outcome.seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
