"""The MQTT protocol between devices and cloud coordinators: topics, messages, data descriptors.

Every message is one JSON object with an envelope (`schema`, `type`, `message_id`, `sender`,
`timestamp`) and type-specific fields. `decode_message` checks the size, the JSON syntax, the
schema version and every field's type before anything else reads the message, and raises
ProtocolError with the reason. This module depends on the standard library and numpy only,
so that it runs on a device without torch and under Python 3.8.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import urlsplit

import numpy as np

from models.errors import EdgeNasError

SCHEMA_VERSION = 1
TOPIC_ROOT = "edge-nas"

# The largest message any side decodes. A raw share of 64 float32 images of 3 x 32 x 32 takes
# about 1.1 MB as base64, so 4 MiB leaves room for larger inputs without letting one message
# exhaust a coordinator's memory.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

MAX_ARCHS = 256
MAX_ARCH_CHARS = 2048
MAX_PROXIES = 32
MAX_BATCH_SIZE = 1024
MAX_SEED = 2**32 - 1  # numpy and torch seeds must fit in 32 unsigned bits here
MAX_INPUT_SIZE = 512
# The largest width multiplier a request may name; MobileNetV2's published models use at most 1.4.
MAX_WIDTH_MULT = 4.0
MAX_CLASSES = 100000
MAX_REASON_CHARS = 2000

# Share policies of the data descriptor: what the device sends about its personal data.
SHARE_NONE = "none"
SHARE_SUMMARY = "summary"
SHARE_RAW = "raw"
SHARE_POLICIES = (SHARE_NONE, SHARE_SUMMARY, SHARE_RAW)

DEFAULT_SUMMARY_COMPONENTS = 16
DEFAULT_SUMMARY_IMAGES = 512
DEFAULT_RAW_IMAGES = 64

# Message types.
GRADIENT_REQUEST = "gradient_request"
GRADIENT_RESULT = "gradient_result"
AGGREGATOR = "aggregator"
COORDINATOR_PRESENCE = "coordinator_presence"
DEVICE_STATUS = "device_status"
DEVICE_COMMAND = "device_command"
DEVICE_REPLY = "device_reply"
JOB_STATUS = "job_status"
DEVICE_HEARTBEAT = "device_heartbeat"
MESSAGE_TYPES = (
    GRADIENT_REQUEST, GRADIENT_RESULT, AGGREGATOR, COORDINATOR_PRESENCE, DEVICE_STATUS,
    DEVICE_COMMAND, DEVICE_REPLY, JOB_STATUS, DEVICE_HEARTBEAT,
)

# States of a device in its device_status message.
DEVICE_STATES = ("online", "stopping", "offline")

# Commands that the device daemon accepts, and the states of a reply to one.
COMMAND_PERSONALIZE = "personalize"
COMMAND_STATUS = "status"
COMMAND_CANCEL = "cancel"
COMMANDS = (COMMAND_PERSONALIZE, COMMAND_STATUS, COMMAND_CANCEL)
REPLY_STATUSES = ("accepted", "ok", "error")

# The stages of a personalisation job, in order; the last three are final.
JOB_STAGES = ("queued", "scoring", "measuring", "exporting", "done", "failed", "cancelled")
FINAL_JOB_STAGES = ("done", "failed", "cancelled")
# States of a job: its final stage, or for an unfinished stage whether the daemon is working on it now.
JOB_STATES = ("queued", "running", "interrupted", "done", "failed", "cancelled")

# The arguments of a personalize command and of its constraints; any other key is rejected.
PERSONALIZE_ARGUMENTS = (
    "data", "space", "input_size", "width_mult", "budget", "finalists", "search", "seed", "batch_size", "constraints",
)
CONSTRAINT_ARGUMENTS = ("max_params", "max_flops", "max_latency_ms", "max_power_w", "max_energy_mj")
MAX_BUDGET = 100000
MAX_DATA_PATH_CHARS = 4096
# The maximum number of jobs in one status reply.
MAX_LISTED_JOBS = 50

# Device ids and coordinator ids become topic levels and MQTT client ids.
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_REQUEST_ID_PATTERN = re.compile(r"^[0-9a-f]{16,64}$")
_SPACE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

_ARRAY_DTYPES = ("uint8", "int64", "float16", "float32")


class ProtocolError(EdgeNasError, ValueError):
    """A message or descriptor that breaks the protocol; the error message names the field and the reason."""


# Topic tree --------------------------------------------------------------------------


def _device_topic(device_id: str, leaf: str) -> str:
    return f"{TOPIC_ROOT}/devices/{check_id(device_id, 'device id')}/{leaf}"


def request_topic(device_id: str) -> str:
    """Device to cloud: gradient requests of one device."""
    return _device_topic(device_id, "requests")


def result_topic(device_id: str) -> str:
    """Cloud to device: gradient results for one device."""
    return _device_topic(device_id, "results")


def status_topic(device_id: str) -> str:
    """Device to anyone: the device's online/offline status (retained, with a last will)."""
    return _device_topic(device_id, "status")


def command_topic(device_id: str) -> str:
    """Controller to device: commands for the device daemon (personalize, status, cancel)."""
    return _device_topic(device_id, "commands")


def reply_topic(device_id: str) -> str:
    """Device to controllers: the device daemon's replies to commands, matched by command id."""
    return _device_topic(device_id, "replies")


def job_topic(device_id: str, job_id: str) -> str:
    """Device to controllers: the progress and result of one job (retained)."""
    return _device_topic(device_id, f"jobs/{check_id(job_id, 'job id')}")


def heartbeat_topic(device_id: str) -> str:
    """Device to anyone: the daemon's periodic heartbeat with telemetry."""
    return _device_topic(device_id, "heartbeat")


def aggregator_topic(space: str) -> str:
    """Cloud to devices: the calibrated aggregator of one search space (retained)."""
    return f"{TOPIC_ROOT}/spaces/{_check_space_name(space)}/aggregator"


def presence_topic(coordinator_id: str) -> str:
    """Coordinator to anyone: whether that coordinator is serving (retained, with a last will)."""
    return f"{TOPIC_ROOT}/coordinators/{check_id(coordinator_id, 'coordinator id')}/presence"


def shared_request_filter(group: str) -> str:
    """Return the MQTT 5 shared subscription through which the coordinators of `group` split all requests."""
    return f"$share/{check_id(group, 'group')}/{TOPIC_ROOT}/devices/+/requests"


def device_id_from_topic(topic: str, leaf: str) -> Optional[str]:
    """Return the device id in `edge-nas/devices/<id>/<leaf>`, or None when the topic has another form."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != TOPIC_ROOT or parts[1] != "devices" or parts[3] != leaf:
        return None
    return parts[2] if _ID_PATTERN.match(parts[2]) else None


def check_id(value: Any, what: str) -> str:
    """Return `value` if it can be a device, coordinator or group id, else raise ProtocolError."""
    if not isinstance(value, str) or not _ID_PATTERN.match(value):
        raise ProtocolError(
            f"invalid {what} {value!r}: use 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return value


def _check_space_name(value: Any) -> str:
    if not isinstance(value, str) or not _SPACE_PATTERN.match(value):
        raise ProtocolError(f"invalid search space name {value!r}")
    return value


# Broker address ----------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerAddress:
    """The broker's host, port, TLS flag and user name, parsed from an mqtt:// or mqtts:// URL."""

    host: str
    port: int
    tls: bool
    username: Optional[str] = None

    @property
    def url(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """Parse `mqtt://HOST[:PORT]` (default port 1883) or `mqtts://HOST[:PORT]` (TLS, default 8883).

    A user name may come before the host (`mqtt://device-7@HOST`). A password in the URL is
    rejected, because URLs end up in logs and shell history: use a password file instead.
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as error:
        raise EdgeNasError(f"invalid broker URL {url!r}: {error}; write mqtt://HOST:PORT or mqtts://HOST:PORT") from None
    if parts.scheme not in ("mqtt", "mqtts"):
        raise EdgeNasError(f"invalid broker URL {url!r}: the scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise EdgeNasError(f"invalid broker URL {url!r}: the host is missing; write mqtt://HOST:PORT")
    if parts.password is not None:
        raise EdgeNasError(
            f"the broker URL must not contain a password; give it in a file with --password-file instead"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise EdgeNasError(f"invalid broker URL {url!r}: a path, query or fragment is not allowed")
    tls = parts.scheme == "mqtts"
    if port is None:
        port = 8883 if tls else 1883
    return BrokerAddress(host=parts.hostname, port=port, tls=tls, username=parts.username or None)


# Envelope and encoding ---------------------------------------------------------------


def new_message_id() -> str:
    return uuid.uuid4().hex


def envelope(message_type: str, sender: str, **fields: Any) -> Dict[str, Any]:
    """Build a message of `message_type` with a fresh message id and the current UNIX time."""
    if message_type not in MESSAGE_TYPES:
        raise ValueError(f"unknown message type {message_type!r}")
    message: Dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "type": message_type,
        "message_id": new_message_id(),
        "sender": sender,
        "timestamp": time.time(),
    }
    message.update(fields)
    return message


def encode_message(message: Mapping[str, Any], *, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    """Validate `message` as a receiver would and return its UTF-8 JSON; raise ProtocolError if invalid."""
    validate_message(message)
    try:
        payload = json.dumps(message, allow_nan=False, separators=(",", ":"), sort_keys=True).encode("utf-8")
    except (TypeError, ValueError) as error:
        raise ProtocolError(f"the message cannot be written as JSON: {error}") from None
    if len(payload) > max_bytes:
        raise ProtocolError(
            f"the {message.get('type')} message takes {len(payload)} bytes, more than the limit of {max_bytes}; "
            "send fewer images or architectures"
        )
    return payload


def decode_message(payload: bytes, *, expected_type: Optional[str] = None, max_bytes: int = MAX_MESSAGE_BYTES) -> Dict[str, Any]:
    """Parse and validate one received payload; raise ProtocolError with the reason if it is invalid."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"the payload must be bytes, got {type(payload).__name__}")
    size = len(payload)
    if size > max_bytes:
        raise ProtocolError(f"the payload of {size} bytes is larger than the limit of {max_bytes}")
    if size == 0:
        raise ProtocolError("the payload is empty")
    try:
        message = json.loads(bytes(payload).decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as error:
        raise ProtocolError(f"the payload is not UTF-8: {error}") from None
    except ValueError as error:
        raise ProtocolError(f"the payload is not valid JSON: {error}") from None
    except RecursionError:
        raise ProtocolError("the payload's JSON is nested too deeply") from None
    validate_message(message)
    if expected_type is not None and message["type"] != expected_type:
        raise ProtocolError(f"expected a {expected_type} message, got {message['type']}")
    return message


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def validate_message(message: Any) -> None:
    """Raise ProtocolError unless `message` is a complete message of a known type and schema version."""
    if not isinstance(message, Mapping):
        raise ProtocolError(f"a message must be a JSON object, got {type(message).__name__}")
    schema = message.get("schema")
    if "schema" not in message:
        raise ProtocolError("missing field 'schema'")
    if not _is_int(schema):
        raise ProtocolError(f"field 'schema' must be an integer, got {schema!r}")
    if schema != SCHEMA_VERSION:
        raise ProtocolError(f"unsupported schema version {schema}; this build reads version {SCHEMA_VERSION}")
    message_type = _field(message, "type", str)
    if message_type not in _VALIDATORS:
        raise ProtocolError(f"unknown message type {message_type!r}; known types: {', '.join(MESSAGE_TYPES)}")
    message_id = _field(message, "message_id", str)
    if not message_id or len(message_id) > 64:
        raise ProtocolError("field 'message_id' must hold 1 to 64 characters")
    check_id(_field(message, "sender", str), "sender")
    timestamp = _field(message, "timestamp", (int, float))
    if not math.isfinite(timestamp) or timestamp < 0:
        raise ProtocolError(f"field 'timestamp' must be a non-negative UNIX time, got {timestamp!r}")
    _VALIDATORS[message_type](message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field(message: Mapping[str, Any], name: str, types: Any, *, optional: bool = False) -> Any:
    if name not in message or (optional and message[name] is None):
        if optional:
            return None
        raise ProtocolError(f"missing field {name!r}")
    value = message[name]
    expected = types if isinstance(types, tuple) else (types,)
    wrong_bool = isinstance(value, bool) and bool not in expected
    if wrong_bool or not isinstance(value, expected):
        names = " or ".join(t.__name__ for t in expected)
        raise ProtocolError(f"field {name!r} must be {names}, got {type(value).__name__}")
    return value


def _int_field(message: Mapping[str, Any], name: str, low: int, high: int) -> int:
    value = _field(message, name, int)
    if not low <= value <= high:
        raise ProtocolError(f"field {name!r} must be between {low} and {high}, got {value}")
    return value


def _string_list(message: Mapping[str, Any], name: str, max_items: int, max_chars: int) -> List[str]:
    values = _field(message, name, list)
    if not 1 <= len(values) <= max_items:
        raise ProtocolError(f"field {name!r} must hold 1 to {max_items} entries, got {len(values)}")
    for value in values:
        if not isinstance(value, str) or not 1 <= len(value) <= max_chars:
            raise ProtocolError(f"every entry of {name!r} must be a string of 1 to {max_chars} characters")
    if len(set(values)) != len(values):
        raise ProtocolError(f"field {name!r} contains the same entry twice")
    return values


def _validate_request(message: Mapping[str, Any]) -> None:
    check_id(_field(message, "device_id", str), "device id")
    request_id = _field(message, "request_id", str)
    if not _REQUEST_ID_PATTERN.match(request_id):
        raise ProtocolError("field 'request_id' must be 16 to 64 lowercase hex digits")
    space = _field(message, "space", dict)
    _check_space_name(_field(space, "name", str))
    num_classes = _int_field(space, "num_classes", 1, MAX_CLASSES)
    input_size = _int_field(space, "input_size", 1, MAX_INPUT_SIZE)
    width_mult = _field(space, "width_mult", (int, float), optional=True)
    if width_mult is not None and not (math.isfinite(width_mult) and 0 < width_mult <= MAX_WIDTH_MULT):
        raise ProtocolError(f"field 'width_mult' must be above 0 and at most {MAX_WIDTH_MULT:g}, got {width_mult!r}")
    _string_list(message, "archs", MAX_ARCHS, MAX_ARCH_CHARS)
    _string_list(message, "proxies", MAX_PROXIES, 64)
    _int_field(message, "seed", 0, MAX_SEED)
    _int_field(message, "batch_size", 1, MAX_BATCH_SIZE)
    options = _field(message, "proxy_options", dict, optional=True)
    if options is not None and not all(isinstance(value, dict) for value in options.values()):
        raise ProtocolError("field 'proxy_options' must map proxy names to objects of options")
    deadline = _field(message, "deadline", (int, float), optional=True)
    if deadline is not None and not math.isfinite(deadline):
        raise ProtocolError("field 'deadline' must be a finite UNIX time or null")
    validate_descriptor(_field(message, "data", dict), num_classes=num_classes, input_size=input_size)


def _validate_result(message: Mapping[str, Any]) -> None:
    check_id(_field(message, "device_id", str), "device id")
    request_id = _field(message, "request_id", str)
    if not _REQUEST_ID_PATTERN.match(request_id):
        raise ProtocolError("field 'request_id' must be 16 to 64 lowercase hex digits")
    status = _field(message, "status", str)
    if status not in ("ok", "error"):
        raise ProtocolError(f"field 'status' must be 'ok' or 'error', got {status!r}")
    if status == "error":
        _field(message, "error", str)
        return
    results = _field(message, "results", dict)
    for arch, row in results.items():
        if not isinstance(row, dict):
            raise ProtocolError(f"results for {arch!r} must be an object of proxy results")
        for proxy, entry in row.items():
            _validate_proxy_entry(arch, proxy, entry)
    _field(message, "probe", dict)
    seconds = _field(message, "seconds", (int, float), optional=True)
    if seconds is not None and not (math.isfinite(seconds) and seconds >= 0):
        raise ProtocolError(f"field 'seconds' must be a non-negative number, got {seconds!r}")


def _validate_proxy_entry(arch: str, proxy: str, entry: Any) -> None:
    where = f"result {proxy!r} of {arch!r}"
    if not isinstance(entry, dict):
        raise ProtocolError(f"{where} must be an object")
    valid = entry.get("valid")
    if not isinstance(valid, bool):
        raise ProtocolError(f"{where} needs a boolean 'valid'")
    value = entry.get("value")
    if valid:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ProtocolError(f"{where} is valid but its 'value' is not a finite number")
    elif value is not None:
        raise ProtocolError(f"{where} is invalid, so its 'value' must be null")
    reason = entry.get("reason", "")
    if not isinstance(reason, str):
        raise ProtocolError(f"{where} has a 'reason' that is not a string")


def _validate_aggregator(message: Mapping[str, Any]) -> None:
    _check_space_name(_field(message, "space", str))
    version = _field(message, "version", int)
    if version < 1:
        raise ProtocolError(f"field 'version' must be a positive integer, got {version}")
    _field(message, "checksum", str)
    _field(message, "content", str)
    _field(message, "calibration", dict)


def _validate_presence(message: Mapping[str, Any]) -> None:
    check_id(_field(message, "coordinator_id", str), "coordinator id")
    state = _field(message, "state", str)
    if state not in ("online", "offline"):
        raise ProtocolError(f"field 'state' must be 'online' or 'offline', got {state!r}")


def _validate_status(message: Mapping[str, Any]) -> None:
    check_id(_field(message, "device_id", str), "device id")
    state = _field(message, "state", str)
    if state not in DEVICE_STATES:
        raise ProtocolError(f"field 'state' must be one of {', '.join(DEVICE_STATES)}, got {state!r}")
    job = _field(message, "job", dict, optional=True)
    if job is not None:
        _validate_job(job)


def _validate_command(message: Mapping[str, Any]) -> None:
    check_id(_field(message, "device_id", str), "device id")
    check_id(_field(message, "command_id", str), "command id")
    command = _field(message, "command", str)
    if command not in COMMANDS:
        raise ProtocolError(f"unknown command {command[:64]!r}; known commands: {', '.join(COMMANDS)}")
    arguments = _field(message, "arguments", dict, optional=True) or {}
    if command == COMMAND_PERSONALIZE:
        validate_personalize_arguments(arguments)
    else:
        _check_keys(arguments, ("job_id",), f"{command} argument")
        job_id = _field(arguments, "job_id", str, optional=True)
        if job_id is not None:
            check_id(job_id, "job id")


def validate_personalize_arguments(arguments: Mapping[str, Any]) -> None:
    """Raise ProtocolError unless every argument of a personalize command has a known name, its type and range."""
    _check_keys(arguments, PERSONALIZE_ARGUMENTS, "personalize argument")

    data = _field(arguments, "data", str, optional=True)
    if data is not None and not 1 <= len(data) <= MAX_DATA_PATH_CHARS:
        raise ProtocolError(f"argument 'data' must hold 1 to {MAX_DATA_PATH_CHARS} characters")
    space = _field(arguments, "space", str, optional=True)
    if space is not None:
        _check_space_name(space)
    search = _field(arguments, "search", str, optional=True)
    if search is not None and not 1 <= len(search) <= 64:
        raise ProtocolError("argument 'search' must hold 1 to 64 characters")

    for name, low, high in (
        ("input_size", 1, MAX_INPUT_SIZE),
        ("budget", 1, MAX_BUDGET),
        ("finalists", 1, MAX_ARCHS),
        ("seed", 0, MAX_SEED),
        ("batch_size", 2, MAX_BATCH_SIZE),
    ):
        if arguments.get(name) is not None:
            _int_field(arguments, name, low, high)
    width_mult = _field(arguments, "width_mult", (int, float), optional=True)
    if width_mult is not None and not (math.isfinite(width_mult) and 0 < width_mult <= MAX_WIDTH_MULT):
        raise ProtocolError(f"argument 'width_mult' must be above 0 and at most {MAX_WIDTH_MULT:g}, got {width_mult!r}")

    constraints = _field(arguments, "constraints", dict, optional=True) or {}
    _check_keys(constraints, CONSTRAINT_ARGUMENTS, "constraint")
    for name in CONSTRAINT_ARGUMENTS:
        value = constraints.get(name)
        if value is None:
            continue
        kind = int if name in ("max_params", "max_flops") else (int, float)
        _field(constraints, name, kind)
        if not (math.isfinite(value) and value > 0):
            raise ProtocolError(f"constraint {name!r} must be a positive number, got {value!r}")


def _check_keys(values: Mapping[str, Any], known: Sequence[str], kind: str) -> None:
    unknown = sorted(str(key)[:64] for key in values if key not in known)
    if unknown:
        raise ProtocolError(f"unknown {kind} {unknown[0]!r}; known: {', '.join(known) or 'none'}")


def _validate_reply(message: Mapping[str, Any]) -> None:
    check_id(_field(message, "device_id", str), "device id")
    check_id(_field(message, "command_id", str), "command id")
    command = _field(message, "command", str)
    if not 1 <= len(command) <= 64:
        raise ProtocolError("field 'command' must hold 1 to 64 characters")
    status = _field(message, "status", str)
    if status not in REPLY_STATUSES:
        raise ProtocolError(f"field 'status' must be one of {', '.join(REPLY_STATUSES)}, got {status!r}")
    if status == "error":
        _field(message, "error", str)
    job = _field(message, "job", dict, optional=True)
    if job is not None:
        _validate_job(job)
    jobs = _field(message, "jobs", list, optional=True)
    if jobs is not None:
        if len(jobs) > MAX_LISTED_JOBS:
            raise ProtocolError(f"field 'jobs' must hold at most {MAX_LISTED_JOBS} jobs, got {len(jobs)}")
        for entry in jobs:
            if not isinstance(entry, dict):
                raise ProtocolError("every entry of 'jobs' must be a job object")
            _validate_job(entry)
    _field(message, "device", dict, optional=True)


def _validate_job_status(message: Mapping[str, Any]) -> None:
    check_id(_field(message, "device_id", str), "device id")
    _validate_job(_field(message, "job", dict))


def _validate_job(job: Mapping[str, Any]) -> None:
    check_id(_field(job, "job_id", str), "job id")
    stage = _field(job, "stage", str)
    if stage not in JOB_STAGES:
        raise ProtocolError(f"job field 'stage' must be one of {', '.join(JOB_STAGES)}, got {stage!r}")
    state = _field(job, "state", str)
    if state not in JOB_STATES:
        raise ProtocolError(f"job field 'state' must be one of {', '.join(JOB_STATES)}, got {state!r}")
    for name in ("created", "updated"):
        value = _field(job, name, (int, float))
        if not math.isfinite(value) or value < 0:
            raise ProtocolError(f"job field {name!r} must be a non-negative UNIX time, got {value!r}")
    _field(job, "arguments", dict)
    _field(job, "progress", dict, optional=True)
    if state == "done":
        _field(job, "result", dict)
    if state == "failed":
        _field(job, "error", str)


def _validate_heartbeat(message: Mapping[str, Any]) -> None:
    check_id(_field(message, "device_id", str), "device id")
    for name in ("uptime_s", "interval_s"):
        value = _field(message, name, (int, float))
        if not math.isfinite(value) or value < 0:
            raise ProtocolError(f"field {name!r} must be a non-negative number of seconds, got {value!r}")
    telemetry = _field(message, "telemetry", dict)
    for name in ("power", "temperatures", "cpu", "gpu"):
        reading = _field(telemetry, name, dict)
        if not isinstance(reading.get("available"), bool):
            raise ProtocolError(f"telemetry {name!r} needs a boolean 'available'")
        if not reading["available"] and not isinstance(reading.get("reason"), str):
            raise ProtocolError(f"telemetry {name!r} is unavailable, so it needs a 'reason' string")


_VALIDATORS = {
    GRADIENT_REQUEST: _validate_request,
    GRADIENT_RESULT: _validate_result,
    AGGREGATOR: _validate_aggregator,
    COORDINATOR_PRESENCE: _validate_presence,
    DEVICE_STATUS: _validate_status,
    DEVICE_COMMAND: _validate_command,
    DEVICE_REPLY: _validate_reply,
    JOB_STATUS: _validate_job_status,
    DEVICE_HEARTBEAT: _validate_heartbeat,
}


# Messages ----------------------------------------------------------------------------


# The fields of a gradient request that change its result (see request_body).
_REQUEST_CONTENT_FIELDS = ("space", "archs", "proxies", "seed", "batch_size", "proxy_options", "data")


def request_content_digest(message: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the fields of a gradient request that change its result."""
    content = {name: message.get(name) for name in _REQUEST_CONTENT_FIELDS}
    encoded = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False, default=str)
    return hashlib.sha256(encoded.encode("utf-8")).hexdigest()


def make_request_id(device_id: str, body: Mapping[str, Any]) -> str:
    """Derive a request id from the device id and the request's content.

    The same finalists with the same data, proxies and seed get the same id, so a rerun after
    a crash finds the result already received, and a coordinator recognises a re-sent request.
    """
    digest = hashlib.sha256()
    digest.update(device_id.encode("utf-8"))
    digest.update(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8"))
    return digest.hexdigest()[:32]


def request_body(
    space: str,
    num_classes: int,
    input_size: int,
    archs: Sequence[str],
    proxies: Sequence[str],
    data: Mapping[str, Any],
    *,
    seed: int = 0,
    batch_size: int = 64,
    proxy_options: Optional[Mapping[str, Mapping[str, Any]]] = None,
    width_mult: Optional[float] = None,
) -> Dict[str, Any]:
    """Build the content of a gradient request: everything that changes the result, nothing that differs per send.

    `width_mult` is sent only for a space that takes a width multiplier (MobileNetV2), so the
    request ids of other spaces do not change.
    """
    described_space: Dict[str, Any] = {"name": space, "num_classes": int(num_classes), "input_size": int(input_size)}
    if width_mult is not None:
        described_space["width_mult"] = float(width_mult)
    return {
        "space": described_space,
        "archs": list(archs),
        "proxies": list(proxies),
        "seed": int(seed),
        "batch_size": int(batch_size),
        "proxy_options": {name: dict(values) for name, values in (proxy_options or {}).items()},
        "data": dict(data),
    }


def gradient_request(device_id: str, request_id: str, body: Mapping[str, Any], *, deadline: Optional[float]) -> Dict[str, Any]:
    """Wrap the stored body of a request in a fresh message id and timestamp, for one send."""
    return envelope(GRADIENT_REQUEST, device_id, device_id=device_id, request_id=request_id, deadline=deadline, **body)


def gradient_result(
    coordinator_id: str,
    request: Mapping[str, Any],
    results: Mapping[str, Mapping[str, Mapping[str, Any]]],
    probe: Mapping[str, Any],
    *,
    seconds: float,
    code_version: str,
) -> Dict[str, Any]:
    return envelope(
        GRADIENT_RESULT,
        coordinator_id,
        device_id=request["device_id"],
        request_id=request["request_id"],
        status="ok",
        results={arch: {name: dict(entry) for name, entry in row.items()} for arch, row in results.items()},
        probe=dict(probe),
        seconds=float(seconds),
        code_version=code_version,
    )


def gradient_error(coordinator_id: str, device_id: str, request_id: str, reason: str) -> Dict[str, Any]:
    """Build the error result that informs the device that its request cannot be computed, and why."""
    return envelope(
        GRADIENT_RESULT,
        coordinator_id,
        device_id=device_id,
        request_id=request_id,
        status="error",
        error=reason[:MAX_REASON_CHARS],
    )


def aggregator_message(coordinator_id: str, space: str, version: int, content: str, calibration: Mapping[str, Any]) -> Dict[str, Any]:
    return envelope(
        AGGREGATOR,
        coordinator_id,
        space=space,
        version=int(version),
        checksum=content_checksum(content),
        content=content,
        calibration=dict(calibration),
    )


def presence_message(coordinator_id: str, state: str, **details: Any) -> Dict[str, Any]:
    return envelope(COORDINATOR_PRESENCE, coordinator_id, coordinator_id=coordinator_id, state=state, **details)


def status_message(device_id: str, state: str, job: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Build a device status; the daemon adds the job it is working on, or the last one."""
    if job is None:
        return envelope(DEVICE_STATUS, device_id, device_id=device_id, state=state)
    return envelope(DEVICE_STATUS, device_id, device_id=device_id, state=state, job=dict(job))


def command_message(
    sender: str, device_id: str, command: str, command_id: Optional[str] = None, arguments: Optional[Mapping[str, Any]] = None
) -> Dict[str, Any]:
    """Build a command for the daemon of `device_id`; a missing command id gets a fresh UUID (hex)."""
    return envelope(
        DEVICE_COMMAND,
        sender,
        device_id=device_id,
        command_id=command_id or new_message_id(),
        command=command,
        arguments=dict(arguments or {}),
    )


def reply_message(device_id: str, command_id: str, command: str, status: str, **fields: Any) -> Dict[str, Any]:
    """Build the daemon's reply to one command: `job`, `jobs`, `device` or `error` go in `fields`."""
    if "error" in fields:
        fields["error"] = str(fields["error"])[:MAX_REASON_CHARS]
    return envelope(
        DEVICE_REPLY, device_id, device_id=device_id, command_id=command_id, command=command[:64], status=status, **fields
    )


def job_status_message(device_id: str, job: Mapping[str, Any]) -> Dict[str, Any]:
    return envelope(JOB_STATUS, device_id, device_id=device_id, job=dict(job))


def heartbeat_message(device_id: str, uptime_s: float, interval_s: float, telemetry: Mapping[str, Any]) -> Dict[str, Any]:
    return envelope(
        DEVICE_HEARTBEAT, device_id, device_id=device_id, uptime_s=float(uptime_s), interval_s=float(interval_s),
        telemetry=dict(telemetry),
    )


def content_checksum(content: str) -> str:
    """`sha256:<hex>` of the UTF-8 bytes of `content`."""
    return "sha256:" + hashlib.sha256(content.encode("utf-8")).hexdigest()


# Arrays ------------------------------------------------------------------------------


def encode_array(array: np.ndarray, dtype: str) -> Dict[str, Any]:
    """`{"dtype", "shape", "data"}` with the little-endian bytes of `array` in base64."""
    if dtype not in _ARRAY_DTYPES:
        raise ValueError(f"unsupported array dtype {dtype!r}; use one of {', '.join(_ARRAY_DTYPES)}")
    converted = np.ascontiguousarray(np.asarray(array).astype(np.dtype(dtype).newbyteorder("<")))
    return {
        "dtype": dtype,
        "shape": [int(n) for n in converted.shape],
        "data": base64.b64encode(converted.tobytes()).decode("ascii"),
    }


def decode_array(encoded: Any, name: str) -> np.ndarray:
    """Parse an array written by `encode_array`; raise ProtocolError if it is inconsistent or not finite."""
    if not isinstance(encoded, Mapping):
        raise ProtocolError(f"{name} must be an encoded array object")
    dtype = encoded.get("dtype")
    shape = encoded.get("shape")
    data = encoded.get("data")
    if dtype not in _ARRAY_DTYPES:
        raise ProtocolError(f"{name} has dtype {dtype!r}; expected one of {', '.join(_ARRAY_DTYPES)}")
    if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
        raise ProtocolError(f"{name} needs a 'shape' of non-negative integers")
    if not isinstance(data, str):
        raise ProtocolError(f"{name} needs its bytes as a base64 string in 'data'")
    try:
        raw = base64.b64decode(data.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as error:
        raise ProtocolError(f"{name} contains invalid base64: {error}") from None
    item = np.dtype(dtype).newbyteorder("<")
    expected = int(np.prod(shape, dtype=np.int64)) * item.itemsize
    if len(raw) != expected:
        raise ProtocolError(f"{name} contains {len(raw)} bytes, but shape {shape} of {dtype} needs {expected}")
    array = np.frombuffer(raw, dtype=item).reshape(shape)
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise ProtocolError(f"{name} contains NaN or infinite values")
    return array.astype(np.dtype(dtype))


# Data descriptors --------------------------------------------------------------------
#
# A descriptor determines the probe inputs that the coordinator uses. Its images are always the
# network's inputs as the device feeds them: float N x 3 x H x W, already normalised with the
# device's per-channel mean and std, at the network's input size.


def describe_none(num_classes: int) -> Dict[str, Any]:
    """Share nothing: the coordinator uses its own probe data."""
    return {"share": SHARE_NONE, "num_classes": int(num_classes)}


def describe_summary(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    components: int = DEFAULT_SUMMARY_COMPONENTS,
    max_images: int = DEFAULT_SUMMARY_IMAGES,
    seed: int = 0,
    data_hash: str = "",
) -> Dict[str, Any]:
    """Summarise images (float N x 3 x H x W, as the network reads them) and their labels.

    The summary contains the per-channel mean and std, the mean image, the leading principal
    components of the images with their standard deviations, the per-channel std that those
    components leave unexplained, and the label histogram. At most `max_images` images,
    drawn with `seed`, enter the principal component analysis.
    """
    images = _checked_images(images)
    labels = _checked_labels(labels, images.shape[0], num_classes)
    count, channels, height, width = images.shape
    if components < 1:
        raise ValueError(f"the number of principal components must be at least 1, got {components}")
    if count > max_images:
        chosen = np.sort(np.random.default_rng(seed).choice(count, size=max_images, replace=False))
        sample = images[chosen]
    else:
        sample = images
    flat = sample.reshape(sample.shape[0], -1).astype(np.float64)
    mean_image = flat.mean(axis=0)
    centered = flat - mean_image
    kept = max(0, min(components, flat.shape[0] - 1))
    dimension = flat.shape[1]
    if kept:
        _, singular, basis = np.linalg.svd(centered, full_matrices=False)
        basis = basis[:kept]
        component_var = singular[:kept] ** 2 / (flat.shape[0] - 1)
    else:
        basis = np.zeros((0, dimension))
        component_var = np.zeros(0)
    pixel_var = centered.var(axis=0, ddof=1) if flat.shape[0] > 1 else np.zeros(dimension)
    explained = (basis ** 2 * component_var[:, None]).sum(axis=0)
    residual = np.maximum(pixel_var - explained, 0.0).reshape(channels, height * width).mean(axis=1)

    pixels = images.astype(np.float64).transpose(1, 0, 2, 3).reshape(channels, -1)
    histogram = np.bincount(labels, minlength=num_classes)
    return {
        "share": SHARE_SUMMARY,
        "num_classes": int(num_classes),
        "images": int(count),
        "shape": [int(channels), int(height), int(width)],
        "channel_mean": [float(v) for v in pixels.mean(axis=1)],
        "channel_std": [float(v) for v in pixels.std(axis=1)],
        "value_range": [float(images.min()), float(images.max())],
        "mean_image": encode_array(mean_image.reshape(channels, height, width), "float32"),
        "components": encode_array(basis, "float16"),
        "component_std": [float(v) for v in np.sqrt(component_var)],
        "residual_std": [float(v) for v in np.sqrt(residual)],
        "label_histogram": [int(v) for v in histogram],
        "data_hash": data_hash,
    }


def describe_raw(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    max_images: int = DEFAULT_RAW_IMAGES,
    data_hash: str = "",
) -> Dict[str, Any]:
    """Share the first `max_images` images and labels themselves, as float32: an explicit opt-in."""
    images = _checked_images(images)
    labels = _checked_labels(labels, images.shape[0], num_classes)
    if max_images < 1:
        raise ValueError(f"the raw image cap must be at least 1, got {max_images}")
    kept = min(max_images, images.shape[0])
    return {
        "share": SHARE_RAW,
        "num_classes": int(num_classes),
        "images": encode_array(images[:kept], "float32"),
        "labels": encode_array(labels[:kept], "int64"),
        "data_hash": data_hash,
    }


def _checked_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] < 1:
        raise ValueError(f"images must have shape N x 3 x H x W with N >= 1, got {tuple(images.shape)}")
    if not np.all(np.isfinite(images)):
        raise ValueError("images hold NaN or infinite values")
    return images


def _checked_labels(labels: np.ndarray, count: int, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if labels.shape[0] != count:
        raise ValueError(f"got {labels.shape[0]} labels for {count} images")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    return labels


def validate_descriptor(data: Mapping[str, Any], *, num_classes: int, input_size: int) -> None:
    """Raise ProtocolError unless `data` is a complete descriptor that fits the request's space."""
    share = _field(data, "share", str)
    if share not in SHARE_POLICIES:
        raise ProtocolError(f"data descriptor has share {share!r}; expected one of {', '.join(SHARE_POLICIES)}")
    described_classes = _int_field(data, "num_classes", 1, MAX_CLASSES)
    if described_classes > num_classes:
        raise ProtocolError(
            f"data descriptor has {described_classes} classes, more than the {num_classes} outputs of the network"
        )
    if share == SHARE_SUMMARY:
        _validate_summary(data, input_size)
    elif share == SHARE_RAW:
        _validate_raw(data, input_size)


def _validate_summary(data: Mapping[str, Any], input_size: int) -> None:
    shape = _field(data, "shape", list)
    if shape != [3, input_size, input_size]:
        raise ProtocolError(f"summary shape {shape} does not match the network input [3, {input_size}, {input_size}]")
    for name in ("channel_mean", "channel_std", "residual_std"):
        _float_list(data, name, 3)
    low, high = _float_list(data, "value_range", 2)
    if low > high:
        raise ProtocolError("summary 'value_range' must be [low, high] with low <= high")
    component_std = _float_list(data, "component_std", None)
    if any(v < 0 for v in component_std):
        raise ProtocolError("summary 'component_std' must be non-negative")
    histogram = _field(data, "label_histogram", list)
    if len(histogram) != data["num_classes"] or not all(_is_int(v) and v >= 0 for v in histogram) or sum(histogram) < 1:
        raise ProtocolError("summary 'label_histogram' must hold one non-negative count per class, not all zero")
    _field(data, "mean_image", dict)
    _field(data, "components", dict)


def _validate_raw(data: Mapping[str, Any], input_size: int) -> None:
    images = _field(data, "images", dict)
    labels = _field(data, "labels", dict)
    shape = images.get("shape")
    if not isinstance(shape, list) or len(shape) != 4 or shape[1:] != [3, input_size, input_size]:
        raise ProtocolError(f"raw images have shape {shape}; expected [N, 3, {input_size}, {input_size}]")
    if not isinstance(labels.get("shape"), list) or labels.get("shape") != shape[:1]:
        raise ProtocolError("raw labels must hold one label per image")


def _float_list(data: Mapping[str, Any], name: str, length: Optional[int]) -> List[float]:
    values = _field(data, name, list)
    if length is not None and len(values) != length:
        raise ProtocolError(f"field {name!r} must hold {length} numbers, got {len(values)}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ProtocolError(f"field {name!r} must hold finite numbers")
    return [float(v) for v in values]


def draw_probe_batch(data: Mapping[str, Any], batch_size: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Probe inputs (float32 N x 3 x H x W) and labels (int64 N) from a summary or raw descriptor.

    A summary yields `batch_size` images drawn from its Gaussian model: the mean image, plus
    the principal components with their std, plus per-channel noise of the unexplained std,
    clipped to the described value range. Labels are drawn from the label histogram, and both
    draws use `seed`.
    A raw descriptor yields its own images and labels, `batch_size` notwithstanding.
    Raises ProtocolError if an array in the descriptor is inconsistent.
    """
    share = data.get("share")
    if share == SHARE_RAW:
        images = decode_array(data["images"], "raw images").astype(np.float32)
        labels = decode_array(data["labels"], "raw labels").astype(np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= int(data["num_classes"])):
            raise ProtocolError("raw labels lie outside the described classes")
        return images, labels
    if share != SHARE_SUMMARY:
        raise ProtocolError(f"cannot draw probe inputs from a descriptor with share {share!r}")

    channels, height, width = data["shape"]
    dimension = channels * height * width
    mean_image = decode_array(data["mean_image"], "summary mean image").astype(np.float64)
    basis = decode_array(data["components"], "summary components").astype(np.float64)
    component_std = np.asarray(data["component_std"], dtype=np.float64)
    if mean_image.shape != (channels, height, width):
        raise ProtocolError(f"summary mean image has shape {list(mean_image.shape)}, expected {data['shape']}")
    if basis.ndim != 2 or basis.shape[1] != dimension or basis.shape[0] != component_std.shape[0]:
        raise ProtocolError(
            f"summary components have shape {list(basis.shape)}; expected [{component_std.shape[0]}, {dimension}]"
        )

    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((batch_size, basis.shape[0])) * component_std
    images = mean_image.reshape(1, -1) + weights @ basis
    images = images.reshape(batch_size, channels, height, width)
    residual_std = np.asarray(data["residual_std"], dtype=np.float64).reshape(1, channels, 1, 1)
    images = images + rng.standard_normal(images.shape) * residual_std
    low, high = data["value_range"]
    images = np.clip(images, low, high)

    histogram = np.asarray(data["label_histogram"], dtype=np.float64)
    labels = rng.choice(histogram.shape[0], size=batch_size, p=histogram / histogram.sum())
    return images.astype(np.float32), labels.astype(np.int64)
