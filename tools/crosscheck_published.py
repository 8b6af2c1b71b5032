"""Check that our baseline proxies rank architectures like the published NAS-Bench-Suite-Zero scores.

Takes a seeded sample of development-split architectures that have published scores
(zc_scores_cifar10.csv; only the 9,445 architectures without unreachable operations have
them), scores them here on real CIFAR-10 images, and reports the Spearman correlation
between our values and the published ones for each proxy.

    python tools/crosscheck_published.py --archs 200 --out docs/benchmarks/crosscheck_published.md
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import random
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = Path(os.environ.get("EDGE_NAS_SHARED", REPO.parent / "shared"))

# Our proxy name -> column of the published file.
PUBLISHED_COLUMNS = {"synflow": "synflow", "snip": "snip", "grad_norm": "grad_norm", "jacob_cov": "jacov", "naswot": "nwot"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", type=int, default=200)
    parser.add_argument("--sample-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="probe batch and initialisation seed")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--proxies", default=",".join(PUBLISHED_COLUMNS))
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "edge-nas" / "benchmark.sqlite")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from edge_runtime.data import load_dataset
    from edge_runtime.score_cache import ScoreCache
    from edge_runtime.scoring import ScoringProtocol, score_archs
    from models.spaces import get_space

    with (args.shared / "data" / "nb201" / "zc_scores_cifar10.csv").open(newline="") as handle:
        published = {row["arch"]: row for row in csv.DictReader(handle) if row["nwot"]}
    archs = sorted(published, key=lambda a: int(published[a]["nb201_index"]))
    random.Random(args.sample_seed).shuffle(archs)
    archs = archs[: args.archs]
    proxies = [p for p in args.proxies.split(",") if p]

    data = load_dataset(str(args.shared / "data" / "images" / "cifar10.npz"))
    space = get_space("nb201", num_classes=10, input_size=32)
    inputs, labels = data.probe_batch(args.batch_size, seed=args.seed, size=32)
    protocol = ScoringProtocol("nb201", 10, 32, data.data_hash, args.batch_size, args.seed)
    args.cache.parent.mkdir(parents=True, exist_ok=True)
    ours: Dict[str, List[float]] = {name: [] for name in proxies}
    with ScoreCache(args.cache) as cache:
        parsed = [space.parse(a) for a in archs]
        for _, results in score_archs(space, parsed, inputs, labels, proxies, protocol, cache=cache, description="crosscheck"):
            for name in proxies:
                ours[name].append(np.nan if results[name].value is None else results[name].value)

    lines = [
        f"Command: `python tools/crosscheck_published.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores. {len(archs)} development-split architectures "
        f"with published scores, CIFAR-10 probe batch {args.batch_size}, seed {args.seed}.",
        "",
        "| proxy | published column | Spearman(ours, published) | valid here |",
        "|---|---|---|---|",
    ]
    for name in proxies:
        values = np.array(ours[name], dtype=np.float64)
        theirs = np.array([float(published[a][PUBLISHED_COLUMNS[name]]) for a in archs])
        keep = np.isfinite(values)
        rho = stats.spearmanr(values[keep], theirs[keep])[0]
        lines.append(f"| {name} | {PUBLISHED_COLUMNS[name]} | {rho:.3f} | {int(keep.sum())}/{len(archs)} |")
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
