"""The cloud coordinator: compute the gradient proxies that devices request, and publish the aggregator.

Workers join one MQTT 5 shared subscription (`$share/<group>/edge-nas/devices/+/requests`), so
the broker hands each request to one of them. Any number of workers on any number of machines
split the load this way. A worker that gets a request id again re-publishes its stored result
instead of recomputing it. Each worker connects with a clean session, so when it dies the
broker drops its subscription at once, and the device's re-sent request reaches a live worker.

Every incoming payload is validated; one that is malformed, oversized, of an unknown schema
version, or sent on another device's topic is logged with the reason and dropped. A request
that is well formed but cannot be computed (unknown space or proxy, invalid architecture)
gets an error result, so the device falls back to local proxies at once.

Device code never imports this module: it imports torch and the proxy implementations.
"""
from __future__ import annotations

import collections
import csv
import hashlib
import json
import logging
import math
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import edge_runtime
from cloud_sync import protocol
from cloud_sync.client import BrokerSettings, connect_properties, create_mqtt_client
from cloud_sync.protocol import ProtocolError
from models.errors import EdgeNasError

logger = logging.getLogger(__name__)

DEFAULT_GROUP = "edge-nas"
# Results that one worker keeps for repeated request ids; each takes a few kB.
DEFAULT_RESULT_CACHE = 1024
# How long a retained "offline" presence message stays at the broker.
OFFLINE_PRESENCE_EXPIRY_S = 24 * 3600
# Seconds between checks of the calibration file for changes.
DEFAULT_POLL_INTERVAL_S = 1.0


class _DropLog:
    """Log dropped messages, at most `per_minute` lines a minute, with a count of the rest."""

    def __init__(self, per_minute: int = 20) -> None:
        self.per_minute = per_minute
        self.window_start = time.monotonic()
        self.logged = 0
        self.suppressed = 0
        self.total = 0

    def drop(self, topic: str, reason: str) -> None:
        self.total += 1
        now = time.monotonic()
        if now - self.window_start >= 60.0:
            if self.suppressed:
                logger.warning("dropped %d more invalid messages in the last minute", self.suppressed)
            self.window_start, self.logged, self.suppressed = now, 0, 0
        if self.logged < self.per_minute:
            self.logged += 1
            logger.warning("dropped a message on %s: %s", topic, reason)
        else:
            self.suppressed += 1


# Computing requests ------------------------------------------------------------------


class Coordinator:
    """Turn validated gradient requests into result messages; no MQTT here.

    `data` is the coordinator's own probe data (an ImageDataset), used for requests that
    share no data. Without it such requests get seeded standard-normal inputs and uniform
    labels, which the result's `probe.source` records as "gaussian".
    """

    def __init__(self, coordinator_id: str, *, data: Any = None, result_cache: int = DEFAULT_RESULT_CACHE) -> None:
        self.coordinator_id = protocol.check_id(coordinator_id, "coordinator id")
        self.data = data
        self.result_cache = result_cache
        self._results: "collections.OrderedDict[str, bytes]" = collections.OrderedDict()
        self._spaces: Dict[Tuple[str, int, int], Any] = {}
        self.drops = _DropLog()
        self.computed = 0
        self.repeated = 0

    def handle(self, topic: str, payload: bytes) -> Optional[Tuple[str, bytes]]:
        """Return (topic, payload) of the result to publish for one incoming message, or None when it is dropped."""
        topic_device = protocol.device_id_from_topic(topic, "requests")
        if topic_device is None:
            self.drops.drop(topic, "not a request topic")
            return None
        try:
            message = protocol.decode_message(payload, expected_type=protocol.GRADIENT_REQUEST)
        except ProtocolError as error:
            self.drops.drop(topic, str(error))
            return None
        if message["device_id"] != topic_device:
            self.drops.drop(topic, f"the request names device {message['device_id']!r}, not the topic's device")
            return None

        request_id = message["request_id"]
        reply_topic = protocol.result_topic(topic_device)
        # Keyed by id and content: a different request that reuses an id is computed, not answered from the store.
        stored_key = f"{request_id}:{protocol.request_content_digest(message)}"
        cached = self._results.get(stored_key)
        if cached is not None:
            self._results.move_to_end(stored_key)
            self.repeated += 1
            logger.info("re-publishing the stored result of repeated request %s of %s", request_id, topic_device)
            return reply_topic, cached

        logger.info("computing request %s of %s: %d architectures, proxies %s",
                    request_id, topic_device, len(message["archs"]), ",".join(message["proxies"]))
        started = time.perf_counter()
        try:
            reply = self.compute(message)
        except (EdgeNasError, ValueError, KeyError) as error:
            logger.warning("rejected request %s of %s: %s", request_id, topic_device, error)
            reply = protocol.gradient_error(self.coordinator_id, topic_device, request_id, str(error))
        except Exception as error:  # a bug must not stop the service; the device falls back
            logger.exception("request %s of %s failed", request_id, topic_device)
            reply = protocol.gradient_error(
                self.coordinator_id, topic_device, request_id, f"internal error in the coordinator: {type(error).__name__}"
            )
        encoded = protocol.encode_message(reply)
        self._remember(stored_key, encoded)
        self.computed += 1
        logger.info("published the result of request %s of %s after %.2f s (status %s)",
                    request_id, topic_device, time.perf_counter() - started, reply["status"])
        return reply_topic, encoded

    def _remember(self, key: str, encoded: bytes) -> None:
        self._results[key] = encoded
        while len(self._results) > self.result_cache:
            self._results.popitem(last=False)

    def compute(self, request: Mapping[str, Any]) -> Dict[str, Any]:
        """Compute the result message of one validated request; raise EdgeNasError or ValueError if it cannot be computed."""
        import torch

        from models.proxies import CLOUD, get_proxy
        from models.proxies.scoring import score_architecture

        started = time.perf_counter()
        space = self._space(request["space"])
        for name in request["proxies"]:
            spec = get_proxy(name)
            if CLOUD not in spec.runs_on:
                raise EdgeNasError(f"proxy {name!r} does not run in the cloud")
        archs = [(text, space.parse(text)) for text in request["archs"]]
        inputs, labels, probe = self.probe_batch(request)
        inputs_tensor = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
        labels_tensor = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
        options = request.get("proxy_options") or None

        results: Dict[str, Dict[str, Dict[str, Any]]] = {}
        for text, arch in archs:
            row = score_architecture(
                space, arch, inputs_tensor, labels_tensor, request["proxies"], seed=request["seed"], options=options
            )
            results[text] = {name: _entry(result) for name, result in row.items()}
        return protocol.gradient_result(
            self.coordinator_id, request, results, probe,
            seconds=time.perf_counter() - started, code_version=edge_runtime.__version__,
        )

    def _space(self, described: Mapping[str, Any]) -> Any:
        from models.spaces import get_space

        width_mult = described.get("width_mult")
        key = (described["name"], described["num_classes"], described["input_size"], width_mult)
        if key not in self._spaces:
            options: Dict[str, Any] = {"num_classes": key[1], "input_size": key[2]}
            if width_mult is not None:
                if not hasattr(get_space(key[0]), "width_mult"):
                    raise EdgeNasError(f"search space {key[0]!r} takes no width multiplier, but the request names {width_mult:g}")
                options["width_mult"] = width_mult
            self._spaces[key] = get_space(key[0], **options)
        return self._spaces[key]

    def probe_batch(self, request: Mapping[str, Any]) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
        """Probe inputs, labels and a record of where they came from, for one request."""
        data = request["data"]
        share = data["share"]
        batch_size = request["batch_size"]
        seed = request["seed"]
        size = request["space"]["input_size"]
        num_classes = request["space"]["num_classes"]
        probe: Dict[str, Any] = {"share": share, "seed": seed, "data_hash": data.get("data_hash", "")}
        if share in (protocol.SHARE_SUMMARY, protocol.SHARE_RAW):
            inputs, labels = protocol.draw_probe_batch(data, batch_size, seed)
            probe["source"] = share
        elif self.data is not None:
            if self.data.num_classes > num_classes:
                raise EdgeNasError(
                    f"the coordinator's probe data has {self.data.num_classes} classes, more than the "
                    f"{num_classes} outputs of the network; send a data summary with --share summary"
                )
            tensor, label_tensor = self.data.probe_batch(batch_size, seed=seed, size=size)
            inputs, labels = tensor.numpy(), label_tensor.numpy()
            probe.update(source="coordinator_data", data_hash=self.data.data_hash)
        else:
            rng = np.random.default_rng(seed)
            inputs = rng.standard_normal((batch_size, 3, size, size)).astype(np.float32)
            labels = rng.integers(0, data["num_classes"], size=batch_size)
            probe["source"] = "gaussian"
        probe["batch_size"] = int(inputs.shape[0])
        return inputs, labels, probe


def _entry(result: Any) -> Dict[str, Any]:
    entry: Dict[str, Any] = {"value": result.value if result.valid else None, "valid": bool(result.valid)}
    if result.reason:
        entry["reason"] = result.reason
    if "seconds" in result.details:
        entry["seconds"] = float(result.details["seconds"])
    return entry


# Calibration and the aggregator -------------------------------------------------------


@dataclass(frozen=True)
class FittedAggregator:
    """An aggregator ready to publish: its space, its document as text, and what it was fitted on."""

    space: str
    content: str
    calibration: Dict[str, Any]


AggregatorFitter = Callable[[Path], FittedAggregator]


# The aggregate that a calibration file fits; its component proxies must be columns of the file.
CALIBRATION_AGGREGATE = "fgnas"
_NON_PROXY_COLUMNS = ("arch", "accuracy", "space")


def fit_calibration_file(path: Path, aggregate: str = CALIBRATION_AGGREGATE) -> FittedAggregator:
    """Fit the aggregator of a calibration CSV with `models.aggregation.fit_aggregator`.

    The CSV has an `arch` column, an `accuracy` column and one column per component proxy of
    `aggregate` (for "fgnas": fgnas_fc, fgnas_gi, fgnas_gc, params). An empty cell or "nan"
    marks an invalid proxy value. An optional `space` column names the search space (default
    nb201). Raises EdgeNasError if the file cannot be read or fitted.
    """
    from models.aggregation import fit_aggregator

    rows = read_calibration_csv(path)
    spaces = {(row.get("space") or "nb201").strip() for row in rows}
    if len(spaces) != 1:
        raise EdgeNasError(f"{path}: the calibration rows name several search spaces ({', '.join(sorted(spaces))})")
    space = spaces.pop()
    proxies = [name for name in rows[0] if name not in _NON_PROXY_COLUMNS]
    archs = [row["arch"].strip() for row in rows]
    accuracies = [_number(row["accuracy"], path, "accuracy", index) for index, row in enumerate(rows, start=2)]
    columns = {
        name: [_number(row[name], path, name, index) for index, row in enumerate(rows, start=2)] for name in proxies
    }
    # NOTE: a calibration CSV does not say how its proxies were computed (data, batch size,
    # seed), so the aggregator's protocol records only which file it was fitted on.
    provenance = {"calibration_file": path.name, "calibration_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    aggregator = fit_aggregator(space, archs, columns, accuracies, provenance, name=aggregate)
    content = json.dumps(aggregator.to_json(), indent=2) + "\n"
    calibration = dict(provenance, rows=len(rows), spearman=aggregator.calibration_spearman, aggregate=aggregate)
    return FittedAggregator(space, content, calibration)


def _number(text: Any, path: Path, column: str, line: int) -> float:
    if text is None or not str(text).strip() or str(text).strip().lower() == "nan":
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise EdgeNasError(f"{path}, line {line}: {column} {text!r} is not a number") from None


def read_calibration_csv(path: Path) -> List[Dict[str, str]]:
    """Read the rows of a calibration CSV; raise EdgeNasError unless it has `arch` and `accuracy` columns and rows."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            columns = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise EdgeNasError(f"cannot read the calibration file {path}: {error}") from None
    missing = [name for name in ("arch", "accuracy") if name not in columns]
    if missing:
        raise EdgeNasError(
            f"{path}: the calibration CSV has no column {', '.join(missing)}; "
            "it needs arch, accuracy and one column per proxy"
        )
    if not rows:
        raise EdgeNasError(f"{path}: the calibration CSV has no rows")
    return rows


class CalibrationWatcher:
    """Refit the aggregator when the calibration file changes (its size or modification time)."""

    def __init__(self, path: Path, fit: AggregatorFitter) -> None:
        self.path = path
        self.fit = fit
        self._stamp: Optional[Tuple[int, int]] = None
        self.current: Optional[FittedAggregator] = None

    def _read_stamp(self) -> Optional[Tuple[int, int]]:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def refit_if_changed(self) -> Optional[FittedAggregator]:
        """Return a new aggregator when the file changed and fits; log and keep the old one when it fails."""
        stamp = self._read_stamp()
        if stamp is None or stamp == self._stamp:
            return None
        self._stamp = stamp
        try:
            fitted = self.fit(self.path)
        except EdgeNasError as error:
            if self.current is None:
                raise
            logger.error("cannot refit the aggregator from %s, keeping the last one: %s", self.path, error)
            return None
        self.current = fitted
        logger.info("fitted the aggregator of %s from %s", fitted.space, self.path)
        return fitted


# The service -------------------------------------------------------------------------


def default_coordinator_id() -> str:
    host = "".join(c if c.isalnum() or c in "_.-" else "-" for c in socket.gethostname()).strip("-._")[:40]
    return f"coord-{host or 'host'}-{os.getpid()}"


def serve(
    broker_url: Union[str, BrokerSettings],
    group: str = DEFAULT_GROUP,
    calibration: Optional[Union[str, Path]] = None,
    data: Any = None,
    *,
    coordinator_id: Optional[str] = None,
    fit: Optional[AggregatorFitter] = None,
    stop: Optional[threading.Event] = None,
    ready: Optional[threading.Event] = None,
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
    result_cache: int = DEFAULT_RESULT_CACHE,
    threads: Optional[int] = None,
) -> Coordinator:
    """Serve gradient requests until `stop` is set or the process is interrupted; return the Coordinator.

    `data` is a path, a built-in sample name or an ImageDataset: the probe data for requests
    that share none. With `calibration`, the aggregator fitted from that file (by `fit`,
    default `fit_calibration_file`) is published retained on its space's topic, and again
    whenever the file changes. `ready` is set once the shared subscription is in place.
    `threads` sets torch's intra-op threads for this process; with several workers on one
    machine, one thread each avoids oversubscribing the cores.
    Raises EdgeNasError for a bad broker URL, group, data or calibration file.
    """
    settings = broker_url if isinstance(broker_url, BrokerSettings) else BrokerSettings(broker_url)
    address = settings.address
    protocol.check_id(group, "group")
    coordinator_id = protocol.check_id(coordinator_id or default_coordinator_id(), "coordinator id")
    dataset = _load_data(data)
    watcher = CalibrationWatcher(Path(calibration), fit or fit_calibration_file) if calibration else None
    if watcher is not None:
        if not watcher.path.is_file():
            raise EdgeNasError(f"calibration file not found: {watcher.path}")
        watcher.refit_if_changed()
    if threads is not None:
        if threads < 1:
            raise EdgeNasError(f"--threads must be at least 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    coordinator = Coordinator(coordinator_id, data=dataset, result_cache=result_cache)
    stop = stop or threading.Event()
    service = _Service(coordinator, settings, group, watcher, stop, ready, poll_interval_s)
    logger.info("coordinator %s starting: broker %s, group %s", coordinator_id, address.url, group)
    try:
        service.run()
    except KeyboardInterrupt:
        logger.info("coordinator %s interrupted", coordinator_id)
    finally:
        service.shutdown()
    logger.info("coordinator %s stopped: %d requests computed, %d stored results re-published, %d messages dropped",
                coordinator_id, coordinator.computed, coordinator.repeated, coordinator.drops.total)
    return coordinator


def _offline_properties(packet_type: int) -> Properties:
    """Publish properties that let the broker discard a retained "offline" presence after a day."""
    properties = Properties(packet_type)
    properties.MessageExpiryInterval = OFFLINE_PRESENCE_EXPIRY_S
    return properties


def _load_data(data: Any) -> Any:
    if data is None:
        return None
    from edge_runtime.data import ImageDataset, load_dataset

    if isinstance(data, ImageDataset):
        return data
    return load_dataset(str(data))


class _Service:
    """The MQTT side of one worker: connection, subscription, presence and the event loop."""

    def __init__(
        self,
        coordinator: Coordinator,
        settings: BrokerSettings,
        group: str,
        watcher: Optional[CalibrationWatcher],
        stop: threading.Event,
        ready: Optional[threading.Event],
        poll_interval_s: float,
    ) -> None:
        self.coordinator = coordinator
        self.settings = settings
        self.group = group
        self.watcher = watcher
        self.stop = stop
        self.ready = ready
        self.poll_interval_s = poll_interval_s
        self.events: "queue.Queue[Tuple[str, Any]]" = queue.Queue()
        self.connected = False
        # space -> (version, checksum) of the retained aggregator seen on the broker
        self.retained: Dict[str, Tuple[int, str]] = {}
        self.published: Dict[str, str] = {}
        coordinator_id = coordinator.coordinator_id
        self.presence_topic = protocol.presence_topic(coordinator_id)
        self.client = create_mqtt_client(coordinator_id, settings)
        self.client.will_set(self.presence_topic, self._offline_payload(), qos=1, retain=True,
                             properties=_offline_properties(PacketTypes.WILLMESSAGE))
        self.client.on_connect = lambda client, userdata, flags, reason, properties: self.events.put(("connected", reason))
        self.client.on_disconnect = lambda client, userdata, flags, reason, properties: self.events.put(("disconnected", reason))
        self.client.on_connect_fail = lambda client, userdata: self.events.put(("connect_failed", None))
        self.client.on_message = lambda client, userdata, message: self.events.put(
            ("message", (message.topic, bytes(message.payload)))
        )
        self.client.on_subscribe = lambda client, userdata, mid, reasons, properties: self.events.put(("subscribed", reasons))

    def _offline_payload(self) -> bytes:
        offline = protocol.presence_message(self.coordinator.coordinator_id, "offline", group=self.group)
        return protocol.encode_message(offline)

    def run(self) -> None:
        address = self.settings.address
        # A clean session: when this worker dies, the broker drops its share of the subscription at once.
        self.client.connect_async(address.host, address.port, keepalive=self.settings.keepalive_s,
                                  clean_start=True, properties=connect_properties(0))
        self.client.loop_start()
        while not self.stop.is_set():
            try:
                event = self.events.get(timeout=self.poll_interval_s)
            except queue.Empty:
                event = None
            if event is not None:
                self._handle(event)
            self._check_calibration()

    def _handle(self, event: Tuple[str, Any]) -> None:
        kind, details = event
        if kind == "connected":
            self._on_connected(details)
        elif kind == "disconnected":
            if self.connected:
                logger.warning("coordinator %s lost the broker connection (%s); reconnecting",
                               self.coordinator.coordinator_id, details)
            self.connected = False
        elif kind == "connect_failed":
            logger.warning("coordinator %s cannot reach the broker at %s; retrying",
                           self.coordinator.coordinator_id, self.settings.address.url)
        elif kind == "subscribed":
            failures = [str(reason) for reason in details if reason.is_failure]
            if failures:
                logger.error("the broker rejected a subscription of coordinator %s: %s",
                             self.coordinator.coordinator_id, ", ".join(failures))
            elif self.ready is not None:
                self.ready.set()
        elif kind == "message":
            self._on_message(*details)

    def _on_connected(self, reason: Any) -> None:
        if reason.is_failure:
            logger.error("the broker rejected the connection of coordinator %s: %s; retrying", self.coordinator.coordinator_id, reason)
            return
        self.connected = True
        logger.info("coordinator %s connected to %s", self.coordinator.coordinator_id, self.settings.address.url)
        self.client.subscribe([
            (f"{protocol.TOPIC_ROOT}/spaces/+/aggregator", 1),
            (protocol.shared_request_filter(self.group), 1),
        ])
        online = protocol.presence_message(self.coordinator.coordinator_id, "online", group=self.group)
        self.client.publish(self.presence_topic, protocol.encode_message(online), qos=1, retain=True)
        if self.watcher is not None and self.watcher.current is not None:
            self._publish_aggregator(self.watcher.current)

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic.endswith("/aggregator"):
            self._note_retained_aggregator(topic, payload)
            return
        reply = self.coordinator.handle(topic, payload)
        if reply is not None:
            self.client.publish(reply[0], reply[1], qos=1)

    def _note_retained_aggregator(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        try:
            message = protocol.decode_message(payload, expected_type=protocol.AGGREGATOR)
        except ProtocolError as error:
            logger.warning("ignoring an invalid aggregator on %s: %s", topic, error)
            return
        space = message["space"]
        known = self.retained.get(space)
        if known is None or message["version"] > known[0]:
            self.retained[space] = (message["version"], message["checksum"])

    def _check_calibration(self) -> None:
        if self.watcher is None:
            return
        fitted = self.watcher.refit_if_changed()
        if fitted is not None and self.connected:
            self._publish_aggregator(fitted)

    def _publish_aggregator(self, fitted: FittedAggregator) -> None:
        checksum = protocol.content_checksum(fitted.content)
        known = self.retained.get(fitted.space)
        if known is not None and known[1] == checksum:
            logger.info("the broker already has this aggregator of %s (version %d); not publishing it again", fitted.space, known[0])
            return
        if self.published.get(fitted.space) == checksum:
            return
        # Versions only grow: past any version seen on the broker, and at least the UNIX time in seconds.
        version = max(int(time.time()), (known[0] + 1) if known else 1)
        message = protocol.aggregator_message(
            self.coordinator.coordinator_id, fitted.space, version, fitted.content, fitted.calibration
        )
        self.client.publish(protocol.aggregator_topic(fitted.space), protocol.encode_message(message), qos=1, retain=True)
        self.published[fitted.space] = checksum
        self.retained[fitted.space] = (version, checksum)
        logger.info("published aggregator version %d of %s (%s)", version, fitted.space, checksum)

    def shutdown(self) -> None:
        if self.connected:
            info = self.client.publish(self.presence_topic, self._offline_payload(), qos=1, retain=True,
                                       properties=_offline_properties(PacketTypes.PUBLISH))
            try:
                info.wait_for_publish(timeout=1.0)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()
