"""`edge-nas personalize`: end to end on real images, and one clear line for each kind of bad input."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from edge_runtime.cli_personalize import personalize

TINY = ["--budget", "6", "--finalists", "2", "--batch-size", "16"]


def run_cli(*args: str):
    return CliRunner().invoke(personalize, list(args))


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def out_dir(tmp_path):
    return str(tmp_path / "out")


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One score cache for the small runs of this module, so that each scores its candidates once."""
    return str(tmp_path_factory.mktemp("cache") / "scores.sqlite")


def check_outputs(out: str, summary: dict) -> None:
    from pathlib import Path

    folder = Path(out)
    subnet = json.loads((folder / "subnet.json").read_text())
    assert subnet["architecture"] == summary["architecture"]
    for key in ("proxies", "score", "measurements", "constraints", "preprocessing", "data_hash", "seeds",
                "code_version", "stage_seconds", "gradient_source"):
        assert key in subnet, key
    assert subnet["measurements"]["latency"]["execution_provider"]
    onnx.checker.check_model(onnx.load(str(folder / "model.onnx")))
    assert "score_vs_latency.png" in (folder / "report.md").read_text()
    assert (folder / "score_vs_latency.png").stat().st_size > 0


def test_cli_end_to_end_on_sklearn_digits(out_dir, tmp_path):
    result = run_cli("--data", "sklearn-digits", "--out", out_dir, "--max-params", "1.2M", "--budget", "4",
                     "--finalists", "2", "--batch-size", "8", "--cache", str(tmp_path / "c.sqlite"), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["params"] <= 1_200_000
    assert summary["candidates_scored"] == 4
    assert summary["gradient_source"] == "local"
    check_outputs(out_dir, summary)


def test_cli_end_to_end_on_cifar10(shared_data, out_dir):
    cifar = shared_data / "images" / "cifar10.npz"
    if not cifar.exists():
        pytest.skip(f"{cifar} is absent")
    result = run_cli("--data", str(cifar), "--out", out_dir, "--search", "evolution", "--json", *TINY)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    check_outputs(out_dir, summary)
    with open(summary["files"]["subnet"]) as handle:
        subnet = json.load(handle)
    assert subnet["data"]["images"] == 5000


def test_cli_human_summary(shared_cache, out_dir):
    result = run_cli("--data", "sklearn-digits", "--out", out_dir, "--budget", "2", "--finalists", "1",
                     "--batch-size", "8", "--cache", shared_cache)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("chosen: |")
    assert "latency p50" in result.stdout
    assert "power: not measured" in result.stdout


def test_missing_data(out_dir, tmp_path):
    assert_one_line_error(run_cli("--data", str(tmp_path / "absent.npz"), "--out", out_dir), "data not found")


def test_corrupt_data(out_dir, tmp_path):
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"this is not a zip archive")
    assert_one_line_error(run_cli("--data", str(corrupt), "--out", out_dir), "corrupt.npz", "not an .npz archive")


def test_too_few_images(out_dir, tmp_path):
    small = tmp_path / "small.npz"
    np.savez(small, x=np.zeros((5, 32, 32, 3), dtype=np.uint8), y=np.arange(5))
    assert_one_line_error(run_cli("--data", str(small), "--out", out_dir, "--batch-size", "16"),
                          "5 images", "--batch-size")


def test_unknown_space(out_dir):
    assert_one_line_error(run_cli("--data", "sklearn-digits", "--out", out_dir, "--space", "nb999"),
                          "unknown search space 'nb999'", "nb201")


@pytest.mark.parametrize("option, value, smallest", [("--max-params", "50k", "73,306"), ("--max-flops", "1M", "7,783,040")])
def test_unreachable_cost_limit(out_dir, option, value, smallest):
    # The smallest NB201 network (no convolution in the cell) has 73,306 params and 7,783,040 FLOPs at 10 classes.
    assert_one_line_error(run_cli("--data", "sklearn-digits", "--out", out_dir, option, value), option, smallest)


@pytest.mark.parametrize(
    "option, value",
    [("--max-params", "0"), ("--max-flops", "-3M"), ("--max-latency-ms", "0"), ("--max-power-w", "-1"),
     ("--max-energy-mj", "0")],
)
def test_non_positive_limits(out_dir, option, value):
    assert_one_line_error(run_cli("--data", "sklearn-digits", "--out", out_dir, f"{option}={value}"), option)


def test_finalists_above_budget(out_dir):
    assert_one_line_error(run_cli("--data", "sklearn-digits", "--out", out_dir, "--budget", "4", "--finalists", "5"),
                          "--finalists (5)", "--budget (4)")


def test_unwritable_out(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert_one_line_error(run_cli("--data", "sklearn-digits", "--out", str(blocker / "out")), "cannot write")


def test_power_limit_without_power_meter(out_dir):
    # This machine has neither jtop nor INA3221 rails, so a power limit cannot be checked.
    assert_one_line_error(run_cli("--data", "sklearn-digits", "--out", out_dir, "--max-power-w", "5"),
                          "--max-power-w", "cannot be measured")


def test_latency_limit_no_finalist_meets(shared_cache, out_dir):
    result = run_cli("--data", "sklearn-digits", "--out", out_dir, "--budget", "2", "--finalists", "1",
                     "--batch-size", "8", "--max-latency-ms", "0.0001", "--cache", shared_cache)
    assert_one_line_error(result, "--max-latency-ms", "the fastest of the 1 finalists takes")
    assert not os.path.exists(out_dir)  # the folder this run created is removed again


def test_aggregator_wrong_format(out_dir, tmp_path):
    wrong = tmp_path / "aggregator.json"
    wrong.write_text('{"not": "an aggregator"}')
    assert_one_line_error(run_cli("--data", "sklearn-digits", "--out", out_dir, "--aggregator", str(wrong)),
                          str(wrong), "not an edge-nas aggregator file")


def test_aggregator_not_json(out_dir, tmp_path):
    wrong = tmp_path / "aggregator.json"
    wrong.write_text("weights: 1, 2")
    assert_one_line_error(run_cli("--data", "sklearn-digits", "--out", out_dir, "--aggregator", str(wrong)),
                          "not valid JSON")


def test_aggregator_of_other_space(out_dir, tmp_path):
    from models.aggregation import Aggregator

    path = tmp_path / "mbv2.json"
    Aggregator(name="fgnas", space="mbv2").save(path)
    assert_one_line_error(run_cli("--data", "sklearn-digits", "--out", out_dir, "--aggregator", str(path)),
                          "'mbv2'", "'nb201'")


def test_aggregator_of_other_aggregate(out_dir, tmp_path):
    from models.aggregation import label_free_aggregator

    path = tmp_path / "forward.json"
    label_free_aggregator("fgnas-forward").save(path)
    assert_one_line_error(run_cli("--data", "sklearn-digits", "--out", out_dir, "--aggregator", str(path)),
                          "'fgnas-forward'", "'fgnas'")


def test_registered_in_edge_nas_group():
    from edge_runtime.cli import main

    assert "personalize" in main.commands


def test_unusable_cache_path(out_dir, tmp_path):
    assert_one_line_error(run_cli("--data", "sklearn-digits", "--out", out_dir, "--cache", str(tmp_path)),
                          "cannot open the score cache", "--cache")


# Other search spaces ------------------------------------------------------------------

TINY_MBV2 = ["--space", "mobilenetv2", "--input-size", "32", "--width-mult", "0.35"]


def test_cli_mobilenetv2_end_to_end(out_dir, tmp_path):
    import onnxruntime as ort
    import torch

    from models.proxies._context import build_seeded
    from models.spaces import get_space

    result = run_cli("--data", "sklearn-digits", "--out", out_dir, *TINY_MBV2, "--budget", "4", "--finalists", "2",
                     "--batch-size", "8", "--cache", str(tmp_path / "c.sqlite"), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["space"] == "mobilenetv2"
    check_outputs(out_dir, summary)

    with open(summary["files"]["subnet"]) as handle:
        subnet = json.load(handle)
    assert subnet["space"] == {"name": "mobilenetv2", "num_classes": 10, "input_size": 32, "width_mult": 0.35}
    assert subnet["preprocessing"]["input_shape"] == [1, 3, 32, 32]
    space = get_space("mobilenetv2", num_classes=10, input_size=32, width_mult=0.35)
    arch = space.parse(subnet["architecture"])
    assert subnet["params"] == space.params(arch)

    # The exported model is the chosen network at the chosen width and resolution.
    network = build_seeded(lambda: space.build(arch), 0).eval()
    inputs = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = network(inputs).numpy()
    session = ort.InferenceSession(summary["files"]["model"], providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {"input": inputs.numpy()})
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


def test_cli_autoformer_tiny_end_to_end(out_dir, tmp_path):
    result = run_cli("--data", "sklearn-digits", "--out", out_dir, "--space", "autoformer-tiny", "--input-size", "32",
                     "--budget", "2", "--finalists", "1", "--batch-size", "8", "--cache", str(tmp_path / "c.sqlite"),
                     "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    check_outputs(out_dir, summary)
    with open(summary["files"]["subnet"]) as handle:
        subnet = json.load(handle)
    assert subnet["space"] == {"name": "autoformer-tiny", "num_classes": 10, "input_size": 32}
    assert all(entry["valid"] for entry in subnet["proxies"].values())


def test_unknown_space_lists_all_spaces(out_dir):
    result = run_cli("--data", "sklearn-digits", "--out", out_dir, "--space", "mobilenetv3")
    assert_one_line_error(result, "unknown search space 'mobilenetv3'", "mobilenetv2", "autoformer-tiny",
                          "autoformer-small", "autoformer-base", "nb201")


@pytest.mark.parametrize(
    "space, settings, limit_option, value, cost",
    [
        ("mobilenetv2", {"input_size": 32, "width_mult": 0.35}, "--max-params", "1k", "params"),
        ("mobilenetv2", {}, "--max-flops", "1M", "flops"),
        ("autoformer-tiny", {}, "--max-params", "100k", "params"),
        ("autoformer-small", {"input_size": 32}, "--max-flops", "1M", "flops"),
    ],
)
def test_unreachable_cost_limit_other_spaces(out_dir, space, settings, limit_option, value, cost):
    from models.spaces import get_space

    smallest = get_space(space, num_classes=10, **settings).cost_range()[cost][0]
    options = [text for key, setting in settings.items() for text in (f"--{key.replace('_', '-')}", str(setting))]
    result = run_cli("--data", "sklearn-digits", "--out", out_dir, "--space", space, *options, limit_option, value)
    assert_one_line_error(result, limit_option, f"search space {space!r}", f"{smallest:,}")


@pytest.mark.parametrize(
    "options, fragments",
    [
        (["--space", "mobilenetv2", "--input-size", "16"], ["--input-size 16", "at least 32"]),
        (["--space", "autoformer-tiny", "--input-size", "40"], ["--input-size 40", "multiple of the patch size 16"]),
        (["--space", "autoformer-tiny", "--width-mult", "0.5"], ["'autoformer-tiny' has no width multiplier", "mobilenetv2"]),
        (["--space", "nb201", "--width-mult", "0.5"], ["'nb201' has no width multiplier"]),
        (["--space", "mobilenetv2", "--width-mult", "0"], ["--width-mult must be a positive number"]),
        (["--space", "mobilenetv2", "--input-size", "0"], ["--input-size must be a positive number of pixels"]),
    ],
)
def test_space_setting_errors(out_dir, options, fragments):
    assert_one_line_error(run_cli("--data", "sklearn-digits", "--out", out_dir, *options), *fragments)


# Cloud options ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, fragments",
    [
        (["--share", "raw"], ["--share applies only with --broker"]),
        (["--device-id", "dev-1", "--cloud-timeout", "5"], ["--cloud-timeout, --device-id apply only with --broker"]),
        (["--broker", "http://127.0.0.1:1883"], ["mqtt:// or mqtts://"]),
        (["--broker", "mqtt://127.0.0.1:1", "--cloud-timeout", "0"], ["--cloud-timeout must be a positive number"]),
        (["--broker", "mqtt://127.0.0.1:1", "--device-id", "a/b"], ["invalid device id"]),
        (["--broker", "mqtt://127.0.0.1:1", "--username", "dev-1", "--password-file", "/nonexistent/secret"],
         ["cannot read the password file"]),
        (["--broker", "mqtt://127.0.0.1:1", "--ca-file", "/nonexistent/ca.crt"], ["--ca-file needs an mqtts://"]),
    ],
)
def test_cloud_option_errors(out_dir, options, fragments):
    assert_one_line_error(run_cli("--data", "sklearn-digits", "--out", out_dir, *options), *fragments)


def test_device_side_skips_coordinator_module():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import edge_runtime.cli, edge_runtime.cli_personalize, edge_runtime.personalize, cloud_sync.client\n"
        "assert 'cloud_sync.coordinator' not in sys.modules, 'the device imported the coordinator'\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr


def test_probe_batch_too_large_for_memory(out_dir):
    from edge_runtime.scoring import available_memory_bytes

    if available_memory_bytes() is None or available_memory_bytes() > 2**40:
        pytest.skip("this system does not report a bounded MemAvailable")
    # 512 x 512 NB201 activations take about 2 GiB per image, so a batch of 64 exceeds any memory here.
    result = run_cli("--data", "sklearn-digits", "--out", out_dir, "--input-size", "512", "--budget", "2",
                     "--finalists", "1")
    assert_one_line_error(result, "GiB for activations", "--batch-size or --input-size")
    assert not os.path.exists(out_dir)


def test_activation_estimate_scales_with_area():
    from edge_runtime.scoring import ACTIVATION_PROBE_MAX_SIZE, activation_bytes_per_sample
    from models.spaces import get_space

    space = get_space("nb201", num_classes=10, input_size=32)
    network = space.build(space.parse("|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_1x1~1|nor_conv_3x3~2|"))
    small = activation_bytes_per_sample(network, 32)
    assert small == pytest.approx(activation_bytes_per_sample(network, 16) * 4, rel=0.05)
    large = activation_bytes_per_sample(network, 4 * ACTIVATION_PROBE_MAX_SIZE)
    assert large == pytest.approx(activation_bytes_per_sample(network, ACTIVATION_PROBE_MAX_SIZE) * 16, rel=1e-6)
