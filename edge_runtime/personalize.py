"""The on-device search: personal data in, one measured and exported subnet out.

`personalize()` runs the whole pipeline and is what `edge-nas personalize` calls:

1. load the personal images and draw one probe batch;
2. search the space under the params/FLOPs limits, scoring every candidate with the
   forward-only proxies (the search fitness);
3. keep the best `finalists` by that forward-only ranking;
4. compute the gradient proxies of the finalists through a gradient source (here by default,
   or a cloud client that the caller passes in);
5. aggregate every proxy over the finalists, with the aggregator file given, else the last one
   the gradient source received from the cloud, else the label-free aggregator;
6. export each finalist to ONNX and measure its latency and power on this machine;
7. drop finalists over the latency, power and energy limits, choose the best-scored one left,
   and write model.onnx, subnet.json and report.md (with a plot) into the output folder.
"""
from __future__ import annotations

import json
import logging
import math
import random
import sqlite3
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import edge_runtime
from edge_runtime.atomic import ensure_writable_dir, write_bytes_atomic, write_text_atomic
from edge_runtime.data import ImageDataset, load_dataset
from edge_runtime.latency import LatencyResult, import_onnxruntime
from edge_runtime.measure import MeasureSettings, measure_finalist
from edge_runtime.proxy_ranking import ProxyRanking, default_ranking
from edge_runtime.report import write_report
from edge_runtime.power import PowerMeter, PowerSummary, open_power_meter
from edge_runtime.score_cache import ScoreCache, default_cache_path
from edge_runtime.scoring import ScoringProtocol, score_archs
from edge_runtime.search import STRATEGIES, Candidate, CostLimits, run_search
from models.errors import EdgeNasError, InvalidArchitectureError
from models.proxies import ProxyResult
from models.proxies._context import build_seeded
from models.spaces import get_space, list_spaces

logger = logging.getLogger(__name__)

SUBNET_FORMAT = "edge-nas-subnet/1"
DEFAULT_BUDGET = 200
DEFAULT_FINALISTS = 8
DEFAULT_BATCH_SIZE = 64

# The latency statistic that --max-latency-ms limits.
LATENCY_LIMIT_STATISTIC = "p50"


@dataclass
class GradientRequest:
    """The input of a gradient source: the finalists, the proxies to compute, and the probe batch."""

    space: Any
    archs: List[str]
    proxies: List[str]
    protocol: ScoringProtocol
    # The probe batch, float32 N x 3 x H x W. Raw images leave the device only when the user
    # opts in, so a cloud source sends a summary of them in their place.
    inputs: Any
    labels: Any
    cache: Optional[ScoreCache] = None
    progress: bool = True
    # The personal ImageDataset, from which a cloud source may summarise more images than the probe batch.
    dataset: Any = None


class RunObserver:
    """Callbacks that follow one run of `personalize`; the default does nothing.

    A callback may raise to stop the run: the exception propagates after the cache and the
    temporary files are closed, and no output is written. The device daemon uses this to
    publish progress and to stop a job for a cancel command or a shutdown.
    """

    def stage_started(self, name: str) -> None:
        """Receive the name of each stage as it starts.

        The stages, in order: load, search, forward_ranking, gradient_proxies, aggregation,
        measurement, choice, write.
        """

    def candidate_scored(self, done: int, budget: int) -> None:
        """Receive the count of candidates scored (or read from the cache) so far."""

    def finalist_measured(self, done: int, total: int) -> None:
        """Receive the count of finalists exported and measured so far."""


# A gradient source maps a request to {architecture string: {proxy: ProxyResult}}. It has a
# `name` attribute, written to subnet.json as `gradient_source` ("local" or "cloud"). It may
# also have `fetch_aggregator(space_name)`, returning (file, metadata) of the last good
# aggregator received from the cloud or None, and `describe()`, a dict for subnet.json.
GradientSource = Callable[[GradientRequest], Mapping[str, Mapping[str, ProxyResult]]]


class LocalGradientSource:
    """Compute the gradient proxies on this machine (offline mode), with the score cache."""

    name = "local"

    def __call__(self, request: GradientRequest) -> Dict[str, Dict[str, ProxyResult]]:
        archs = [request.space.parse(text) for text in request.archs]
        results: Dict[str, Dict[str, ProxyResult]] = {}
        rows = score_archs(
            request.space,
            archs,
            request.inputs,
            request.labels,
            request.proxies,
            request.protocol,
            cache=request.cache,
            progress=request.progress,
            description="gradient proxies",
        )
        for arch, row in rows:
            results[request.space.to_string(arch)] = dict(row)
        return results


@dataclass
class Finalist:
    """A finalist with every proxy result, its scores and its measurements."""

    arch: str
    params: int
    flops: int
    proxies: Dict[str, ProxyResult]
    forward_score: float
    score: float = math.nan
    latency: Optional[LatencyResult] = None
    power: Optional[PowerSummary] = None
    power_unavailable_reason: str = ""
    onnx_path: Optional[Path] = None
    limit_failures: List[str] = field(default_factory=list)

    @property
    def meets_limits(self) -> bool:
        return not self.limit_failures

    def describe(self) -> Dict[str, Any]:
        return {
            "architecture": self.arch,
            "params": self.params,
            "flops": self.flops,
            "proxies": {name: _describe_result(result) for name, result in self.proxies.items()},
            "forward_score": _finite_or_none(self.forward_score),
            "score": _finite_or_none(self.score),
            "measurements": describe_measurements(self.latency, self.power, self.power_unavailable_reason),
            "meets_limits": self.meets_limits,
            "limit_failures": list(self.limit_failures),
        }


@dataclass
class PersonalizeResult:
    """The outcome of `personalize`: the chosen finalist, all finalists, and `subnet`, the content of subnet.json."""

    out_dir: Path
    chosen: Finalist
    finalists: List[Finalist]
    candidates_scored: int
    stage_seconds: Dict[str, float]
    subnet: Dict[str, Any]

    @property
    def files(self) -> Dict[str, Path]:
        return {key: self.out_dir / name for key, name in self.subnet["files"].items()}

    def summary(self) -> Dict[str, Any]:
        """Return a compact machine-readable summary (what `--json` prints)."""
        measurements = self.subnet["measurements"]
        return {
            "architecture": self.chosen.arch,
            "space": self.subnet["space"]["name"],
            "params": self.chosen.params,
            "flops": self.chosen.flops,
            "score": self.subnet["score"],
            "latency_ms": measurements["latency"],
            "power": measurements["power"],
            "gradient_source": self.subnet["gradient_source"],
            "aggregator": self.subnet["aggregation"]["aggregator_source"],
            "candidates_scored": self.candidates_scored,
            "finalists": len(self.finalists),
            "stage_seconds": dict(self.stage_seconds),
            "peak_memory_mb": self.subnet["peak_memory_mb"],
            "files": {key: str(path) for key, path in self.files.items()},
        }


@dataclass(frozen=True)
class Limits:
    """Every user limit of one run; None means no limit."""

    max_params: Optional[int] = None
    max_flops: Optional[int] = None
    max_latency_ms: Optional[float] = None
    max_power_w: Optional[float] = None
    max_energy_mj: Optional[float] = None

    def check_positive(self) -> None:
        for keyword, option, value in (
            ("max_params", "--max-params", self.max_params),
            ("max_flops", "--max-flops", self.max_flops),
            ("max_latency_ms", "--max-latency-ms", self.max_latency_ms),
            ("max_power_w", "--max-power-w", self.max_power_w),
            ("max_energy_mj", "--max-energy-mj", self.max_energy_mj),
        ):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise EdgeNasError(f"{option} ({keyword}) must be a positive number, got {value!r}")

    @property
    def needs_power(self) -> bool:
        return self.max_power_w is not None or self.max_energy_mj is not None

    def cost_limits(self) -> CostLimits:
        return CostLimits(max_params=self.max_params, max_flops=self.max_flops)

    def describe(self) -> Dict[str, Any]:
        return {
            "max_params": self.max_params,
            "max_flops": self.max_flops,
            "max_latency_ms": self.max_latency_ms,
            "latency_statistic": LATENCY_LIMIT_STATISTIC,
            "max_power_w": self.max_power_w,
            "max_energy_mj": self.max_energy_mj,
        }


def personalize(
    data: Union[str, Path, ImageDataset],
    out_dir: Union[str, Path],
    *,
    space: str = "nb201",
    input_size: Optional[int] = None,
    width_mult: Optional[float] = None,
    max_params: Optional[int] = None,
    max_flops: Optional[int] = None,
    max_latency_ms: Optional[float] = None,
    max_power_w: Optional[float] = None,
    max_energy_mj: Optional[float] = None,
    budget: int = DEFAULT_BUDGET,
    finalists: int = DEFAULT_FINALISTS,
    search: str = "random",
    seed: int = 0,
    aggregator: Optional[Union[str, Path]] = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    cache: Optional[Union[str, Path, ScoreCache]] = None,
    gradient_source: Optional[GradientSource] = None,
    power_meter: Optional[PowerMeter] = None,
    measure: Optional[MeasureSettings] = None,
    ranking: Optional[ProxyRanking] = None,
    progress: Optional[bool] = None,
    observer: Optional[RunObserver] = None,
) -> PersonalizeResult:
    """Search `space` for the subnet that suits `data` and this machine, and write it to `out_dir`.

    Args:
        data: a path (.npz or image folder), a built-in sample name such as "sklearn-digits",
            or a loaded `ImageDataset`.
        out_dir: the folder that receives model.onnx, subnet.json, report.md and the plot.
        space: the search space: "nb201", "mobilenetv2", "autoformer-tiny", "autoformer-small"
            or "autoformer-base".
        input_size: the network's input resolution in pixels; None takes the space's own (32
            for nb201, 224 for the others). Images of another size are resized to it.
        width_mult: the width multiplier of a space that has one (mobilenetv2); None keeps 1.0.
        max_params, max_flops: limits checked on the encoding before any network is built.
        max_latency_ms: limit on the p50 latency of one image, measured with onnxruntime.
        max_power_w, max_energy_mj: limits on mean board power while the model runs and on
            energy per inference; both raise EdgeNasError where power cannot be measured.
        budget: the number of candidates scored. finalists: how many go on to the gradient
            proxies and the measurement.
        search: "random" or "evolution" (regularised evolution with the forward score as fitness).
        seed: seeds the search, the network weights, the probe batch and the latency input.
        aggregator: a calibrated aggregator file. Without one, the last good aggregator that
            `gradient_source.fetch_aggregator` returns is used, else the aggregation is label-free.
        cache: the score cache (a path or an open cache); None uses the default path. A rerun
            with the same inputs reads its results from there, so an interrupted run resumes.
        gradient_source: computes the finalists' gradient proxies; None computes them here.
            `cloud_sync.client.CloudGradientSource` gets them from the cloud coordinators.
        power_meter: None opens the first available source (jtop, sysfs, else unavailable).
        progress: progress bars on stderr; None shows them when stderr is a terminal.
        observer: receives each stage, scored candidate and measured finalist (`RunObserver`).

    Raises EdgeNasError, with a message naming the value and the fix, for every mistake a user can fix.
    KeyboardInterrupt propagates after the cache and the temporary files are closed.
    """
    limits = Limits(max_params, max_flops, max_latency_ms, max_power_w, max_energy_mj)
    limits.check_positive()
    if progress is None:
        progress = sys.stderr.isatty()
    _check_counts(budget, finalists, batch_size, search)
    created_out_dir = not Path(out_dir).exists()
    out_dir = ensure_writable_dir(Path(out_dir))
    import_onnxruntime()  # fail before the search, not after it
    ranking = ranking or default_ranking()
    measure = measure or MeasureSettings()
    gradient_source = gradient_source or LocalGradientSource()
    observer = observer or RunObserver()
    source_name = getattr(gradient_source, "name", None)
    if source_name not in ("local", "cloud"):
        raise TypeError(f"a gradient source needs a `name` attribute, 'local' or 'cloud', got {source_name!r}")
    stage_seconds: Dict[str, float] = {}

    with ExitStack() as stack:
        if created_out_dir:
            # A run that fails before writing leaves no empty output folder behind.
            stack.callback(_remove_if_empty, out_dir)
        meter = power_meter if power_meter is not None else open_power_meter()
        if power_meter is None:
            stack.callback(meter.close)
        if limits.needs_power and not meter.available:
            option = "--max-power-w" if limits.max_power_w is not None else "--max-energy-mj"
            raise EdgeNasError(
                f"{option} needs power measurements, but power cannot be measured on this machine "
                f"({meter.reason}); remove the limit or run on a Jetson with jetson-stats or readable INA3221 rails"
            )

        with _stage(stage_seconds, "load", observer):
            space_options = space_settings(space, input_size, width_mult)
            # An image folder is read at the network's input size, so its images are resized once.
            dataset = data if isinstance(data, ImageDataset) else load_dataset(
                str(data), image_size=space_options["input_size"]
            )
            gap = dataset.label_gap_warning()
            if gap:
                logger.warning("%s", gap)
            search_space = build_space(space, dataset.num_classes, space_options)
            limits.cost_limits().check(search_space)
            loaded_aggregator, aggregator_record = _load_aggregator(ranking, aggregator, search_space.name, gradient_source)
            if loaded_aggregator is not None:
                ranking = ranking.including(getattr(loaded_aggregator, "proxies", ()))
            _check_probe_memory(search_space, batch_size, seed)
            inputs, labels = dataset.probe_batch(batch_size, seed=seed, size=search_space.input_size)
            protocol = ScoringProtocol(
                space=search_space.name,
                num_classes=search_space.num_classes,
                input_size=search_space.input_size,
                data_hash=dataset.data_hash,
                batch_size=batch_size,
                seed=seed,
                space_options=_network_options(search_space),
            )
        logger.info("loaded %s: %d images, %d classes, data hash %s",
                    dataset.name, len(dataset), dataset.num_classes, dataset.data_hash)

        score_cache = _open_cache(cache, stack)
        try:
            with _stage(stage_seconds, "search", observer):
                candidates = _search(
                    search_space, limits, budget, search, seed, inputs, labels, protocol, score_cache, ranking, progress,
                    observer,
                )
            with _stage(stage_seconds, "forward_ranking", observer):
                chosen_finalists = _select_finalists(search_space, candidates, ranking, finalists)
            with _stage(stage_seconds, "gradient_proxies", observer):
                request = GradientRequest(
                    space=search_space,
                    archs=[f.arch for f in chosen_finalists],
                    proxies=list(ranking.gradient_proxies),
                    protocol=protocol,
                    inputs=inputs,
                    labels=labels,
                    cache=score_cache,
                    progress=progress,
                    dataset=dataset,
                )
                _merge_gradient_results(chosen_finalists, gradient_source(request), request)
            # A cloud source that fell back to local computation renames itself, so read the name after the call.
            source_name = getattr(gradient_source, "name", source_name)
            with _stage(stage_seconds, "aggregation", observer):
                _aggregate(chosen_finalists, ranking, loaded_aggregator)
            temporary = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edge-nas-finalists-")))
            with _stage(stage_seconds, "measurement", observer):
                _measure_all(search_space, chosen_finalists, seed, meter, measure, temporary, progress, observer)
            with _stage(stage_seconds, "choice", observer):
                chosen = choose_finalist(chosen_finalists, limits)
        except KeyboardInterrupt:
            logger.warning(
                "interrupted; the scores computed so far are kept in the cache %s, so the same command resumes",
                getattr(score_cache, "path", None),
            )
            raise

        observer.stage_started("write")
        write_started = time.perf_counter()
        subnet = _subnet_record(
            search_space, dataset, chosen, chosen_finalists, limits, protocol, ranking, aggregator_record,
            budget, len(candidates), search, seed, source_name,
        )
        describe_source = getattr(gradient_source, "describe", None)
        subnet["gradient_source_details"] = describe_source() if callable(describe_source) else None
        assert chosen.onnx_path is not None
        # subnet.json is removed first and written last, so its presence means the folder is complete.
        _remove_if_present(out_dir / subnet["files"]["subnet"])
        write_bytes_atomic(out_dir / subnet["files"]["model"], chosen.onnx_path.read_bytes())
        stage_seconds["write"] = time.perf_counter() - write_started
        subnet["stage_seconds"] = dict(stage_seconds)
        write_report(out_dir, subnet, chosen_finalists, chosen)
        write_text_atomic(out_dir / subnet["files"]["subnet"], json.dumps(subnet, indent=2) + "\n")

    logger.info("chose %s; wrote %s", chosen.arch, out_dir)
    return PersonalizeResult(
        out_dir=out_dir,
        chosen=chosen,
        finalists=chosen_finalists,
        candidates_scored=len(candidates),
        stage_seconds=dict(stage_seconds),
        subnet=subnet,
    )


def _check_probe_memory(space: Any, batch_size: int, seed: int) -> None:
    """Raise EdgeNasError when scoring one sampled network on the probe batch would not fit in free memory."""
    from edge_runtime.scoring import BACKWARD_MEMORY_FACTOR, activation_bytes_per_sample, available_memory_bytes

    available = available_memory_bytes()
    if available is None:
        return
    network = build_seeded(lambda: space.build(space.sample(random.Random(seed))), seed)
    needed = BACKWARD_MEMORY_FACTOR * batch_size * activation_bytes_per_sample(network, space.input_size)
    if needed > available:
        raise EdgeNasError(
            f"scoring a batch of {batch_size} images at {space.input_size}x{space.input_size} needs about "
            f"{needed / 2**30:.1f} GiB for activations, more than the {available / 2**30:.1f} GiB available; "
            f"use a smaller --batch-size or --input-size"
        )


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # The folder contains the results, or files the user put there.


def _remove_if_present(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _check_counts(budget: int, finalists: int, batch_size: int, search: str) -> None:
    if budget < 1:
        raise EdgeNasError(f"--budget must be at least 1, got {budget}")
    if finalists < 1:
        raise EdgeNasError(f"--finalists must be at least 1, got {finalists}")
    if finalists > budget:
        raise EdgeNasError(
            f"--finalists ({finalists}) must not exceed --budget ({budget}): the finalists are chosen among the candidates"
        )
    if batch_size < 2:
        raise EdgeNasError(f"--batch-size must be at least 2 (proxies compare samples), got {batch_size}")
    if search not in STRATEGIES:
        raise EdgeNasError(f"unknown search strategy {search!r}; expected one of {', '.join(STRATEGIES)}")


def space_settings(name: str, input_size: Optional[int], width_mult: Optional[float]) -> Dict[str, Any]:
    """Check the space name and its options; return the options that `build_space` passes on.

    `input_size` None takes the space's own resolution. `width_mult` is allowed only for a
    space that has a width multiplier. Raises EdgeNasError naming the option and the fix.
    """
    reference = get_space(name)  # an unknown name raises here, listing the known spaces
    settings: Dict[str, Any] = {"input_size": reference.input_size}
    if input_size is not None:
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
            raise EdgeNasError(f"--input-size must be a positive number of pixels, got {input_size!r}")
        settings["input_size"] = input_size
    if width_mult is not None:
        if not hasattr(reference, "width_mult"):
            with_width = [other for other in list_spaces() if hasattr(get_space(other), "width_mult")]
            raise EdgeNasError(
                f"search space {name!r} has no width multiplier; --width-mult applies to {', '.join(with_width)} only"
            )
        if not (isinstance(width_mult, (int, float)) and math.isfinite(width_mult) and width_mult > 0):
            raise EdgeNasError(f"--width-mult must be a positive number, got {width_mult!r}")
        settings["width_mult"] = float(width_mult)
    return settings


def build_space(name: str, num_classes: int, settings: Mapping[str, Any]) -> Any:
    """Build the search space from `space_settings`; a resolution the network cannot take raises EdgeNasError."""
    try:
        return get_space(name, num_classes=num_classes, **settings)
    except InvalidArchitectureError as error:
        raise EdgeNasError(
            f"search space {name!r} cannot be built with --input-size {settings['input_size']}: {error}"
        ) from None


def _network_options(space: Any) -> Dict[str, Any]:
    """Return the settings besides the input size that shape the space's networks, for the cache key and subnet.json."""
    return {"width_mult": space.width_mult} if hasattr(space, "width_mult") else {}


def _load_aggregator(
    ranking: ProxyRanking, path: Optional[Union[str, Path]], space_name: str, gradient_source: Any
) -> Tuple[Any, Dict[str, Any]]:
    """Load the aggregator file given, else the last good one from the cloud; return it and its record for subnet.json.

    A bad file given by the caller raises EdgeNasError. A received aggregator that this
    ranking cannot use is skipped with a warning, and the aggregation is label-free.
    """
    if path:
        return ranking.load_aggregator(path, space_name), {"source": "file", "file": str(path), "received": None}
    label_free: Dict[str, Any] = {"source": "label-free", "file": None, "received": None}
    fetch = getattr(gradient_source, "fetch_aggregator", None)
    if not callable(fetch):
        return None, label_free
    received = fetch(space_name)
    if received is None:
        logger.info("no aggregator of %s has been received from the cloud; aggregating label-free", space_name)
        return None, label_free
    received_path, metadata = received
    try:
        loaded = ranking.load_aggregator(received_path, space_name)
    except EdgeNasError as error:
        logger.warning("cannot use the aggregator received from the cloud (%s): %s; aggregating label-free",
                       received_path, error)
        return None, label_free
    logger.info("using aggregator version %s of %s received from the cloud", metadata.get("version"), space_name)
    return loaded, {"source": "cloud", "file": str(received_path), "received": dict(metadata)}


@contextmanager
def _stage(seconds: Dict[str, float], name: str, observer: Optional[RunObserver] = None) -> Iterator[None]:
    if observer is not None:
        observer.stage_started(name)
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start


def _open_cache(cache: Optional[Union[str, Path, ScoreCache]], stack: ExitStack) -> ScoreCache:
    if isinstance(cache, ScoreCache):
        return cache
    path = Path(cache) if cache is not None else default_cache_path()
    try:
        opened = ScoreCache(path)
    except (OSError, sqlite3.Error) as error:
        raise EdgeNasError(f"cannot open the score cache {path}: {error}; choose another path with --cache") from None
    stack.callback(opened.close)
    return opened


def _search(
    space: Any,
    limits: Limits,
    budget: int,
    strategy: str,
    seed: int,
    inputs: Any,
    labels: Any,
    protocol: ScoringProtocol,
    cache: ScoreCache,
    ranking: ProxyRanking,
    progress: bool,
    observer: RunObserver,
) -> List[Candidate]:
    from tqdm import tqdm

    proxies = list(ranking.forward_proxies)

    def evaluate(arch: Any) -> Dict[str, ProxyResult]:
        rows = score_archs(space, [arch], inputs, labels, proxies, protocol, cache=cache, progress=False)
        _, results = next(iter(rows))
        return dict(results)

    def rank(population: Sequence[Candidate]) -> List[float]:
        return ranking.rank_forward([c.results for c in population])

    scored = 0
    with tqdm(total=budget, desc=f"{strategy} search", unit="arch", disable=not progress, leave=False) as bar:

        def on_candidate(_: Candidate) -> None:
            nonlocal scored
            scored += 1
            bar.update(1)
            observer.candidate_scored(scored, budget)

        candidates = run_search(
            strategy, space, budget, evaluate, rank, random.Random(seed), limits.cost_limits(),
            on_candidate=on_candidate,
        )
    logger.info("scored %d candidates with %s", len(candidates), ", ".join(proxies))
    return candidates


def _select_finalists(space: Any, candidates: Sequence[Candidate], ranking: ProxyRanking, count: int) -> List[Finalist]:
    scores = ranking.rank_forward([c.results for c in candidates])
    valid = [(score, index) for index, score in enumerate(scores) if math.isfinite(score)]
    if not valid:
        reasons = sorted({r.reason for c in candidates for r in c.results.values() if not r.valid})
        shown = "; ".join(reasons)[:300]  # the first reasons are enough to say what went wrong
        raise EdgeNasError(
            f"none of the {len(candidates)} candidates has a valid forward-proxy score (invalid because: {shown}); "
            "check the data or raise --budget"
        )
    if len(valid) < count:
        logger.warning("only %d candidates have a valid forward score; keeping %d finalists, not %d",
                       len(valid), len(valid), count)
    # Ties go to the earlier candidate, so the choice does not depend on sort stability.
    best = sorted(valid, key=lambda item: (-item[0], item[1]))[:count]
    finalists = []
    for score, index in best:
        candidate = candidates[index]
        finalists.append(
            Finalist(
                arch=space.to_string(candidate.arch),
                params=candidate.params,
                flops=candidate.flops,
                proxies=dict(candidate.results),
                forward_score=score,
            )
        )
    return finalists


def _merge_gradient_results(
    finalists: Sequence[Finalist], results: Mapping[str, Mapping[str, ProxyResult]], request: GradientRequest
) -> None:
    for finalist in finalists:
        row = results.get(finalist.arch)
        missing = [name for name in request.proxies if row is None or name not in row]
        if missing:
            raise EdgeNasError(
                f"the gradient source returned no {', '.join(missing)} for {finalist.arch}; "
                "check the cloud coordinator or run offline"
            )
        for name in request.proxies:
            finalist.proxies[name] = row[name]


def _aggregate(finalists: Sequence[Finalist], ranking: ProxyRanking, aggregator: Any) -> None:
    scores = ranking.rank_all([f.proxies for f in finalists], aggregator)
    for finalist, score in zip(finalists, scores):
        finalist.score = score


def _measure_all(
    space: Any,
    finalists: Sequence[Finalist],
    seed: int,
    meter: PowerMeter,
    settings: MeasureSettings,
    folder: Path,
    progress: bool,
    observer: RunObserver,
) -> None:
    from tqdm import tqdm

    for position, finalist in enumerate(tqdm(finalists, desc="measuring", unit="model", disable=not progress, leave=False)):
        path = folder / f"finalist_{position}.onnx"
        finalist.latency, finalist.power = measure_finalist(space, space.parse(finalist.arch), seed, path, meter, settings)
        finalist.onnx_path = path
        finalist.power_unavailable_reason = meter.reason
        logger.info("%s: p50 %.3f ms on %s", finalist.arch, finalist.latency.p50_ms, finalist.latency.execution_provider)
        observer.finalist_measured(position + 1, len(finalists))


def choose_finalist(finalists: Sequence[Finalist], limits: Limits) -> Finalist:
    """Mark each finalist's limit failures and return the best-scored one that meets every limit.

    The aggregated score decides; a finalist without a valid aggregated score ranks after those
    with one, by its forward score. Raises EdgeNasError naming the best measured value of each
    limit that no finalist meets.
    """
    for finalist in finalists:
        finalist.limit_failures = _limit_failures(finalist, limits)
    eligible = [f for f in finalists if f.meets_limits]
    if not eligible:
        raise EdgeNasError(_no_finalist_message(finalists, limits))

    def preference(finalist: Finalist) -> tuple:
        has_score = math.isfinite(finalist.score)
        return (has_score, finalist.score if has_score else -math.inf, finalist.forward_score)

    return max(eligible, key=preference)


def _limit_failures(finalist: Finalist, limits: Limits) -> List[str]:
    failures = []
    latency = finalist.latency
    if limits.max_latency_ms is not None and latency is not None and latency.p50_ms > limits.max_latency_ms:
        failures.append("latency")
    power = finalist.power
    if limits.max_power_w is not None and (power is None or power.total_w > limits.max_power_w):
        failures.append("power")
    if limits.max_energy_mj is not None:
        energy = power.energy_per_inference_mj if power is not None else None
        if energy is None or energy > limits.max_energy_mj:
            failures.append("energy")
    return failures


def _no_finalist_message(finalists: Sequence[Finalist], limits: Limits) -> str:
    parts = []
    count = len(finalists)
    if limits.max_latency_ms is not None:
        best = min(f.latency.p50_ms for f in finalists if f.latency is not None)
        if best > limits.max_latency_ms:
            parts.append(
                f"the latency limit {limits.max_latency_ms:g} ms (--max-latency-ms): "
                f"the fastest of the {count} finalists takes {best:.3f} ms (p50)"
            )
    powers = [f.power for f in finalists if f.power is not None]
    if limits.max_power_w is not None and powers:
        best_power = min(p.total_w for p in powers)
        if best_power > limits.max_power_w:
            parts.append(
                f"the power limit {limits.max_power_w:g} W (--max-power-w): "
                f"the lowest mean power of the {count} finalists is {best_power:.3f} W"
            )
    energies = [p.energy_per_inference_mj for p in powers if p.energy_per_inference_mj is not None]
    if limits.max_energy_mj is not None and energies:
        best_energy = min(energies)
        if best_energy > limits.max_energy_mj:
            parts.append(
                f"the energy limit {limits.max_energy_mj:g} mJ (--max-energy-mj): "
                f"the lowest energy per inference of the {count} finalists is {best_energy:.3f} mJ"
            )
    if not parts:
        # Each limit alone is met by some finalist, but no finalist meets all of them.
        parts.append("all latency, power and energy limits at once, although each one alone is met by some finalist")
    return (
        "no finalist meets " + "; and ".join(parts)
        + "; relax the limit, or lower --max-params/--max-flops so that smaller networks are searched"
    )


def describe_measurements(
    latency: Optional[LatencyResult], power: Optional[PowerSummary], unavailable_reason: str = ""
) -> Dict[str, Any]:
    """Describe the measurements of one model, with their units in the key names (ms, W, mJ)."""
    described: Dict[str, Any] = {"latency": latency.describe() if latency is not None else None}
    if power is None:
        described["power"] = {"available": False, "reason": unavailable_reason or "power was not measured"}
    else:
        described["power"] = dict(power.describe(), available=True)
    described["energy_per_inference_mj"] = power.energy_per_inference_mj if power is not None else None
    return described


def _subnet_record(
    space: Any,
    dataset: ImageDataset,
    chosen: Finalist,
    finalists: Sequence[Finalist],
    limits: Limits,
    protocol: ScoringProtocol,
    ranking: ProxyRanking,
    aggregator: Mapping[str, Any],
    budget: int,
    candidates_scored: int,
    strategy: str,
    seed: int,
    gradient_source: str,
) -> Dict[str, Any]:
    mean, std = dataset.channel_stats()
    size = space.input_size
    measurements = describe_measurements(chosen.latency, chosen.power, chosen.power_unavailable_reason)
    assert chosen.latency is not None
    return {
        "format": SUBNET_FORMAT,
        "architecture": chosen.arch,
        "space": dict({"name": space.name, "num_classes": space.num_classes, "input_size": size},
                      **protocol.space_options),
        "params": chosen.params,
        "flops": chosen.flops,
        "proxies": {name: _describe_result(result) for name, result in chosen.proxies.items()},
        "forward_score": _finite_or_none(chosen.forward_score),
        "score": _finite_or_none(chosen.score),
        "aggregation": {
            "forward": ranking.forward_name,
            "final": ranking.final_name,
            # The aggregator file (None when label-free), where it came from, and the cloud's metadata of it.
            "aggregator": aggregator["file"],
            "aggregator_source": aggregator["source"],
            "aggregator_received": aggregator["received"],
            "population": "finalists",
        },
        "measurements": measurements,
        "constraints": limits.describe(),
        "preprocessing": {
            "input_shape": [1, 3, size, size],
            "layout": "NCHW",
            "channel_order": "RGB",
            "dtype": "float32",
            "size": [size, size],
            "resize": "bilinear" if dataset.image_size != (size, size) else "none",
            "scale": 1.0 / 255.0,
            "mean": mean,
            "std": std,
            "formula": "(pixel / 255 - mean) / std, per channel",
        },
        "onnx": {
            "opset": 17,
            "input_name": "input",
            "output_name": "logits",
            "weights": "untrained: the seeded initial weights; train or fine-tune before use",
        },
        "data": {
            "source": dataset.name,
            "images": len(dataset),
            "image_size": list(dataset.image_size),
            "num_classes": dataset.num_classes,
            "data_hash": dataset.data_hash,
        },
        "data_hash": dataset.data_hash,
        "seeds": {"search": seed, "weights": seed, "probe_batch": seed, "latency_input": seed},
        "search": {"strategy": strategy, "budget": budget, "candidates_scored": candidates_scored,
                   "finalists": len(finalists), "batch_size": protocol.batch_size},
        "code_version": edge_runtime.__version__,
        "stage_seconds": {},
        "peak_memory_mb": _peak_memory_mb(),
        "gradient_source": gradient_source,
        "finalists": [f.describe() for f in finalists],
        "files": {"model": "model.onnx", "subnet": "subnet.json", "report": "report.md", "plot": "score_vs_latency.png"},
    }


def _describe_result(result: ProxyResult) -> Dict[str, Any]:
    described: Dict[str, Any] = {"value": result.value, "valid": result.valid}
    if result.reason:
        described["reason"] = result.reason
    if "seconds" in result.details:
        described["seconds"] = result.details["seconds"]
    return described


def _finite_or_none(value: float) -> Optional[float]:
    return float(value) if value is not None and math.isfinite(value) else None


def _peak_memory_mb() -> Optional[float]:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes); None without `resource`."""
    try:
        import resource
        import sys
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0
