"""`edge-nas personalize --broker`: gradient proxies and the aggregator from a real coordinator, and the local fallback."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cloud_sync import protocol
from cloud_sync.client import CloudClient
from cloud_sync.coordinator import Coordinator
from edge_runtime.cli_personalize import personalize
from models.proxies.scoring import score_architecture
from models.spaces import get_space

from broker_support import free_port

TINY = ["--data", "sklearn-digits", "--budget", "4", "--finalists", "2", "--batch-size", "8"]
MBV2_ARCH = "k3e3-k3e3_k3e3-k3e3_k3e3-k3e3_k3e3-k3e3_k3e3-k3e3_k3e3"


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # The coordinators set one intra-op thread only in their own threads; the device side runs here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(tmp_path: Path, *args: str):
    arguments = [*TINY, "--cache", str(tmp_path / "scores.sqlite"), "--json", *args]
    return CliRunner().invoke(personalize, arguments)


def read_subnet(out: Path) -> dict:
    return json.loads((out / "subnet.json").read_text())


def write_calibration(path: Path) -> None:
    """Six rows whose fgnas_gi ranks like the accuracies; the other columns are noise."""
    rng = np.random.default_rng(0)
    lines = ["arch,accuracy,fgnas_fc,fgnas_gi,fgnas_gc,params"]
    for index, accuracy in enumerate([90.0, 80.0, 70.0, 60.0, 85.0, 75.0]):
        noise = rng.standard_normal(3)
        lines.append(f"arch-{index},{accuracy},{noise[0]:.4f},{accuracy / 10:.4f},{noise[1]:.4f},{noise[2]:.4f}")
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.broker
def test_cli_broker_gives_cloud_gradients(broker, start_coordinator, tmp_path):
    start_coordinator(broker.url)
    out = tmp_path / "out"
    result = run_cli(tmp_path, "--out", str(out), "--broker", broker.url, "--device-id", "dev-1",
                     "--state-dir", str(tmp_path / "state"), "--cloud-timeout", "60")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["gradient_source"] == "cloud"

    subnet = read_subnet(out)
    assert subnet["gradient_source"] == "cloud"
    details = subnet["gradient_source_details"]
    assert details["coordinator"] == "coord-a"
    assert details["share"] == "summary"
    assert details["probe"]["source"] == "summary"
    for name in ("fgnas_gi", "fgnas_gc"):
        assert subnet["proxies"][name]["valid"], name
    assert subnet["aggregation"]["aggregator_source"] == "label-free"
    assert (out / "model.onnx").stat().st_size > 0


def test_cli_unreachable_broker_falls_back_quickly(tmp_path):
    out = tmp_path / "out"
    started = time.monotonic()
    result = run_cli(tmp_path, "--out", str(out), "--broker", f"mqtt://127.0.0.1:{free_port()}",
                     "--device-id", "dev-1", "--state-dir", str(tmp_path / "state"), "--cloud-timeout", "60")
    elapsed = time.monotonic() - started
    assert result.exit_code == 0, result.output

    subnet = read_subnet(out)
    assert subnet["gradient_source"] == "local"
    details = subnet["gradient_source_details"]
    assert "no broker reachable" in details["fallback_reason"]
    # Far below the 60 s deadline: the client gave up on the connection, it did not wait the deadline out.
    assert details["elapsed_s"] < 20
    assert subnet["aggregation"]["aggregator_source"] == "label-free"
    # Far below the 60 s cloud timeout: nothing waited for the deadline.
    assert elapsed < 50


@pytest.mark.broker
def test_cloud_aggregator_used_and_kept_offline(broker, start_coordinator, tmp_path):
    calibration = tmp_path / "calibration.csv"
    write_calibration(calibration)
    start_coordinator(broker.url, calibration=str(calibration))
    with CloudClient(broker.url, device_id="probe", state_dir=tmp_path / "probe-state") as client:
        assert client.fetch_aggregator("nb201", timeout_s=10) is not None
        version = client.aggregators.metadata("nb201")["version"]

    state = tmp_path / "state"
    online = tmp_path / "online"
    result = run_cli(tmp_path, "--out", str(online), "--broker", broker.url, "--device-id", "dev-1",
                     "--state-dir", str(state), "--cloud-timeout", "60")
    assert result.exit_code == 0, result.output
    aggregation = read_subnet(online)["aggregation"]
    assert aggregation["aggregator_source"] == "cloud"
    assert aggregation["aggregator_received"]["version"] == version
    assert Path(aggregation["aggregator"]).parent == state / "aggregators"
    assert "received from the cloud" in (online / "report.md").read_text()

    # With the broker gone, the last good aggregator still weights the proxies, computed here. Another
    # seed draws other finalists, because the outbox would return the stored result of the same request.
    broker.stop()
    offline = tmp_path / "offline"
    result = run_cli(tmp_path, "--out", str(offline), "--broker", broker.url, "--device-id", "dev-1",
                     "--state-dir", str(state), "--cloud-timeout", "60", "--seed", "1")
    assert result.exit_code == 0, result.output
    subnet = read_subnet(offline)
    assert subnet["gradient_source"] == "local"
    assert subnet["aggregation"]["aggregator_source"] == "cloud"
    assert subnet["aggregation"]["aggregator_received"]["version"] == version


def _mbv2_request(width_mult, space="mobilenetv2", arch=MBV2_ARCH):
    inputs = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    labels = np.arange(4) % 10
    body = protocol.request_body(space, 10, 32, [arch], ["grad_norm"], protocol.describe_raw(inputs, labels, 10),
                                 batch_size=4, width_mult=width_mult)
    message = protocol.gradient_request("dev-1", protocol.make_request_id("dev-1", body), body, deadline=None)
    return protocol.encode_message(message), torch.from_numpy(inputs), torch.from_numpy(labels)


def _local_grad_norm(width_mult, inputs, labels):
    space = get_space("mobilenetv2", num_classes=10, input_size=32, width_mult=width_mult)
    return score_architecture(space, space.parse(MBV2_ARCH), inputs, labels, ["grad_norm"], seed=0)["grad_norm"].value


def test_coordinator_builds_requested_width():
    coordinator = Coordinator("coord-a")
    payload, inputs, labels = _mbv2_request(0.35)
    _, reply = coordinator.handle("edge-nas/devices/dev-1/requests", payload)
    result = protocol.decode_message(reply)
    assert result["status"] == "ok", result.get("error")
    value = result["results"][MBV2_ARCH]["grad_norm"]["value"]
    assert value == pytest.approx(_local_grad_norm(0.35, inputs, labels), rel=1e-5)
    assert value != pytest.approx(_local_grad_norm(1.0, inputs, labels), rel=1e-3)


def test_coordinator_rejects_width_for_nb201():
    arch = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_1x1~1|nor_conv_3x3~2|"
    payload, _, _ = _mbv2_request(0.5, space="nb201", arch=arch)
    _, reply = Coordinator("coord-a").handle("edge-nas/devices/dev-1/requests", payload)
    result = protocol.decode_message(reply)
    assert result["status"] == "error"
    assert "takes no width multiplier" in result["error"]
