"""Measure what each `--share` policy costs in ranking quality on a seeded NAS-Bench-201 sample.

The device side scores `fgnas_fc` and `params` once on its own CIFAR-10 probe batch. For each
policy, the gradient proxies `fgnas_gi` and `fgnas_gc` are computed on the probe inputs that a
coordinator would use for that policy. The descriptor is built with the device's functions
(`cloud_sync.client.describe_data`, with the same image selection and message-limit fitting).
`Coordinator.probe_batch` then draws the probe batch from it, so no broker is involved. The `local` row
uses the device's own batch, as the fallback without a coordinator does. Each row then ranks the
sample with the label-free `fgnas` aggregate and reports the signed Spearman rho against
`cifar10_test`.

    OMP_NUM_THREADS=1 nice -n 5 python tools/share_policy_cost.py --out runs/share_policy_cost/result.json

Results are cached per architecture, proxy and probe-batch hash in a SQLite score cache, so an
interrupted run resumes, and two policies whose probe batches are byte-identical share scores.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

logger = logging.getLogger("share_policy_cost")

DEFAULT_ACCURACY = REPO.parent / "shared" / "data" / "nb201" / "accuracy.csv"
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "images" / "cifar10.npz"
DEFAULT_CACHE = REPO / "runs" / "share_policy_cost" / "scores.sqlite"
TARGET = "cifar10_test"
GRADIENT_PROXIES = ("fgnas_gi", "fgnas_gc")
NUM_CLASSES = 10
INPUT_SIZE = 32
COORDINATOR_ID = "share-policy-cost"
# Rows of the table: the device's own batch, then the three policies. A `none+DATA` row models a
# coordinator started with `--data DATA`, and plain `none` one started without `--data`.
DEFAULT_ROWS = ("local", "raw", "summary", "none")


def read_sample(path: Path, count: int, seed: int) -> List[Dict[str, Any]]:
    """Return `count` rows of the accuracy CSV, drawn with `random.Random(seed)`."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if count > len(rows):
        raise SystemExit(f"--count {count} is larger than the {len(rows)} architectures in {path}")
    picked = random.Random(seed).sample(range(len(rows)), count)
    return [{"arch": rows[index]["arch"], TARGET: float(rows[index][TARGET])} for index in picked]


def descriptor_for(share: str, dataset: Any, inputs: Any, labels: Any, archs: Sequence[str], seed: int) -> Dict[str, Any]:
    """Build the descriptor that `edge-nas personalize --share SHARE` sends for this probe batch.

    This repeats the selection of `CloudGradientSource._descriptor` in cloud_sync/client.py: a
    summary describes up to DEFAULT_SUMMARY_IMAGES images of the whole data set, and both the
    summary and the raw share are cut to fit the message limit for `archs`.
    """
    from cloud_sync import protocol
    from cloud_sync.client import MAX_SUMMARY_VALUES, describe_data, fitting_raw_images, fitting_summary_components

    components = protocol.DEFAULT_SUMMARY_COMPONENTS
    raw_images = protocol.DEFAULT_RAW_IMAGES
    if share == protocol.SHARE_SUMMARY:
        components = fitting_summary_components(INPUT_SIZE, archs)
        count = min(len(dataset), protocol.DEFAULT_SUMMARY_IMAGES, max(2, MAX_SUMMARY_VALUES // (3 * INPUT_SIZE**2)))
        if count > len(labels):
            chosen = np.sort(np.random.default_rng(seed).choice(len(dataset), count, replace=False))
            inputs = dataset.to_tensor(chosen, size=INPUT_SIZE)
            labels = dataset.labels[chosen]
    elif share == protocol.SHARE_RAW:
        raw_images = min(raw_images, fitting_raw_images(INPUT_SIZE, archs))
    return describe_data(
        share, inputs, labels, NUM_CLASSES,
        data_hash=dataset.data_hash, seed=seed, raw_images=raw_images, components=components,
    )


def coordinator_probe(descriptor: Mapping[str, Any], coordinator_data: Optional[str], batch_size: int, seed: int):
    """Return the coordinator's probe inputs, labels and probe record for a request carrying `descriptor`."""
    from cloud_sync.coordinator import Coordinator, _load_data

    coordinator = Coordinator(COORDINATOR_ID, data=_load_data(coordinator_data))
    request = {
        "data": dict(descriptor),
        "batch_size": batch_size,
        "seed": seed,
        "space": {"name": "nb201", "num_classes": NUM_CLASSES, "input_size": INPUT_SIZE},
    }
    return coordinator.probe_batch(request)


def batch_hash(inputs: np.ndarray, labels: np.ndarray) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(inputs, dtype=np.float32).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def score_rows(
    space: Any, sample: Sequence[Mapping[str, Any]], inputs: np.ndarray, labels: np.ndarray, proxies: Sequence[str],
    seed: int, cache: Any, label: str,
) -> Dict[str, List[float]]:
    """Compute `proxies` for every sampled architecture on one probe batch, with NaN where a proxy is invalid."""
    import torch

    from edge_runtime.score_cache import protocol_key, split_cached
    from models.proxies.scoring import score_architecture

    inputs_tensor = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
    labels_tensor = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    key = protocol_key(batch=batch_hash(inputs, labels), network_seed=seed, options="registered defaults",
                       torch=torch.__version__)
    keys = {name: key for name in proxies}
    columns: Dict[str, List[float]] = {name: [] for name in proxies}
    started = time.perf_counter()
    computed = 0
    for number, row in enumerate(sample, start=1):
        results, missing = split_cached(cache, "nb201", row["arch"], proxies, keys)
        if missing:
            fresh = score_architecture(space, space.parse(row["arch"]), inputs_tensor, labels_tensor, missing, seed=seed)
            cache.put_many("nb201", row["arch"], fresh, keys)
            results.update(fresh)
            computed += 1
        for name in proxies:
            result = results[name]
            columns[name].append(float(result.value) if result.valid else math.nan)
        if number % 20 == 0:
            logger.info("%s: %d/%d architectures, %d computed, %.0f s", label, number, len(sample), computed,
                        time.perf_counter() - started)
    return columns


def spearman(values: Sequence[float], targets: Sequence[float]) -> Tuple[float, int]:
    """Signed Spearman rho over the entries where the value is finite, and how many entries that is."""
    from scipy.stats import spearmanr

    values = np.asarray(values, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    usable = np.isfinite(values) & np.isfinite(targets)
    if usable.sum() < 3:
        return math.nan, int(usable.sum())
    return float(spearmanr(values[usable], targets[usable]).correlation), int(usable.sum())


def bootstrap_difference_sd(
    values: Sequence[float], reference: Sequence[float], targets: Sequence[float], rounds: int = 1000, seed: int = 0
) -> float:
    """Standard deviation of rho(values) - rho(reference) over bootstrap resamples of the architectures.

    Both rankings are resampled with the same indices, so the spread is that of the paired difference.
    The scores stay those of the whole population, so the aggregate's dynamic weights are not refitted.
    """
    values = np.asarray(values, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    rng = np.random.default_rng(seed)
    differences = []
    for _ in range(rounds):
        chosen = rng.integers(0, len(targets), len(targets))
        difference = spearman(values[chosen], targets[chosen])[0] - spearman(reference[chosen], targets[chosen])[0]
        if math.isfinite(difference):
            differences.append(difference)
    return float(np.std(differences, ddof=1)) if len(differences) > 1 else math.nan


def descriptor_bytes(descriptor: Mapping[str, Any]) -> int:
    """Size of the descriptor as it travels inside a request: compact, key-sorted UTF-8 JSON."""
    return len(json.dumps(descriptor, allow_nan=False, separators=(",", ":"), sort_keys=True).encode("utf-8"))


def parse_row(row: str) -> Tuple[str, Optional[str]]:
    """Split `none+DATA` into the share policy and the coordinator's --data, which is None for other rows."""
    share, _, data = row.partition("+")
    return share, (data or None)


def measure(arguments: argparse.Namespace) -> Dict[str, Any]:
    import torch

    from cloud_sync import protocol
    from edge_runtime.data import load_dataset
    from edge_runtime.score_cache import ScoreCache
    from models.aggregation import aggregate_population
    from models.proxies.scoring import score_architecture
    from models.spaces import get_space

    torch.set_num_threads(arguments.threads)
    sample = read_sample(arguments.accuracy, arguments.count, arguments.sample_seed)
    archs = [row["arch"] for row in sample]
    targets = [row[TARGET] for row in sample]
    space = get_space("nb201", num_classes=NUM_CLASSES, input_size=INPUT_SIZE)
    dataset = load_dataset(str(arguments.images))
    device_inputs, device_labels = dataset.probe_batch(arguments.batch_size, seed=arguments.batch_seed, size=INPUT_SIZE)
    device_inputs, device_labels = device_inputs.numpy(), device_labels.numpy()
    params = [float(space.params(space.parse(arch))) for arch in archs]

    arguments.cache.parent.mkdir(parents=True, exist_ok=True)
    table: List[Dict[str, Any]] = []
    with ScoreCache(arguments.cache) as cache:
        fc = score_rows(space, sample, device_inputs, device_labels, ["fgnas_fc"], arguments.seed, cache, "device fgnas_fc")
        for row in arguments.rows:
            share, coordinator_data = parse_row(row)
            started = time.perf_counter()
            if share == "local":
                inputs, labels = device_inputs, device_labels
                probe = {"source": "device", "batch_size": int(inputs.shape[0])}
                size = 0
            else:
                if share not in protocol.SHARE_POLICIES:
                    raise SystemExit(f"unknown row {row!r}; use local, raw, summary, none or none+DATA")
                if coordinator_data is not None and share != protocol.SHARE_NONE:
                    raise SystemExit(f"row {row!r}: only the none policy reads the coordinator's --data")
                descriptor = descriptor_for(share, dataset, torch.from_numpy(device_inputs), device_labels, archs,
                                            arguments.batch_seed)
                size = descriptor_bytes(descriptor)
                inputs, labels, probe = coordinator_probe(descriptor, coordinator_data, arguments.batch_size,
                                                          arguments.batch_seed)
            gradient = score_rows(space, sample, inputs, labels, GRADIENT_PROXIES, arguments.seed, cache, row)
            columns = {"fgnas_fc": fc["fgnas_fc"], "fgnas_gi": gradient["fgnas_gi"],
                       "fgnas_gc": gradient["fgnas_gc"], "params": params}
            aggregate = aggregate_population("fgnas", columns)
            rho_aggregate, n_aggregate = spearman(aggregate, targets)
            rho_gi, n_gi = spearman(gradient["fgnas_gi"], targets)
            rho_gc, n_gc = spearman(gradient["fgnas_gc"], targets)
            entry = {
                "row": row, "descriptor_bytes": size, "probe": probe, "probe_batch_hash": batch_hash(inputs, labels),
                "rho_fgnas": rho_aggregate, "n_fgnas": n_aggregate, "rho_fgnas_gi": rho_gi, "n_fgnas_gi": n_gi,
                "rho_fgnas_gc": rho_gc, "n_fgnas_gc": n_gc, "seconds": time.perf_counter() - started,
            }
            logger.info("%s: rho fgnas %+.3f (n %d), fgnas_gi %+.3f (n %d), descriptor %d bytes",
                        row, rho_aggregate, n_aggregate, rho_gi, n_gi, size)
            entry["values"] = {"fgnas": [float(v) for v in aggregate], "fgnas_gi": gradient["fgnas_gi"],
                               "fgnas_gc": gradient["fgnas_gc"]}
            table.append(entry)

    # The paired spread of each row's rho against the first row (by default `local`).
    for entry in table:
        for name in ("fgnas", "fgnas_gi"):
            entry[f"sd_difference_{name}"] = bootstrap_difference_sd(
                entry["values"][name], table[0]["values"][name], targets
            )

    rho_fc, n_fc = spearman(fc["fgnas_fc"], targets)
    rho_params, n_params = spearman(params, targets)
    forward = aggregate_population("fgnas-forward", {"fgnas_fc": fc["fgnas_fc"], "params": params})
    rho_forward, n_forward = spearman(forward, targets)
    return {
        "protocol": {
            "count": arguments.count, "sample_seed": arguments.sample_seed, "batch_size": arguments.batch_size,
            "batch_seed": arguments.batch_seed, "network_seed": arguments.seed, "threads": arguments.threads,
            "data_hash": dataset.data_hash, "target": TARGET, "torch": torch.__version__,
        },
        "device": {"rho_fgnas_fc": rho_fc, "n_fgnas_fc": n_fc, "rho_params": rho_params, "n_params": n_params,
                   "rho_fgnas_forward": rho_forward, "n_fgnas_forward": n_forward},
        "rows": table,
        "archs": archs,
        "targets": targets,
        "fgnas_fc": fc["fgnas_fc"],
        "params": params,
    }


def markdown_table(result: Mapping[str, Any]) -> str:
    first = result["rows"][0]["row"]
    lines = [
        "| row | probe source | descriptor bytes | rho fgnas | rho fgnas_gi | rho fgnas_gc | n "
        f"| sd of rho fgnas - {first} | sd of rho fgnas_gi - {first} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in result["rows"]:
        size = f"{entry['descriptor_bytes']:,}" if entry["row"] != "local" else "-"
        if entry is result["rows"][0]:
            spreads = "- | -"
        else:
            spreads = f"{entry['sd_difference_fgnas']:.3f} | {entry['sd_difference_fgnas_gi']:.3f}"
        lines.append(
            f"| {entry['row']} | {entry['probe']['source']} | {size} | {entry['rho_fgnas']:+.3f} | "
            f"{entry['rho_fgnas_gi']:+.3f} | {entry['rho_fgnas_gc']:+.3f} | {entry['n_fgnas']} | {spreads} |"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accuracy", type=Path, default=DEFAULT_ACCURACY, help="NAS-Bench-201 accuracy CSV")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="the device's images (.npz)")
    parser.add_argument("--count", type=int, default=100, help="architectures in the sample")
    parser.add_argument("--sample-seed", type=int, default=0, help="seed of the architecture sample")
    parser.add_argument("--batch-size", type=int, default=64, help="probe batch size")
    parser.add_argument("--batch-seed", type=int, default=0, help="seed of the probe batch and of the descriptor draws")
    parser.add_argument("--seed", type=int, default=0, help="network initialisation seed")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS),
                        help="rows to measure: local, raw, summary, none, or none+DATA for a coordinator "
                             "started with --data DATA (a path or built-in sample name)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="SQLite score cache")
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the result")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    result = measure(arguments)
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown_table(result))
    print(json.dumps(result["device"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
