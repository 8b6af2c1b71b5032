"""The message protocol: topics, validation, data descriptors. Imports nothing from torch."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from cloud_sync import protocol
from cloud_sync.protocol import ProtocolError
from models.errors import EdgeNasError

ARCH = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_1x1~1|nor_conv_3x3~2|"


def _request(**changes):
    body = protocol.request_body("nb201", 10, 16, [ARCH], ["grad_norm"], protocol.describe_none(10), batch_size=4)
    request_id = protocol.make_request_id("dev-1", body)
    message = protocol.gradient_request("dev-1", request_id, body, deadline=None)
    message.update(changes)
    return message


def test_protocol_and_client_import_without_torch():
    code = (
        "import sys\n"
        "import cloud_sync.protocol, cloud_sync.client\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'cloud_sync.coordinator' not in sys.modules\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr


def test_topic_tree():
    assert protocol.request_topic("dev-1") == "edge-nas/devices/dev-1/requests"
    assert protocol.result_topic("dev-1") == "edge-nas/devices/dev-1/results"
    assert protocol.status_topic("dev-1") == "edge-nas/devices/dev-1/status"
    assert protocol.aggregator_topic("nb201") == "edge-nas/spaces/nb201/aggregator"
    assert protocol.presence_topic("coord-a") == "edge-nas/coordinators/coord-a/presence"
    assert protocol.shared_request_filter("workers") == "$share/workers/edge-nas/devices/+/requests"


@pytest.mark.parametrize("bad_id", ["", "a/b", "dev+", "#", "-leading", "x" * 65, "dév"])
def test_ids_that_cannot_be_topic_levels_are_rejected(bad_id):
    with pytest.raises(ProtocolError):
        protocol.request_topic(bad_id)


def test_device_id_from_topic():
    assert protocol.device_id_from_topic("edge-nas/devices/dev-1/requests", "requests") == "dev-1"
    assert protocol.device_id_from_topic("edge-nas/devices/dev-1/results", "requests") is None
    assert protocol.device_id_from_topic("other/devices/dev-1/requests", "requests") is None
    assert protocol.device_id_from_topic("edge-nas/devices/dev-1/requests/x", "requests") is None


def test_request_round_trip():
    message = _request()
    decoded = protocol.decode_message(protocol.encode_message(message), expected_type=protocol.GRADIENT_REQUEST)
    assert decoded == json.loads(json.dumps(message))
    assert decoded["schema"] == protocol.SCHEMA_VERSION
    assert decoded["sender"] == "dev-1"


def test_width_mult_sent_only_when_given():
    plain = protocol.request_body("nb201", 10, 16, [ARCH], ["grad_norm"], protocol.describe_none(10))
    assert "width_mult" not in plain["space"]
    body = protocol.request_body("mobilenetv2", 10, 32, ["k3e6"], ["grad_norm"], protocol.describe_none(10), width_mult=0.35)
    assert body["space"]["width_mult"] == 0.35
    message = protocol.gradient_request("dev-1", protocol.make_request_id("dev-1", body), body, deadline=None)
    decoded = protocol.decode_message(protocol.encode_message(message))
    assert decoded["space"]["width_mult"] == 0.35
    narrower = protocol.request_body("mobilenetv2", 10, 32, ["k3e6"], ["grad_norm"], protocol.describe_none(10), width_mult=0.5)
    assert protocol.make_request_id("dev-1", body) != protocol.make_request_id("dev-1", narrower)


def test_request_id_depends_on_content_and_device():
    body = protocol.request_body("nb201", 10, 16, [ARCH], ["grad_norm"], protocol.describe_none(10))
    same = protocol.request_body("nb201", 10, 16, [ARCH], ["grad_norm"], protocol.describe_none(10))
    other_seed = protocol.request_body("nb201", 10, 16, [ARCH], ["grad_norm"], protocol.describe_none(10), seed=1)
    assert protocol.make_request_id("dev-1", body) == protocol.make_request_id("dev-1", same)
    assert protocol.make_request_id("dev-1", body) != protocol.make_request_id("dev-1", other_seed)
    assert protocol.make_request_id("dev-1", body) != protocol.make_request_id("dev-2", body)


INVALID_PAYLOADS = [
    (b"", "empty"),
    (b"not json", "not valid JSON"),
    (b"\xff\xfe", "not UTF-8"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"schema": 1, "type": "gradient_request", "message_id": "x", "sender": "d", "timestamp": NaN}', "not valid JSON"),
]


@pytest.mark.parametrize("payload, reason", INVALID_PAYLOADS)
def test_invalid_payloads_raise_with_reason(payload, reason):
    with pytest.raises(ProtocolError, match=reason):
        protocol.decode_message(payload)


def test_truncated_request_is_rejected():
    encoded = protocol.encode_message(_request())
    with pytest.raises(ProtocolError, match="not valid JSON"):
        protocol.decode_message(encoded[: len(encoded) // 2])


def test_oversized_payload_is_rejected_before_parsing():
    with pytest.raises(ProtocolError, match="larger than the limit"):
        protocol.decode_message(b" " * (protocol.MAX_MESSAGE_BYTES + 1))


def test_unknown_schema_version_is_rejected():
    payload = json.dumps(_request(schema=2)).encode()
    with pytest.raises(ProtocolError, match="unsupported schema version 2"):
        protocol.decode_message(payload)


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"type": "something"}, "unknown message type"),
        ({"message_id": 5}, "'message_id' must be str"),
        ({"timestamp": "now"}, "'timestamp' must be"),
        ({"timestamp": -1}, "non-negative"),
        ({"device_id": "a/b"}, "invalid device id"),
        ({"request_id": "XYZ"}, "hex digits"),
        ({"archs": []}, "1 to 256 entries"),
        ({"archs": [ARCH, ARCH]}, "same entry twice"),
        ({"archs": [5]}, "must be a string"),
        ({"proxies": "grad_norm"}, "must be list"),
        ({"seed": True}, "'seed' must be int"),
        ({"seed": 1.5}, "'seed' must be int"),
        ({"batch_size": 0}, "between 1 and"),
        ({"space": {"name": "nb201", "num_classes": 10}}, "missing field 'input_size'"),
        ({"space": {"name": "mobilenetv2", "num_classes": 10, "input_size": 16, "width_mult": 0}}, "'width_mult' must be above 0"),
        ({"space": {"name": "mobilenetv2", "num_classes": 10, "input_size": 16, "width_mult": 9.5}}, "at most 4"),
        ({"space": {"name": "mobilenetv2", "num_classes": 10, "input_size": 16, "width_mult": "wide"}}, "'width_mult' must be"),
        ({"data": {"share": "everything", "num_classes": 10}}, "expected one of"),
        ({"data": {"share": "none", "num_classes": 11}}, "more than the 10 outputs"),
    ],
)
def test_invalid_request_fields_raise_with_reason(changes, reason):
    payload = json.dumps(_request(**changes)).encode()
    with pytest.raises(ProtocolError, match=reason):
        protocol.decode_message(payload)


def test_missing_envelope_field_is_named():
    message = _request()
    del message["sender"]
    with pytest.raises(ProtocolError, match="missing field 'sender'"):
        protocol.decode_message(json.dumps(message).encode())


def test_expected_type_is_enforced():
    status = protocol.status_message("dev-1", "online")
    with pytest.raises(ProtocolError, match="expected a gradient_request"):
        protocol.decode_message(protocol.encode_message(status), expected_type=protocol.GRADIENT_REQUEST)


def test_result_entries_are_validated():
    request = _request()
    good = protocol.gradient_result(
        "coord-a", request, {ARCH: {"grad_norm": {"value": 1.5, "valid": True}}}, {"source": "gaussian"},
        seconds=0.1, code_version="0",
    )
    protocol.decode_message(protocol.encode_message(good))
    for entry, reason in (
        ({"value": None, "valid": True}, "not a finite number"),
        ({"value": 1.0, "valid": False}, "must be null"),
        ({"value": 1.0}, "boolean 'valid'"),
    ):
        bad = dict(good, results={ARCH: {"grad_norm": entry}})
        with pytest.raises(ProtocolError, match=reason):
            protocol.decode_message(json.dumps(bad).encode())


def test_error_result_needs_reason():
    error = protocol.gradient_error("coord-a", "dev-1", "ab" * 16, "unknown proxy 'x'")
    decoded = protocol.decode_message(protocol.encode_message(error))
    assert decoded["status"] == "error"
    assert decoded["error"] == "unknown proxy 'x'"


def test_encode_rejects_oversized_message():
    message = _request()
    with pytest.raises(ProtocolError, match="more than the limit"):
        protocol.encode_message(message, max_bytes=100)


def test_aggregator_checksum_covers_content():
    message = protocol.aggregator_message("coord-a", "nb201", 3, '{"space": "nb201"}', {"rows": 5})
    decoded = protocol.decode_message(protocol.encode_message(message), expected_type=protocol.AGGREGATOR)
    assert decoded["checksum"] == protocol.content_checksum('{"space": "nb201"}')
    assert decoded["checksum"].startswith("sha256:")


@pytest.mark.parametrize(
    "url, host, port, tls, username",
    [
        ("mqtt://127.0.0.1", "127.0.0.1", 1883, False, None),
        ("mqtt://127.0.0.1:1999", "127.0.0.1", 1999, False, None),
        ("mqtts://broker.example:8884", "broker.example", 8884, True, None),
        ("mqtts://broker.example", "broker.example", 8883, True, None),
        ("mqtt://dev-7@127.0.0.1:1999", "127.0.0.1", 1999, False, "dev-7"),
    ],
)
def test_broker_url_parsing(url, host, port, tls, username):
    address = protocol.parse_broker_url(url)
    assert (address.host, address.port, address.tls, address.username) == (host, port, tls, username)


@pytest.mark.parametrize(
    "url, reason",
    [
        ("http://127.0.0.1:1883", "mqtt:// or mqtts://"),
        ("mqtt://", "host is missing"),
        ("mqtt://user:secret@127.0.0.1", "must not contain a password"),
        ("mqtt://127.0.0.1:99999", "invalid broker URL"),
        ("mqtt://127.0.0.1/topic", "path, query or fragment"),
    ],
)
def test_invalid_broker_urls_are_rejected(url, reason):
    with pytest.raises(EdgeNasError, match=reason):
        protocol.parse_broker_url(url)


def test_array_round_trip_and_checks():
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    encoded = protocol.encode_array(array, "float32")
    np.testing.assert_array_equal(protocol.decode_array(encoded, "a"), array)
    with pytest.raises(ProtocolError, match="contains 48 bytes, but shape \\[4, 4\\] of float32 needs 64"):
        protocol.decode_array(dict(encoded, shape=[4, 4]), "a")
    with pytest.raises(ProtocolError, match="dtype"):
        protocol.decode_array(dict(encoded, dtype="object"), "a")
    with pytest.raises(ProtocolError, match="base64"):
        protocol.decode_array(dict(encoded, data="***"), "a")
    with pytest.raises(ProtocolError, match="NaN"):
        protocol.decode_array(protocol.encode_array(np.array([np.nan]), "float32"), "a")


def _images(count=40, size=8, seed=0):
    rng = np.random.default_rng(seed)
    # Two channels share a pattern of rank 4, the third is independent noise; the means differ.
    bases = rng.standard_normal((4, size * size))
    pattern = (rng.standard_normal((count, 4)) @ bases).reshape(count, 1, size, size)
    images = np.concatenate(
        [pattern + 1.0, 0.5 * pattern - 2.0, 0.3 * rng.standard_normal((count, 1, size, size))], axis=1
    )
    labels = np.arange(count) % 4
    return images.astype(np.float32), labels


def test_summary_describes_channels_and_labels():
    images, labels = _images()
    summary = protocol.describe_summary(images, labels, 4, components=8)
    assert summary["share"] == "summary"
    assert summary["shape"] == [3, 8, 8]
    np.testing.assert_allclose(summary["channel_mean"], images.mean(axis=(0, 2, 3)), atol=1e-5)
    np.testing.assert_allclose(summary["channel_std"], images.std(axis=(0, 2, 3)), atol=1e-5)
    assert summary["label_histogram"] == [10, 10, 10, 10]
    assert len(summary["component_std"]) == 8
    assert summary["component_std"] == sorted(summary["component_std"], reverse=True)
    protocol.validate_descriptor(summary, num_classes=4, input_size=8)
    json.dumps(summary)


def test_summary_keeps_fewer_components_than_images():
    images, labels = _images(count=3)
    summary = protocol.describe_summary(images, labels, 4, components=16)
    # Three centred images span at most two directions.
    assert len(summary["component_std"]) == 2


def test_probe_batch_drawn_from_summary_matches_statistics():
    images, labels = _images(count=200)
    summary = protocol.describe_summary(images, labels, 4, components=16)
    summary = json.loads(json.dumps(summary))
    drawn, drawn_labels = protocol.draw_probe_batch(summary, 400, seed=3)
    assert drawn.shape == (400, 3, 8, 8)
    assert drawn.dtype == np.float32
    np.testing.assert_allclose(drawn.mean(axis=(0, 2, 3)), images.mean(axis=(0, 2, 3)), atol=0.1)
    np.testing.assert_allclose(drawn.std(axis=(0, 2, 3)), images.std(axis=(0, 2, 3)), rtol=0.1)
    # Channels 0 and 1 are the same pattern up to scale and offset; the components must carry that.
    correlation = np.corrcoef(drawn[:, 0].ravel(), drawn[:, 1].ravel())[0, 1]
    assert correlation > 0.9
    assert set(np.unique(drawn_labels)) <= {0, 1, 2, 3}
    again, again_labels = protocol.draw_probe_batch(summary, 400, seed=3)
    np.testing.assert_array_equal(drawn, again)
    np.testing.assert_array_equal(drawn_labels, again_labels)


def test_probe_labels_follow_histogram():
    images, _ = _images(count=40)
    labels = np.zeros(40, dtype=np.int64)
    labels[:4] = 2
    summary = protocol.describe_summary(images, labels, 3)
    _, drawn_labels = protocol.draw_probe_batch(summary, 1000, seed=0)
    assert not np.any(drawn_labels == 1)
    assert 0.05 < np.mean(drawn_labels == 2) < 0.15


def test_raw_descriptor_is_capped_and_exact():
    images, labels = _images(count=10)
    raw = protocol.describe_raw(images, labels, 4, max_images=6)
    raw = json.loads(json.dumps(raw))
    protocol.validate_descriptor(raw, num_classes=4, input_size=8)
    drawn, drawn_labels = protocol.draw_probe_batch(raw, 64, seed=0)
    np.testing.assert_array_equal(drawn, images[:6])
    np.testing.assert_array_equal(drawn_labels, labels[:6])


def test_descriptor_must_fit_input_size():
    images, labels = _images()
    summary = protocol.describe_summary(images, labels, 4)
    with pytest.raises(ProtocolError, match="does not match the network input"):
        protocol.validate_descriptor(summary, num_classes=4, input_size=16)
    raw = protocol.describe_raw(images, labels, 4)
    with pytest.raises(ProtocolError, match="expected \\[N, 3, 16, 16\\]"):
        protocol.validate_descriptor(raw, num_classes=4, input_size=16)


def test_descriptor_builders_reject_bad_input():
    images, labels = _images()
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        protocol.describe_summary(images[:, :2], labels, 4)
    with pytest.raises(ValueError, match="labels must lie"):
        protocol.describe_summary(images, labels + 4, 4)
    with pytest.raises(ValueError, match="labels for"):
        protocol.describe_raw(images, labels[:3], 4)


def test_documented_examples_are_valid():
    """Every message example in docs/protocol.md passes validation, and every message type has one."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    blocks = [block.split("\n", 1)[1] for block in text.split("```")[1::2] if block.startswith("json\n")]
    messages = [json.loads(block) for block in blocks if '"schema"' in block]
    for message in messages:
        protocol.decode_message(json.dumps(message).encode())
    assert {message["type"] for message in messages} == set(protocol.MESSAGE_TYPES)
    descriptors = [json.loads(block) for block in blocks if '"share"' in block and '"schema"' not in block]
    assert {descriptor["share"] for descriptor in descriptors} == set(protocol.SHARE_POLICIES)
    for descriptor in descriptors:
        size = descriptor["shape"][1] if "shape" in descriptor else 2
        protocol.validate_descriptor(descriptor, num_classes=10, input_size=size)


def test_deeply_nested_payload_is_rejected():
    payload = b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}"
    with pytest.raises(ProtocolError, match="nested too deeply"):
        protocol.decode_message(payload)


@pytest.mark.parametrize("seed", [-5, 2**70])
def test_out_of_range_seed_is_rejected(seed):
    with pytest.raises(ProtocolError, match="seed"):
        protocol.validate_message(_request(seed=seed))
