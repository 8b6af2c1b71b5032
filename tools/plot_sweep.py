"""Plot Spearman rho against an option value from a correlation-benchmark record.

The benchmark (`tools/nb201_correlation.py --variants`) reports each variant alone and swapped
into the aggregates that use its proxy. Variant labels end with the option value, e.g.
`fc_r0.4`. The plot draws rho (mean and sd over seeds) against that value. Each dataset gets
one line for the variant alone and one for each aggregate with it.

    python tools/plot_sweep.py docs/benchmarks/nb201_fgnas_r_sweep.json --prefix fc_r --xlabel "layer ratio r" \
        --out docs/benchmarks/nb201_fgnas_r_sweep.png
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

Series = Dict[Tuple[str, str], List[Tuple[float, float, float]]]


def collect(table: Sequence[dict], prefix: str) -> Series:
    """Group rows by (dataset, 'alone' or aggregate name) into (value, rho mean, rho sd) points."""
    pattern = re.compile(rf"^(?:(?P<aggregate>\S+) with )?{re.escape(prefix)}(?P<value>[0-9.]+)$")
    series: Series = defaultdict(list)
    for row in table:
        match = pattern.match(row["proxy"])
        if match is None:
            continue
        kind = match.group("aggregate") or "alone"
        series[(row["dataset"], kind)].append((float(match.group("value")), row["rho_mean"], row["rho_sd"]))
    for points in series.values():
        points.sort()
    return dict(series)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("record", type=Path, help="JSON written by tools/nb201_correlation.py")
    parser.add_argument("--prefix", required=True, help="variant label before the value, e.g. fc_r")
    parser.add_argument("--xlabel", default="option value")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    series = collect(json.loads(args.record.read_text())["table"], args.prefix)
    if not series:
        print(f"error: no row of {args.record} is labelled {args.prefix}<value>; check --prefix", file=sys.stderr)
        return 2

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 3.6))
    for (dataset, kind), points in sorted(series.items()):
        values, means, sds = zip(*points)
        style = "-o" if kind == "alone" else "--s"
        axis.errorbar(values, means, yerr=sds, fmt=style, capsize=3, markersize=4, label=f"{dataset}: {kind}")
    axis.set_xlabel(args.xlabel)
    axis.set_ylabel("Spearman rho (mean ± sd over seeds)")
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
