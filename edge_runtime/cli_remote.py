"""`edge-nas remote`: drive a device daemon over MQTT (submit a personalisation job, ask its status, cancel it).

This is how a user or a cloud operator drives a device: the command goes to
`edge-nas/devices/<device id>/commands`, the reply comes back on `.../replies` and the job's
progress and result on `.../jobs/<job id>` (retained). It imports neither torch nor the daemon.
"""
from __future__ import annotations

import logging
import math
import queue
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

import click

from cloud_sync import protocol
from cloud_sync.protocol import ProtocolError
from edge_runtime.cli_common import broker_login_options, echo_json, parse_count
from models.errors import EdgeNasError

logger = logging.getLogger(__name__)

DEFAULT_REPLY_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 5.0


class RemoteDevice:
    """A controller's MQTT connection to one device daemon; paho's callbacks only queue events."""

    def __init__(self, settings: Any, device_id: str) -> None:
        from cloud_sync.client import create_mqtt_client

        self.settings = settings
        self.device_id = protocol.check_id(device_id, "device id")
        self.client_id = f"remote-{uuid.uuid4().hex[:12]}"
        self._events: "queue.Queue[Tuple[str, Any]]" = queue.Queue()
        self._topics: List[str] = []
        # Events that arrived while waiting for an acknowledgement, kept for next_message.
        self._held: List[Tuple[str, Any]] = []
        self.last_status: Optional[Dict[str, Any]] = None
        client = create_mqtt_client(self.client_id, settings)
        client.on_connect = lambda c, u, flags, reason, p: self._events.put(("connected", reason))
        client.on_disconnect = lambda c, u, flags, reason, p: self._events.put(("disconnected", reason))
        client.on_subscribe = lambda c, u, mid, reasons, p: self._events.put(("subscribed", (mid, reasons)))
        client.on_publish = lambda c, u, mid, reason, p: self._events.put(("published", (mid, reason)))
        client.on_message = lambda c, u, message: self._events.put(("message", (message.topic, message.payload)))
        self._client = client

    def __enter__(self) -> "RemoteDevice":
        self.connect()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def connect(self) -> None:
        """Connect with a clean session; raise EdgeNasError when the broker rejects it or does not reply in time."""
        address = self.settings.address
        try:
            # Connecting here, not in paho's thread, fails at once with the reason (refused, unknown host, TLS).
            self._client.connect(address.host, address.port, keepalive=self.settings.keepalive_s, clean_start=True)
        except (OSError, ValueError) as error:
            raise EdgeNasError(
                f"cannot connect to the broker at {address.url}: {error}; check --broker and that the broker runs"
            ) from None
        self._client.loop_start()
        reason = self._expect("connected", None, CONNECT_TIMEOUT_S)
        if reason is None:
            raise EdgeNasError(
                f"no reply from the broker at {address.url} within {CONNECT_TIMEOUT_S:g} s; check --broker and that the broker runs"
            )
        if reason.is_failure:
            raise EdgeNasError(f"the broker at {address.url} rejected the connection: {reason}; check the credentials")

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def subscribe(self, topics: List[str]) -> None:
        """Subscribe to `topics` with QoS 1 and wait for the broker's acknowledgement."""
        self._topics = list(topics)
        result, mid = self._client.subscribe([(topic, 1) for topic in topics])
        acknowledged = self._expect("subscribed", lambda details: details[0] == mid, CONNECT_TIMEOUT_S)
        if acknowledged is None:
            raise EdgeNasError(f"the broker did not acknowledge the subscription to {topics[0]} within {CONNECT_TIMEOUT_S:g} s")
        failures = [str(code) for code in acknowledged[1] if code.is_failure]
        if failures:
            raise EdgeNasError(
                f"the broker rejected the subscription to the topics of device {self.device_id} ({failures[0]}); "
                "check the ACL of this user"
            )

    def send(self, command: str, arguments: Dict[str, Any], command_id: Optional[str] = None) -> str:
        """Publish a command with QoS 1, wait for the broker's acknowledgement, and return its command id."""
        message = protocol.command_message(self.client_id, self.device_id, command, command_id, arguments)
        info = self._client.publish(protocol.command_topic(self.device_id), protocol.encode_message(message), qos=1)
        acknowledged = self._expect("published", lambda details: details[0] == info.mid, CONNECT_TIMEOUT_S)
        if acknowledged is None:
            raise EdgeNasError(f"the broker did not acknowledge the command within {CONNECT_TIMEOUT_S:g} s")
        if acknowledged[1].is_failure:
            raise EdgeNasError(f"the broker rejected the command for device {self.device_id} ({acknowledged[1]}); "
                               "check the ACL of this user")
        return message["command_id"]

    def next_message(self, deadline: Optional[float]) -> Optional[Tuple[str, Dict[str, Any]]]:
        """Return the next valid (topic, message) before `deadline` (monotonic; None: no limit), or None."""
        while True:
            event = self._next_event(deadline)
            if event is None:
                return None
            kind, details = event
            if kind == "connected" and not details.is_failure and self._topics:
                # A clean session drops the subscriptions, so subscribe again. The retained job status then arrives again.
                self._client.subscribe([(topic, 1) for topic in self._topics])
            elif kind == "disconnected":
                logger.warning("lost the connection to the broker (%s); reconnecting", details)
            elif kind == "message":
                topic, payload = details
                try:
                    message = protocol.decode_message(payload)
                except ProtocolError as error:
                    logger.warning("ignored an invalid message on %s: %s", topic, error)
                    continue
                if message["type"] == protocol.DEVICE_STATUS:
                    self.last_status = message
                return topic, message

    def _expect(self, kind: str, matches: Optional[Callable[[Any], bool]], timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            event = self._next_event(deadline, replay_held=False)
            if event is None:
                return None
            if event[0] == kind and (matches is None or matches(event[1])):
                return event[1]
            if event[0] == "message":
                self._held.append(event)

    def _next_event(self, deadline: Optional[float], replay_held: bool = True) -> Optional[Tuple[str, Any]]:
        """Return the next event: first the messages set aside while waiting for an acknowledgement, then new ones."""
        if replay_held and self._held:
            return self._held.pop(0)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None


def _positive_seconds(context: click.Context, parameter: click.Parameter, value: Optional[float]) -> Optional[float]:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"must be a positive number of seconds, got {value}")
    return value


def _broker_options(function: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--broker", "broker_url", required=True, metavar="URL",
                     help="MQTT broker: mqtt://HOST[:PORT] (default port 1883) or mqtts://HOST[:PORT] (TLS, default 8883)."),
        click.option("--device", "device_id", required=True, metavar="ID", help="Device id of the daemon to drive."),
        broker_login_options,
        click.option("--timeout", "timeout_s", type=float, default=DEFAULT_REPLY_TIMEOUT_S, show_default=True,
                     metavar="SECONDS", callback=_positive_seconds, help="How long to wait for the device's reply."),
        click.option("--json", "as_json", is_flag=True, help="Print the reply or the job as JSON on stdout."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@click.group("remote")
def remote() -> None:
    """Drive a device daemon (`edge-nas daemon`) over MQTT: submit jobs, read their status, cancel them."""


@remote.command("personalize")
@_broker_options
@click.option("--data", metavar="PATH", help="Data on the device: a path inside its data folder, or a built-in "
                                             "sample such as sklearn-digits (default: the device's data folder).")
@click.option("--space", help="Search space (default: the device's configured space).")
@click.option("--budget", type=int, help="Number of candidates scored (default: the device's configuration).")
@click.option("--finalists", type=int, help="Number of finalists measured (default: the device's configuration).")
@click.option("--search", "strategy", type=click.Choice(("random", "evolution")), help="Search strategy.")
@click.option("--seed", type=int, help="Seed of the search, the network weights and the probe batch.")
@click.option("--batch-size", type=int, help="Images in the probe batch.")
@click.option("--max-params", metavar="N", help="Largest parameter count; k/M/G suffixes allowed (800k, 3M).")
@click.option("--max-flops", metavar="N", help="Largest FLOPs (multiply-adds); k/M/G suffixes allowed (450M).")
@click.option("--max-latency-ms", type=float, metavar="MS", help="Largest p50 latency of one image, in milliseconds.")
@click.option("--max-power-w", type=float, metavar="W", help="Largest mean board power while the model runs, in watts.")
@click.option("--max-energy-mj", type=float, metavar="MJ", help="Largest energy per inference, in millijoules.")
@click.option("--command-id", metavar="ID",
              help="Command id, which becomes the job id (default: a fresh UUID). Sending the same id again "
                   "returns the same job instead of starting another.")
@click.option("--wait", is_flag=True, help="Wait for the job to end and print its result.")
@click.option("--wait-timeout", type=float, metavar="SECONDS", callback=_positive_seconds, help="With --wait, stop waiting after this long (default: no limit).")
def personalize_command(
    broker_url: str,
    device_id: str,
    username: Optional[str],
    password_file: Optional[str],
    ca_file: Optional[str],
    timeout_s: float,
    as_json: bool,
    data: Optional[str],
    space: Optional[str],
    budget: Optional[int],
    finalists: Optional[int],
    strategy: Optional[str],
    seed: Optional[int],
    batch_size: Optional[int],
    max_params: Optional[str],
    max_flops: Optional[str],
    max_latency_ms: Optional[float],
    max_power_w: Optional[float],
    max_energy_mj: Optional[float],
    command_id: Optional[str],
    wait: bool,
    wait_timeout: Optional[float],
) -> None:
    """Submit a personalisation job to a device daemon and print its job id, or with --wait its result.

    Options left out take the values of the device's configuration. Progress goes to stderr.
    """
    if wait_timeout is not None and not wait:
        raise click.UsageError("--wait-timeout only applies with --wait; add --wait or drop --wait-timeout")
    constraints = {
        "max_params": parse_count(max_params, "--max-params"),
        "max_flops": parse_count(max_flops, "--max-flops"),
        "max_latency_ms": max_latency_ms,
        "max_power_w": max_power_w,
        "max_energy_mj": max_energy_mj,
    }
    arguments: Dict[str, Any] = {
        "data": data, "space": space, "budget": budget, "finalists": finalists, "search": strategy,
        "seed": seed, "batch_size": batch_size,
    }
    arguments = {name: value for name, value in arguments.items() if value is not None}
    requested_constraints = {name: value for name, value in constraints.items() if value is not None}
    if requested_constraints:
        arguments["constraints"] = requested_constraints
    try:
        protocol.validate_personalize_arguments(arguments)
        if command_id is not None:
            protocol.check_id(command_id, "command id")
    except ProtocolError as error:
        raise EdgeNasError(_option_names(str(error))) from None

    command_id = command_id or uuid.uuid4().hex
    with _connect(broker_url, device_id, username, password_file, ca_file) as device:
        device.subscribe([protocol.reply_topic(device_id), protocol.job_topic(device_id, command_id),
                          protocol.status_topic(device_id)])
        device.send(protocol.COMMAND_PERSONALIZE, arguments, command_id)
        reply = _await_reply(device, command_id, timeout_s)
        job = reply["job"]
        if not wait:
            if as_json:
                echo_json(job)
            else:
                click.echo(f"job {job['job_id']} accepted by device {device_id} ({job['state']}); "
                           f"follow it with: edge-nas remote status --broker {broker_url} --device {device_id} "
                           f"--job {job['job_id']}")
            return
        try:
            job = _await_end(device, job, wait_timeout)
        except KeyboardInterrupt:
            click.echo(f"stopped waiting; job {command_id} goes on running on device {device_id}", err=True)
            raise SystemExit(130)
    _print_end(job, device_id, as_json)


@remote.command("status")
@_broker_options
@click.option("--job", "job_id", metavar="ID", help="Also print this job in full (its arguments and result).")
def status_command(
    broker_url: str,
    device_id: str,
    username: Optional[str],
    password_file: Optional[str],
    ca_file: Optional[str],
    timeout_s: float,
    as_json: bool,
    job_id: Optional[str],
) -> None:
    """Print a device daemon's state, its running job and its recent jobs."""
    device = _connect(broker_url, device_id, username, password_file, ca_file)
    reply = _job_command(device, device_id, protocol.COMMAND_STATUS, job_id, timeout_s)
    if as_json:
        echo_json({name: reply[name] for name in ("device", "job", "jobs") if name in reply})
        return
    click.echo(_format_status(device_id, reply))


@remote.command("cancel")
@_broker_options
@click.option("--job", "job_id", metavar="ID", help="Job to cancel (default: the running job).")
def cancel_command(
    broker_url: str,
    device_id: str,
    username: Optional[str],
    password_file: Optional[str],
    ca_file: Optional[str],
    timeout_s: float,
    as_json: bool,
    job_id: Optional[str],
) -> None:
    """Cancel a queued or running job; a running job stops at its next checkpoint."""
    device = _connect(broker_url, device_id, username, password_file, ca_file)
    reply = _job_command(device, device_id, protocol.COMMAND_CANCEL, job_id, timeout_s)
    job = reply["job"]
    if as_json:
        echo_json(job)
    elif reply["status"] == "accepted":
        click.echo(f"job {job['job_id']} stops at its next checkpoint on device {device_id}")
    else:
        click.echo(f"job {job['job_id']} cancelled on device {device_id}")


def _job_command(device: RemoteDevice, device_id: str, command: str, job_id: Optional[str],
                 timeout_s: float) -> Dict[str, Any]:
    """Send a status or cancel command (about `job_id` when given) and return the daemon's reply."""
    arguments = {"job_id": job_id} if job_id else {}
    command_id = uuid.uuid4().hex
    with device:
        device.subscribe([protocol.reply_topic(device_id), protocol.status_topic(device_id)])
        device.send(command, arguments, command_id)
        return _await_reply(device, command_id, timeout_s)


def _connect(broker_url: str, device_id: str, username: Optional[str], password_file: Optional[str],
             ca_file: Optional[str]) -> RemoteDevice:
    from cloud_sync.client import BrokerSettings

    settings = BrokerSettings(broker_url, username=username, password_file=password_file, ca_file=ca_file)
    settings.login()  # a bad URL, password file or CA file fails here, before any connection
    return RemoteDevice(settings, device_id)


def _await_reply(device: RemoteDevice, command_id: str, timeout_s: float) -> Dict[str, Any]:
    """Return the device's reply to `command_id`; raise EdgeNasError for an error reply or none in time."""
    deadline = time.monotonic() + timeout_s
    while True:
        received = device.next_message(deadline)
        if received is None:
            raise EdgeNasError(_no_reply_message(device, timeout_s))
        _, message = received
        if message["type"] == protocol.DEVICE_REPLY and message["command_id"] == command_id:
            if message["status"] == "error":
                raise EdgeNasError(f"device {device.device_id} rejected the command: {message['error']}")
            return message


def _no_reply_message(device: RemoteDevice, timeout_s: float) -> str:
    status = device.last_status
    if status is None:
        # Without a status, the daemon has probably never connected, so the broker has no session to keep the command in.
        return (f"no reply from device {device.device_id} within {timeout_s:g} s, and no daemon with this device id "
                "has published a status on this broker; check --device and --broker, and that the daemon runs")
    moment = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status["timestamp"]))
    return (f"no reply from device {device.device_id} within {timeout_s:g} s (its last status is {status['state']} "
            f"at {moment}); the broker keeps the command for the daemon's session until it reconnects, or raise --timeout")


def _await_end(device: RemoteDevice, job: Dict[str, Any], wait_timeout: Optional[float]) -> Dict[str, Any]:
    """Follow the job's status messages until it ends; progress goes to stderr."""
    deadline = time.monotonic() + wait_timeout if wait_timeout is not None else None
    job_topic = protocol.job_topic(device.device_id, job["job_id"])
    last_line = ""
    while job["state"] not in protocol.FINAL_JOB_STAGES:
        line = _progress_line(job)
        if line != last_line:
            click.echo(line, err=True)
            last_line = line
        received = device.next_message(deadline)
        if received is None:
            raise EdgeNasError(
                f"job {job['job_id']} did not end within {wait_timeout:g} s (last state {job['state']}, stage "
                f"{job['stage']}); it goes on running on the device, so ask again with edge-nas remote status"
            )
        topic, message = received
        if topic == job_topic and message["type"] == protocol.JOB_STATUS:
            job = message["job"]
    return job


def _progress_line(job: Dict[str, Any]) -> str:
    progress = job.get("progress") or {}
    parts = [f"job {job['job_id']}: {job['state']}, stage {job['stage']}"]
    candidates = progress.get("candidates")
    if isinstance(candidates, dict):
        parts.append(f"{candidates.get('done')}/{candidates.get('total')} candidates scored")
    measured = progress.get("finalists_measured")
    if isinstance(measured, dict):
        parts.append(f"{measured.get('done')}/{measured.get('total')} finalists measured")
    return ", ".join(parts)


def _print_end(job: Dict[str, Any], device_id: str, as_json: bool) -> None:
    if as_json:
        echo_json(job)
    state = job["state"]
    if state == "failed":
        raise EdgeNasError(f"job {job['job_id']} failed on device {device_id}: {job.get('error')}")
    if state == "cancelled":
        raise EdgeNasError(f"job {job['job_id']} was cancelled on device {device_id}")
    if not as_json:
        click.echo(_format_result(job, device_id))


def _format_result(job: Dict[str, Any], device_id: str) -> str:
    result = job.get("result") or {}
    latency = result.get("latency_ms") or {}
    power = result.get("power") or {}
    score = result.get("score")
    lines = [
        f"job {job['job_id']} done on device {device_id} after {job['updated'] - job['created']:.1f} s",
        f"chosen: {result.get('architecture')}",
        f"  params {result.get('params', 0):,}, FLOPs {result.get('flops', 0):,}, "
        + (f"score {score:.4g}" if isinstance(score, (int, float)) else "no valid aggregated score")
        + f" among {result.get('finalists')} finalists of {result.get('candidates_scored')} candidates",
    ]
    if latency:
        lines.append(f"  latency p50 {latency.get('p50_ms', 0.0):.3f} ms ({latency.get('execution_provider')})")
    if power.get("available"):
        lines.append(f"  power {power.get('total_w', 0.0):.2f} W ({power.get('source')})")
    else:
        lines.append(f"  power: not measured ({power.get('reason', 'no power meter')})")
    lines.append(f"outputs on the device: {result.get('result_dir')}")
    return "\n".join(lines)


def _format_status(device_id: str, reply: Dict[str, Any]) -> str:
    device = reply.get("device") or {}
    lines = [
        f"device {device_id}: {device.get('state')}, up {device.get('uptime_s', 0):.0f} s, "
        f"edge-nas {device.get('code_version')}, {device.get('pending_jobs', 0)} unfinished jobs",
        f"running: {device.get('active_job') or 'none'}",
    ]
    jobs = reply.get("jobs") or []
    if jobs:
        lines.append("recent jobs:")
        for job in jobs:
            moment = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job["created"]))
            detail = (job.get("result") or {}).get("architecture") or job.get("error") or job["stage"]
            lines.append(f"  {job['job_id']}  {moment}  {job['state']:<11} {detail}")
    job = reply.get("job")
    if job is not None:
        lines.append(_progress_line(job))
        if job["state"] == "done":
            lines.append(_format_result(job, device_id))
        elif job.get("error"):
            lines.append(f"error: {job['error']}")
    return "\n".join(lines)


def _option_names(message: str) -> str:
    """Reword a protocol message about an argument so that it names the command-line option."""
    for name in protocol.PERSONALIZE_ARGUMENTS + protocol.CONSTRAINT_ARGUMENTS:
        option = "--" + name.replace("_", "-")
        message = message.replace(f"argument {name!r}", option).replace(f"constraint {name!r}", option)
        message = message.replace(f"field {name!r}", option)
    return message
