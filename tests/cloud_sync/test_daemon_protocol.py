"""The device-command messages of the protocol: topics, commands, replies, job status, heartbeat. Imports nothing from torch."""
from __future__ import annotations

import json

import pytest

from cloud_sync import protocol
from cloud_sync.protocol import ProtocolError

JOB = {
    "job_id": "job-1", "origin": "command", "stage": "scoring", "state": "running", "created": 1.0, "updated": 2.0,
    "arguments": {"budget": 4}, "progress": {"candidates": {"done": 1, "total": 4}},
}


def _command(command="personalize", **arguments):
    return protocol.command_message("ops", "dev-1", command, "cmd-1", arguments)


def _round_trip(message):
    return protocol.decode_message(protocol.encode_message(message))


def test_device_topics():
    assert protocol.command_topic("dev-1") == "edge-nas/devices/dev-1/commands"
    assert protocol.reply_topic("dev-1") == "edge-nas/devices/dev-1/replies"
    assert protocol.job_topic("dev-1", "job-1") == "edge-nas/devices/dev-1/jobs/job-1"
    assert protocol.heartbeat_topic("dev-1") == "edge-nas/devices/dev-1/heartbeat"
    with pytest.raises(ProtocolError, match="invalid job id"):
        protocol.job_topic("dev-1", "a/b")


def test_command_round_trip():
    message = _command(data="photos", budget=4, constraints={"max_params": 800000, "max_latency_ms": 5})
    decoded = _round_trip(message)
    assert decoded["command"] == "personalize"
    assert decoded["arguments"]["constraints"] == {"max_params": 800000, "max_latency_ms": 5}
    assert len(protocol.command_message("ops", "dev-1", "status")["command_id"]) == 32  # a fresh UUID in hex


@pytest.mark.parametrize("changes, reason", [
    ({"command": "reboot"}, "unknown command 'reboot'; known commands: personalize, status, cancel"),
    ({"command_id": "a/b"}, "invalid command id"),
    ({"command_id": None}, "missing field 'command_id'"),
    ({"device_id": "dev+"}, "invalid device id"),
    ({"arguments": []}, "field 'arguments' must be dict"),
    ({"arguments": {"budgett": 4}}, "unknown personalize argument 'budgett'"),
    ({"arguments": {"budget": "4"}}, "field 'budget' must be int"),
    ({"arguments": {"budget": 0}}, "field 'budget' must be between 1 and 100000"),
    ({"arguments": {"budget": True}}, "field 'budget' must be int"),
    ({"arguments": {"finalists": 1000}}, "field 'finalists' must be between 1 and 256"),
    ({"arguments": {"batch_size": 1}}, "field 'batch_size' must be between 2 and 1024"),
    ({"arguments": {"data": ""}}, "argument 'data' must hold 1 to 4096 characters"),
    ({"arguments": {"space": "nb/201"}}, "invalid search space name"),
    ({"arguments": {"width_mult": 9}}, "argument 'width_mult' must be above 0 and at most 4"),
    ({"arguments": {"constraints": {"max_params": 1.5}}}, "field 'max_params' must be int"),
    ({"arguments": {"constraints": {"max_latency_ms": -2}}}, "constraint 'max_latency_ms' must be a positive number"),
    ({"arguments": {"constraints": {"max_weight": 2}}}, "unknown constraint 'max_weight'"),
])
def test_invalid_command_raises_with_reason(changes, reason):
    message = _command()
    for name, value in changes.items():
        if value is None:
            del message[name]
        else:
            message[name] = value
    with pytest.raises(ProtocolError) as caught:
        protocol.validate_message(message)
    assert reason in str(caught.value)


def test_status_and_cancel_take_only_job_id():
    protocol.validate_message(_command("cancel", job_id="job-1"))
    protocol.validate_message(_command("status"))
    with pytest.raises(ProtocolError, match="unknown cancel argument 'force'"):
        protocol.validate_message(_command("cancel", force=True))
    with pytest.raises(ProtocolError, match="invalid job id"):
        protocol.validate_message(_command("status", job_id="../x"))


def test_reply_round_trip_and_checks():
    reply = protocol.reply_message("dev-1", "cmd-1", "personalize", "accepted", job=JOB)
    assert _round_trip(reply)["job"]["state"] == "running"
    error = protocol.reply_message("dev-1", "cmd-1", "reboot", "error", error="x" * 5000)
    assert len(_round_trip(error)["error"]) == protocol.MAX_REASON_CHARS
    without_reason = dict(error)
    del without_reason["error"]
    with pytest.raises(ProtocolError, match="missing field 'error'"):
        protocol.validate_message(without_reason)
    with pytest.raises(ProtocolError, match="field 'status' must be one of accepted, ok, error"):
        protocol.validate_message(dict(reply, status="maybe"))
    with pytest.raises(ProtocolError, match="at most 50 jobs"):
        protocol.validate_message(dict(reply, jobs=[JOB] * 51))


@pytest.mark.parametrize("changes, reason", [
    ({"stage": "training"}, "job field 'stage' must be one of queued"),
    ({"state": "paused"}, "job field 'state' must be one of queued"),
    ({"state": "done"}, "missing field 'result'"),
    ({"state": "failed"}, "missing field 'error'"),
    ({"created": -1}, "job field 'created' must be a non-negative UNIX time"),
    ({"job_id": ""}, "invalid job id"),
])
def test_invalid_job_raises_with_reason(changes, reason):
    message = protocol.job_status_message("dev-1", dict(JOB, **changes))
    with pytest.raises(ProtocolError) as caught:
        protocol.validate_message(message)
    assert reason in str(caught.value)


def test_status_may_carry_job_and_stopping():
    decoded = _round_trip(protocol.status_message("dev-1", "stopping", JOB))
    assert decoded["state"] == "stopping"
    assert decoded["job"]["job_id"] == "job-1"
    with pytest.raises(ProtocolError, match="field 'state' must be one of online, stopping, offline"):
        protocol.validate_message(protocol.status_message("dev-1", "asleep"))


def test_heartbeat_needs_each_reading_or_reason():
    telemetry = {
        "power": {"available": False, "reason": "jetson-stats (jtop) is not installed"},
        "temperatures": {"available": True, "celsius": {"CPU-therm": 40.0}},
        "cpu": {"available": True, "busy_percent": None},
        "gpu": {"available": False, "reason": "no GPU"},
    }
    decoded = _round_trip(protocol.heartbeat_message("dev-1", 12.0, 30.0, telemetry))
    assert decoded["telemetry"]["power"]["available"] is False
    for broken, reason in (
        (dict(telemetry, gpu={"available": False}), "telemetry 'gpu' is unavailable, so it needs a 'reason' string"),
        (dict(telemetry, cpu={"busy_percent": 3}), "telemetry 'cpu' needs a boolean 'available'"),
        ({name: value for name, value in telemetry.items() if name != "power"}, "missing field 'power'"),
    ):
        with pytest.raises(ProtocolError) as caught:
            protocol.validate_message(protocol.heartbeat_message("dev-1", 12.0, 30.0, broken))
        assert reason in str(caught.value)


def test_nan_in_telemetry_is_rejected():
    telemetry = {name: {"available": False, "reason": "absent"} for name in ("power", "temperatures", "cpu", "gpu")}
    telemetry["cpu"] = {"available": True, "busy_percent": float("nan")}
    with pytest.raises(ProtocolError, match="cannot be written as JSON"):
        protocol.encode_message(protocol.heartbeat_message("dev-1", 1.0, 30.0, telemetry))
    payload = json.dumps(protocol.heartbeat_message("dev-1", 1.0, 30.0, telemetry)).encode()
    with pytest.raises(ProtocolError, match="NaN is not allowed"):
        protocol.decode_message(payload)
