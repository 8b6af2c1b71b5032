"""The device daemon: personalisation jobs on request over MQTT, unattended, resumable and observable.

Threads:

- paho's network thread only puts events (connected, disconnected, message, acknowledged
  publish) on a queue;
- the main thread reads that queue and handles commands, publishes the heartbeat and the
  device status, feeds the systemd watchdog and watches the data folder;
- one worker thread runs the jobs of the job store one at a time (`daemon_jobs.JobRunner`).

SIGTERM and SIGINT set the stop event. The running job stops at its next checkpoint (every
scored candidate, measured finalist and stage change), keeps its stage and resumes at the
next start. The daemon publishes `stopping`, waits up to `stop_timeout_s` for that
checkpoint, publishes `offline` and exits with status 0.

The topics and messages are in docs/protocol.md, the service set-up in docs/daemon.md.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from cloud_sync import protocol
from cloud_sync.protocol import ProtocolError
from edge_runtime.daemon_config import DaemonConfig
from edge_runtime.daemon_jobs import Job, JobRunner, JobStore, ResultFolders, arguments_digest, json_safe
from edge_runtime.daemon_systemd import SystemdNotifier
from models.errors import EdgeNasError

logger = logging.getLogger(__name__)

# Test hook: seconds that a job pauses after each stage change and each scored or measured
# candidate, so that a test can signal the daemon in the middle of a stage. Unset in service.
STEP_DELAY_VARIABLE = "EDGE_NAS_DAEMON_STEP_DELAY_S"

# How long the broker keeps a retained job status: a week, so that old jobs do not pile up there.
JOB_STATUS_EXPIRY_S = 7 * 24 * 3600
# Progress of a running job is published at most this often. Stage changes are published at once.
PROGRESS_INTERVAL_S = 1.0
# A job whose stage was cut short by this many crashes (the process died during it) fails.
MAX_LOST_ATTEMPTS = 3
# Jobs listed in the reply to a status command.
STATUS_JOBS = 20
# Rejected commands logged per minute. The rest are only counted.
REJECTED_LOG_PER_MINUTE = 20


class Daemon:
    """One device daemon. `run` serves until the stop event is set (SIGTERM, SIGINT or `request_stop`)."""

    def __init__(
        self,
        config: DaemonConfig,
        *,
        notifier: Optional[SystemdNotifier] = None,
        power_meter: Any = None,
        environ: Optional[Mapping[str, str]] = None,
    ) -> None:
        environ = os.environ if environ is None else environ
        self.config = config
        self.device_id = config.device_id
        self.notifier = notifier or SystemdNotifier(environ)
        self.stop = threading.Event()
        self.started = time.monotonic()
        self._events: "queue.Queue[Tuple[str, Any]]" = queue.Queue()
        self._wake_worker = threading.Event()
        self._job_lock = threading.Lock()
        self._active_job: Optional[str] = None
        self._cancel = threading.Event()
        self._connected = False
        self._client: Any = None
        self._final_publishes: Dict[int, str] = {}
        self._last_progress: Dict[str, Tuple[str, float]] = {}
        self._next_heartbeat = time.monotonic()
        self._rejected = _RateLimitedLog(REJECTED_LOG_PER_MINUTE)
        self._connect_failures = 0
        self._next_connect_warning = 0.0
        self.worker_failed = False

        for folder in (config.state_dir, config.results_dir):
            _make_dir(folder)
        # Two daemons on one job store would both run each job, and each would mark the other's attempts lost.
        self._lock_file = _lock_state_dir(config.state_dir)
        self.store = JobStore(config.jobs_path)
        self.folders = ResultFolders(config.results_dir)
        if power_meter is None:
            from edge_runtime.power import open_power_meter

            power_meter = open_power_meter()
        self.power_meter = power_meter
        from edge_runtime.daemon_telemetry import Telemetry

        self.telemetry = Telemetry(power_meter)
        step_delay_s = _step_delay(environ)
        self.runner = JobRunner(
            self.store,
            self.folders,
            cache_path=config.cache_path,
            power_meter=power_meter,
            threads=config.defaults.threads,
            on_update=self._on_job_update,
            step_delay_s=step_delay_s,
        )
        self.watcher = DataWatcher(config.data_dir, config.watch.new_images, self.store) if config.watch.enabled else None
        self._worker = threading.Thread(target=self._work, name="edge-nas-jobs", daemon=True)

    # Lifecycle

    def request_stop(self, *_: Any) -> None:
        """Ask the daemon to stop; safe to call from a signal handler."""
        self.stop.set()
        self._wake_worker.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def run(self) -> bool:
        """Serve until the stop event is set; return whether the worker thread stopped in time."""
        self._lost_attempt_check()
        self._remove_stale_partials()
        self._connect()
        self._worker.start()
        logger.info("daemon of device %s started; state in %s; broker %s",
                    self.device_id, self.config.state_dir, self.config.broker.url)
        if not self.config.data_dir.is_dir():
            logger.warning("the data folder %s does not exist; jobs without a data path and the folder watch find "
                           "no images until it is created", self.config.data_dir)
        self.notifier.ready(f"serving device {self.device_id}")
        next_watchdog = time.monotonic()
        next_watch = time.monotonic()
        while not self.stop.is_set():
            self._pump(0.2)
            self._rejected.flush()
            now = time.monotonic()
            if now >= self._next_heartbeat and self._connected:
                self._publish_heartbeat()
                self._next_heartbeat = now + self.config.heartbeat_s
            interval = self.notifier.watchdog_interval_s
            if interval is not None and now >= next_watchdog:
                self.notifier.watchdog()
                next_watchdog = now + interval
            if self.watcher is not None and now >= next_watch:
                self._check_watcher()
                next_watch = now + self.config.watch.interval_s
        return self._shut_down()

    def _shut_down(self) -> bool:
        logger.info("stopping: the running job stops at its next checkpoint")
        self.notifier.stopping("stopping")
        self._publish_status("stopping")
        self._wake_worker.set()

        self._worker.join(self.config.stop_timeout_s)
        stopped = not self._worker.is_alive()
        if not stopped:
            logger.warning("the job did not reach a checkpoint within %.1f s; exiting anyway, and it resumes at the next start",
                           self.config.stop_timeout_s)
            active = self._active_job
            if active is not None:
                # A stop, not a crash: the attempt must not count towards MAX_LOST_ATTEMPTS.
                self.store.interrupt(active)

        self._pump(0.0)
        client, self._client = self._client, None
        if client is not None:
            # Without a connection nothing can be published. After a lost connection the broker has
            # already published the last will, which is the same offline status.
            info = self._publish_status("offline", client=client) if self._connected else None
            if info is not None:
                try:
                    info.wait_for_publish(timeout=1.0)
                except (RuntimeError, ValueError) as error:
                    logger.warning("the offline status was not published: %s", error)
            client.disconnect()
            client.loop_stop()

        if stopped:
            self.store.close()
            self.power_meter.close()
            self._lock_file.close()
        self.notifier.close()
        logger.info("daemon of device %s stopped", self.device_id)
        return stopped

    def _remove_stale_partials(self) -> None:
        """Remove the partial result folders of ended or unknown jobs, which a crash after the job ended can leave."""
        for job_id in self.folders.partial_job_ids():
            job = self.store.get(job_id)
            if job is None or job.final:
                logger.info("removing the partial result folder of job %s, which has ended or is unknown", job_id)
                self.folders.discard(job_id)

    def _lost_attempt_check(self) -> None:
        """Record the stage attempts that a crash cut short, and fail a job after MAX_LOST_ATTEMPTS of them.

        Without the limit, a job that kills the process (out of memory, say) would restart
        the service for ever under Restart=on-failure.
        """
        for job_id in self.store.close_lost_runs():
            lost = sum(1 for run in self.store.stage_runs(job_id) if run.outcome == "lost")
            logger.warning("job %s was cut short when the previous daemon process ended (lost attempts so far: %d)",
                           job_id, lost)
            if lost >= MAX_LOST_ATTEMPTS:
                message = (f"the daemon process ended {lost} times while running this job (out of memory or "
                           "a power cut?); submit it again with a smaller budget or batch size")
                self.store.finish(job_id, "failed", error=message)
                logger.error("job %s failed: %s", job_id, message)

    # MQTT

    def _connect(self) -> None:
        from cloud_sync.client import connect_properties, create_mqtt_client

        will = (protocol.status_topic(self.device_id),
                protocol.encode_message(protocol.status_message(self.device_id, "offline")))
        settings = self.config.broker.settings()
        client = create_mqtt_client(self.device_id, settings, will=will)
        client.on_connect = lambda c, u, flags, reason, p: self._events.put(
            ("connected", (reason, bool(flags.session_present)))
        )
        client.on_disconnect = lambda c, u, flags, reason, p: self._events.put(("disconnected", str(reason)))
        client.on_connect_fail = lambda c, u: self._events.put(("connect_failed", None))
        client.on_message = lambda c, u, message: self._events.put(("message", (message.topic, message.payload)))
        client.on_publish = lambda c, u, mid, reason, p: self._events.put(("published", (mid, reason)))
        address = settings.address
        # A persistent session keeps the command subscription, so commands sent while the daemon is down wait for it.
        client.connect_async(
            address.host, address.port, keepalive=settings.keepalive_s, clean_start=False,
            properties=connect_properties(self.config.broker.session_expiry_s),
        )
        client.loop_start()
        self._client = client

    def _pump(self, timeout_s: float) -> None:
        try:
            event = self._events.get(timeout=timeout_s) if timeout_s > 0 else self._events.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(event)
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return

    def _handle(self, event: Tuple[str, Any]) -> None:
        kind, details = event
        if kind == "connected":
            reason, session_present = details
            if reason.is_failure:
                logger.warning("the broker at %s rejected the connection: %s; retrying", self.config.broker.url, reason)
                return
            self._connected = True
            self._connect_failures = 0
            self._next_connect_warning = 0.0
            # Publishes not acknowledged before the connection dropped are made again below.
            self._final_publishes.clear()
            self._next_heartbeat = time.monotonic()
            logger.info("connected to %s as %s (session present: %s)", self.config.broker.url, self.device_id,
                        session_present)
            self._client.subscribe(protocol.command_topic(self.device_id), qos=1)
            self._publish_status(self._device_state())
            self._publish_unpublished()
            self.notifier.status(f"serving device {self.device_id}, connected to {self.config.broker.url}")
        elif kind == "disconnected":
            if self._connected:
                logger.warning("lost the connection to the broker (%s); reconnecting", details)
                self.notifier.status(f"serving device {self.device_id}, reconnecting to {self.config.broker.url}")
            self._connected = False
        elif kind == "connect_failed":
            # paho retries every 1 to 10 s and gives no reason. One warning a minute reports that it keeps retrying.
            self._connect_failures += 1
            now = time.monotonic()
            if now >= self._next_connect_warning:
                logger.warning("cannot connect to the broker at %s (failed attempts so far: %d); retrying; check "
                               "broker.url and that the broker runs", self.config.broker.url, self._connect_failures)
                self.notifier.status(f"serving device {self.device_id}, cannot connect to {self.config.broker.url}")
                self._next_connect_warning = now + 60.0
        elif kind == "message":
            self._on_message(*details)
        elif kind == "published":
            mid, reason = details
            job_id = self._final_publishes.pop(mid, None)
            if reason.is_failure:
                logger.warning("the broker rejected a publish of the daemon (%s)", reason)
            elif job_id is not None:
                self.store.mark_published(job_id)
        elif kind == "job_ended":
            self._publish_unpublished()
            if self._connected:
                self._publish_status(self._device_state())

    def _publish(self, topic: str, message: Mapping[str, Any], *, retain: bool = False,
                 expiry_s: Optional[float] = None, client: Any = None) -> Any:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        client = client or self._client
        if client is None:
            return None
        properties = None
        if expiry_s is not None:
            properties = Properties(PacketTypes.PUBLISH)
            # MQTT 5 sends the expiry as a 32-bit unsigned integer.
            properties.MessageExpiryInterval = min(max(1, int(expiry_s)), 2**32 - 1)
        return client.publish(topic, protocol.encode_message(message), qos=1, retain=retain, properties=properties)

    def _publish_status(self, state: str, client: Any = None) -> Any:
        job = self._status_job()
        return self._publish(
            protocol.status_topic(self.device_id), protocol.status_message(self.device_id, state, job),
            retain=True, client=client,
        )

    def _device_state(self) -> str:
        return "stopping" if self.stop.is_set() else "online"

    def _status_job(self) -> Optional[Dict[str, Any]]:
        """Return the job that the device status shows: the running one, else the newest."""
        active = self._active_job
        job = self.store.get(active) if active else None
        if job is None:
            newest = self.store.recent(1)
            job = newest[0] if newest else None
        if job is None:
            return None
        return _brief(job.describe(running=job.job_id == active and not job.final))

    def _publish_job(self, job: Job, running: bool) -> Any:
        info = self._publish(
            protocol.job_topic(self.device_id, job.job_id),
            protocol.job_status_message(self.device_id, json_safe(job.describe(running))),
            retain=True, expiry_s=JOB_STATUS_EXPIRY_S,
        )
        if info is not None and job.final:
            self._final_publishes[info.mid] = job.job_id
        return info

    def _publish_unpublished(self) -> None:
        """Publish the final status of every job whose earlier publish was not acknowledged (or never made)."""
        if not self._connected:
            return
        pending = set(self._final_publishes.values())
        for job in self.store.unpublished():
            if job.job_id not in pending:
                self._publish_job(job, running=False)

    def _publish_heartbeat(self) -> None:
        if not self._connected:
            return
        telemetry = json_safe(self.telemetry.read())
        message = protocol.heartbeat_message(
            self.device_id, time.monotonic() - self.started, self.config.heartbeat_s, telemetry
        )
        # A heartbeat older than three intervals is stale, so the broker drops it.
        self._publish(protocol.heartbeat_topic(self.device_id), message, expiry_s=3 * self.config.heartbeat_s)

    def _on_job_update(self, job: Job, running: bool) -> None:
        """Publish a job's change; called from the worker thread (paho's publish is thread-safe).

        Progress within a stage is published at most every PROGRESS_INTERVAL_S. The main
        thread publishes a final state, because it records the broker's acknowledgement.
        """
        if job.final:
            self._last_progress.pop(job.job_id, None)
            self._events.put(("job_ended", job.job_id))
            return
        now = time.monotonic()
        previous = self._last_progress.get(job.job_id)
        if running and previous is not None and previous[0] == job.stage and now - previous[1] < PROGRESS_INTERVAL_S:
            return
        self._last_progress[job.job_id] = (job.stage, now)
        if self._connected:
            self._publish_job(job, running)
            self._publish_status(self._device_state())
        candidates = job.progress.get("candidates")
        counted = f", {candidates['done']}/{candidates['total']} candidates" if candidates else ""
        self.notifier.status(f"job {job.job_id}: {job.state(running)}, stage {job.stage}{counted}")

    # Commands

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic != protocol.command_topic(self.device_id):
            self._rejected.log(f"ignored a message on {topic}: not this daemon's command topic")
            return
        try:
            message = protocol.decode_message(payload)
        except ProtocolError as error:
            self._reject_invalid(payload, str(error))
            return
        if message["type"] != protocol.DEVICE_COMMAND:
            self._rejected.log(f"ignored a {message['type']} message on the command topic")
            return
        if message["device_id"] != self.device_id:
            self._rejected.log(f"ignored command {message['command_id']} for device {message['device_id']}")
            return
        command, command_id = message["command"], message["command_id"]
        logger.info("command %s %s from %s", command, command_id, message["sender"])
        try:
            if command == protocol.COMMAND_PERSONALIZE:
                self._command_personalize(command_id, message.get("arguments") or {})
            elif command == protocol.COMMAND_STATUS:
                self._command_status(command_id, message.get("arguments") or {})
            else:
                self._command_cancel(command_id, message.get("arguments") or {})
        except EdgeNasError as error:
            self._rejected.log(f"rejected command {command} {command_id}: {error}")
            self._reply(command_id, command, "error", error=str(error))
        except Exception as error:  # A bug in one command must not stop the daemon.
            logger.exception("command %s %s failed with an internal error", command, command_id)
            self._reply(command_id, command, "error", error=f"internal error in the daemon: {type(error).__name__}")

    def _reject_invalid(self, payload: bytes, reason: str) -> None:
        """Reply with an error to an invalid command that names a command id and no other device; log the rest."""
        raw = _loose_json(payload)
        command_id = raw.get("command_id")
        device_id = raw.get("device_id")
        if device_id not in (None, self.device_id):
            self._rejected.log(f"ignored an invalid command for device {str(device_id)[:64]!r}: {reason}")
            return
        try:
            protocol.check_id(command_id, "command id")
        except ProtocolError:
            self._rejected.log(f"dropped an invalid command without a usable command id: {reason}")
            return
        command = raw.get("command")
        command = command if isinstance(command, str) and command else "unknown"
        self._rejected.log(f"rejected command {command_id}: {reason}")
        self._reply(command_id, command, "error", error=reason)

    def _reply(self, command_id: str, command: str, status: str, **fields: Any) -> None:
        message = protocol.reply_message(self.device_id, command_id, command, status, **json_safe(fields))
        self._publish(protocol.reply_topic(self.device_id), message)

    def _command_personalize(self, command_id: str, arguments: Dict[str, Any]) -> None:
        digest = arguments_digest(arguments)
        existing = self.store.get(command_id)
        if existing is not None:
            if existing.digest != digest:
                raise EdgeNasError(f"command id {command_id} was already used for another job; send a new command id")
            # The broker may deliver a command twice, so the reply repeats the job that the first delivery created.
            self._reply(command_id, protocol.COMMAND_PERSONALIZE, "accepted", job=self._describe(existing))
            return
        effective = job_arguments(arguments, self.config)
        # Under the lock the worker cannot start the job before its queued status is published.
        with self._job_lock:
            job, _ = self.store.add(command_id, effective, digest)
            self._reply(command_id, protocol.COMMAND_PERSONALIZE, "accepted", job=self._describe(job))
            self._publish_job(job, running=False)
        logger.info("queued job %s: data %s, budget %d, %d jobs waiting",
                    command_id, effective["data"], effective["budget"], self.store.pending_count())
        self._wake_worker.set()

    def _command_status(self, command_id: str, arguments: Dict[str, Any]) -> None:
        job_id = arguments.get("job_id")
        fields: Dict[str, Any] = {
            "device": {
                "state": self._device_state(),
                "uptime_s": round(time.monotonic() - self.started, 1),
                "active_job": self._active_job,
                "pending_jobs": self.store.pending_count(),
                "code_version": _code_version(),
            },
            "jobs": [_brief(self._describe(job)) for job in self.store.recent(STATUS_JOBS)],
        }
        if job_id is not None:
            job = self.store.get(job_id)
            if job is None:
                raise EdgeNasError(f"unknown job id {job_id}; send status without a job id to list the recent jobs")
            fields["job"] = self._describe(job)
        self._reply(command_id, protocol.COMMAND_STATUS, "ok", **fields)

    def _command_cancel(self, command_id: str, arguments: Dict[str, Any]) -> None:
        with self._job_lock:
            job_id = arguments.get("job_id") or self._active_job
            if job_id is None:
                raise EdgeNasError("no job is running; name the job to cancel with its job id")
            job = self.store.get(job_id)
            if job is None:
                raise EdgeNasError(f"unknown job id {job_id}; send a status command to list the recent jobs")
            if job.final:
                raise EdgeNasError(f"job {job_id} has already ended ({job.stage}); there is nothing to cancel")
            if job_id == self._active_job:
                # Stored, so that the job ends cancelled even when the daemon stops before the next checkpoint.
                self.store.request_cancel(job_id)
                self._cancel.set()
                logger.info("cancelling job %s at its next checkpoint", job_id)
                self._reply(command_id, protocol.COMMAND_CANCEL, "accepted", job=self._describe(job))
                return
            self.store.finish(job_id, "cancelled")
            self.folders.discard(job_id)
        logger.info("cancelled job %s before it ran", job_id)
        cancelled = self.store.get(job_id)
        assert cancelled is not None
        self._reply(command_id, protocol.COMMAND_CANCEL, "ok", job=self._describe(cancelled))
        self._publish_unpublished()

    def _describe(self, job: Job) -> Dict[str, Any]:
        return json_safe(job.describe(running=job.job_id == self._active_job and not job.final))

    # Worker

    def _work(self) -> None:
        try:
            self._run_jobs()
        except Exception:  # The job store failed (a full disk, say): stop, so that systemd restarts the daemon.
            logger.exception("the job worker failed; stopping the daemon")
            self.worker_failed = True
            self.request_stop()

    def _run_jobs(self) -> None:
        while not self.stop.is_set():
            with self._job_lock:
                job = self.store.next_pending()
                self._active_job = job.job_id if job is not None else None
                self._cancel = threading.Event()
                cancel = self._cancel
                if job is not None and self.store.cancel_requested(job.job_id):
                    logger.info("job %s was cancelled before the previous daemon process stopped; ending it", job.job_id)
                    cancel.set()
            if job is None:
                self._wake_worker.wait(1.0)
                self._wake_worker.clear()
                continue
            try:
                self.runner.run(job.job_id, self.stop, cancel)
            finally:
                with self._job_lock:
                    self._active_job = None

    # Data folder

    def _check_watcher(self) -> None:
        assert self.watcher is not None
        if self.store.pending_count():
            return
        arrived = self.watcher.new_images()
        if arrived is None:
            return
        self.watcher.reset()
        try:
            effective = job_arguments({}, self.config)
        except EdgeNasError as error:
            logger.warning("%d new images in %s, but no job can start: %s", arrived, self.config.data_dir, error)
            return
        job_id = f"watch-{uuid.uuid4().hex[:16]}"
        with self._job_lock:
            job, _ = self.store.add(job_id, effective, arguments_digest({}), origin="watch")
            self._publish_job(job, running=False)
        logger.info("%d new images in %s; queued job %s", arrived, self.config.data_dir, job_id)
        self._wake_worker.set()


class DataWatcher:
    """Count the images in the data folder and report when `threshold` new ones have arrived since the last job.

    The count at the last job is kept in the job store, so a restart does not start a job for
    images it has already seen. Images that disappear lower the baseline.
    """

    SETTING = "watch_baseline"

    def __init__(self, folder: Path, threshold: int, store: JobStore) -> None:
        self.folder = Path(folder)
        self.threshold = int(threshold)
        self.store = store

    def count(self) -> int:
        from edge_runtime.data import IMAGE_SUFFIXES

        if not self.folder.is_dir():
            return 0
        total = 0
        for directory, folders, files in os.walk(str(self.folder)):
            folders[:] = [name for name in folders if not name.startswith(".")]
            total += sum(1 for name in files if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES)
        return total

    def new_images(self) -> Optional[int]:
        """Return how many images arrived since the baseline when that reaches the threshold, else None."""
        count = self.count()
        stored = self.store.get_setting(self.SETTING)
        if stored is None or count < int(stored):
            self.store.set_setting(self.SETTING, str(count))
            return None
        arrived = count - int(stored)
        return arrived if arrived >= self.threshold else None

    def reset(self) -> None:
        self.store.set_setting(self.SETTING, str(self.count()))


def job_arguments(arguments: Mapping[str, Any], config: DaemonConfig) -> Dict[str, Any]:
    """Merge a personalize command's arguments over the configured defaults and check them.

    A constraint in the command replaces the configured one; the others keep their configured
    values. Raises EdgeNasError naming the argument and the fix.
    """
    from edge_runtime.personalize import space_settings
    from edge_runtime.search import STRATEGIES

    effective = config.defaults.arguments()
    constraints = dict(effective.pop("constraints"))
    constraints.update(arguments.get("constraints") or {})
    for name, value in arguments.items():
        if name != "constraints" and value is not None:
            effective[name] = value
    effective["constraints"] = constraints
    effective["data"] = resolve_data(arguments.get("data"), config.data_dir)
    space_settings(effective["space"], effective.get("input_size"), effective.get("width_mult"))
    if effective["search"] not in STRATEGIES:
        raise EdgeNasError(f"unknown search strategy {effective['search']!r}; use one of {', '.join(STRATEGIES)}")
    if effective["finalists"] > effective["budget"]:
        raise EdgeNasError(
            f"finalists ({effective['finalists']}) must not exceed budget ({effective['budget']}): "
            "the finalists are chosen among the candidates"
        )
    return effective


def resolve_data(data: Optional[str], data_dir: Path) -> str:
    """Return the data that a job reads: a built-in sample name, or a path inside the data folder.

    A relative path is taken inside `data_dir`, and a path that leads outside it (through
    `..` or a symbolic link) is rejected, so a command cannot make the daemon read any file
    of the device.
    """
    from edge_runtime.data import BUILTIN_SAMPLES

    if data in BUILTIN_SAMPLES:
        return str(data)
    try:
        root = Path(data_dir).resolve()
        path = (root / data).resolve() if data else root
        exists = path.exists()
    except (OSError, ValueError, RuntimeError) as error:
        # ValueError: a NUL character; OSError or RuntimeError: a symbolic link loop, by Python version.
        raise EdgeNasError(f"data path {data!r} is not a usable path: {error}; send a plain path inside the data folder") from None
    if path != root and root not in path.parents:
        raise EdgeNasError(
            f"data path {data} lies outside the data folder {root}; put the images under it or change data_dir"
        )
    if not exists:
        raise EdgeNasError(f"data path {path} does not exist on device; copy the images there first")
    return str(path)


class _RateLimitedLog:
    """Warning log of at most `per_minute` lines a minute, with a count of those left out."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self.window_start = time.monotonic()
        self.logged = 0
        self.suppressed = 0

    def log(self, text: str) -> None:
        self.flush()
        if self.logged < self.per_minute:
            self.logged += 1
            logger.warning("%s", text)
        else:
            self.suppressed += 1

    def flush(self) -> None:
        """Log the count of the lines left out once their minute has passed, and start a new minute."""
        now = time.monotonic()
        if now - self.window_start < 60.0:
            return
        if self.suppressed:
            logger.warning("left out %d more rejected messages in the last minute", self.suppressed)
        self.window_start, self.logged, self.suppressed = now, 0, 0


def run_daemon(config: DaemonConfig) -> int:
    """Run the daemon in this process until SIGTERM or SIGINT and return the exit status; called by `edge-nas daemon`.

    The status is 0 after a stop, and 1 when the job worker failed, so that systemd's
    Restart=on-failure restarts the daemon.
    """
    daemon = Daemon(config)
    daemon.install_signal_handlers()
    stopped = daemon.run()
    status = 1 if daemon.worker_failed else 0
    if not stopped:
        # The worker thread is still inside a job, and the interpreter's shutdown would wait
        # for it, so the process ends here. The job resumes at the next start.
        logging.shutdown()
        os._exit(status)
    return status


def _brief(job: Dict[str, Any]) -> Dict[str, Any]:
    """Return the job without its arguments and most of its result, small enough for lists and the device status."""
    brief = {key: value for key, value in job.items() if key not in ("arguments", "result")}
    brief["arguments"] = {}
    if job.get("state") == "done":
        result = job.get("result") or {}
        brief["result"] = {key: result[key] for key in ("architecture", "result_dir") if key in result}
    return brief


def _loose_json(payload: bytes) -> Dict[str, Any]:
    """Parse a payload that failed validation, to find its command id; {} when that is impossible."""
    if len(payload) > protocol.MAX_MESSAGE_BYTES:
        return {}
    try:
        value = json.loads(bytes(payload).decode("utf-8"))
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _step_delay(environ: Mapping[str, str]) -> float:
    text = environ.get(STEP_DELAY_VARIABLE)
    if not text:
        return 0.0
    try:
        delay = float(text)
    except ValueError:
        raise EdgeNasError(f"{STEP_DELAY_VARIABLE}={text!r} is not a number of seconds; unset it") from None
    logger.warning("%s=%g: every job step pauses %g s (a test hook; unset it in service)", STEP_DELAY_VARIABLE, delay, delay)
    return max(0.0, delay)


def _lock_state_dir(state_dir: Path) -> Any:
    """Take an exclusive lock on `<state_dir>/daemon.lock` for the life of the process; return the open file.

    Raises EdgeNasError naming the other daemon's process id when it holds the lock.
    """
    import fcntl

    path = state_dir / "daemon.lock"
    try:
        handle = open(str(path), "a+")
    except OSError as error:
        raise EdgeNasError(
            f"cannot open {path}: {error.strerror or error}; set state_dir to a folder writable by the daemon's user"
        ) from None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise EdgeNasError(
            f"another edge-nas daemon (process {owner}) is running with the state folder {state_dir}; "
            "stop it first, or give this one another state_dir"
        ) from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _make_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise EdgeNasError(
            f"cannot create the folder {folder}: {error.strerror or error}; set state_dir to a writable folder"
        ) from None


def _code_version() -> str:
    import edge_runtime

    return edge_runtime.__version__
