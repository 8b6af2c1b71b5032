"""sd_notify over a real unix socket, the logfmt lines for journald, and the heartbeat's telemetry on a fake /sys."""
from __future__ import annotations

import logging
import os
import socket

import pytest

from edge_runtime.daemon_systemd import LogfmtFormatter, SystemdNotifier
from edge_runtime.daemon_telemetry import Telemetry
from edge_runtime.power import SysfsPowerMeter, UnavailableMeter


@pytest.fixture
def notify_socket(tmp_path):
    """A datagram socket standing in for systemd's notify socket."""
    path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.settimeout(2.0)
    yield path, receiver
    receiver.close()


def test_notifier_sends_each_message(notify_socket):
    path, receiver = notify_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(path)})
    assert notifier.ready("serving device dev-1")
    assert receiver.recv(4096) == b"READY=1\nSTATUS=serving device dev-1"
    assert notifier.watchdog()
    assert receiver.recv(4096) == b"WATCHDOG=1"
    assert notifier.status("job 1: running")
    assert receiver.recv(4096) == b"STATUS=job 1: running"
    assert notifier.stopping("stopping")
    assert receiver.recv(4096) == b"STOPPING=1\nSTATUS=stopping"
    notifier.close()


def test_notifier_reaches_abstract_socket():
    name = f"edge-nas-test-{os.getpid()}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0" + name)
    receiver.settimeout(2.0)
    try:
        assert SystemdNotifier({"NOTIFY_SOCKET": "@" + name}).ready("up")
        assert receiver.recv(4096).startswith(b"READY=1")
    finally:
        receiver.close()


def test_notifier_without_systemd_does_nothing():
    notifier = SystemdNotifier({})
    assert not notifier.enabled
    assert notifier.ready("up") is False
    assert notifier.watchdog_interval_s is None


def test_notifier_survives_vanished_socket(tmp_path, caplog):
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.watchdog() is False
    assert "sending WATCHDOG to systemd failed" in caplog.text


@pytest.mark.parametrize("environ, interval", [
    ({"WATCHDOG_USEC": "20000000"}, 10.0),
    ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid())}, 10.0),
    ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}, None),  # the watchdog is another process's
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
])
def test_watchdog_interval_is_half_timeout(environ, interval):
    assert SystemdNotifier(environ).watchdog_interval_s == interval


def _record(message, level=logging.WARNING, exc_info=None):
    return logging.LogRecord("edge_runtime.daemon", level, __file__, 1, message, (), exc_info)


def test_logfmt_quotes_only_when_needed():
    line = LogfmtFormatter().format(_record('job 7 failed: bad "data"\nsecond line'))
    assert line.startswith("ts=")
    assert ' level=warning logger=edge_runtime.daemon msg="job 7 failed: bad \\"data\\"\\nsecond line"' in line
    assert "\n" not in line
    assert LogfmtFormatter(journald=True).format(_record("ok", logging.INFO)).endswith("msg=ok")


def test_journald_lines_carry_priority():
    formatter = LogfmtFormatter(journald=True)
    assert formatter.format(_record("x", logging.ERROR)).startswith("<3>level=error ")
    assert formatter.format(_record("x", logging.INFO)).startswith("<6>level=info ")
    assert formatter.format(_record("x", logging.DEBUG)).startswith("<7>")


def test_logfmt_keeps_traceback_on_one_line():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        line = LogfmtFormatter().format(_record("job failed", logging.ERROR, sys.exc_info()))
    assert "\n" not in line
    assert 'error="Traceback' in line
    assert "ValueError: boom" in line


# Telemetry -------------------------------------------------------------------------------


def _fake_jetson(root):
    """A /sys and /proc with one INA3221 rail, two thermal zones and a GPU load file."""
    hwmon = root / "sys" / "class" / "hwmon" / "hwmon1"
    hwmon.mkdir(parents=True)
    for name, text in {"name": "ina3221", "in1_label": "VDD_IN", "in1_input": "5000", "curr1_input": "1200",
                       "in2_label": "VDD_CPU_GPU_CV", "in2_input": "5000", "curr2_input": "400"}.items():
        (hwmon / name).write_text(text)
    for index, (kind, millidegrees) in enumerate((("CPU-therm", "41500"), ("GPU-therm", "39000"))):
        zone = root / "sys" / "class" / "thermal" / f"thermal_zone{index}"
        zone.mkdir(parents=True)
        (zone / "type").write_text(kind)
        (zone / "temp").write_text(millidegrees)
    gpu = root / "sys" / "class" / "devfreq" / "17000000.ga10b" / "device"
    gpu.mkdir(parents=True)
    (gpu / "load").write_text("275\n")
    (root / "proc").mkdir()
    (root / "proc" / "stat").write_text("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3 4\n")


def test_telemetry_reads_fake_jetson(tmp_path):
    _fake_jetson(tmp_path)
    telemetry = Telemetry(SysfsPowerMeter.discover(tmp_path / "sys"), root=tmp_path)
    reading = telemetry.read()
    power = reading["power"]
    assert power["available"] is True
    assert power["rails_w"] == pytest.approx({"VDD_IN": 6.0, "VDD_CPU_GPU_CV": 2.0})  # mV x mA / 1e6
    assert power["total_w"] == pytest.approx(6.0)  # the board input rail, not the sum
    assert reading["temperatures"] == {"available": True, "celsius": {"CPU-therm": 41.5, "GPU-therm": 39.0}}
    assert reading["gpu"]["load_percent"] == 27.5  # tenths of a percent
    assert reading["cpu"]["busy_percent"] is None  # no earlier reading to compare with
    # 100 more busy jiffies (user) and 100 more idle ones: half of the time was busy.
    (tmp_path / "proc" / "stat").write_text("cpu  200 0 100 800 100 0 0 0 0 0\n")
    assert telemetry.cpu()["busy_percent"] == 50.0


def test_telemetry_marks_missing_sources_unavailable(tmp_path):
    telemetry = Telemetry(UnavailableMeter("jetson-stats (jtop) is not installed"), root=tmp_path)
    reading = telemetry.read()
    assert reading["power"] == {"available": False, "reason": "jetson-stats (jtop) is not installed"}
    for name in ("temperatures", "cpu", "gpu"):
        assert reading[name]["available"] is False
        assert reading[name]["reason"]
