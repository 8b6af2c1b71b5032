"""The device side of the cloud loop: send finalists to the coordinators and wait for their gradient proxies.

`CloudClient` speaks MQTT 5 through paho-mqtt 2 (VERSION2 callbacks) with a persistent
session: a stable client id (the device id), clean start off and a session expiry, so results
published while the device is offline wait for it at the broker. Every publish and
subscription uses QoS 1. The paho callbacks only put events on a queue; the caller's thread
reads that queue, so no protocol work runs on paho's network thread.

Requests go through an on-disk outbox (SQLite) before they are sent. A request without a
result survives a restart of the device process and is sent again, with the same request id,
until a result arrives or its deadline passes. The first result for a request id is kept and
later ones are ignored. At the deadline, or when no broker can be reached, the client returns
a `CloudFallback` within the connect timeout instead of waiting for the network.

This module imports neither torch nor the coordinator; `CloudGradientSource`, the adapter
for `edge_runtime.personalize`, imports that module (and through it torch) only when it falls back.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloud_sync import protocol
from cloud_sync.protocol import BrokerAddress, ProtocolError
from edge_runtime.atomic import ensure_writable_dir, write_text_atomic
from models.errors import EdgeNasError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 120.0
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_RESEND_INTERVAL_S = 10.0
# How long the broker keeps the device's session (subscriptions and queued results) while it is offline.
DEFAULT_SESSION_EXPIRY_S = 24 * 3600
DEFAULT_KEEPALIVE_S = 30
# Results kept in the outbox database; the oldest beyond this count are deleted.
MAX_STORED_RESULTS = 512

PathLike = Union[str, "os.PathLike[str]"]


# Connection settings -------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerSettings:
    """How to reach and log in to the broker: the URL, credentials and TLS files."""

    url: str
    username: Optional[str] = None
    password_file: Optional[PathLike] = None
    ca_file: Optional[PathLike] = None
    keepalive_s: int = DEFAULT_KEEPALIVE_S

    @property
    def address(self) -> BrokerAddress:
        return protocol.parse_broker_url(self.url)

    def user_name(self) -> Optional[str]:
        address = self.address
        if self.username and address.username and self.username != address.username:
            raise EdgeNasError(
                f"the user name {self.username!r} differs from {address.username!r} in the broker URL; give only one"
            )
        return self.username or address.username

    def read_password(self) -> Optional[str]:
        """Return the first line of the password file, or None without a file."""
        if self.password_file is None:
            return None
        path = Path(self.password_file).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise EdgeNasError(f"cannot read the password file {path}: {error.strerror or error}") from None
        if not lines or not lines[0]:
            raise EdgeNasError(f"the password file {path} is empty; write the password on its first line")
        return lines[0]

    def login(self) -> Tuple[Optional[str], Optional[str], Optional[str]]:
        """Return (user name, password, CA file) after checking that they fit together and the files exist.

        Raises EdgeNasError for a bad URL, an unreadable password or CA file, a password
        without a user name, or a CA file with an mqtt:// URL.
        """
        address = self.address
        username = self.user_name()
        # The user name is checked first, so a missing one is reported even when the file is missing too.
        if self.password_file is not None and not username:
            raise EdgeNasError("a password file needs a user name: pass --username or write it in the URL")
        password = self.read_password()
        ca_file = None
        if self.ca_file is not None:
            if not address.tls:
                raise EdgeNasError("--ca-file needs an mqtts:// broker URL; the mqtt:// scheme does not use TLS")
            ca_path = Path(self.ca_file).expanduser()
            if not ca_path.is_file():
                raise EdgeNasError(f"the CA file {ca_path} does not exist; pass the broker's CA certificate with --ca-file")
            ca_file = str(ca_path)
        return username, password, ca_file


def create_mqtt_client(
    client_id: str,
    settings: BrokerSettings,
    *,
    will: Optional[Tuple[str, bytes]] = None,
) -> mqtt.Client:
    """A paho MQTT 5 client with VERSION2 callbacks, credentials, TLS and a retained last will.

    Raises EdgeNasError for a bad URL, an unreadable password or CA file, or a password
    without a user name.
    """
    username, password, ca_file = settings.login()
    client = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
    )
    if username:
        client.username_pw_set(username, password)
    if settings.address.tls:
        client.tls_set(ca_certs=ca_file)
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=True)
    client.reconnect_delay_set(min_delay=1, max_delay=10)
    return client


def connect_properties(session_expiry_s: int) -> Properties:
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = int(session_expiry_s)
    return properties


# Outcomes ----------------------------------------------------------------------------


@dataclass
class CloudResult:
    """The cloud's gradient proxies for one request.

    `values[arch][proxy]` is the value, or None where the proxy is invalid for that
    architecture. `results` contains the full entries (`valid`, `reason`, `seconds`).
    `compute_s` is the coordinator's time for the whole request, `round_trip_s` the device's
    time from submit to result (0 for a result taken from the outbox).
    """

    request_id: str
    values: Dict[str, Dict[str, Optional[float]]]
    results: Dict[str, Dict[str, Dict[str, Any]]]
    coordinator: str
    probe: Dict[str, Any]
    round_trip_s: float
    sends: int
    compute_s: float = 0.0
    from_outbox: bool = False

    is_fallback = False


@dataclass
class CloudFallback:
    """The marker for "compute locally": no result by the deadline, no broker, or a rejected request."""

    reason: str
    request_id: Optional[str] = None
    elapsed_s: float = 0.0

    is_fallback = True


CloudOutcome = Union[CloudResult, CloudFallback]


# Outbox ------------------------------------------------------------------------------


class Outbox:
    """Requests still waiting for a result, and the results received, in one SQLite file.

    Only the thread that owns the client touches it; the lock guards against a caller that
    shares one client between threads.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS requests (request_id TEXT PRIMARY KEY, body TEXT NOT NULL, "
                "created REAL NOT NULL, deadline REAL NOT NULL, sends INTEGER NOT NULL DEFAULT 0)"
            )
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS results (request_id TEXT PRIMARY KEY, payload TEXT NOT NULL, received REAL NOT NULL)"
            )
        except sqlite3.Error as error:
            raise EdgeNasError(f"cannot open the cloud outbox {path}: {error}; choose another state folder") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, request_id: str, body: Mapping[str, Any], deadline: float) -> None:
        """Store a request; a request id already stored keeps its body and gets the later deadline."""
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
        with self._lock:
            self._db.execute(
                "INSERT INTO requests (request_id, body, created, deadline) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(request_id) DO UPDATE SET deadline = max(deadline, excluded.deadline)",
                (request_id, text, time.time(), deadline),
            )

    def pending(self, now: float) -> List[Tuple[str, Dict[str, Any], float]]:
        """Return (request id, body, deadline) of every request without a result whose deadline has not passed."""
        with self._lock:
            rows = self._db.execute(
                "SELECT request_id, body, deadline FROM requests WHERE deadline > ? ORDER BY created", (now,)
            ).fetchall()
        return [(request_id, json.loads(body), deadline) for request_id, body, deadline in rows]

    def is_pending(self, request_id: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM requests WHERE request_id = ?", (request_id,)).fetchone()
        return row is not None

    def count_send(self, request_id: str) -> int:
        with self._lock:
            self._db.execute("UPDATE requests SET sends = sends + 1 WHERE request_id = ?", (request_id,))
            row = self._db.execute("SELECT sends FROM requests WHERE request_id = ?", (request_id,)).fetchone()
        return int(row[0]) if row else 0

    def sends(self, request_id: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT sends FROM requests WHERE request_id = ?", (request_id,)).fetchone()
        return int(row[0]) if row else 0

    def store_result(self, request_id: str, payload: Mapping[str, Any]) -> bool:
        """Keep the first result for `request_id` and drop the request; return False for a later result."""
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
        with self._lock:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO results (request_id, payload, received) VALUES (?, ?, ?)",
                (request_id, text, time.time()),
            )
            self._db.execute("DELETE FROM requests WHERE request_id = ?", (request_id,))
            self._db.execute(
                "DELETE FROM results WHERE request_id NOT IN "
                "(SELECT request_id FROM results ORDER BY received DESC LIMIT ?)",
                (MAX_STORED_RESULTS,),
            )
        return cursor.rowcount == 1

    def drop(self, request_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM requests WHERE request_id = ?", (request_id,))

    def result(self, request_id: str) -> Optional[Dict[str, Any]]:
        with self._lock:
            row = self._db.execute("SELECT payload FROM results WHERE request_id = ?", (request_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def drop_expired(self, now: float) -> int:
        with self._lock:
            cursor = self._db.execute("DELETE FROM requests WHERE deadline <= ?", (now,))
        return cursor.rowcount


# Aggregators ---------------------------------------------------------------------------


class AggregatorStore:
    """The last good aggregator of each search space, on disk: `<space>.json` and `<space>.meta.json`.

    `<space>.json` contains the aggregator document exactly as the coordinator fitted it, so it
    can be passed to `edge-nas personalize --aggregator`.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, space: str) -> Path:
        return self.folder / f"{protocol._check_space_name(space)}.json"

    def metadata(self, space: str) -> Optional[Dict[str, Any]]:
        meta_path = self.folder / f"{space}.meta.json"
        try:
            return json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def latest(self, space: str) -> Optional[Path]:
        """Return the last good aggregator file of `space`, or None if none was received."""
        path = self.path(space)
        return path if path.is_file() and self.metadata(space) is not None else None

    def accept(self, message: Mapping[str, Any], topic_space: str) -> bool:
        """Verify an aggregator message and store it if it is newer; return whether it was stored.

        Raises ProtocolError when the space does not match its topic, the checksum does not
        match the content, or the content is not a valid aggregator of the same space
        (`models.aggregation.Aggregator.from_json`).
        """
        space = message["space"]
        if space != topic_space:
            raise ProtocolError(f"aggregator for space {space!r} arrived on the topic of space {topic_space!r}")
        content = message["content"]
        checksum = protocol.content_checksum(content)
        if message["checksum"] != checksum:
            raise ProtocolError(f"aggregator checksum {message['checksum']} does not match its content ({checksum})")
        try:
            document = json.loads(content)
        except ValueError as error:
            raise ProtocolError(f"aggregator content is not JSON: {error}") from None
        except RecursionError:
            raise ProtocolError("aggregator content is nested too deeply") from None
        if not isinstance(document, dict):
            raise ProtocolError("aggregator content must be a JSON object")
        if document.get("space") != space:
            raise ProtocolError(f"aggregator content is for space {document.get('space')!r}, not {space!r}")
        from models.aggregation import Aggregator

        try:
            Aggregator.from_json(document, space=space, source=f"aggregator version {message['version']}")
        except EdgeNasError as error:
            raise ProtocolError(str(error)) from None
        current = self.metadata(space)
        if current is not None and int(current.get("version", 0)) >= message["version"]:
            if current.get("checksum") != checksum:
                logger.info("ignoring aggregator version %d of %s: version %d is stored",
                            message["version"], space, current.get("version"))
            return False
        ensure_writable_dir(self.folder)
        write_text_atomic(self.path(space), content)
        meta = {
            "space": space,
            "version": message["version"],
            "checksum": checksum,
            "sender": message["sender"],
            "calibration": message["calibration"],
            "received": time.time(),
        }
        write_text_atomic(self.folder / f"{space}.meta.json", json.dumps(meta, indent=2) + "\n")
        logger.info("stored aggregator version %d of %s from %s", message["version"], space, message["sender"])
        return True


# Client ------------------------------------------------------------------------------


def default_state_dir() -> Path:
    """Return the folder of the outbox and the received aggregators.

    It is `$EDGE_NAS_CLOUD_STATE`, else `$XDG_CACHE_HOME/edge-nas/cloud`, else
    `~/.cache/edge-nas/cloud`, the same cache root as the score cache.
    """
    configured = os.environ.get("EDGE_NAS_CLOUD_STATE")
    if configured:
        return Path(configured).expanduser()
    cache_root = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache_root).expanduser() if cache_root else Path("~/.cache").expanduser()
    return base / "edge-nas" / "cloud"


def default_device_id() -> str:
    """Return the host name reduced to the characters that a device id allows, which is stable across runs."""
    name = "".join(c if c.isalnum() or c in "_.-" else "-" for c in socket.gethostname())
    return name.strip("-._")[:64] or "device"


class CloudClient:
    """The device's connection to the cloud coordinators.

    Use as a context manager, or call `close()`. `request_gradients` does the whole exchange;
    `submit` and `wait` split it for several requests in flight at once.
    """

    def __init__(
        self,
        broker: Union[str, BrokerSettings],
        *,
        device_id: Optional[str] = None,
        state_dir: Optional[PathLike] = None,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        resend_interval_s: float = DEFAULT_RESEND_INTERVAL_S,
        session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S,
    ) -> None:
        self.settings = broker if isinstance(broker, BrokerSettings) else BrokerSettings(broker)
        self.device_id = protocol.check_id(device_id or default_device_id(), "device id")
        self.connect_timeout_s = float(connect_timeout_s)
        self.resend_interval_s = float(resend_interval_s)
        self.session_expiry_s = int(session_expiry_s)
        folder = ensure_writable_dir(Path(state_dir) if state_dir is not None else default_state_dir())
        self.outbox = Outbox(folder / f"outbox-{self.device_id}.sqlite")
        self.aggregators = AggregatorStore(folder / "aggregators")
        self._events: "queue.Queue[Tuple[str, Any]]" = queue.Queue()
        self._client: Optional[mqtt.Client] = None
        self._connected = False
        self._connect_error: Optional[str] = None
        self._last_sent: Dict[str, float] = {}
        self._submitted_at: Dict[str, float] = {}
        self._errors: Dict[str, str] = {}
        # request id -> (monotonic time its result arrived, sends until then), for this process only
        self._result_arrivals: Dict[str, Tuple[float, int]] = {}
        # Publishes that the broker rejected (an MQTT 5 PUBACK failure code, e.g. "Not authorized").
        self.rejected_publishes = 0

    # Lifecycle

    def __enter__(self) -> "CloudClient":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def connect(self, timeout_s: Optional[float] = None) -> bool:
        """Start the connection and wait up to `timeout_s` (default: the connect timeout) for it.

        Returns False, with the reason in `connect_error`, when the broker rejects the
        connection or does not reply in time. paho keeps retrying in the background.
        """
        if self._client is None:
            will = (protocol.status_topic(self.device_id),
                    protocol.encode_message(protocol.status_message(self.device_id, "offline")))
            client = create_mqtt_client(self.device_id, self.settings, will=will)
            client.on_connect = self._on_connect
            client.on_connect_fail = self._on_connect_fail
            client.on_disconnect = self._on_disconnect
            client.on_message = self._on_message
            client.on_publish = self._on_publish
            address = self.settings.address
            try:
                client.connect_async(
                    address.host, address.port, keepalive=self.settings.keepalive_s,
                    clean_start=False, properties=connect_properties(self.session_expiry_s),
                )
            except (OSError, ValueError) as error:
                self._connect_error = f"cannot connect to {address.url}: {error}"
                return False
            client.loop_start()
            self._client = client
        limit = time.monotonic() + (self.connect_timeout_s if timeout_s is None else timeout_s)
        while not self._connected:
            remaining = limit - time.monotonic()
            if remaining <= 0:
                if self._connect_error is None:
                    self._connect_error = f"no reply from the broker at {self.settings.address.url}"
                return False
            if not self.pump(min(remaining, 0.2)) and self._connect_error is not None and not self._connected:
                return False
        return True

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def connect_error(self) -> Optional[str]:
        return self._connect_error

    def close(self) -> None:
        """Publish the offline status, disconnect and close the outbox; requests without a result stay in it."""
        client, self._client = self._client, None
        if client is not None:
            if self._connected:
                info = client.publish(
                    protocol.status_topic(self.device_id),
                    protocol.encode_message(protocol.status_message(self.device_id, "offline")),
                    qos=1, retain=True,
                )
                try:
                    info.wait_for_publish(timeout=1.0)
                except (RuntimeError, ValueError):
                    pass
            client.disconnect()
            client.loop_stop()
        self._connected = False
        self.outbox.close()

    # Requests

    def request_gradients(
        self,
        space: str,
        archs: Sequence[str],
        proxies: Sequence[str],
        data: Mapping[str, Any],
        *,
        num_classes: int,
        input_size: int,
        seed: int = 0,
        batch_size: int = 64,
        proxy_options: Optional[Mapping[str, Mapping[str, Any]]] = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        width_mult: Optional[float] = None,
    ) -> CloudOutcome:
        """Send one request of gradient proxies and wait for its result until `timeout_s` passes.

        `data` is a descriptor from `cloud_sync.protocol` (`describe_none`, `describe_summary`
        or `describe_raw`). `width_mult` is the width multiplier of a space that takes one.
        Returns a CloudResult, or a CloudFallback when no broker is reachable, the deadline
        passes, or the coordinator rejects the request. A result that an earlier run already
        received for the same content returns at once.
        """
        started = time.monotonic()
        request_id = self.submit(
            space, archs, proxies, data, num_classes=num_classes, input_size=input_size, seed=seed,
            batch_size=batch_size, proxy_options=proxy_options, timeout_s=timeout_s, width_mult=width_mult,
        )
        outcome = self.wait([request_id], timeout_s - (time.monotonic() - started))[request_id]
        if isinstance(outcome, CloudFallback):
            outcome.elapsed_s = time.monotonic() - started
        return outcome

    def submit(
        self,
        space: str,
        archs: Sequence[str],
        proxies: Sequence[str],
        data: Mapping[str, Any],
        *,
        num_classes: int,
        input_size: int,
        seed: int = 0,
        batch_size: int = 64,
        proxy_options: Optional[Mapping[str, Mapping[str, Any]]] = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        width_mult: Optional[float] = None,
    ) -> str:
        """Store a request in the outbox, send it if connected, and return its request id.

        Raises ProtocolError if the request would be invalid or larger than the message limit.
        """
        body = protocol.request_body(
            space, num_classes, input_size, archs, proxies, data,
            seed=seed, batch_size=batch_size, proxy_options=proxy_options, width_mult=width_mult,
        )
        request_id = protocol.make_request_id(self.device_id, body)
        deadline = time.time() + max(0.0, timeout_s)
        # Encoding once here rejects an invalid or oversized request before it reaches the outbox.
        protocol.encode_message(protocol.gradient_request(self.device_id, request_id, body, deadline=deadline))
        self._submitted_at[request_id] = time.monotonic()
        self._errors.pop(request_id, None)
        if self.outbox.result(request_id) is not None:
            logger.info("request %s already has a result in the outbox; using it", request_id)
            self._result_arrivals.pop(request_id, None)
            return request_id
        self.outbox.add(request_id, body, deadline)
        if self._connected:
            self._send(request_id, body, deadline)
        return request_id

    def wait(self, request_ids: Sequence[str], timeout_s: float) -> Dict[str, CloudOutcome]:
        """Wait until every request id has a result or `timeout_s` passes; return one outcome per id.

        Connects first if needed. Requests without a result are re-sent every re-send interval
        and right after each reconnect.
        """
        started = time.monotonic()
        limit = started + max(0.0, timeout_s)
        outcomes: Dict[str, CloudOutcome] = {}
        waiting = list(request_ids)

        def settle() -> None:
            for request_id in list(waiting):
                outcome = self._outcome(request_id)
                if outcome is not None:
                    outcomes[request_id] = outcome
                    waiting.remove(request_id)

        settle()
        if waiting and not self._connected:
            if not self.connect(min(self.connect_timeout_s, max(0.0, limit - time.monotonic()))):
                reason = f"no broker reachable: {self._connect_error}"
                logger.warning("%s; computing locally", reason)
                for request_id in waiting:
                    outcomes[request_id] = CloudFallback(reason, request_id, time.monotonic() - started)
                return outcomes
        while waiting:
            remaining = limit - time.monotonic()
            if remaining <= 0:
                break
            self.pump(min(remaining, 0.1))
            self._resend_due()
            settle()
        for request_id in waiting:
            reason = f"timed out: no result from a coordinator within {timeout_s:.1f} s"
            logger.warning("request %s: %s; computing locally", request_id, reason)
            outcomes[request_id] = CloudFallback(reason, request_id, time.monotonic() - started)
        return outcomes

    def _outcome(self, request_id: str) -> Optional[CloudOutcome]:
        if request_id in self._errors:
            return CloudFallback(self._errors[request_id], request_id)
        payload = self.outbox.result(request_id)
        if payload is None:
            return None
        submitted = self._submitted_at.get(request_id)
        arrival = self._result_arrivals.get(request_id)
        if arrival is None or submitted is None:
            # The result was stored before this submit, so it comes from the outbox with no round trip.
            return _result_from_payload(payload, round_trip_s=0.0, sends=0, from_outbox=True)
        arrived, sends = arrival
        return _result_from_payload(payload, round_trip_s=arrived - submitted, sends=sends, from_outbox=False)

    # Aggregators

    def fetch_aggregator(self, space: str, timeout_s: float = 2.0) -> Optional[Path]:
        """Wait up to `timeout_s` for the retained aggregator of `space`; return the last good file or None."""
        stored = self.aggregators.metadata(space)
        if self._connected or self.connect(timeout_s):
            limit = time.monotonic() + timeout_s
            while time.monotonic() < limit and self.aggregators.metadata(space) == stored:
                self.pump(0.1)
        return self.aggregators.latest(space)

    # Event handling on the caller's thread

    def pump(self, timeout_s: float) -> bool:
        """Handle the events that paho queued, waiting up to `timeout_s` for the first; return whether any came."""
        try:
            event = self._events.get(timeout=max(0.0, timeout_s))
        except queue.Empty:
            return False
        self._handle(event)
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return True
            self._handle(event)

    def _handle(self, event: Tuple[str, Any]) -> None:
        kind, details = event
        if kind == "connected":
            self._on_connected(*details)
        elif kind == "connect_failed":
            if not self._connected:
                self._connect_error = f"cannot connect to the broker at {self.settings.address.url}"
        elif kind == "disconnected":
            if self._connected:
                logger.warning("lost the connection to the broker (%s); paho reconnects", details)
            self._connected = False
        elif kind == "message":
            self._on_received(*details)
        elif kind == "published":
            mid, reason = details
            if reason.is_failure:
                self.rejected_publishes += 1
                logger.warning("the broker rejected publish %d: %s", mid, reason)

    def _on_connected(self, reason: Any, session_present: bool) -> None:
        if reason.is_failure:
            self._connect_error = f"the broker at {self.settings.address.url} rejected the connection: {reason}"
            logger.warning("%s", self._connect_error)
            return
        assert self._client is not None
        self._connected = True
        self._connect_error = None
        logger.info("connected to %s as %s (session present: %s)", self.settings.address.url, self.device_id, session_present)
        # A persistent session keeps the subscriptions, but the session may have expired.
        self._client.subscribe(
            [(protocol.result_topic(self.device_id), 1), (f"{protocol.TOPIC_ROOT}/spaces/+/aggregator", 1)]
        )
        self._client.publish(
            protocol.status_topic(self.device_id),
            protocol.encode_message(protocol.status_message(self.device_id, "online")),
            qos=1, retain=True,
        )
        dropped = self.outbox.drop_expired(time.time())
        if dropped:
            logger.info("dropped %d requests whose deadline passed", dropped)
        for request_id, body, deadline in self.outbox.pending(time.time()):
            self._send(request_id, body, deadline)

    def _send(self, request_id: str, body: Mapping[str, Any], deadline: float) -> None:
        assert self._client is not None
        message = protocol.gradient_request(self.device_id, request_id, body, deadline=deadline)
        properties = Properties(PacketTypes.PUBLISH)
        # The broker discards the request once the device no longer waits for it.
        properties.MessageExpiryInterval = max(1, int(deadline - time.time()))
        self._client.publish(
            protocol.request_topic(self.device_id), protocol.encode_message(message), qos=1, properties=properties
        )
        self._last_sent[request_id] = time.monotonic()
        sends = self.outbox.count_send(request_id)
        if sends > 1:
            logger.info("re-sent request %s (send %d)", request_id, sends)
        else:
            logger.debug("sent request %s", request_id)

    def _resend_due(self) -> None:
        if not self._connected:
            return
        now = time.monotonic()
        for request_id, body, deadline in self.outbox.pending(time.time()):
            if now - self._last_sent.get(request_id, -1e9) >= self.resend_interval_s:
                self._send(request_id, body, deadline)

    def _on_received(self, topic: str, payload: bytes) -> None:
        try:
            message = protocol.decode_message(payload)
        except ProtocolError as error:
            logger.warning("dropped an invalid message on %s: %s", topic, error)
            return
        if message["type"] == protocol.GRADIENT_RESULT and topic == protocol.result_topic(self.device_id):
            self._on_result(message)
        elif message["type"] == protocol.AGGREGATOR:
            parts = topic.split("/")
            topic_space = parts[2] if len(parts) == 4 else ""
            try:
                self.aggregators.accept(message, topic_space)
            except ProtocolError as error:
                logger.warning("rejected the aggregator on %s: %s", topic, error)
        else:
            logger.warning("dropped a %s message on %s: not expected on that topic", message["type"], topic)

    def _on_result(self, message: Dict[str, Any]) -> None:
        request_id = message["request_id"]
        if message["device_id"] != self.device_id:
            logger.warning("dropped the result of request %s: addressed to device %s", request_id, message["device_id"])
            return
        if not self.outbox.is_pending(request_id):
            logger.debug("ignoring a later result for request %s from %s", request_id, message["sender"])
            return
        if message["status"] == "error":
            self.outbox.drop(request_id)
            self._errors[request_id] = f"coordinator {message['sender']} rejected the request: {message['error']}"
            logger.warning("request %s: %s", request_id, self._errors[request_id])
            return
        self._result_arrivals[request_id] = (time.monotonic(), self.outbox.sends(request_id))
        if self.outbox.store_result(request_id, message):
            logger.info("received the result of request %s from %s", request_id, message["sender"])

    # paho callbacks: they run on paho's network thread and only enqueue.

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._events.put(("connected", (reason, bool(flags.session_present))))

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        self._events.put(("connect_failed", None))

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._events.put(("disconnected", str(reason)))

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        self._events.put(("message", (message.topic, bytes(message.payload))))

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        self._events.put(("published", (mid, reason)))


def _result_from_payload(payload: Mapping[str, Any], *, round_trip_s: float, sends: int, from_outbox: bool) -> CloudResult:
    results = {arch: {name: dict(entry) for name, entry in row.items()} for arch, row in payload["results"].items()}
    values = {
        arch: {name: (float(entry["value"]) if entry.get("valid") else None) for name, entry in row.items()}
        for arch, row in results.items()
    }
    return CloudResult(
        request_id=payload["request_id"],
        values=values,
        results=results,
        coordinator=payload["sender"],
        probe=dict(payload.get("probe", {})),
        round_trip_s=max(0.0, round_trip_s),
        sends=sends,
        compute_s=float(payload.get("seconds", 0.0)),
        from_outbox=from_outbox,
    )


# The seam of edge_runtime.personalize ------------------------------------------------

# Bytes of a request left for everything but the descriptor's arrays: the envelope, the
# summary's lists of numbers and the proxy names. The architecture strings are added per request.
REQUEST_OVERHEAD_BYTES = 64 * 1024
# Values (images x 3 x H x W) that a summary reads from the dataset at most: 512 images at
# 64x64, about 50 MB in float64 for the principal component analysis on the device. When
# fewer images than the probe batch fit (41 at 224x224), the summary describes the probe batch.
MAX_SUMMARY_VALUES = 512 * 3 * 64 * 64
DEFAULT_AGGREGATOR_WAIT_S = 2.0


def _base64_bytes(raw_bytes: int) -> int:
    return 4 * ((raw_bytes + 2) // 3)


def fitting_summary_components(input_size: int, archs: Sequence[str]) -> int:
    """Return how many principal components a summary at `input_size` may carry within the message limit (0 if none)."""
    pixels = 3 * input_size * input_size
    room = protocol.MAX_MESSAGE_BYTES - REQUEST_OVERHEAD_BYTES - sum(len(arch) + 4 for arch in archs)
    room -= _base64_bytes(4 * pixels)  # the float32 mean image
    if room <= 0:
        return 0
    # The components travel as one float16 array.
    return max(0, min(protocol.DEFAULT_SUMMARY_COMPONENTS, room * 3 // 4 // (2 * pixels)))


def fitting_raw_images(input_size: int, archs: Sequence[str]) -> int:
    """Return how many float32 images at `input_size` a raw descriptor may carry within the message limit."""
    per_image = _base64_bytes(4 * 3 * input_size * input_size) + 8  # the image and its int64 label
    room = protocol.MAX_MESSAGE_BYTES - REQUEST_OVERHEAD_BYTES - sum(len(arch) + 4 for arch in archs)
    return max(0, room // per_image)


def describe_data(
    share: str,
    inputs: Any,
    labels: Any,
    num_classes: int,
    *,
    data_hash: str = "",
    seed: int = 0,
    raw_images: int = protocol.DEFAULT_RAW_IMAGES,
    components: int = protocol.DEFAULT_SUMMARY_COMPONENTS,
) -> Dict[str, Any]:
    """Build the descriptor of `share` for probe inputs (array or tensor N x 3 x H x W, normalised) and labels."""
    if share == protocol.SHARE_NONE:
        return protocol.describe_none(num_classes)
    images = _as_numpy(inputs).astype(np.float32)
    label_array = _as_numpy(labels).astype(np.int64)
    if share == protocol.SHARE_SUMMARY:
        return protocol.describe_summary(
            images, label_array, num_classes, components=components, seed=seed, data_hash=data_hash
        )
    if share == protocol.SHARE_RAW:
        return protocol.describe_raw(images, label_array, num_classes, max_images=raw_images, data_hash=data_hash)
    raise EdgeNasError(f"unknown --share policy {share!r}; expected one of {', '.join(protocol.SHARE_POLICIES)}")


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


class CloudGradientSource:
    """A gradient source for `edge_runtime.personalize.personalize(gradient_source=...)`.

    Called with a `GradientRequest`, it sends the finalists to the coordinators and returns
    `{architecture: {proxy: ProxyResult}}`. On a CloudFallback it calls `fallback` (by default
    `LocalGradientSource()`) with the same request. `name` is "cloud" after a cloud result and
    "local" after a fallback: personalize writes it to subnet.json as `gradient_source`.
    `outcome` keeps the CloudResult or CloudFallback of the last call.

    The personal `ImageDataset`, given here as `dataset` or carried by the request, lets a
    summary describe up to `summary_images` of its images instead of the probe batch alone.
    A descriptor is cut to fit the message limit: a summary keeps fewer principal
    components, a raw share fewer images. When not even that fits, the source falls back.

    `fetch_aggregator(space)` returns the last good aggregator received from the cloud, which
    personalize uses when the caller gives none.
    """

    name = "cloud"

    def __init__(
        self,
        broker: Union[str, BrokerSettings],
        *,
        device_id: Optional[str] = None,
        state_dir: Optional[PathLike] = None,
        share: str = protocol.SHARE_SUMMARY,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        resend_interval_s: float = DEFAULT_RESEND_INTERVAL_S,
        raw_images: int = protocol.DEFAULT_RAW_IMAGES,
        summary_images: int = protocol.DEFAULT_SUMMARY_IMAGES,
        aggregator_wait_s: float = DEFAULT_AGGREGATOR_WAIT_S,
        dataset: Any = None,
        fallback: Optional[Callable[[Any], Mapping[str, Mapping[str, Any]]]] = None,
    ) -> None:
        if share not in protocol.SHARE_POLICIES:
            raise EdgeNasError(f"unknown --share policy {share!r}; expected one of {', '.join(protocol.SHARE_POLICIES)}")
        self.settings = broker if isinstance(broker, BrokerSettings) else BrokerSettings(broker)
        # A bad URL, device id or credential file fails here, before the search starts.
        self.settings.login()
        self.device_id = protocol.check_id(device_id, "device id") if device_id is not None else None
        self.state_dir = state_dir
        self.share = share
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.resend_interval_s = resend_interval_s
        self.raw_images = raw_images
        self.summary_images = summary_images
        self.aggregator_wait_s = aggregator_wait_s
        self.dataset = dataset
        self.fallback = fallback
        self.outcome: Optional[CloudOutcome] = None

    def _client(self) -> CloudClient:
        return CloudClient(
            self.settings, device_id=self.device_id, state_dir=self.state_dir,
            connect_timeout_s=self.connect_timeout_s, resend_interval_s=self.resend_interval_s,
        )

    def __call__(self, request: Any) -> Dict[str, Dict[str, Any]]:
        from models.proxies import ProxyResult

        space = request.space
        protocol_record = request.protocol
        started = time.monotonic()
        descriptor = self._descriptor(request)
        if descriptor is None:
            self.outcome = CloudFallback(
                f"a {self.share} share of {space.input_size}x{space.input_size} inputs does not fit the "
                f"{protocol.MAX_MESSAGE_BYTES // (1024 * 1024)} MiB message limit; use --share none or a smaller --input-size"
            )
            logger.warning("%s; computing locally", self.outcome.reason)
        else:
            with self._client() as client:
                try:
                    self.outcome = client.request_gradients(
                        space.name, list(request.archs), list(request.proxies), descriptor,
                        num_classes=space.num_classes, input_size=space.input_size,
                        seed=protocol_record.seed, batch_size=protocol_record.batch_size,
                        proxy_options=protocol_record.proxy_options, timeout_s=self.timeout_s,
                        width_mult=getattr(space, "width_mult", None),
                    )
                except ProtocolError as error:
                    self.outcome = CloudFallback(f"the request cannot be sent: {error}")
                    logger.warning("%s; computing locally", self.outcome.reason)
        # The client has logged the reason of its own fallbacks (no broker, deadline, error result).
        if isinstance(self.outcome, CloudFallback):
            if not self.outcome.elapsed_s:  # the client's own figure counts from the connection attempt
                self.outcome.elapsed_s = time.monotonic() - started
            self.name = "local"
            fallback = self.fallback
            if fallback is None:
                from edge_runtime.personalize import LocalGradientSource

                fallback = LocalGradientSource()
            return {arch: dict(row) for arch, row in fallback(request).items()}

        self.name = "cloud"
        converted: Dict[str, Dict[str, Any]] = {}
        for arch, row in self.outcome.results.items():
            converted[arch] = {}
            for proxy, entry in row.items():
                details = {"seconds": float(entry.get("seconds", 0.0)), "source": "cloud",
                           "coordinator": self.outcome.coordinator}
                if entry["valid"]:
                    converted[arch][proxy] = ProxyResult(float(entry["value"]), True, "", details)
                else:
                    converted[arch][proxy] = ProxyResult(None, False, str(entry.get("reason", "")), details)
        return converted

    def fetch_aggregator(self, space: str) -> Optional[Tuple[Path, Dict[str, Any]]]:
        """Return (file, metadata) of the last good aggregator of `space` received from the cloud, or None.

        With a reachable broker, this waits up to `aggregator_wait_s` for the retained
        aggregator and stores a newer one. Without a broker, it returns the one stored in the
        state folder by an earlier run.
        """
        with self._client() as client:
            path = client.fetch_aggregator(space, timeout_s=self.aggregator_wait_s)
            metadata = client.aggregators.metadata(space) if path is not None else None
        if path is None:
            return None
        return path, dict(metadata or {})

    def describe(self) -> Dict[str, Any]:
        """Describe the last call for subnet.json: broker, share policy, and the result or the fallback reason."""
        described: Dict[str, Any] = {"broker": self.settings.address.url, "share": self.share, "timeout_s": self.timeout_s}
        outcome = self.outcome
        if isinstance(outcome, CloudResult):
            described.update(
                request_id=outcome.request_id,
                coordinator=outcome.coordinator,
                probe=dict(outcome.probe),
                round_trip_s=outcome.round_trip_s,
                sends=outcome.sends,
                from_outbox=outcome.from_outbox,
            )
        elif isinstance(outcome, CloudFallback):
            described.update(request_id=outcome.request_id, fallback_reason=outcome.reason, elapsed_s=outcome.elapsed_s)
        return described

    def _descriptor(self, request: Any) -> Optional[Dict[str, Any]]:
        """Build the data descriptor of the request, cut to fit the message limit; None when it cannot fit."""
        space = request.space
        size = space.input_size
        data_hash = getattr(request.protocol, "data_hash", "")
        components = protocol.DEFAULT_SUMMARY_COMPONENTS
        raw_images = self.raw_images
        if self.share == protocol.SHARE_SUMMARY:
            components = fitting_summary_components(size, request.archs)
            if components < 1:
                return None
            if components < protocol.DEFAULT_SUMMARY_COMPONENTS:
                logger.info("the summary keeps %d principal components to fit the message limit at %dx%d inputs",
                            components, size, size)
        elif self.share == protocol.SHARE_RAW:
            raw_images = min(self.raw_images, fitting_raw_images(size, request.archs))
            if raw_images < 2:  # the gradient proxies compare samples
                return None
            if raw_images < min(self.raw_images, len(request.labels)):
                logger.warning("the raw share carries %d images, not %d, to fit the message limit at %dx%d inputs",
                               raw_images, min(self.raw_images, len(request.labels)), size, size)

        dataset = self.dataset if self.dataset is not None else getattr(request, "dataset", None)
        inputs, labels = request.inputs, request.labels
        if self.share == protocol.SHARE_SUMMARY and dataset is not None:
            count = min(len(dataset), self.summary_images, max(2, MAX_SUMMARY_VALUES // (3 * size * size)))
            if count > len(request.labels):
                chosen = np.sort(np.random.default_rng(request.protocol.seed).choice(len(dataset), count, replace=False))
                inputs = dataset.to_tensor(chosen, size=size)
                labels = dataset.labels[chosen]
        return describe_data(
            self.share, inputs, labels, space.num_classes,
            data_hash=data_hash, seed=request.protocol.seed, raw_images=raw_images, components=components,
        )
