"""Search quality of the on-device search on NAS-Bench-201, and the cost of one `personalize` call.

Quality mode (the default) runs the search of `edge-nas personalize` under a few params limits
and seeds. Each run uses the same strategy, probe batch, forward-only ranking of the
candidates, gradient proxies for the finalists and label-free aggregation as `personalize`,
but without the ONNX export and latency measurement. With no latency or power limit, the
measurement cannot change the choice. Candidates are drawn only from the development split of
accuracy.csv, so every chosen architecture has a known CIFAR-10 test accuracy. Each limit row
compares that accuracy with the best development-split architecture that meets the limit and
with the median of uniform random picks among the architectures the search draws from.

    OMP_NUM_THREADS=1 nice -n 5 python tools/search_quality.py --limits none,800k,500k,300k \\
        --seeds 0,1,2 --budget 200 --finalists 8

Timing mode (`--time-personalize`) calls `personalize()` with its defaults (budget 200,
8 finalists, ONNX measurement included) on sklearn-digits, first with an empty score cache and
then with the cache filled. It records the seconds per stage and the peak resident memory.
Run it in its own process so that the peak memory is that of the calls alone.

Both modes store their results as JSON next to the page and then rewrite the page from every
JSON file present, so the two modes can run at different times. `--render-only` rewrites the
page from the JSON files without running anything. A quality rerun reads its scores from the
cache, so it would replace the stored timings with those of cached runs.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from models.errors import EdgeNasError  # noqa: E402  (needs the repository on sys.path)

DEFAULT_SHARED = Path(os.environ.get("EDGE_NAS_SHARED", REPO.parent / "shared"))
DEFAULT_ACCURACY = DEFAULT_SHARED / "data" / "nb201" / "accuracy.csv"
DEFAULT_DATA = DEFAULT_SHARED / "data" / "images" / "cifar10.npz"
DEFAULT_PAGE = REPO / "docs" / "benchmarks" / "search_quality.md"
ACCURACY_COLUMN = "cifar10_test"

logger = logging.getLogger("search_quality")


class CountingCache:
    """A score cache that counts the scorings computed afresh: each `put_many` stores one architecture's results."""

    def __init__(self, cache: Any) -> None:
        self._cache = cache
        self.fresh_rows = 0

    def put_many(self, *args: Any, **kwargs: Any) -> Any:
        self.fresh_rows += 1
        return self._cache.put_many(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)


class DevelopmentSplitSpace:
    """A search space restricted to the architectures with a known accuracy.

    `sample` draws uniformly from the development split. Every other architecture counts as
    degenerate, so the search rejects a mutation child outside the split as it rejects an
    architecture whose output cannot depend on its input. Every other attribute comes from the
    wrapped space, including `name`, so the score-cache keys are those of `personalize`.
    """

    def __init__(self, space: Any, archs: Sequence[str]) -> None:
        self._space = space
        self._archs = list(archs)
        self._known = set(self._archs)

    def sample(self, rng: random.Random) -> Any:
        return self._space.parse(rng.choice(self._archs))

    def is_degenerate(self, arch: Any) -> bool:
        return self._space.to_string(arch) not in self._known or self._space.is_degenerate(arch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._space, name)


def load_accuracy(path: Path) -> Dict[str, float]:
    """Read {architecture string: CIFAR-10 test accuracy in %} from the development split's CSV."""
    if not path.is_file():
        raise EdgeNasError(f"the NAS-Bench-201 accuracy file {path} was not found; pass --accuracy")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "arch" not in rows[0] or ACCURACY_COLUMN not in rows[0]:
        raise EdgeNasError(f"{path} is missing the 'arch' or the {ACCURACY_COLUMN!r} column; pass the NAS-Bench-201 accuracy CSV")
    return {row["arch"]: float(row[ACCURACY_COLUMN]) for row in rows if row[ACCURACY_COLUMN]}


def parse_limit(text: str) -> Optional[int]:
    from edge_runtime.cli_common import parse_count

    return None if text.strip().lower() == "none" else parse_count(text, "--limits")


def limit_label(limit: Optional[int]) -> str:
    if limit is None:
        return "none"
    return f"{limit / 1000:g}k"


def reference_stats(space: Any, accuracy: Mapping[str, float], limit: Optional[int]) -> Dict[str, Any]:
    """Describe the architectures that the search draws from under `limit`: meeting it and not degenerate."""
    eligible = {}
    for text, value in accuracy.items():
        arch = space.parse(text)
        if space.is_degenerate(arch):
            continue
        if limit is not None and space.params(arch) > limit:
            continue
        eligible[text] = value
    if not eligible:
        raise EdgeNasError(f"no development-split architecture meets the params limit {limit_label(limit)}")
    best = max(eligible, key=eligible.get)
    return {
        "eligible": len(eligible),
        "best_arch": best,
        "best_accuracy": eligible[best],
        "median_accuracy": statistics.median(eligible.values()),
        "sorted_accuracies": sorted(eligible.values()),
    }


def search_once(
    space: Any,
    accuracy: Mapping[str, float],
    inputs: Any,
    labels: Any,
    protocol: Any,
    cache: CountingCache,
    ranking: Any,
    limit: Optional[int],
    budget: int,
    finalists: int,
    strategy: str,
    seed: int,
) -> Dict[str, Any]:
    """Run the search, forward ranking, gradient proxies, aggregation and choice of `personalize`, without measurement.

    NOTE: this calls the private helpers of edge_runtime.personalize in the order that
    `personalize()` calls them. A new step added there is not run here until it is added here too.
    """
    from edge_runtime import personalize as pipeline

    limits = pipeline.Limits(max_params=limit)
    fresh_before = cache.fresh_rows
    wall_start = time.perf_counter()
    cpu_start = time.process_time()
    candidates = pipeline._search(
        space, limits, budget, strategy, seed, inputs, labels, protocol, cache, ranking, False, pipeline.RunObserver()
    )
    chosen_finalists = pipeline._select_finalists(space, candidates, ranking, finalists)
    request = pipeline.GradientRequest(
        space=space,
        archs=[f.arch for f in chosen_finalists],
        proxies=list(ranking.gradient_proxies),
        protocol=protocol,
        inputs=inputs,
        labels=labels,
        cache=cache,
        progress=False,
    )
    pipeline._merge_gradient_results(chosen_finalists, pipeline.LocalGradientSource()(request), request)
    pipeline._aggregate(chosen_finalists, ranking, None)
    chosen = pipeline.choose_finalist(chosen_finalists, limits)
    seconds = time.perf_counter() - wall_start
    cpu_seconds = time.process_time() - cpu_start

    candidate_archs = [space.to_string(c.arch) for c in candidates]
    return {
        "limit": limit,
        "seed": seed,
        "chosen": chosen.arch,
        "chosen_params": chosen.params,
        "chosen_accuracy": accuracy[chosen.arch],
        # The top finalist by the forward-only ranking: the pick without the gradient proxies.
        "forward_pick_accuracy": accuracy[chosen_finalists[0].arch],
        "best_candidate_accuracy": max(accuracy[text] for text in candidate_archs),
        "candidates": len(candidates),
        "finalists": len(chosen_finalists),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "fresh_rows": cache.fresh_rows - fresh_before,
    }


def run_quality(args: argparse.Namespace) -> Dict[str, Any]:
    import torch

    from edge_runtime.data import load_dataset
    from edge_runtime.personalize import _network_options
    from edge_runtime.proxy_ranking import default_ranking
    from edge_runtime.score_cache import ScoreCache, default_cache_path
    from edge_runtime.scoring import ScoringProtocol
    from models.spaces import get_space

    accuracy = load_accuracy(args.accuracy)
    dataset = load_dataset(str(args.data), image_size=32)
    base_space = get_space("nb201", num_classes=dataset.num_classes)
    space = DevelopmentSplitSpace(base_space, sorted(accuracy))
    ranking = default_ranking()
    limits = [parse_limit(text) for text in args.limits.split(",")]
    seeds = [int(text) for text in args.seeds.split(",")]
    cache_path = args.cache or default_cache_path()
    cache_path.parent.mkdir(parents=True, exist_ok=True)

    references = {limit_label(limit): reference_stats(base_space, accuracy, limit) for limit in limits}
    runs: List[Dict[str, Any]] = []
    load_start = os.getloadavg()
    with ScoreCache(cache_path) as opened:
        cache = CountingCache(opened)
        for seed in seeds:
            inputs, labels = dataset.probe_batch(args.batch_size, seed=seed, size=base_space.input_size)
            protocol = ScoringProtocol(
                space=base_space.name,
                num_classes=base_space.num_classes,
                input_size=base_space.input_size,
                data_hash=dataset.data_hash,
                batch_size=args.batch_size,
                seed=seed,
                space_options=_network_options(base_space),
            )
            for limit in limits:
                run = search_once(
                    space, accuracy, inputs, labels, protocol, cache, ranking,
                    limit, args.budget, args.finalists, args.search, seed,
                )
                run["chosen_percentile"] = percentile_of(run["chosen_accuracy"], references[limit_label(limit)])
                runs.append(run)
                logger.info(
                    "limit %s seed %d: chose %s (%.2f%%), %.0f s, %d scorings computed afresh",
                    limit_label(limit), seed, run["chosen"], run["chosen_accuracy"], run["seconds"], run["fresh_rows"],
                )

    for reference in references.values():
        del reference["sorted_accuracies"]
    return {
        "settings": {
            "limits": [limit_label(limit) for limit in limits],
            "seeds": seeds,
            "budget": args.budget,
            "finalists": args.finalists,
            "search": args.search,
            "batch_size": args.batch_size,
            "data": f"{Path(args.data).name} (hash {dataset.data_hash})",
            "cache": str(cache_path),
            "forward_aggregate": ranking.forward_name,
            "forward_proxies": list(ranking.forward_proxies),
            "final_aggregate": ranking.final_name,
            "gradient_proxies": list(ranking.gradient_proxies),
            "development_split": len(accuracy),
            "source_sha256": source_hashes(),
        },
        "machine": machine_description(torch.get_num_threads(), load_start, os.getloadavg()),
        "command": command_line(),
        "date": time.strftime("%Y-%m-%d"),
        "references": references,
        "runs": runs,
    }


def source_hashes() -> Dict[str, str]:
    """Return the first 12 hex digits of the SHA-256 of each proxy and aggregation source file.

    The score cache does not see these files, so the page records which versions scored.
    """
    hashes = {}
    for relative in ("models/proxies/fgnas.py", "models/aggregation.py", "edge_runtime/proxy_ranking.py"):
        path = REPO / relative
        hashes[relative] = hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.is_file() else "missing"
    return hashes


def percentile_of(value: float, reference: Mapping[str, Any]) -> float:
    """Return the share (%) of the eligible architectures whose accuracy is at most `value`."""
    ordered = reference["sorted_accuracies"]
    return 100.0 * sum(1 for other in ordered if other <= value) / len(ordered)


def run_personalize_timing(args: argparse.Namespace) -> Dict[str, Any]:
    """Call `personalize()` with its defaults on `--timing-data`, first with an empty score cache, then with it filled."""
    import torch

    from edge_runtime.personalize import personalize

    load_start = os.getloadavg()
    calls = []
    with tempfile.TemporaryDirectory(prefix="edge-nas-timing-") as folder:
        cache_path = Path(folder) / "scores.sqlite"
        for label in ("empty cache", "filled cache"):
            start = time.perf_counter()
            cpu_start = time.process_time()
            result = personalize(args.timing_data, Path(folder) / "out", cache=cache_path, progress=False)
            calls.append({
                "cache": label,
                "seconds": time.perf_counter() - start,
                "cpu_seconds": time.process_time() - cpu_start,
                "stage_seconds": dict(result.stage_seconds),
                # ru_maxrss never decreases, so after the second call it is the peak of both.
                "peak_memory_mb": peak_memory_mb(),
                "chosen": result.chosen.arch,
                "latency_p50_ms": result.chosen.latency.p50_ms if result.chosen.latency else None,
                "execution_provider": result.chosen.latency.execution_provider if result.chosen.latency else None,
                "candidates_scored": result.candidates_scored,
                "finalists": len(result.finalists),
            })
            logger.info("personalize with %s: %.1f s, peak memory %.0f MB", label, calls[-1]["seconds"],
                        calls[-1]["peak_memory_mb"])
    return {
        "data": args.timing_data,
        "machine": machine_description(torch.get_num_threads(), load_start, os.getloadavg()),
        "command": command_line(),
        "date": time.strftime("%Y-%m-%d"),
        "calls": calls,
    }


def peak_memory_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def machine_description(threads: int, load_start: Sequence[float], load_end: Sequence[float]) -> Dict[str, Any]:
    return {
        "cpu": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "torch": _torch_version(),
        "load_average_start": round(load_start[0], 2),
        "load_average_end": round(load_end[0], 2),
    }


def _torch_version() -> str:
    import torch

    return torch.__version__


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])


def mean_sd(values: Sequence[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def render_page(quality: Optional[Mapping[str, Any]], timing: Optional[Mapping[str, Any]]) -> str:
    lines = ["# Search quality on NAS-Bench-201", ""]
    if quality is not None:
        lines += render_quality(quality)
    else:
        lines += ["No quality results yet: run `tools/search_quality.py` without `--time-personalize`.", ""]
    if timing is not None:
        lines += render_timing(timing)
    return "\n".join(lines)


def render_quality(quality: Mapping[str, Any]) -> List[str]:
    settings = quality["settings"]
    machine = quality["machine"]
    lines = [
        f"Each row is one params limit (10 classes, 32x32 inputs), searched once with each seed in "
        f"{', '.join(map(str, settings['seeds']))}. Each search is the pipeline of `edge-nas personalize`: "
        f"{settings['search']} search with {settings['budget']} candidates scored by `{settings['forward_aggregate']}` "
        f"({', '.join(settings['forward_proxies'])}), the best {settings['finalists']} by that ranking given the "
        f"gradient proxies ({', '.join(settings['gradient_proxies'])}), and the choice by the label-free "
        f"`{settings['final_aggregate']}` aggregate. The ONNX export and latency measurement are skipped because "
        "with no latency or power limit they cannot change the choice.",
        "",
        f"Candidates are drawn only from the development split ({settings['development_split']:,} of the 15,625 "
        f"architectures), so every chosen architecture has a known `{ACCURACY_COLUMN}` accuracy. The 4,000 "
        "withheld architectures are never drawn.",
        "",
        "| Params limit | Eligible architectures | Chosen: accuracy % (mean ± sd) | Chosen: percentile | "
        "Forward-only pick: accuracy % | Best of the candidates % | Best in split % | Median random pick % | "
        "Search s per run (mean) | Scored afresh per run (mean) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label in settings["limits"]:
        reference = quality["references"][label]
        runs = [run for run in quality["runs"] if limit_label(run["limit"]) == label]
        if not runs:
            continue
        lines.append(
            f"| {label} | {reference['eligible']:,} | {mean_sd([r['chosen_accuracy'] for r in runs])} | "
            f"{mean_sd([r['chosen_percentile'] for r in runs])} | "
            f"{mean_sd([r['forward_pick_accuracy'] for r in runs])} | "
            f"{mean_sd([r['best_candidate_accuracy'] for r in runs])} | {reference['best_accuracy']:.2f} | "
            f"{reference['median_accuracy']:.2f} | {statistics.mean(r['seconds'] for r in runs):.0f} | "
            f"{statistics.mean(r['fresh_rows'] for r in runs):.0f} |"
        )
    fresh = sum(run["fresh_rows"] for run in quality["runs"])
    lines += [
        "",
        "- Eligible architectures: development-split architectures that meet the limit and whose output depends on "
        "their input, the set the search draws from. The median random pick is the median accuracy of that set.",
        "- Chosen: percentile is the share of eligible architectures whose accuracy is at most the chosen one's.",
        "- Forward-only pick: the top candidate by the forward ranking alone, before the gradient proxies.",
        "- Best of the candidates: the most accurate of the candidates scored in that run, the best any ranking "
        "of them could choose.",
        f"- Search seconds: wall time of the search, forward ranking, gradient proxies and aggregation of one run. "
        f"{fresh} scorings (the forward proxies of a candidate or the gradient proxies of a finalist) were "
        "computed afresh in these runs and the others came from the score cache. The runs of one seed share "
        "their probe batch and so their cache entries, and the limits ran in the order of the table, so a later "
        "limit reuses the candidates that an earlier one scored. Only a run that scored about budget + finalists "
        "afresh shows the time of a first run.",
        "",
        "## Runs",
        "",
        "| Params limit | Seed | Chosen architecture | Params | Accuracy % | Seconds | CPU seconds | Scored afresh |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in quality["runs"]:
        lines.append(
            f"| {limit_label(run['limit'])} | {run['seed']} | `{table_cell(run['chosen'])}` | {run['chosen_params']:,} | "
            f"{run['chosen_accuracy']:.2f} | {run['seconds']:.0f} | {run['cpu_seconds']:.0f} | {run['fresh_rows']} |"
        )
    lines += [
        "",
        "## Protocol",
        "",
        f"- Command: `OMP_NUM_THREADS={machine['omp_num_threads']} nice -n 5 {quality['command']}`",
        f"- Machine: {describe_machine(machine)}",
        f"- Data: {settings['data']}, probe batch of {settings['batch_size']} images drawn with the run's seed, "
        "which also seeds the initial weights and the search",
        f"- Score cache: the default path ({settings['cache']}); a rerun with the same settings reads every score "
        "from there",
        f"- Date: {quality['date']}",
        "- Proxy and aggregation sources (SHA-256, first 12 digits): "
        + ", ".join(f"`{path}` {digest}" for path, digest in settings.get("source_sha256", {}).items()),
        "",
        "## Caveats",
        "",
        "- The accuracies are those of NAS-Bench-201 (trained 200 epochs on CIFAR-10), not of the seeded networks "
        "that `personalize` exports, which are untrained.",
        "- Restricting the draw to the development split changes the candidate pool: the search never sees the "
        "withheld 4,000 architectures, which a real run can choose.",
        "- The aggregation is label-free. A calibrated aggregator file (`--aggregator`) can rank differently.",
        f"- {len(settings['seeds'])} seeds give a rough spread only. The seed changes the probe batch, the weights "
        "and the draws at once.",
        "- The score cache keys include the code version but not the proxy source, so cached scores from an older "
        "proxy implementation at the same version are reused. Clear the cache after changing a proxy.",
        "",
    ]
    return lines


def render_timing(timing: Mapping[str, Any]) -> List[str]:
    machine = timing["machine"]
    stages = list(timing["calls"][0]["stage_seconds"])
    lines = [
        "## Time per stage and peak memory of one `personalize` call",
        "",
        f"`personalize()` ran with its defaults on `{timing['data']}`: 200 candidates, 8 finalists, random search, "
        "probe batch 64, and ONNX export and latency measurement of every finalist. The first call started with an "
        "empty score cache and the second reused the cache that the first call filled.",
        "",
        "| Stage | " + " | ".join(f"Seconds, {call['cache']}" for call in timing["calls"]) + " |",
        "| --- | " + " | ".join("---:" for _ in timing["calls"]) + " |",
    ]
    for stage in stages:
        lines.append(
            f"| {stage} | " + " | ".join(f"{call['stage_seconds'].get(stage, math.nan):.2f}" for call in timing["calls"]) + " |"
        )
    lines.append("| total (wall) | " + " | ".join(f"{call['seconds']:.1f}" for call in timing["calls"]) + " |")
    lines.append("| total (CPU of this process) | " + " | ".join(f"{call['cpu_seconds']:.1f}" for call in timing["calls"]) + " |")
    first = timing["calls"][0]
    lines += [
        "",
        f"- Peak resident memory (`ru_maxrss`) after the first call: {first['peak_memory_mb']:.0f} MB, "
        f"after both: {timing['calls'][-1]['peak_memory_mb']:.0f} MB (the whole Python process, torch included).",
        f"- Chosen: `{first['chosen']}`, p50 latency {first['latency_p50_ms']:.3f} ms on {first['execution_provider']}.",
        f"- Command: `OMP_NUM_THREADS={machine['omp_num_threads']} nice -n 5 {timing['command']}`",
        f"- Machine: {describe_machine(machine)}",
        f"- Date: {timing['date']}",
        "",
        f"NOTE: torch used {machine['torch_threads']} thread(s) and other jobs shared the cores while this ran "
        f"(1-minute load average {machine['load_average_start']} at start on {machine['cpu_count']} cores). "
        "An idle machine with every core given to torch is expected to be faster, but that was not measured.",
        "",
    ]
    return lines


def table_cell(text: str) -> str:
    """Escape the pipes of an NB201 architecture string so that it stays in one Markdown table cell."""
    return text.replace("|", "\\|")


def describe_machine(machine: Mapping[str, Any]) -> str:
    return (
        f"{machine['cpu']}, {machine['cpu_count']} CPU cores, torch {machine['torch']} with "
        f"{machine['torch_threads']} thread(s), Python {machine['python']}; 1-minute load average "
        f"{machine['load_average_start']} at start and {machine['load_average_end']} at end, from other jobs on "
        "the same cores"
    )


def read_json(path: Path) -> Optional[Dict[str, Any]]:
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limits", default="none,800k,500k,300k",
                        help="comma-separated params limits; 'none' for no limit, k/M suffixes allowed")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one search per seed and limit")
    parser.add_argument("--budget", type=int, default=200, help="candidates scored per search")
    parser.add_argument("--finalists", type=int, default=8, help="finalists given the gradient proxies")
    parser.add_argument("--search", choices=("random", "evolution"), default="random", help="search strategy")
    parser.add_argument("--batch-size", type=int, default=64, help="probe batch size in images")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="images for the quality runs: a path or a built-in sample name")
    parser.add_argument("--accuracy", type=Path, default=DEFAULT_ACCURACY,
                        help="NAS-Bench-201 accuracy CSV of the development split")
    parser.add_argument("--cache", type=Path, default=None,
                        help="score cache for the quality runs; default: the edge-nas default path")
    parser.add_argument("--time-personalize", action="store_true",
                        help="time one default personalize() call instead of the quality runs")
    parser.add_argument("--timing-data", default="sklearn-digits",
                        help="data of the personalize() timing call: a path or a built-in sample name")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the page from the stored JSON results without running anything")
    parser.add_argument("--out", type=Path, default=DEFAULT_PAGE, help="the Markdown page to write")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    quality_path = args.out.with_suffix(".json")
    timing_path = args.out.with_name(args.out.stem + "_personalize_timing.json")
    try:
        if args.time_personalize and not args.render_only:
            write_json(timing_path, run_personalize_timing(args))
        elif not args.render_only:
            write_json(quality_path, run_quality(args))
    except EdgeNasError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    args.out.write_text(render_page(read_json(quality_path), read_json(timing_path)))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
