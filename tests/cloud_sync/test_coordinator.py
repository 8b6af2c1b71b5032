"""The coordinator against a real broker: requests computed end to end, shared, retried and survived."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cloud_sync import protocol
from cloud_sync.client import BrokerSettings, CloudResult, CloudClient, CloudFallback, CloudGradientSource, create_mqtt_client
from cloud_sync.coordinator import Coordinator
from edge_runtime.cli_cloud import cloud
from models.errors import EdgeNasError
from models.proxies.scoring import score_architecture
from models.spaces import get_space

from broker_support import free_port

ARCHS = [
    "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_1x1~1|nor_conv_3x3~2|",
    "|avg_pool_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|nor_conv_1x1~0|skip_connect~1|skip_connect~2|",
    "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|",
]
PROXIES = ["grad_norm", "snip"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread in the test's own thread too: the coordinators here set it only in theirs,
    and spinning OpenMP threads on a busy two-core machine slow a tiny network down a hundredfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _probe(count=6, size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, size, size, generator=generator), torch.arange(count) % 10


def _request(client, archs=ARCHS, share="raw", seed=0, timeout_s=15.0):
    inputs, labels = _probe()
    data = protocol.describe_raw(inputs.numpy(), labels.numpy(), 10) if share == "raw" else protocol.describe_none(10)
    return client.request_gradients(
        "nb201", archs, PROXIES, data, num_classes=10, input_size=16, seed=seed, batch_size=6, timeout_s=timeout_s
    )


def _local_values(archs, seed=0):
    """What the device would compute itself on the same probe batch."""
    inputs, labels = _probe()
    space = get_space("nb201", num_classes=10, input_size=16)
    values = {}
    for text in archs:
        row = score_architecture(space, space.parse(text), inputs, labels, PROXIES, seed=seed)
        values[text] = {name: result.value for name, result in row.items()}
    return values


@pytest.mark.broker
def test_request_computed_end_to_end(broker, start_coordinator, tmp_path):
    start_coordinator(broker.url)
    with CloudClient(broker.url, device_id="dev-1", state_dir=tmp_path) as client:
        outcome = _request(client)
    assert isinstance(outcome, CloudResult)
    assert outcome.coordinator == "coord-a"
    assert outcome.probe["source"] == "raw"
    # A raw share is the device's own probe batch, so the cloud computes what the device would.
    expected = _local_values(ARCHS)
    for arch in ARCHS[:2]:
        for name in PROXIES:
            assert outcome.values[arch][name] == pytest.approx(expected[arch][name], rel=1e-5)
    # The third architecture has no path from input to output: invalid, with the reason.
    assert outcome.values[ARCHS[2]] == {"grad_norm": None, "snip": None}
    assert "no path" in outcome.results[ARCHS[2]]["grad_norm"]["reason"]


@pytest.mark.broker
def test_summary_and_none_shares_are_computed(broker, start_coordinator, tmp_path):
    start_coordinator(broker.url)
    inputs, labels = _probe()
    summary = protocol.describe_summary(inputs.numpy(), labels.numpy(), 10)
    with CloudClient(broker.url, device_id="dev-1", state_dir=tmp_path) as client:
        outcomes = {}
        for share, data in (("summary", summary), ("none", protocol.describe_none(10))):
            outcomes[share] = client.request_gradients(
                "nb201", ARCHS[:1], PROXIES, data, num_classes=10, input_size=16, batch_size=4, timeout_s=15
            )
    assert outcomes["summary"].probe["source"] == "summary"
    assert outcomes["summary"].probe["batch_size"] == 4
    assert outcomes["none"].probe["source"] == "gaussian"
    for outcome in outcomes.values():
        assert outcome.values[ARCHS[0]]["grad_norm"] > 0


@pytest.mark.broker
def test_none_share_uses_coordinator_data(broker, start_coordinator, tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "probe.npz"
    np.savez(data, x=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8), y=np.arange(8) % 4)
    start_coordinator(broker.url, data=str(data))
    with CloudClient(broker.url, device_id="dev-1", state_dir=tmp_path) as client:
        outcome = client.request_gradients(
            "nb201", ARCHS[:1], PROXIES, protocol.describe_none(10), num_classes=10, input_size=16,
            batch_size=4, timeout_s=15,
        )
    assert outcome.probe["source"] == "coordinator_data"
    assert outcome.values[ARCHS[0]]["grad_norm"] > 0


@pytest.mark.broker
def test_unknown_proxy_gets_error_result(broker, start_coordinator, tmp_path):
    start_coordinator(broker.url)
    with CloudClient(broker.url, device_id="dev-1", state_dir=tmp_path) as client:
        started = time.monotonic()
        outcome = client.request_gradients(
            "nb201", ARCHS[:1], ["no_such_proxy"], protocol.describe_none(10), num_classes=10, input_size=16,
            batch_size=4, timeout_s=15,
        )
    assert isinstance(outcome, CloudFallback)
    assert "unknown proxy 'no_such_proxy'" in outcome.reason
    assert time.monotonic() - started < 5


@pytest.mark.broker
def test_two_coordinators_share_twenty_requests(broker, start_coordinator, tmp_path):
    first = start_coordinator(broker.url, "coord-a")
    second = start_coordinator(broker.url, "coord-b")
    # A bystander counts every result message that the coordinators publish.
    results = []
    bystander = create_mqtt_client("bystander", BrokerSettings(broker.url))
    bystander.on_message = lambda client, userdata, message: results.append(json.loads(message.payload)["request_id"])
    bystander.connect("127.0.0.1", broker.port)
    bystander.loop_start()
    bystander.subscribe(protocol.result_topic("dev-1"), qos=1)
    time.sleep(0.2)

    with CloudClient(broker.url, device_id="dev-1", state_dir=tmp_path, resend_interval_s=60) as client:
        assert client.connect()
        request_ids = [
            client.submit("nb201", [ARCHS[seed % 2]], ["grad_norm"], protocol.describe_none(10), num_classes=10,
                          input_size=16, seed=seed, batch_size=4, timeout_s=60)
            for seed in range(20)
        ]
        outcomes = client.wait(request_ids, 40)
    time.sleep(0.3)
    bystander.disconnect()
    bystander.loop_stop()
    served = [first.close(), second.close()]

    assert len(set(request_ids)) == 20
    assert all(isinstance(outcome, CloudResult) for outcome in outcomes.values())
    assert sorted(results) == sorted(request_ids)  # exactly one result per request
    assert served[0].computed + served[1].computed == 20
    assert served[0].computed > 0
    assert served[1].computed > 0
    assert {outcome.coordinator for outcome in outcomes.values()} == {"coord-a", "coord-b"}


@pytest.mark.broker
def test_repeated_request_gets_stored_result(broker, start_coordinator, tmp_path):
    running = start_coordinator(broker.url)
    body = protocol.request_body("nb201", 10, 16, ARCHS[:1], ["grad_norm"], protocol.describe_none(10), batch_size=4)
    request_id = protocol.make_request_id("dev-1", body)
    replies = []
    device = create_mqtt_client("dev-1", BrokerSettings(broker.url))
    device.on_message = lambda client, userdata, message: replies.append(json.loads(message.payload))
    device.connect("127.0.0.1", broker.port)
    device.loop_start()
    device.subscribe(protocol.result_topic("dev-1"), qos=1)
    time.sleep(0.2)
    for _ in range(2):
        message = protocol.gradient_request("dev-1", request_id, body, deadline=None)
        device.publish(protocol.request_topic("dev-1"), protocol.encode_message(message), qos=1)
    limit = time.monotonic() + 10
    while len(replies) < 2 and time.monotonic() < limit:
        time.sleep(0.05)
    device.disconnect()
    device.loop_stop()
    coordinator = running.close()
    assert len(replies) == 2
    assert replies[0] == replies[1]  # the stored result, message id included
    assert coordinator.computed == 1
    assert coordinator.repeated == 1


@pytest.mark.broker
def test_broker_restart_mid_job(broker, start_coordinator, tmp_path):
    start_coordinator(broker.url)
    with CloudClient(broker.url, device_id="dev-1", state_dir=tmp_path, resend_interval_s=2) as client:
        assert client.connect()
        request_ids = [
            client.submit("nb201", ARCHS[:2], ["grad_norm"], protocol.describe_none(10), num_classes=10,
                          input_size=16, seed=seed, batch_size=4, timeout_s=60)
            for seed in range(10)
        ]
        first = client.wait(request_ids[:1], 15)[request_ids[0]]
        assert isinstance(first, CloudResult)
        broker.stop()
        client.pump(0.3)  # take in whatever arrived before the stop
        results_before_stop = sum(client.outbox.result(request_id) is not None for request_id in request_ids)
        time.sleep(0.5)
        broker.start()
        outcomes = client.wait(request_ids, 30)
    assert results_before_stop < len(request_ids)
    assert all(isinstance(outcome, CloudResult) for outcome in outcomes.values()), outcomes


@pytest.mark.broker
def test_killed_coordinator_request_completed_by_other(broker, start_coordinator, tmp_path):
    """The device re-sends the request that died with its coordinator, and another worker computes it."""
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    code = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
        "from edge_runtime.cli_cloud import cloud\n"
        "cloud(['serve', '--broker', sys.argv[1], '--id', 'coord-doomed', '--threads', '1'])\n"
    )
    doomed = subprocess.Popen([sys.executable, "-c", code, broker.url], cwd=REPO, env=environment,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_line(doomed, "coordinator coord-doomed connected", 30)
        archs = _distinct_archs(16)  # enough work that the kill lands while it computes
        with CloudClient(broker.url, device_id="dev-1", state_dir=tmp_path, resend_interval_s=1.0) as client:
            assert client.connect()
            request_id = client.submit("nb201", archs, PROXIES, protocol.describe_none(10), num_classes=10,
                                       input_size=16, batch_size=6, timeout_s=60)
            _wait_for_line(doomed, f"computing request {request_id}", 15)
            doomed.kill()
            doomed.wait(10)
            start_coordinator(broker.url, "coord-b")
            outcome = client.wait([request_id], 30)[request_id]
    finally:
        if doomed.poll() is None:
            doomed.kill()
            doomed.wait(10)
        doomed.stderr.close()
    assert isinstance(outcome, CloudResult)
    assert outcome.coordinator == "coord-b"
    assert outcome.sends >= 2


def _distinct_archs(count):
    import random

    space = get_space("nb201", num_classes=10, input_size=16)
    rng = random.Random(0)
    archs = []
    while len(archs) < count:
        text = space.to_string(space.sample(rng))
        if text not in archs:
            archs.append(text)
    return archs


def _wait_for_line(process, text, timeout_s):
    """Read the process's stderr until a line contains `text`; fail with what it wrote otherwise."""
    seen = []
    result = {}

    def read():
        for line in process.stderr:
            seen.append(line)
            if text in line:
                result["found"] = True
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout_s)
    if not result:
        raise AssertionError(f"no line with {text!r} within {timeout_s} s; stderr:\n{''.join(seen)}")


@pytest.mark.broker
def test_invalid_payloads_dropped_and_serving_continues(broker, start_coordinator, tmp_path):
    running = start_coordinator(broker.url)
    valid_body = protocol.request_body("nb201", 10, 16, ARCHS[:1], ["grad_norm"], protocol.describe_none(10), batch_size=4)
    valid = protocol.encode_message(
        protocol.gradient_request("dev-1", protocol.make_request_id("dev-1", valid_body), valid_body, deadline=None)
    )
    wrong_version = json.loads(valid)
    wrong_version["schema"] = 99
    wrong_device = json.loads(valid)
    wrong_device["device_id"] = "dev-2"
    wrong_type = json.loads(valid)
    wrong_type["archs"] = "not a list"
    invalid_payloads = [
        b"",
        b"not json at all",
        valid[: len(valid) // 2],  # truncated
        b"{" + b" " * (protocol.MAX_MESSAGE_BYTES + 10) + b"}",  # oversized
        json.dumps(wrong_version).encode(),
        json.dumps(wrong_device).encode(),  # names another device than its topic
        json.dumps(wrong_type).encode(),
        b"\xff\xfe\x00",
    ]
    publisher = create_mqtt_client("intruder", BrokerSettings(broker.url))
    publisher.connect("127.0.0.1", broker.port)
    publisher.loop_start()
    for payload in invalid_payloads:
        publisher.publish(protocol.request_topic("dev-1"), payload, qos=1).wait_for_publish(timeout=10)
    publisher.disconnect()
    publisher.loop_stop()

    with CloudClient(broker.url, device_id="dev-1", state_dir=tmp_path) as client:
        outcome = _request(client, archs=ARCHS[:1])
    coordinator = running.close()
    assert isinstance(outcome, CloudResult)
    assert coordinator.drops.total == len(invalid_payloads)
    assert coordinator.computed == 1


def test_coordinator_handle_drops_without_broker():
    coordinator = Coordinator("coord-a")
    body = protocol.request_body("nb201", 10, 16, ARCHS[:1], ["grad_norm"], protocol.describe_none(10), batch_size=4)
    message = protocol.gradient_request("dev-1", protocol.make_request_id("dev-1", body), body, deadline=None)
    payload = protocol.encode_message(message)
    assert coordinator.handle("edge-nas/devices/dev-1/status", payload) is None
    assert coordinator.handle("edge-nas/devices/dev-2/requests", payload) is None
    assert coordinator.drops.total == 2
    topic, reply = coordinator.handle("edge-nas/devices/dev-1/requests", payload)
    assert topic == "edge-nas/devices/dev-1/results"
    assert protocol.decode_message(reply)["status"] == "ok"


def test_coordinator_rejects_invalid_architecture():
    coordinator = Coordinator("coord-a")
    body = protocol.request_body("nb201", 10, 16, ["|bogus~0|"], ["grad_norm"], protocol.describe_none(10), batch_size=4)
    message = protocol.gradient_request("dev-1", protocol.make_request_id("dev-1", body), body, deadline=None)
    _, reply = coordinator.handle("edge-nas/devices/dev-1/requests", protocol.encode_message(message))
    decoded = protocol.decode_message(reply)
    assert decoded["status"] == "error"
    assert "bogus" in decoded["error"]


def _calibration_csv(path, accuracies):
    """Rows whose fgnas_gi ranks like the accuracies and whose other columns are noise."""
    rng = np.random.default_rng(len(accuracies))
    lines = ["arch,accuracy,fgnas_fc,fgnas_gi,fgnas_gc,params"]
    for index, accuracy in enumerate(accuracies):
        noise = rng.standard_normal(3)
        lines.append(f"{ARCHS[index % 2]}-{index},{accuracy},{noise[0]:.4f},{accuracy / 10:.4f},{noise[1]:.4f},{noise[2]:.4f}")
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.broker
def test_calibration_aggregator_published_and_refitted(broker, start_coordinator, tmp_path):
    from models.aggregation import Aggregator

    calibration = tmp_path / "calibration.csv"
    _calibration_csv(calibration, [90.0, 80.0, 70.0, 60.0, 85.0, 75.0])
    start_coordinator(broker.url, calibration=str(calibration))
    with CloudClient(broker.url, device_id="dev-1", state_dir=tmp_path / "device") as client:
        path = client.fetch_aggregator("nb201", timeout_s=5)
        assert path is not None
        first = Aggregator.load(path, space="nb201")
        assert len(first.calibration_archs) == 6
        first_version = client.aggregators.metadata("nb201")["version"]

        _calibration_csv(calibration, [90.0, 80.0, 70.0, 60.0, 85.0, 75.0, 65.0, 55.0])
        limit = time.monotonic() + 10
        while time.monotonic() < limit and client.aggregators.metadata("nb201")["version"] == first_version:
            client.pump(0.2)
        metadata = client.aggregators.metadata("nb201")
    assert metadata["version"] > first_version
    assert metadata["calibration"]["rows"] == 8
    assert len(Aggregator.load(path, space="nb201").calibration_archs) == 8


def test_calibration_file_errors(tmp_path):
    from cloud_sync.coordinator import fit_calibration_file

    cases = [
        ("arch,grad_norm\na,1\n", "has no column accuracy"),
        ("arch,accuracy\n", "has no rows"),
        ("arch,accuracy,fgnas_fc\na,high,1\n", "accuracy 'high' is not a number"),
        ("arch,accuracy,fgnas_fc\na,1,1\nb,2,2\nc,3,3\n", "missing"),
    ]
    for index, (text, message) in enumerate(cases):
        path = tmp_path / f"calibration{index}.csv"
        path.write_text(text)
        with pytest.raises(EdgeNasError, match=message):
            fit_calibration_file(path)


@pytest.mark.broker
def test_gradient_source_for_personalize(broker, start_coordinator, tmp_path):
    from edge_runtime.personalize import GradientRequest, LocalGradientSource
    from edge_runtime.scoring import ScoringProtocol

    start_coordinator(broker.url)
    inputs, labels = _probe()
    space = get_space("nb201", num_classes=10, input_size=16)
    scoring = ScoringProtocol(space="nb201", num_classes=10, input_size=16, data_hash="h", batch_size=6, seed=0)
    request = GradientRequest(space=space, archs=ARCHS[:2], proxies=PROXIES, protocol=scoring,
                              inputs=inputs, labels=labels, progress=False)

    source = CloudGradientSource(broker.url, device_id="dev-1", state_dir=tmp_path, share="raw", timeout_s=15)
    results = source(request)
    assert source.name == "cloud"
    local = LocalGradientSource()(request)
    for arch in ARCHS[:2]:
        for name in PROXIES:
            assert results[arch][name].valid
            assert results[arch][name].value == pytest.approx(local[arch][name].value, rel=1e-5)

    unreachable = CloudGradientSource(f"mqtt://127.0.0.1:{free_port()}", device_id="dev-1",
                                      state_dir=tmp_path, timeout_s=15)
    fallback = unreachable(request)
    assert unreachable.name == "local"
    assert isinstance(unreachable.outcome, CloudFallback)
    assert unreachable.outcome.elapsed_s < 5
    assert fallback[ARCHS[0]]["grad_norm"].value == pytest.approx(local[ARCHS[0]]["grad_norm"].value)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["serve", "--broker", "http://127.0.0.1:1"], "mqtt:// or mqtts://"),
        (["serve", "--broker", "mqtt://127.0.0.1:1", "--group", "a/b"], "invalid group"),
        (["serve", "--broker", "mqtt://127.0.0.1:1", "--calibration", "/nonexistent.csv"], "calibration file not found"),
        (["serve", "--broker", "mqtt://127.0.0.1:1", "--data", "/nonexistent.npz"], "data not found"),
        (["serve", "--broker", "mqtt://127.0.0.1:1", "--threads", "0"], "--threads must be at least 1"),
    ],
)
def test_cli_serve_errors_are_one_line(arguments, message):
    result = CliRunner().invoke(cloud, arguments)
    assert result.exit_code == 1
    assert message in result.output
    assert result.output.count("\n") == 1
    assert result.output.startswith("error: ")


@pytest.mark.broker
def test_personalize_takes_gradient_proxies_from_cloud(broker, start_coordinator, tmp_path):
    from edge_runtime.data import load_dataset
    from edge_runtime.measure import MeasureSettings
    from edge_runtime.personalize import personalize

    start_coordinator(broker.url)
    dataset = load_dataset("sklearn-digits")
    source = CloudGradientSource(broker.url, device_id="dev-1", state_dir=tmp_path / "state", share="summary",
                                 dataset=dataset, summary_images=64, timeout_s=60)
    result = personalize(
        dataset, tmp_path / "out", budget=2, finalists=1, batch_size=8, seed=0, cache=tmp_path / "cache.sqlite",
        gradient_source=source, progress=False, measure=MeasureSettings(warmup_runs=1, runs=3),
    )
    subnet = json.loads((tmp_path / "out" / "subnet.json").read_text())
    assert isinstance(source.outcome, CloudResult)
    assert source.outcome.probe["source"] == "summary"
    assert subnet["gradient_source"] == "cloud"
    for name in source.outcome.values[result.chosen.arch]:
        assert subnet["proxies"][name]["value"] == pytest.approx(source.outcome.values[result.chosen.arch][name])


def test_reused_request_id_with_other_content_is_computed():
    coordinator = Coordinator("coord-a")
    good = protocol.request_body("nb201", 10, 16, ARCHS[:1], ["grad_norm"], protocol.describe_none(10), batch_size=4)
    bad = protocol.request_body("nb201", 10, 16, ["|bogus~0|"], ["grad_norm"], protocol.describe_none(10), batch_size=4)
    request_id = protocol.make_request_id("dev-1", bad)
    for body in (bad, good):
        message = protocol.gradient_request("dev-1", request_id, body, deadline=None)
        _, reply = coordinator.handle("edge-nas/devices/dev-1/requests", protocol.encode_message(message))
    assert protocol.decode_message(reply)["status"] == "ok"
    assert coordinator.computed == 2
    assert coordinator.repeated == 0


def test_deeply_nested_request_is_dropped():
    coordinator = Coordinator("coord-a")
    payload = b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}"
    assert coordinator.handle("edge-nas/devices/dev-1/requests", payload) is None
    assert coordinator.drops.total == 1
