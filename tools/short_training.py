"""Rank MobileNetV2-space subnets by short training on real CIFAR-10 and compare each proxy's ranking.

No ImageNet training fits on this machine, so this checks the ranking at a scale that two CPU
cores afford. A seeded sample of subnets of the MobileNetV2 space is built at CIFAR resolution
with a small width multiplier. Each subnet is trained from scratch for the same number of
epochs on one part of the real CIFAR-10 sample and tested on the rest. Every proxy scores the same
subnets on a probe batch of the same CIFAR-10 sample. The report gives the signed Spearman rho
between each proxy and the short-training accuracy, with a bootstrap 95% interval.

    OMP_NUM_THREADS=1 python tools/short_training.py --archs 16 --epochs 30 --retrain 4 --out docs/benchmarks/mbv2_short_training

Each trained subnet is stored in PREFIX.trained.jsonl as soon as it finishes, so an
interrupted run (Ctrl-C) continues with the next subnet. Proxy scores use the SQLite cache
of the NAS-Bench-201 benchmark.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO, REPO / "tools"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from nb201_correlation import DEFAULT_SHARED, correlations, rank_with_invalid_last, scatter_grid  # noqa: E402

logger = logging.getLogger("short_training")

DEFAULT_PROXIES = "params,flops,grad_norm,snip,synflow,naswot,jacob_cov,zico,zen,fgnas,fgnas-forward"
PAD = 4


def split_indices(count: int, test_count: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(count)
    return order[test_count:], order[:test_count]


def augment(batch, generator):
    """Random crop with 4-pixel zero padding and random horizontal flip, per image, without a Python loop."""
    import torch
    import torch.nn.functional as F

    count, _, height, width = batch.shape
    padded = F.pad(batch, (PAD, PAD, PAD, PAD))
    dy = torch.randint(0, 2 * PAD + 1, (count,), generator=generator)
    dx = torch.randint(0, 2 * PAD + 1, (count,), generator=generator)
    rows = (dy[:, None] + torch.arange(height))[:, :, None]
    cols = (dx[:, None] + torch.arange(width))[:, None, :]
    cropped = padded[torch.arange(count)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    flip = torch.rand(count, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)


def train_and_evaluate(network, train_x, train_y, test_x, test_y, *, epochs: int, batch_size: int, lr: float,
                       weight_decay: float, seed: int) -> Dict[str, float]:
    """Train with SGD (Nesterov momentum, cosine schedule) for a fixed number of epochs and return the test accuracy."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(train_x) // batch_size
    total = epochs * steps_per_epoch
    optimizer = torch.optim.SGD(network.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    started = time.perf_counter()
    network.train()
    loss = float("nan")
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator)
        for step in range(steps_per_epoch):
            index = order[step * batch_size:(step + 1) * batch_size]
            optimizer.zero_grad(set_to_none=True)
            batch_loss = F.cross_entropy(network(augment(train_x[index], generator)), train_y[index])
            batch_loss.backward()
            optimizer.step()
            schedule.step()
            loss = float(batch_loss.detach())
    train_seconds = time.perf_counter() - started
    network.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test_x), 500):
            logits = network(test_x[start:start + 500])
            correct += int((logits.argmax(1) == test_y[start:start + 500]).sum())
    return {"accuracy": 100.0 * correct / len(test_x), "final_loss": loss, "train_seconds": train_seconds}


def bootstrap_interval(values_per_seed: Sequence[Sequence[Optional[float]]], accuracy: Sequence[float],
                       higher_is_better: bool, resamples: int, seed: int) -> Tuple[float, float]:
    """Return the percentile 95% interval of the seed-mean Spearman rho, drawing architectures with replacement.

    Each resample draws one set of architectures and averages rho over the scoring seeds on
    it, so the interval describes the same statistic as the reported mean. Invalid values rank last.
    """
    truth = np.asarray(accuracy, dtype=np.float64)
    draws = np.random.default_rng(seed).integers(0, len(truth), size=(resamples, len(truth)))
    y = _centred_ranks(truth[draws])
    total = np.zeros(resamples)
    for values in values_per_seed:
        oriented = [v if v is None or higher_is_better else -v for v in values]
        x = _centred_ranks(rank_with_invalid_last(oriented)[draws])
        denominator = np.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1))
        # A resample with a constant side has no defined rho; it counts as 0.
        total += np.divide((x * y).sum(axis=1), denominator, out=np.zeros(resamples), where=denominator > 0)
    low, high = np.percentile(total / len(values_per_seed), [2.5, 97.5])
    return float(low), float(high)


def _centred_ranks(rows: np.ndarray) -> np.ndarray:
    ranks = stats.rankdata(rows, axis=1)
    return ranks - ranks.mean(axis=1, keepdims=True)


def settings_key(settings: Dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def load_trained(path: Path, key: str) -> Dict[str, Dict[str, float]]:
    done: Dict[str, Dict[str, float]] = {}
    if not path.exists():
        return done
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # A line cut short by an interruption: that subnet is trained again.
        if record.get("settings") == key:
            done[record["arch"]] = record
    return done


def append_record(path: Path, record: Dict[str, object]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def score_proxies(space, arch_texts: List[str], data, proxies: List[str], seeds: List[int], batch_size: int,
                  cache_path: Path, settings: Dict[str, object]) -> Dict[int, Dict[str, List[Optional[float]]]]:
    from edge_runtime.score_cache import ScoreCache
    from edge_runtime.scoring import ScoringProtocol, score_archs
    from models.aggregation import aggregate_population, expand_proxy_names

    per_arch, aggregates = expand_proxy_names(proxies)
    archs = [space.parse(text) for text in arch_texts]
    columns_by_seed: Dict[int, Dict[str, List[Optional[float]]]] = {}
    with ScoreCache(cache_path) as cache:
        for seed in seeds:
            inputs, labels = data.probe_batch(batch_size, seed=seed, size=settings["input_size"])
            protocol = ScoringProtocol(
                space="mobilenetv2", num_classes=settings["num_classes"], input_size=settings["input_size"],
                data_hash=data.data_hash, batch_size=batch_size, seed=seed,
                space_options={"width_mult": settings["width_mult"]},
            )
            columns: Dict[str, List[Optional[float]]] = {name: [] for name in per_arch}
            for _, results in score_archs(space, archs, inputs, labels, per_arch, protocol, cache=cache,
                                          description=f"scoring seed {seed}"):
                for name in per_arch:
                    columns[name].append(results[name].value)
            arrays = {name: np.array([np.nan if v is None else v for v in values]) for name, values in columns.items()}
            for name in aggregates:
                scores = aggregate_population(name, arrays)
                columns[name] = [float(v) if np.isfinite(v) else None for v in scores]
            columns_by_seed[seed] = columns
    return columns_by_seed


def summarise(columns_by_seed, accuracy: List[float], resamples: int) -> List[Dict[str, object]]:
    from models.errors import UnknownNameError
    from models.proxies import get_proxy

    rows = []
    first = columns_by_seed[min(columns_by_seed)]
    for name in first:
        try:
            higher = get_proxy(name).higher_is_better
        except UnknownNameError:
            higher = True  # An aggregate, which ranks higher-is-better by construction.
        rhos = [correlations(columns[name], accuracy, higher)[0] for columns in columns_by_seed.values()]
        taus = [correlations(columns[name], accuracy, higher)[1] for columns in columns_by_seed.values()]
        low, high = bootstrap_interval([columns[name] for columns in columns_by_seed.values()], accuracy, higher,
                                       resamples, seed=0)
        rows.append({
            "proxy": name,
            "rho_mean": float(np.mean(rhos)),
            "rho_sd": float(np.std(rhos, ddof=1)) if len(rhos) > 1 else 0.0,
            "tau_mean": float(np.mean(taus)),
            "ci_low": low,
            "ci_high": high,
            "invalid": sum(v is None for v in first[name]),
        })
    return rows


def render(rows, trained: List[Dict[str, object]], settings, command: str, wall_s: float, seeds: List[int]) -> str:
    accuracies = [r["accuracy"] for r in trained]
    minutes = [r["train_seconds"] / 60 for r in trained]
    lines = [
        "# MobileNetV2 space: zero-cost proxies against short training on real CIFAR-10",
        "",
        f"Command: `{command}`",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch threads {_torch_threads()}, "
        f"Python {platform.python_version()}",
        "",
        f"{len(trained)} subnets sampled from the MobileNetV2 space (sample seed {settings['sample_seed']}), built at "
        f"{settings['input_size']}x{settings['input_size']} with width multiplier {settings['width_mult']} and "
        f"{settings['num_classes']} classes. Each was trained from scratch for {settings['epochs']} epochs on "
        f"{settings['train_images']} real CIFAR-10 images (SGD, Nesterov momentum 0.9, lr {settings['lr']} with a cosine "
        f"schedule, weight decay {settings['weight_decay']}, batch {settings['train_batch']}, random crop and flip) and "
        f"tested on {settings['test_images']} held-out images. Accuracy ranges over "
        f"{min(accuracies):.1f} to {max(accuracies):.1f} % (median {np.median(accuracies):.1f} %); training took "
        f"{min(minutes):.1f} to {max(minutes):.1f} min per subnet.",
        "",
        f"Proxies scored each subnet on a probe batch of {settings['probe_batch']} images of the sample, seeds "
        f"{', '.join(map(str, seeds))}; aggregates rank this population of {len(trained)}. rho is the signed Spearman "
        "correlation with the short-training accuracy (mean and sd over the scoring seeds); the 95% interval is a "
        "percentile bootstrap over subnets of the seed-mean rho. With this few subnets the interval is wide: read it "
        "before the point value. Short training favours networks that learn fast, which is not the same as the "
        "final accuracy that NAS-Bench-201 records.",
        "",
        "| proxy | Spearman rho | 95% interval | Kendall tau | invalid |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        sd = f" ± {row['rho_sd']:.3f}" if len(seeds) > 1 else ""
        lines.append(f"| {row['proxy']} | {row['rho_mean']:+.3f}{sd} | [{row['ci_low']:+.2f}, {row['ci_high']:+.2f}] | "
                     f"{row['tau_mean']:+.3f} | {row['invalid']} |")
    lines += ["", "## Subnets", "", "| subnet | params | MFLOPs | accuracy % | train min |", "|---|---|---|---|---|"]
    for record in sorted(trained, key=lambda r: -r["accuracy"]):
        lines.append(f"| `{record['arch']}` | {record['params']:,} | {record['flops'] / 1e6:.1f} | "
                     f"{record['accuracy']:.2f} | {record['train_seconds'] / 60:.1f} |")
    lines += ["", f"Wall time {wall_s:.0f} s (training and scoring; subnets read back from the record cost nothing)."]
    return "\n".join(lines) + "\n"


def render_noise(pairs: Sequence[Tuple[float, float]], accuracy: Sequence[float]) -> str:
    """Describe how far a second training run moves each subnet's accuracy, next to the spread between subnets."""
    if not pairs:
        return ""
    differences = [abs(a - b) for a, b in pairs]
    lines = [
        "",
        "## Training noise",
        "",
        f"The first {len(pairs)} subnets were trained a second time with other initial weights and batch order. "
        f"The accuracy moved by {np.mean(differences):.2f} points on average (largest {max(differences):.2f}), while "
        f"the accuracies of the {len(accuracy)} subnets have a standard deviation of {np.std(accuracy, ddof=1):.2f} "
        "points. Where the two are close, no proxy can rank these subnets reliably against this target.",
        "",
        "| subnet | first run % | second run % |",
        "|---|---|---|",
    ]
    lines += [f"| {number} | {a:.2f} | {b:.2f} |" for number, (a, b) in enumerate(pairs, 1)]
    return "\n".join(lines) + "\n"


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", type=int, default=16, help="subnets to sample and train")
    parser.add_argument("--sample-seed", type=int, default=0)
    parser.add_argument("--width-mult", type=float, default=0.35)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--train-batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--test-images", type=int, default=1000, help="held-out images; the rest train")
    parser.add_argument("--retrain", type=int, default=0, help="train the first N subnets twice to measure training noise")
    parser.add_argument("--proxies", default=DEFAULT_PROXIES)
    parser.add_argument("--seeds", default="0,1,2", help="proxy scoring seeds")
    parser.add_argument("--probe-batch", type=int, default=64)
    parser.add_argument("--resamples", type=int, default=5000, help="bootstrap resamples for the interval")
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "edge-nas" / "benchmark.sqlite")
    parser.add_argument("--out", type=Path, required=True, help="output prefix: PREFIX.md, PREFIX.json, PREFIX.png")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    from edge_runtime.data import load_dataset
    from models.proxies._context import build_seeded
    from models.spaces import get_space

    started = time.perf_counter()
    data = load_dataset(str(args.shared / "data" / "images" / "cifar10.npz"))
    train_index, test_index = split_indices(len(data), args.test_images, seed=0)
    settings = {
        "sample_seed": args.sample_seed, "width_mult": args.width_mult, "input_size": args.input_size,
        "num_classes": data.num_classes, "epochs": args.epochs, "train_batch": args.train_batch, "lr": args.lr,
        "weight_decay": args.weight_decay, "train_images": len(train_index), "test_images": len(test_index),
        "probe_batch": args.probe_batch, "data": data.data_hash,
    }
    key = settings_key({k: v for k, v in settings.items() if k != "probe_batch"})
    space = get_space("mobilenetv2", num_classes=data.num_classes, input_size=args.input_size, width_mult=args.width_mult)
    rng = random.Random(args.sample_seed)
    arch_texts = [space.to_string(space.sample(rng)) for _ in range(args.archs)]

    record_path = args.out.with_name(args.out.name + ".trained.jsonl")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = load_trained(record_path, key)
    train_x, test_x = (data.to_tensor(index, size=args.input_size) for index in (train_index, test_index))
    train_y, test_y = (torch.from_numpy(data.labels[index].astype(np.int64)) for index in (train_index, test_index))
    def train(text: str, init_seed: int, train_seed: int, run_key: str) -> Dict[str, object]:
        arch = space.parse(text)
        network = build_seeded(lambda: space.build(arch), init_seed)
        outcome = train_and_evaluate(network, train_x, train_y, test_x, test_y, epochs=args.epochs,
                                     batch_size=args.train_batch, lr=args.lr, weight_decay=args.weight_decay,
                                     seed=train_seed)
        record = {"arch": text, "settings": run_key, "params": space.params(arch), "flops": space.flops(arch), **outcome}
        append_record(record_path, record)
        return record

    # The repeat runs train the first --retrain subnets again with other initial weights and batch
    # order, which measures how far training noise alone moves the accuracy.
    repeat_key = key + "-repeat"
    repeats = load_trained(record_path, repeat_key)
    jobs = [(text, args.sample_seed, position, key, done) for position, text in enumerate(arch_texts, 1)]
    jobs += [(text, args.sample_seed + 1, 1000 + position, repeat_key, repeats)
             for position, text in enumerate(arch_texts[:args.retrain], 1)]
    try:
        for number, (text, init_seed, train_seed, run_key, store) in enumerate(jobs, 1):
            if text in store:
                continue
            store[text] = train(text, init_seed, train_seed, run_key)
            logger.info("[%d/%d] %s: %.2f %% after %.1f min", number, len(jobs), text, store[text]["accuracy"],
                        store[text]["train_seconds"] / 60)
    except KeyboardInterrupt:
        logger.info("interrupted: %d of %d training runs are kept in %s; run the same command to continue",
                    len(done) + len(repeats), len(jobs), record_path)
        return 130

    trained = [done[text] for text in arch_texts]
    accuracy = [r["accuracy"] for r in trained]
    seeds = [int(s) for s in args.seeds.split(",")]
    proxies = [p.strip() for p in args.proxies.split(",") if p.strip()]
    columns_by_seed = score_proxies(space, arch_texts, data, proxies, seeds, args.probe_batch, args.cache, settings)
    rows = summarise(columns_by_seed, accuracy, args.resamples)
    command = "OMP_NUM_THREADS=1 python tools/short_training.py " + " ".join(sys.argv[1:] if argv is None else argv)
    wall_s = time.perf_counter() - started
    noise = [(done[text]["accuracy"], repeats[text]["accuracy"]) for text in arch_texts[:args.retrain]]
    args.out.with_suffix(".md").write_text(render(rows, trained, settings, command, wall_s, seeds) + render_noise(noise, accuracy))
    args.out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "settings": settings, "rows": rows, "trained": trained, "repeat_pairs": noise,
         "scores": {str(s): c for s, c in columns_by_seed.items()}}, indent=1, sort_keys=True))
    panels = {name: (values, accuracy) for name, values in columns_by_seed[seeds[0]].items()}
    scatter_grid(panels, args.out.with_suffix(".png"), ylabel="accuracy (%)", point_size=12)
    for row in rows:
        logger.info("%-14s rho %+.3f [%+.2f, %+.2f]", row["proxy"], row["rho_mean"], row["ci_low"], row["ci_high"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
