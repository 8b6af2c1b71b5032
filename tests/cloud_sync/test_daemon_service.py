"""The device daemon as a real process against a real broker: remote jobs, SIGTERM, SIGKILL, bad commands, a broker restart.

Each daemon is `python -m edge_runtime.cli daemon` with OMP_NUM_THREADS=1 and a tiny job
(budget 2 to 4, one finalist, batch size 8, sklearn-digits). A test that must act in the
middle of a stage sets the daemon's step-delay test hook, so every scored candidate and
stage change pauses long enough to send a signal there.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

from cloud_sync import protocol
from cloud_sync.client import BrokerSettings, create_mqtt_client
from edge_runtime.cli_remote import RemoteDevice
from edge_runtime.daemon_jobs import JobStore
from models.errors import EdgeNasError

from broker_support import DOCS, documented_acl, fenced_block, free_port

REPO = Path(__file__).resolve().parents[2]
DEVICE = "dev-1"
DIGITS = {"data": "sklearn-digits", "budget": 2, "finalists": 1, "batch_size": 8}

pytestmark = pytest.mark.broker


class Listener:
    """A controller connected to the broker: records every message on the device's topics and publishes commands."""

    def __init__(self, broker, device_id: str = DEVICE, settings: Optional[BrokerSettings] = None) -> None:
        self.device_id = device_id
        self.messages: List[Tuple[str, Dict[str, Any], bool]] = []
        self.condition = threading.Condition()
        self.client = create_mqtt_client(f"test-listener-{uuid.uuid4().hex[:8]}", settings or BrokerSettings(broker.url))
        self.client.on_connect = lambda client, userdata, flags, reason, properties: client.subscribe(
            f"{protocol.TOPIC_ROOT}/devices/+/#", qos=1
        )
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", broker.port, clean_start=True)
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        try:
            decoded = protocol.decode_message(message.payload)
        except protocol.ProtocolError:
            return  # the tests' own malformed commands
        with self.condition:
            self.messages.append((message.topic, decoded, bool(message.retain)))
            self.condition.notify_all()

    def wait_for(self, predicate: Callable[[str, Dict[str, Any]], bool], timeout: float = 60.0,
                 since: int = 0) -> Tuple[str, Dict[str, Any]]:
        limit = time.monotonic() + timeout
        with self.condition:
            while True:
                for topic, message, _ in self.messages[since:]:
                    if predicate(topic, message):
                        return topic, message
                remaining = limit - time.monotonic()
                if remaining <= 0:
                    seen = [(topic, message.get("type"), message.get("state") or message.get("status"))
                            for topic, message, _ in self.messages[since:]]
                    raise AssertionError(f"no matching message within {timeout} s; received {seen}")
                self.condition.wait(remaining)

    def wait_job(self, job_id: str, predicate: Callable[[Dict[str, Any]], bool], timeout: float = 90.0,
                 since: int = 0) -> Dict[str, Any]:
        topic = protocol.job_topic(self.device_id, job_id)
        _, message = self.wait_for(lambda t, m: t == topic and predicate(m["job"]), timeout, since)
        return message["job"]

    def wait_reply(self, command_id: str, timeout: float = 30.0, since: int = 0) -> Dict[str, Any]:
        _, message = self.wait_for(
            lambda t, m: m["type"] == protocol.DEVICE_REPLY and m["command_id"] == command_id, timeout, since
        )
        return message

    def replies(self) -> List[Dict[str, Any]]:
        with self.condition:
            return [message for _, message, _ in self.messages if message["type"] == protocol.DEVICE_REPLY]

    def statuses(self) -> List[str]:
        topic = protocol.status_topic(self.device_id)
        with self.condition:
            return [message["state"] for t, message, _ in self.messages if t == topic]

    def count(self) -> int:
        with self.condition:
            return len(self.messages)

    def command(self, command: str, command_id: str, device_id: Optional[str] = None, topic: Optional[str] = None,
                **arguments: Any) -> None:
        message = protocol.command_message("test-listener", device_id or self.device_id, command, command_id, arguments)
        # Written without validation, so that a test can send a command that the daemon must reject.
        self.raw(topic or protocol.command_topic(self.device_id), json.dumps(message).encode())

    def raw(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(timeout=5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class DaemonProcess:
    """`edge-nas daemon` in a subprocess, with a notify socket that records what it sends to systemd."""

    def __init__(self, folder: Path, broker, *, budget: int = 2, broker_lines: str = "") -> None:
        self.folder = folder
        self.state = folder / "state"
        (folder / "data").mkdir(parents=True, exist_ok=True)
        self.config = folder / "config.toml"
        self.config.write_text(
            f'device_id = "{DEVICE}"\nstate_dir = "state"\ndata_dir = "data"\nheartbeat_s = 1.0\n'
            f'stop_timeout_s = 5.0\n[broker]\nurl = "{broker.url}"\nkeepalive_s = 5\n{broker_lines}'
            f"[personalize]\nbudget = {budget}\nfinalists = 1\nbatch_size = 8\n"
        )
        # A short folder of its own, because a unix socket path may hold at most 107 bytes.
        self.socket_folder = Path(tempfile.mkdtemp(prefix="edge-nas-notify-"))
        self.socket_path = self.socket_folder / "notify.sock"
        self.receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.receiver.bind(str(self.socket_path))
        self.receiver.settimeout(0.2)
        self.notifications: List[str] = []
        self._closed = threading.Event()
        threading.Thread(target=self._receive, daemon=True).start()
        self.process: Optional[subprocess.Popen] = None
        self.starts = 0

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                self.notifications.append(self.receiver.recv(4096).decode())
            except socket.timeout:
                continue
            except OSError:
                return

    def start(self, step_delay_s: Optional[float] = None, watchdog_usec: Optional[int] = None) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", NOTIFY_SOCKET=str(self.socket_path))
        env.pop("EDGE_NAS_DAEMON_STEP_DELAY_S", None)
        if step_delay_s is not None:
            env["EDGE_NAS_DAEMON_STEP_DELAY_S"] = str(step_delay_s)
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        self.starts += 1
        self.log = self.folder / f"daemon-{self.starts}.log"
        ready_before = self.notifications.count("READY=1")
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "edge_runtime.cli", "daemon", "--config", str(self.config)],
                cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT,
            )
        limit = time.monotonic() + 60
        while sum(1 for text in self.notifications if text.startswith("READY=1")) <= ready_before:
            if self.process.poll() is not None:
                raise AssertionError(f"the daemon exited with {self.process.returncode}:\n{self.log_text()}")
            if time.monotonic() > limit:
                raise AssertionError(f"the daemon sent no READY=1 within 60 s:\n{self.log_text()}")
            time.sleep(0.05)

    def signal(self, number: int) -> None:
        assert self.process is not None
        self.process.send_signal(number)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def job_store(self) -> JobStore:
        return JobStore(self.state / "jobs.sqlite")

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._closed.set()
        self.receiver.close()
        shutil.rmtree(str(self.socket_folder), ignore_errors=True)


@pytest.fixture
def listener(broker):
    instance = Listener(broker)
    yield instance
    instance.close()


@pytest.fixture
def daemon(broker, tmp_path):
    instance = DaemonProcess(tmp_path / "device", broker)
    yield instance
    instance.close()


def start_online(daemon: DaemonProcess, listener: Listener, **options: Any) -> None:
    """Start the daemon and wait until it is connected and subscribed: before its first session, commands are lost."""
    since = listener.count()
    daemon.start(**options)
    listener.wait_for(lambda t, m: t == protocol.status_topic(DEVICE) and m["state"] == "online", since=since)


def stage_runs(daemon: DaemonProcess, job_id: str) -> List[Tuple[str, int, Optional[str]]]:
    store = daemon.job_store()
    try:
        return [(run.stage, run.attempt, run.outcome) for run in store.stage_runs(job_id)]
    finally:
        store.close()


def completed_stages(runs: List[Tuple[str, int, Optional[str]]]) -> List[str]:
    return [stage for stage, _, outcome in runs if outcome == "done"]


def test_remote_personalize_prints_result(broker, daemon, listener):
    start_online(daemon, listener, watchdog_usec=1_000_000)
    completed = subprocess.run(
        [sys.executable, "-m", "edge_runtime.cli", "remote", "personalize", "--broker", broker.url, "--device", DEVICE,
         "--data", "sklearn-digits", "--budget", "2", "--finalists", "1", "--command-id", "job-remote",
         "--wait", "--json"],
        cwd=str(REPO), env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=180,
    )
    assert completed.returncode == 0, completed.stderr + daemon.log_text()
    job = json.loads(completed.stdout)
    assert job["state"] == "done"
    assert job["job_id"] == "job-remote"
    result_dir = Path(job["result"]["result_dir"])
    assert result_dir == daemon.state / "results" / "job-remote"
    assert json.loads((result_dir / "subnet.json").read_text())["architecture"] == job["result"]["architecture"]
    assert sorted(os.listdir(daemon.state / "results")) == ["job-remote"]
    assert "stage scoring" in completed.stderr  # progress lines on stderr
    assert completed_stages(stage_runs(daemon, "job-remote")) == ["scoring", "measuring", "exporting"]

    _, heartbeat = listener.wait_for(lambda t, m: m["type"] == protocol.DEVICE_HEARTBEAT)
    assert set(heartbeat["telemetry"]) == {"power", "temperatures", "cpu", "gpu"}
    assert all("available" in reading for reading in heartbeat["telemetry"].values())
    assert any(text.startswith("READY=1") for text in daemon.notifications)
    assert "WATCHDOG=1" in daemon.notifications

    # The broker may deliver a command twice: the same command id returns the same job, not a new run.
    since = listener.count()
    listener.command("personalize", "job-remote", data="sklearn-digits", budget=2, finalists=1)  # as the CLI sent it
    again = listener.wait_reply("job-remote", since=since)
    assert again["status"] == "accepted"
    assert again["job"]["state"] == "done"
    since = listener.count()
    listener.command("personalize", "job-remote", **dict(DIGITS, budget=3))
    reused = listener.wait_reply("job-remote", since=since)
    assert reused["status"] == "error"
    assert "already used for another job" in reused["error"]
    assert completed_stages(stage_runs(daemon, "job-remote")) == ["scoring", "measuring", "exporting"]

    status = subprocess.run(
        [sys.executable, "-m", "edge_runtime.cli", "remote", "status", "--broker", broker.url, "--device", DEVICE,
         "--json"],
        cwd=str(REPO), capture_output=True, text=True, timeout=60,
    )
    assert status.returncode == 0, status.stderr
    assert [entry["job_id"] for entry in json.loads(status.stdout)["jobs"]] == ["job-remote"]

    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    listener.wait_for(lambda t, m: t == protocol.status_topic(DEVICE) and m["state"] == "offline")


def test_sigterm_mid_job_then_resume(broker, daemon, listener):
    start_online(daemon, listener, step_delay_s=0.5)
    listener.command("personalize", "job-term", **dict(DIGITS, budget=4))
    listener.wait_job("job-term", lambda job: job["stage"] == "scoring" and "candidates" in job["progress"])
    daemon.signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert daemon.wait(timeout=20) == 0
    assert time.monotonic() - signalled < 5.0, daemon.log_text()

    interrupted = listener.wait_job("job-term", lambda job: job["state"] == "interrupted")
    assert interrupted["stage"] == "scoring"
    listener.wait_for(lambda t, m: t == protocol.status_topic(DEVICE) and m["state"] == "offline")
    assert "stopping" in listener.statuses()
    assert any(text.startswith("STOPPING=1") for text in daemon.notifications)
    assert stage_runs(daemon, "job-term") == [("scoring", 1, "interrupted")]

    daemon.start()
    done = listener.wait_job("job-term", lambda job: job["state"] == "done")
    assert done["result"]["candidates_scored"] == 4
    assert stage_runs(daemon, "job-term") == [
        ("scoring", 1, "interrupted"), ("scoring", 2, "done"), ("measuring", 1, "done"), ("exporting", 1, "done"),
    ]
    assert "resuming job job-term at stage scoring" in daemon.log_text()


def test_sigkill_mid_job_repeats_no_stage(broker, daemon, listener):
    start_online(daemon, listener, step_delay_s=0.5)
    listener.command("personalize", "job-kill", **DIGITS)
    listener.wait_job("job-kill", lambda job: job["stage"] == "measuring")
    daemon.signal(signal.SIGKILL)
    assert daemon.wait() == -signal.SIGKILL
    # The broker detects the closed connection and publishes the daemon's last will.
    listener.wait_for(lambda t, m: t == protocol.status_topic(DEVICE) and m["state"] == "offline")

    daemon.start()
    done = listener.wait_job("job-kill", lambda job: job["state"] == "done")
    runs = stage_runs(daemon, "job-kill")
    assert runs == [("scoring", 1, "done"), ("measuring", 1, "lost"), ("measuring", 2, "done"), ("exporting", 1, "done")]
    assert completed_stages(runs) == ["scoring", "measuring", "exporting"]  # no stage done twice
    assert sorted(os.listdir(daemon.state / "results")) == ["job-kill"]  # no partial folder left
    assert (Path(done["result"]["result_dir"]) / "subnet.json").is_file()
    assert "was cut short when the previous daemon process ended" in daemon.log_text()


def test_bad_commands_leave_daemon_serving(broker, daemon, listener):
    start_online(daemon, listener)
    commands = protocol.command_topic(DEVICE)
    listener.raw(commands, b"this is not json")
    listener.raw(commands, json.dumps({"command_id": "bad-1", "command": "personalize"}).encode())
    listener.command("reboot-now", "bad-2")
    listener.command("personalize", "bad-3", data="../../etc")
    listener.command("personalize", "bad-4", budget=2, finalists=3)
    listener.command("personalize", "bad-5", data="cats\x00dogs")
    listener.command("status", "other-device", device_id="dev-2")  # on this device's topic
    listener.command("status", "other-topic", device_id="dev-2", topic=protocol.command_topic("dev-2"))
    listener.command("status", "alive")

    alive = listener.wait_reply("alive")
    assert alive["status"] == "ok"
    assert alive["device"]["state"] == "online"
    replies = {reply["command_id"]: reply for reply in listener.replies()}
    assert sorted(replies) == ["alive", "bad-1", "bad-2", "bad-3", "bad-4", "bad-5"]
    assert "missing field 'schema'" in replies["bad-1"]["error"]
    assert replies["bad-2"]["error"] == "unknown command 'reboot-now'; known commands: personalize, status, cancel"
    assert replies["bad-2"]["command"] == "reboot-now"
    assert "lies outside the data folder" in replies["bad-3"]["error"]
    assert "finalists (3) must not exceed budget (2)" in replies["bad-4"]["error"]
    assert "is not a usable path" in replies["bad-5"]["error"]
    assert all(replies[name]["status"] == "error" for name in ("bad-1", "bad-2", "bad-3", "bad-4", "bad-5"))
    assert daemon.process.poll() is None
    log = daemon.log_text()
    assert "dropped an invalid command without a usable command id" in log
    assert "ignored command other-device for device dev-2" in log

    listener.command("cancel", "cancel-none")
    assert "no job is running" in listener.wait_reply("cancel-none")["error"]


def test_cancel_stops_running_and_queued_jobs(broker, daemon, listener):
    start_online(daemon, listener, step_delay_s=0.5)
    listener.command("personalize", "job-first", **DIGITS)
    listener.command("personalize", "job-second", **DIGITS)
    listener.wait_job("job-first", lambda job: job["state"] == "running")
    assert listener.wait_reply("job-second")["job"]["state"] == "queued"

    listener.command("cancel", "cancel-second", job_id="job-second")
    queued = listener.wait_reply("cancel-second")
    assert queued["status"] == "ok"
    assert queued["job"]["state"] == "cancelled"
    listener.command("cancel", "cancel-first")  # no job id: the running job
    assert listener.wait_reply("cancel-first")["status"] == "accepted"
    listener.wait_job("job-first", lambda job: job["state"] == "cancelled")
    listener.wait_job("job-second", lambda job: job["state"] == "cancelled")

    listener.command("cancel", "cancel-again", job_id="job-first")
    assert "has already ended (cancelled)" in listener.wait_reply("cancel-again")["error"]
    assert os.listdir(daemon.state / "results") == []


def test_cancel_stored_before_crash_ends_job(broker, daemon, listener):
    start_online(daemon, listener, step_delay_s=0.5)
    listener.command("personalize", "job-doomed", **DIGITS)
    listener.wait_job("job-doomed", lambda job: job["state"] == "running")
    daemon.signal(signal.SIGKILL)
    daemon.wait()
    # What the daemon stores when a cancel command arrives during a step that outlasts the process.
    store = daemon.job_store()
    store.request_cancel("job-doomed")
    store.close()

    daemon.start()
    listener.wait_job("job-doomed", lambda job: job["state"] == "cancelled")
    assert stage_runs(daemon, "job-doomed")[-1] == ("scoring", 2, "cancelled")
    assert os.listdir(daemon.state / "results") == []


def test_second_daemon_on_state_folder_is_rejected(broker, daemon, listener):
    (daemon.state / "results" / ".gone.partial").mkdir(parents=True)
    start_online(daemon, listener)
    assert not (daemon.state / "results" / ".gone.partial").exists()  # left by a job that no longer exists

    second = subprocess.run(
        [sys.executable, "-m", "edge_runtime.cli", "daemon", "--config", str(daemon.config)],
        cwd=str(REPO), env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=60,
    )
    assert second.returncode == 1
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert lines[0].startswith("error: another edge-nas daemon (process ")
    assert str(daemon.state) in lines[0]
    assert daemon.process.poll() is None


def test_unreachable_broker_is_logged(tmp_path):
    absent = type("AbsentBroker", (), {"port": free_port()})()
    absent.url = f"mqtt://127.0.0.1:{absent.port}"
    daemon = DaemonProcess(tmp_path / "device", absent)
    try:
        daemon.start()
        limit = time.monotonic() + 30
        while "cannot connect to the broker at mqtt://127.0.0.1" not in daemon.log_text():
            assert time.monotonic() < limit, daemon.log_text()
            time.sleep(0.2)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
        assert "the offline status was not published" not in daemon.log_text()
    finally:
        daemon.close()


def test_daemon_survives_broker_restart(broker, daemon, listener):
    start_online(daemon, listener, step_delay_s=0.3)
    listener.command("personalize", "job-outage", **DIGITS)
    listener.wait_job("job-outage", lambda job: job["state"] == "running")
    broker.stop()
    time.sleep(1.5)
    broker.start()
    # Sent as soon as the listener is back; the broker keeps it in the daemon's session until it reconnects.
    limit = time.monotonic() + 30
    while not listener.client.is_connected():
        assert time.monotonic() < limit, "the listener did not reconnect"
        time.sleep(0.1)
    listener.command("status", "after-restart")
    reply = listener.wait_reply("after-restart", timeout=45)
    assert reply["status"] == "ok"
    # The job went on while the broker was away, and its result reaches the broker afterwards.
    done = listener.wait_job("job-outage", lambda job: job["state"] == "done")
    assert completed_stages(stage_runs(daemon, "job-outage")) == ["scoring", "measuring", "exporting"]
    assert done["result"]["architecture"]
    log = daemon.log_text()
    assert "lost the connection to the broker" in log
    assert log.count("connected to mqtt://127.0.0.1") >= 2
    assert daemon.process.poll() is None


def daemon_acl() -> str:
    """The daemon's ACL lines of docs/daemon.md: the fenced block that starts with '# edge-nas daemon ACL'."""
    return fenced_block("daemon.md", "# edge-nas daemon ACL")


def test_daemon_works_under_documented_acl(make_broker, password_file, secret_file, tmp_path):
    acl = tmp_path / "edge-nas.acl"
    acl.write_text(documented_acl() + "\n" + daemon_acl())
    password_file("operator", "operator-secret")
    password_file(DEVICE, "device-secret")
    passwd = password_file("dev-2", "other-secret")
    broker = make_broker(f"password_file {passwd}\nacl_file {acl}\n", anonymous=False, name="acl")
    operator = BrokerSettings(broker.url, username="operator", password_file=secret_file("operator", "operator-secret"))
    device_secret = secret_file(DEVICE, "device-secret")
    daemon = DaemonProcess(tmp_path / "device", broker,
                           broker_lines=f'username = "{DEVICE}"\npassword_file = "{device_secret}"\n')
    listener = Listener(broker, settings=operator)
    try:
        start_online(daemon, listener)
        listener.wait_for(lambda t, m: m["type"] == protocol.DEVICE_HEARTBEAT)  # the daemon may write its heartbeat
        with RemoteDevice(operator, DEVICE) as controller:
            controller.subscribe([protocol.reply_topic(DEVICE)])
            command_id = controller.send(protocol.COMMAND_STATUS, {})
            reply = listener.wait_reply(command_id)
        assert reply["status"] == "ok"

        other = BrokerSettings(broker.url, username="dev-2", password_file=secret_file("dev-2", "other-secret"))
        with RemoteDevice(other, DEVICE) as intruder:
            with pytest.raises(EdgeNasError, match="the broker rejected the command for device dev-1"):
                intruder.send(protocol.COMMAND_STATUS, {})
    finally:
        listener.close()
        daemon.close()
