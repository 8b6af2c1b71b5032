"""The device client against a real broker and a torch-free fake coordinator. Imports nothing from torch."""
from __future__ import annotations

import json
import logging
import socket
import time
from dataclasses import replace

import numpy as np
import pytest

from cloud_sync import protocol
from cloud_sync.client import (
    BrokerSettings,
    CloudClient,
    CloudFallback,
    CloudGradientSource,
    CloudResult,
    create_mqtt_client,
    default_state_dir,
    describe_data,
    fitting_raw_images,
    fitting_summary_components,
)
from models.aggregation import Aggregator, label_free_aggregator
from models.errors import EdgeNasError

from broker_support import documented_acl, free_port

ARCHS = [
    "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_1x1~1|nor_conv_3x3~2|",
    "|avg_pool_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|nor_conv_1x1~0|skip_connect~1|skip_connect~2|",
]
PROXIES = ["grad_norm", "snip"]


def _request(client, timeout_s=10.0, seed=0, archs=ARCHS):
    return client.request_gradients(
        "nb201", archs, PROXIES, protocol.describe_none(10), num_classes=10, input_size=16,
        seed=seed, batch_size=4, timeout_s=timeout_s,
    )


def _publisher(broker, client_id="test-publisher"):
    client = create_mqtt_client(client_id, BrokerSettings(broker.url))
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    return client


def _publish(client, topic, payload, retain=False):
    client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(timeout=5)


@pytest.mark.broker
def test_request_gets_coordinator_result(broker, fake_coordinator, tmp_path):
    fake_coordinator(BrokerSettings(broker.url))
    with CloudClient(broker.url, device_id="dev-1", state_dir=tmp_path) as client:
        outcome = _request(client)
    assert isinstance(outcome, CloudResult)
    assert outcome.values == {arch: {name: float(len(arch)) for name in PROXIES} for arch in ARCHS}
    assert outcome.coordinator == "fake-coordinator"
    assert outcome.sends == 1
    assert 0 < outcome.round_trip_s < 10
    assert not outcome.from_outbox


@pytest.mark.broker
def test_first_result_is_kept(broker, fake_coordinator, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="cloud_sync.client")
    fake_coordinator(BrokerSettings(broker.url), results_per_request=2)
    with CloudClient(broker.url, device_id="dev-1", state_dir=tmp_path) as client:
        outcome = _request(client)
        _pump_until(client, lambda: "ignoring a later result" in caplog.text)
        stored = client.outbox.result(outcome.request_id)
    assert outcome.values[ARCHS[0]]["grad_norm"] == float(len(ARCHS[0]))
    assert stored["results"][ARCHS[0]]["grad_norm"]["value"] == float(len(ARCHS[0]))


@pytest.mark.broker
def test_request_resent_with_same_id(broker, fake_coordinator, tmp_path):
    fake = fake_coordinator(BrokerSettings(broker.url), skip_first=True)
    with CloudClient(broker.url, device_id="dev-1", state_dir=tmp_path, resend_interval_s=0.5) as client:
        outcome = _request(client)
    assert isinstance(outcome, CloudResult)
    assert outcome.sends == 2
    assert fake.received == [outcome.request_id, outcome.request_id]


@pytest.mark.broker
def test_outbox_survives_device_restart(broker, fake_coordinator, tmp_path):
    with CloudClient(broker.url, device_id="dev-1", state_dir=tmp_path) as first:
        assert first.connect()
        request_id = first.submit(
            "nb201", ARCHS, PROXIES, protocol.describe_none(10), num_classes=10, input_size=16,
            batch_size=4, timeout_s=60,
        )
        first.pump(0.3)  # the request reaches the broker, where no coordinator listens yet
    fake = fake_coordinator(BrokerSettings(broker.url))

    with CloudClient(broker.url, device_id="dev-1", state_dir=tmp_path) as second:
        outcome = second.wait([request_id], 10)[request_id]
        assert isinstance(outcome, CloudResult)
        assert fake.received[0] == request_id
        # The same request made again after the restart gets its result from the outbox.
        again = _request(second, timeout_s=0.5)
    assert isinstance(again, CloudResult)
    assert again.request_id == request_id
    assert again.from_outbox


@pytest.mark.broker
def test_result_waits_at_broker_while_device_offline(broker, tmp_path):
    """The persistent session: a result published while the device is away reaches it on reconnect."""
    with CloudClient(broker.url, device_id="dev-1", state_dir=tmp_path) as first:
        assert first.connect()
        request_id = first.submit(
            "nb201", ARCHS, PROXIES, protocol.describe_none(10), num_classes=10, input_size=16,
            batch_size=4, timeout_s=60,
        )
        first.pump(0.3)
        body = protocol.request_body("nb201", 10, 16, ARCHS, PROXIES, protocol.describe_none(10), batch_size=4)
    request = protocol.gradient_request("dev-1", request_id, body, deadline=None)
    results = {arch: {name: {"value": 7.0, "valid": True} for name in PROXIES} for arch in ARCHS}
    reply = protocol.gradient_result("coord-offline", request, results, {"source": "test"}, seconds=0.0, code_version="t")
    publisher = _publisher(broker)
    _publish(publisher, protocol.result_topic("dev-1"), protocol.encode_message(reply))
    publisher.disconnect()
    publisher.loop_stop()

    with CloudClient(broker.url, device_id="dev-1", state_dir=tmp_path, resend_interval_s=60) as second:
        outcome = second.wait([request_id], 5)[request_id]
    assert isinstance(outcome, CloudResult)
    assert outcome.coordinator == "coord-offline"
    assert outcome.values[ARCHS[0]]["grad_norm"] == 7.0


@pytest.mark.broker
def test_deadline_without_coordinator_gives_fallback(broker, tmp_path):
    with CloudClient(broker.url, device_id="dev-1", state_dir=tmp_path) as client:
        started = time.monotonic()
        outcome = _request(client, timeout_s=1.0)
        elapsed = time.monotonic() - started
    assert isinstance(outcome, CloudFallback)
    assert "within 1.0 s" in outcome.reason
    assert 0.9 < elapsed < 3.0


@pytest.mark.broker
def test_error_result_gives_fallback(broker, fake_coordinator, tmp_path):
    fake_coordinator(BrokerSettings(broker.url), error="unknown proxy 'grad_norm'")
    with CloudClient(broker.url, device_id="dev-1", state_dir=tmp_path) as client:
        outcome = _request(client)
    assert isinstance(outcome, CloudFallback)
    assert "unknown proxy 'grad_norm'" in outcome.reason
    assert "fake-coordinator" in outcome.reason


def test_no_broker_gives_fallback_quickly(tmp_path):
    url = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens there
    with CloudClient(url, device_id="dev-1", state_dir=tmp_path) as client:
        started = time.monotonic()
        outcome = _request(client, timeout_s=60)
        elapsed = time.monotonic() - started
    assert isinstance(outcome, CloudFallback)
    assert "no broker reachable" in outcome.reason
    assert elapsed < 3.0


def test_silent_broker_gives_fallback_at_connect_timeout(tmp_path):
    """A server that accepts TCP connections and never replies must not hang the device."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(5)
        url = f"mqtt://127.0.0.1:{server.getsockname()[1]}"
        with CloudClient(url, device_id="dev-1", state_dir=tmp_path, connect_timeout_s=1.0) as client:
            started = time.monotonic()
            outcome = _request(client, timeout_s=60)
            elapsed = time.monotonic() - started
    assert isinstance(outcome, CloudFallback)
    assert "no broker reachable" in outcome.reason
    assert elapsed < 2.5


def _pump_until(client, condition, timeout_s=10.0):
    limit = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < limit:
        client.pump(0.1)
    assert condition(), f"condition not met within {timeout_s} s"


def _aggregator_document(version, space="nb201"):
    """A valid aggregator document; its one calibration architecture names the version."""
    aggregator = replace(label_free_aggregator(), space=space, calibration_archs=(f"arch-{version}",))
    return json.dumps(aggregator.to_json())


def _aggregator(version, content=None, space="nb201", checksum=None):
    content = content if content is not None else _aggregator_document(version, space)
    message = protocol.aggregator_message("coord-a", space, version, content, {"rows": 3})
    if checksum is not None:
        message["checksum"] = checksum
    return protocol.encode_message(message)


@pytest.mark.broker
def test_aggregator_is_verified_and_last_good_kept(broker, tmp_path):
    publisher = _publisher(broker)
    topic = protocol.aggregator_topic("nb201")
    _publish(publisher, topic, _aggregator(5), retain=True)
    with CloudClient(broker.url, device_id="dev-1", state_dir=tmp_path) as client:
        path = client.fetch_aggregator("nb201", timeout_s=3)
        assert path is not None
        assert json.loads(path.read_text())["calibration"]["architectures"] == ["arch-5"]

        rejected = [
            _aggregator(6, checksum="sha256:" + "0" * 64),  # tampered content
            _aggregator(4),  # older than the stored version
            _aggregator(7, content=_aggregator_document(7, space="other")),  # content of another space
            _aggregator(8, content="[1, 2]"),  # not a JSON object
            _aggregator(10, content=json.dumps({"space": "nb201", "format": "something else"})),
            b"{not json",
        ]
        for payload in rejected:
            _publish(publisher, topic, payload)
        # A valid aggregator of another space, published last, marks that the rejected ones were read.
        _publish(publisher, protocol.aggregator_topic("marker"), _aggregator(1, space="marker"))
        _pump_until(client, lambda: client.aggregators.metadata("marker") is not None)
        assert json.loads(path.read_text())["calibration"]["architectures"] == ["arch-5"]
        assert client.aggregators.metadata("nb201")["version"] == 5

        _publish(publisher, topic, _aggregator(11))
        _pump_until(client, lambda: client.aggregators.metadata("nb201")["version"] == 11)
        assert Aggregator.load(path, space="nb201").calibration_archs == ("arch-11",)
    publisher.disconnect()
    publisher.loop_stop()

    # The last good aggregator stays on disk for a device that cannot reach the broker.
    with CloudClient(f"mqtt://127.0.0.1:{free_port()}", device_id="dev-1", state_dir=tmp_path) as offline:
        assert offline.aggregators.latest("nb201") == path


@pytest.mark.broker
def test_aggregator_for_wrong_space_topic_is_rejected(broker, tmp_path):
    publisher = _publisher(broker)
    _publish(publisher, protocol.aggregator_topic("nb201"), _aggregator(3, space="other"), retain=True)
    with CloudClient(broker.url, device_id="dev-1", state_dir=tmp_path) as client:
        assert client.fetch_aggregator("nb201", timeout_s=1) is None
        assert client.aggregators.latest("other") is None
    publisher.disconnect()
    publisher.loop_stop()


@pytest.mark.broker
def test_device_denied_other_devices_topics(make_broker, password_file, secret_file, fake_coordinator, tmp_path):
    acl = tmp_path / "acl"
    acl.write_text(documented_acl())
    password_file("coordinator", "coordinator-secret")
    password_file("dev-a", "a-secret")
    passwd = password_file("dev-b", "b-secret")
    broker = make_broker(f"password_file {passwd}\nacl_file {acl}\n", anonymous=False, name="acl")
    coordinator_settings = BrokerSettings(broker.url, username="coordinator",
                                          password_file=secret_file("coordinator", "coordinator-secret"))
    fake = fake_coordinator(coordinator_settings)
    device_a = BrokerSettings(broker.url, username="dev-a", password_file=secret_file("dev-a", "a-secret"))

    # A device may use its own topics: the request passes the ACL and gets its result.
    with CloudClient(device_a, device_id="dev-a", state_dir=tmp_path / "a") as client:
        assert isinstance(_request(client), CloudResult)

    # It may neither publish a request as dev-b nor read dev-b's results.
    events = []
    intruder = create_mqtt_client("dev-a-intruder", device_a)
    intruder.on_publish = lambda client, userdata, mid, reason, properties: events.append(("puback", mid, reason))
    intruder.on_message = lambda client, userdata, message: events.append(("message", message.topic))
    intruder.connect("127.0.0.1", broker.port)
    intruder.loop_start()
    intruder.subscribe(protocol.result_topic("dev-b"), qos=1)
    body = protocol.request_body("nb201", 10, 16, ARCHS, PROXIES, protocol.describe_none(10), batch_size=4)
    forged_id = protocol.make_request_id("dev-b", body)
    forged = protocol.gradient_request("dev-b", forged_id, body, deadline=None)
    info = intruder.publish(protocol.request_topic("dev-b"), protocol.encode_message(forged), qos=1)
    info.wait_for_publish(timeout=5)
    time.sleep(0.2)

    coordinator = create_mqtt_client("coordinator-test", coordinator_settings)
    coordinator.connect("127.0.0.1", broker.port)
    coordinator.loop_start()
    results = {arch: {name: {"value": 1.0, "valid": True} for name in PROXIES} for arch in ARCHS}
    reply = protocol.gradient_result("coordinator-test", forged, results, {}, seconds=0.0, code_version="t")
    coordinator.publish(protocol.result_topic("dev-b"), protocol.encode_message(reply), qos=1).wait_for_publish(timeout=5)
    time.sleep(0.5)
    for client in (intruder, coordinator):
        client.disconnect()
        client.loop_stop()

    pubacks = [event for event in events if event[0] == "puback" and event[1] == info.mid]
    assert len(pubacks) == 1
    assert pubacks[0][2] == "Not authorized"
    assert forged_id not in fake.received
    assert ("message", protocol.result_topic("dev-b")) not in events

    # A wrong password is refused at connect time, and the device falls back at once.
    wrong = BrokerSettings(broker.url, username="dev-a", password_file=secret_file("wrong", "not-the-password"))
    with CloudClient(wrong, device_id="dev-a", state_dir=tmp_path / "wrong") as client:
        outcome = _request(client, timeout_s=30)
    assert isinstance(outcome, CloudFallback)
    assert "rejected the connection" in outcome.reason


@pytest.mark.broker
def test_mqtts_with_password_and_ca_file(make_broker, password_file, secret_file, tls_files, fake_coordinator, tmp_path):
    password_file("coordinator", "coordinator-secret")
    passwd = password_file("dev-1", "device-secret")
    broker = make_broker(
        f"cafile {tls_files['ca']}\ncertfile {tls_files['cert']}\nkeyfile {tls_files['key']}\n"
        f"password_file {passwd}\n",
        anonymous=False, name="tls",
    )
    url = f"mqtts://127.0.0.1:{broker.port}"
    fake_coordinator(BrokerSettings(url, username="coordinator", ca_file=tls_files["ca"],
                                    password_file=secret_file("coordinator", "coordinator-secret")))
    device = BrokerSettings(url, username="dev-1", password_file=secret_file("dev-1", "device-secret"),
                            ca_file=tls_files["ca"])
    with CloudClient(device, device_id="dev-1", state_dir=tmp_path / "tls") as client:
        assert isinstance(_request(client), CloudResult)

    # Without the private CA the broker's certificate is not trusted: a fallback, not a hang.
    untrusted = BrokerSettings(url, username="dev-1", password_file=secret_file("dev-1", "device-secret"))
    with CloudClient(untrusted, device_id="dev-1", state_dir=tmp_path / "untrusted") as client:
        started = time.monotonic()
        outcome = _request(client, timeout_s=30)
    assert isinstance(outcome, CloudFallback)
    assert time.monotonic() - started < 7


@pytest.mark.parametrize(
    "settings, reason",
    [
        (dict(url="mqtt://127.0.0.1:1", password_file="/nonexistent/secret", username="u"), "cannot read the password file"),
        (dict(url="mqtt://127.0.0.1:1", ca_file="/nonexistent/ca.crt"), "needs an mqtts:// broker URL"),
        (dict(url="mqtts://127.0.0.1:1", ca_file="/nonexistent/ca.crt"), "does not exist"),
        (dict(url="mqtt://a@127.0.0.1:1", username="b"), "differs from"),
        (dict(url="ftp://127.0.0.1:1"), "mqtt:// or mqtts://"),
    ],
)
def test_bad_connection_settings_raise(settings, reason, tmp_path):
    with pytest.raises(EdgeNasError, match=reason):
        create_mqtt_client("dev-1", BrokerSettings(**settings))


def test_password_file_needs_user_name(secret_file):
    settings = BrokerSettings("mqtt://127.0.0.1:1", password_file=secret_file("dev", "secret"))
    with pytest.raises(EdgeNasError, match="needs a user name"):
        create_mqtt_client("dev-1", settings)


def test_missing_user_name_reported_before_missing_file(tmp_path):
    settings = BrokerSettings("mqtt://127.0.0.1:1", password_file=tmp_path / "absent")
    with pytest.raises(EdgeNasError, match="needs a user name"):
        settings.login()


def test_describe_data_share_policies():
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((8, 3, 16, 16)).astype(np.float32)
    labels = np.arange(8) % 10
    assert describe_data("none", inputs, labels, 10) == protocol.describe_none(10)
    summary = describe_data("summary", inputs, labels, 10, data_hash="abc")
    assert summary["share"] == "summary"
    assert summary["data_hash"] == "abc"
    raw = describe_data("raw", inputs, labels, 10, raw_images=5)
    assert raw["images"]["shape"] == [5, 3, 16, 16]
    with pytest.raises(EdgeNasError, match="unknown --share policy"):
        describe_data("all", inputs, labels, 10)


def test_descriptor_fits_message_limit_at_224():
    archs = ["k3e6-" * 20] * 8
    components = fitting_summary_components(224, archs)
    assert fitting_summary_components(32, archs) == protocol.DEFAULT_SUMMARY_COMPONENTS
    assert 1 <= components < protocol.DEFAULT_SUMMARY_COMPONENTS
    images = np.random.default_rng(0).standard_normal((components + 4, 3, 224, 224)).astype(np.float32)
    labels = np.arange(len(images)) % 10
    summary = describe_data("summary", images, labels, 10, components=components)
    assert len(summary["component_std"]) == components
    raw = describe_data("raw", images, labels, 10, raw_images=fitting_raw_images(224, archs))
    for data in (summary, raw):
        body = protocol.request_body("mobilenetv2", 10, 224, archs[:1], ["fgnas_gi"], data, width_mult=1.0)
        message = protocol.gradient_request("dev-1", protocol.make_request_id("dev-1", body), body, deadline=None)
        assert len(protocol.encode_message(message)) <= protocol.MAX_MESSAGE_BYTES
    # At 512 x 512 the float32 mean image alone is larger than the message limit.
    assert fitting_summary_components(512, archs) == 0


def test_source_falls_back_when_share_cannot_fit(tmp_path):
    from types import SimpleNamespace

    calls = []

    def fallback(request):
        calls.append(request)
        return {arch: {} for arch in request.archs}

    space = SimpleNamespace(name="nb201", num_classes=10, input_size=512)
    scoring = SimpleNamespace(seed=0, batch_size=4, proxy_options={}, data_hash="")
    request = SimpleNamespace(space=space, archs=["a"], proxies=["grad_norm"], protocol=scoring,
                              inputs=np.zeros((4, 3, 512, 512), np.float32), labels=np.zeros(4, np.int64))
    # No broker listens there: a fallback that tried to connect would report that reason instead.
    source = CloudGradientSource(f"mqtt://127.0.0.1:{free_port()}", device_id="dev-1", state_dir=tmp_path,
                                 share="raw", fallback=fallback)
    assert source(request) == {"a": {}}
    assert source.name == "local"
    assert len(calls) == 1
    assert isinstance(source.outcome, CloudFallback)
    assert "message limit" in source.outcome.reason
    assert source.describe()["fallback_reason"] == source.outcome.reason


@pytest.mark.parametrize(
    "options, message",
    [
        ({"device_id": "a/b"}, "invalid device id"),
        ({"password_file": "/nonexistent/secret"}, "cannot read the password file"),
        ({"ca_file": "/nonexistent/ca.crt"}, "--ca-file needs an mqtts://"),
        ({"share": "everything"}, "unknown --share policy"),
    ],
)
def test_source_rejects_bad_settings_at_once(options, message, tmp_path):
    broker = BrokerSettings("mqtt://127.0.0.1:1", username="dev-1", password_file=options.pop("password_file", None),
                            ca_file=options.pop("ca_file", None))
    with pytest.raises(EdgeNasError, match=message):
        CloudGradientSource(broker, state_dir=tmp_path, **options)


def test_default_state_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGE_NAS_CLOUD_STATE", str(tmp_path / "state"))
    assert default_state_dir() == tmp_path / "state"
    monkeypatch.delenv("EDGE_NAS_CLOUD_STATE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_state_dir() == tmp_path / "xdg" / "edge-nas" / "cloud"
