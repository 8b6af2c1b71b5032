"""Round-trip time and coordinator throughput of the MQTT cloud loop, through a local Mosquitto.

Starts Mosquitto on 127.0.0.1 (a free port, its own config in a temporary folder, no
persistence) and `edge-nas cloud serve` workers as separate processes with one torch thread
each, then measures:

- the round trip of one request of `--finalists` NB201 architectures with a data summary of
  real images, from submit to result on the device. The coordinator's compute time for the
  same request is reported next to it, so the transport overhead is the difference;
- throughput: `--requests` requests of `--throughput-finalists` architectures each, submitted
  at once, with 1 and with 2 workers in one shared-subscription group.

    python tools/cloud_benchmark.py --out docs/benchmarks/cloud_loop.json

Prints a Markdown table on stdout. Needs the mosquitto binary (Debian package mosquitto).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np

from cloud_sync import protocol
from cloud_sync.client import BrokerSettings, CloudClient, CloudResult, create_mqtt_client, describe_data
from edge_runtime.data import load_dataset
from models.spaces import get_space

REPO = Path(__file__).resolve().parents[1]
WORKER_CODE = "from edge_runtime.cli_cloud import cloud; cloud()"


def start_broker(folder: Path) -> "tuple[subprocess.Popen, int]":
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = folder / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false", f"log_dest file {folder}/mosquitto.log"]
    if os.geteuid() == 0:
        lines.append("user root")  # otherwise mosquitto switches to the user "mosquitto"
    config.write_text("\n".join(lines) + "\n")
    process = subprocess.Popen([binary, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    limit = time.monotonic() + 10
    while time.monotonic() < limit:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return process, port
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("mosquitto did not start listening within 10 s")


def start_workers(url: str, count: int, group: str) -> List[subprocess.Popen]:
    """Start `count` workers and wait until each has published its online presence."""
    online = set()
    ready = threading.Event()
    names = [f"bench-{group}-{index}" for index in range(count)]

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        if message.payload and json.loads(message.payload).get("state") == "online":
            online.add(message.topic.split("/")[2])
            if online >= set(names):
                ready.set()

    watcher = create_mqtt_client(f"bench-watcher-{group}", BrokerSettings(url))
    watcher.on_message = on_message
    address = BrokerSettings(url).address
    watcher.connect(address.host, address.port)
    watcher.loop_start()
    watcher.subscribe(f"{protocol.TOPIC_ROOT}/coordinators/+/presence", qos=1)
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER_CODE, "serve", "--broker", url, "--group", group, "--id", name, "--threads", "1"],
            cwd=REPO, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for name in names
    ]
    if not ready.wait(120):
        raise RuntimeError(f"only {sorted(online)} of {names} came online within 120 s")
    watcher.disconnect()
    watcher.loop_stop()
    warm_up(url, count, group)
    return workers


def warm_up(url: str, count: int, group: str) -> None:
    """Send two small requests per worker, so that no timed request pays a worker's first-call setup."""
    with tempfile.TemporaryDirectory() as state:
        with CloudClient(url, device_id=f"bench-warmup-{group}", state_dir=state) as client:
            if not client.connect(10):
                raise RuntimeError(f"cannot connect: {client.connect_error}")
            request_ids = [
                client.submit("nb201", sample_archs(1, 5000 + index), ["grad_norm"], protocol.describe_none(10),
                              num_classes=10, input_size=32, seed=index, batch_size=8, timeout_s=600)
                for index in range(2 * count)
            ]
            client.wait(request_ids, 600)


def stop_workers(workers: Sequence[subprocess.Popen]) -> None:
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.wait(30)


def sample_archs(count: int, seed: int) -> List[str]:
    space = get_space("nb201", num_classes=10, input_size=32)
    rng = random.Random(seed)
    archs: List[str] = []
    while len(archs) < count:
        arch = space.sample(rng)
        text = space.to_string(arch)
        if text not in archs and not space.is_degenerate(arch):
            archs.append(text)
    return archs


def summary_of(data: str, batch_size: int) -> Dict[str, Any]:
    dataset = load_dataset(data)
    count = min(len(dataset), 512)
    chosen = np.sort(np.random.default_rng(0).choice(len(dataset), count, replace=False))
    inputs = dataset.to_tensor(chosen, size=32)
    return describe_data("summary", inputs, dataset.labels[chosen], 10, data_hash=dataset.data_hash)


def measure_round_trip(url: str, state: Path, data: Dict[str, Any], args: argparse.Namespace) -> List[Dict[str, float]]:
    rows = []
    with CloudClient(url, device_id="bench-rtt", state_dir=state, resend_interval_s=600) as client:
        for repeat in range(args.repeats):
            outcome = client.request_gradients(
                "nb201", sample_archs(args.finalists, 100 + repeat), args.proxies, data,
                num_classes=10, input_size=32, seed=repeat, batch_size=args.batch_size, timeout_s=1800,
            )
            if not isinstance(outcome, CloudResult):
                raise RuntimeError(f"round trip {repeat} fell back: {outcome.reason}")
            rows.append({"round_trip_s": outcome.round_trip_s, "compute_s": outcome.compute_s})
            print(f"round trip {repeat}: {outcome.round_trip_s:.2f} s, compute {outcome.compute_s:.2f} s", file=sys.stderr)
    return rows


def measure_throughput(url: str, state: Path, data: Dict[str, Any], args: argparse.Namespace, tag: str) -> Dict[str, Any]:
    with CloudClient(url, device_id=f"bench-{tag}", state_dir=state, resend_interval_s=1800) as client:
        if not client.connect(10):
            raise RuntimeError(f"cannot connect: {client.connect_error}")
        started = time.monotonic()
        request_ids = [
            client.submit("nb201", sample_archs(args.throughput_finalists, 1000 + index), args.proxies, data,
                          num_classes=10, input_size=32, seed=index, batch_size=args.throughput_batch_size,
                          timeout_s=3600)
            for index in range(args.requests)
        ]
        outcomes = client.wait(request_ids, 3600)
        elapsed = time.monotonic() - started
    fallbacks = [o for o in outcomes.values() if not isinstance(o, CloudResult)]
    if fallbacks:
        raise RuntimeError(f"{len(fallbacks)} throughput requests fell back: {fallbacks[0].reason}")
    per_worker: Dict[str, int] = {}
    for outcome in outcomes.values():
        per_worker[outcome.coordinator] = per_worker.get(outcome.coordinator, 0) + 1
    return {
        "requests": args.requests,
        "elapsed_s": elapsed,
        "requests_per_min": 60.0 * args.requests / elapsed,
        "archs_per_s": args.requests * args.throughput_finalists / elapsed,
        "requests_per_worker": per_worker,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finalists", type=int, default=16, help="architectures in the round-trip request")
    parser.add_argument("--batch-size", type=int, default=64, help="probe batch of the round-trip request")
    parser.add_argument("--repeats", type=int, default=2, help="round-trip requests, each with other architectures")
    parser.add_argument("--requests", type=int, default=8, help="requests submitted at once for throughput")
    parser.add_argument("--throughput-finalists", type=int, default=4, help="architectures per throughput request")
    parser.add_argument("--throughput-batch-size", type=int, default=16, help="probe batch of the throughput requests")
    parser.add_argument("--proxies", default="fgnas_gi,fgnas_gc", help="comma-separated gradient proxies")
    parser.add_argument("--data", default="sklearn-digits", help="images whose summary the device sends")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    args.proxies = [name for name in args.proxies.split(",") if name]

    folder = Path(tempfile.mkdtemp(prefix="edge-nas-cloud-bench-"))
    broker, port = start_broker(folder)
    url = f"mqtt://127.0.0.1:{port}"
    data = summary_of(args.data, args.batch_size)
    report: Dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_at_start": list(os.getloadavg())},
        "settings": {key: value for key, value in vars(args).items() if key != "out"},
        "data_descriptor_bytes": len(json.dumps(data)),
    }
    try:
        workers = start_workers(url, 1, "one")
        try:
            report["round_trip"] = measure_round_trip(url, folder / "rtt", data, args)
            report["throughput_1_worker"] = measure_throughput(url, folder / "one", data, args, "one")
        finally:
            stop_workers(workers)
        workers = start_workers(url, 2, "two")
        try:
            report["throughput_2_workers"] = measure_throughput(url, folder / "two", data, args, "two")
        finally:
            stop_workers(workers)
    finally:
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(folder, ignore_errors=True)
    report["machine"]["load_average_at_end"] = list(os.getloadavg())

    trips = report["round_trip"]
    print(f"| measure | value |\n|---|---|")
    print(f"| round trip, {args.finalists} finalists, batch {args.batch_size} (median of {len(trips)}) | "
          f"{statistics.median(t['round_trip_s'] for t in trips):.2f} s |")
    print(f"| coordinator compute of that request (median) | {statistics.median(t['compute_s'] for t in trips):.2f} s |")
    print(f"| transport and queueing (median of round trip - compute) | "
          f"{statistics.median(t['round_trip_s'] - t['compute_s'] for t in trips) * 1000:.0f} ms |")
    for key, label in (("throughput_1_worker", "1 worker"), ("throughput_2_workers", "2 workers")):
        entry = report[key]
        print(f"| throughput, {label} | {entry['requests_per_min']:.1f} requests/min "
              f"({entry['archs_per_s']:.2f} architectures/s) |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
