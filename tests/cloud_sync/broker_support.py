"""Test support for the MQTT tests: a real Mosquitto process, coordinators (a real one and a torch-free fake), the documented ACL."""
from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import List, Optional

MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto")


def find_program(name: str, candidates: tuple) -> Optional[str]:
    found = shutil.which(name)
    if found:
        return found
    for path in candidates:
        if os.access(path, os.X_OK):
            return path
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Broker:
    """One mosquitto process; `stop` and `start` again keep the port and the persistence file."""

    def __init__(self, binary: str, folder: Path, extra_config: str = "", anonymous: bool = True) -> None:
        self.binary = binary
        self.folder = folder
        self.port = free_port()
        self.config = folder / "mosquitto.conf"
        self.log = folder / "mosquitto.log"
        lines: List[str] = [
            f"listener {self.port} 127.0.0.1",
            f"allow_anonymous {'true' if anonymous else 'false'}",
            "persistence true",
            f"persistence_location {folder}/",
            "persistence_file mosquitto.db",
            f"log_dest file {self.log}",
            "log_type all",
        ]
        if os.geteuid() == 0:
            # mosquitto started as root switches to the user "mosquitto", which cannot write to tmp.
            lines.append(f"user {getpass.getuser()}")
        self.config.write_text("\n".join(lines) + "\n" + extra_config)
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 5.0) -> None:
        self.process = subprocess.Popen(
            [self.binary, "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        limit = time.monotonic() + timeout_s
        while time.monotonic() < limit:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.process.returncode}: {self.process.stderr.read().decode()}"
                                   f"\n{self.log_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on port {self.port} within {timeout_s} s\n{self.log_text()}")

    def stop(self) -> None:
        """Stop with SIGTERM, so that mosquitto writes its persistence file."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        if self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


DOCS = Path(__file__).resolve().parents[2] / "docs"


def fenced_block(document: str, first_line: str) -> str:
    """Return the body of the fenced code block of docs/<document> whose first line is `first_line`."""
    text = (DOCS / document).read_text()
    for block in text.split("```")[1::2]:
        body = block.split("\n", 1)[1] if "\n" in block else ""
        if body.startswith(first_line):
            return body
    raise AssertionError(f"docs/{document} has no code block starting with {first_line!r}")


def documented_acl() -> str:
    """The ACL of docs/broker.md: the fenced block that starts with '# edge-nas ACL'."""
    return fenced_block("broker.md", "# edge-nas ACL")


class FakeCoordinator:
    """A torch-free stand-in for the coordinator that replies to every request with fixed values.

    Each proxy value is `len(arch) + offset`, where the offset counts the results sent for that
    request id, so a second result differs from the first. `skip_first` ignores the first
    delivery of each request id; with `error`, the reply is an error result instead.
    """

    def __init__(self, settings, *, group: str = "fake", results_per_request: int = 1, skip_first: bool = False,
                 error: Optional[str] = None, client_id: str = "fake-coordinator") -> None:
        from cloud_sync import protocol
        from cloud_sync.client import create_mqtt_client

        self.protocol = protocol
        self.results_per_request = results_per_request
        self.skip_first = skip_first
        self.error = error
        self.received: List[str] = []
        self.subscribed = threading.Event()
        self.client = create_mqtt_client(client_id, settings)
        self.client.on_connect = lambda client, userdata, flags, reason, properties: client.subscribe(
            protocol.shared_request_filter(group), qos=1
        )
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.on_message = self._on_message
        address = settings.address
        self.client.connect(address.host, address.port, clean_start=True)
        self.client.loop_start()
        if not self.subscribed.wait(5):
            raise RuntimeError("the fake coordinator did not subscribe within 5 s")

    def _on_message(self, client, userdata, message) -> None:
        protocol = self.protocol
        request = protocol.decode_message(message.payload, expected_type=protocol.GRADIENT_REQUEST)
        request_id = request["request_id"]
        first = request_id not in self.received
        self.received.append(request_id)
        if first and self.skip_first:
            return
        topic = protocol.result_topic(request["device_id"])
        if self.error is not None:
            reply = protocol.gradient_error("fake-coordinator", request["device_id"], request_id, self.error)
            client.publish(topic, protocol.encode_message(reply), qos=1)
            return
        for offset in range(self.results_per_request):
            results = {
                arch: {name: {"value": float(len(arch) + offset), "valid": True, "seconds": 0.0} for name in request["proxies"]}
                for arch in request["archs"]
            }
            reply = protocol.gradient_result("fake-coordinator", request, results, {"source": "fake"},
                                             seconds=0.0, code_version="test")
            client.publish(topic, protocol.encode_message(reply), qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class RunningCoordinator:
    """`cloud_sync.coordinator.serve` on a thread of the test process, stopped by `close`.

    The coordinator (and with it torch) is imported only when one starts, so this module stays
    importable without torch.
    """

    def __init__(self, url, coordinator_id, **options):
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.result = {}
        self.thread = threading.Thread(
            target=self._run, args=(url, coordinator_id, options), name=f"coordinator-{coordinator_id}", daemon=True
        )
        self.thread.start()
        if not self.ready.wait(10):
            raise RuntimeError(f"coordinator {coordinator_id} did not subscribe within 10 s")

    def _run(self, url, coordinator_id, options):
        from cloud_sync.coordinator import serve

        self.result["coordinator"] = serve(
            url, coordinator_id=coordinator_id, stop=self.stop, ready=self.ready, threads=1,
            poll_interval_s=0.1, **options,
        )

    def close(self):
        self.stop.set()
        self.thread.join(10)
        return self.result.get("coordinator")
