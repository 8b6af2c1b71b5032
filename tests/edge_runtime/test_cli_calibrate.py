import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edge_runtime.cli import main
from models.aggregation import AGGREGATES, Aggregator
from models.spaces import nb201

COMPONENTS = AGGREGATES["fgnas"]
REPO = Path(__file__).resolve().parents[2]


def _write_inputs(tmp_path, count=12):
    archs = [nb201.arch_at_index(i).to_string() for i in range(count)]
    rng = np.random.default_rng(0)
    accuracy = rng.uniform(50, 95, count)
    with open(tmp_path / "scores.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["arch"] + [item for p in COMPONENTS for item in (p, f"{p}_valid")])
        for i, arch in enumerate(archs):
            # The first component follows the accuracy, the others are noise.
            values = [accuracy[i]] + list(rng.normal(size=len(COMPONENTS) - 1))
            writer.writerow([arch] + [item for v in values for item in (repr(float(v)), "1")])
    with open(tmp_path / "accuracy.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["arch", "cifar10_test"])
        writer.writerows([[a, repr(float(v))] for a, v in zip(archs, accuracy)])
    return archs


def test_calibrate_writes_loadable_aggregator(tmp_path):
    archs = _write_inputs(tmp_path)
    out = tmp_path / "aggregator.json"
    result = CliRunner().invoke(main, ["calibrate", "--space", "nb201", "--scores", str(tmp_path / "scores.csv"),
                                       "--accuracy", str(tmp_path / "accuracy.csv"), "--column", "cifar10_test",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    aggregator = Aggregator.load(out, space="nb201")
    assert list(aggregator.calibration_archs) == archs
    assert aggregator.calibration_spearman > 0.5
    saved = json.loads(out.read_text())
    assert saved["space"] == "nb201"
    assert saved["protocol"]["accuracy_column"] == "cifar10_test"


@pytest.mark.parametrize(
    "column,drop,fragment",
    [("nope", None, "has no column 'nope'"), ("cifar10_test", COMPONENTS[0], "lacks the component columns")],
)
def test_calibrate_rejects_bad_input(tmp_path, column, drop, fragment):
    _write_inputs(tmp_path)
    if drop:
        rows = list(csv.DictReader(open(tmp_path / "scores.csv", newline="")))
        keep = [k for k in rows[0] if not k.startswith(drop)]
        with open(tmp_path / "scores.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=keep, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    result = CliRunner().invoke(main, ["calibrate", "--scores", str(tmp_path / "scores.csv"), "--accuracy",
                                       str(tmp_path / "accuracy.csv"), "--column", column, "--out",
                                       str(tmp_path / "a.json")])
    assert result.exit_code == 1
    assert fragment in result.stderr
    assert not (tmp_path / "a.json").exists()


def test_benchmark_refuses_calibration_archs(tmp_path, shared_data):
    spec = importlib.util.spec_from_file_location("nb201_correlation", REPO / "tools" / "nb201_correlation.py")
    tool = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tool  # dataclasses look their module up by name
    spec.loader.exec_module(tool)
    accuracy = tool.load_accuracy(shared_data / "nb201" / "accuracy.csv")
    sample = tool.sample_dev_archs(accuracy, 5, 0)
    columns = {p: np.arange(5, dtype=np.float64) for p in COMPONENTS}
    from models.aggregation import fit_aggregator

    aggregator = fit_aggregator("nb201", sample, columns, np.arange(5, dtype=np.float64), {})
    aggregator.save(tmp_path / "aggregator.json")
    code = tool.main(["--archs", "5", "--datasets", "cifar10", "--proxies", "params", "--aggregator",
                      str(tmp_path / "aggregator.json"), "--shared", str(shared_data.parent), "--out", str(tmp_path / "r")])
    assert code == 2
    assert not (tmp_path / "r.md").exists()


def test_calibrate_rejects_archs_of_another_space(tmp_path):
    _write_inputs(tmp_path)
    result = CliRunner().invoke(main, ["calibrate", "--space", "mobilenetv2", "--scores", str(tmp_path / "scores.csv"),
                                       "--accuracy", str(tmp_path / "accuracy.csv"), "--column", "cifar10_test",
                                       "--out", str(tmp_path / "a.json")])
    assert result.exit_code == 1
    assert "not a mobilenetv2 architecture" in result.stderr


def test_score_rejects_aggregator_of_unrequested_aggregate(tmp_path):
    _write_inputs(tmp_path)
    CliRunner().invoke(main, ["calibrate", "--space", "nb201", "--scores", str(tmp_path / "scores.csv"),
                              "--accuracy", str(tmp_path / "accuracy.csv"), "--column", "cifar10_test",
                              "--out", str(tmp_path / "a.json")])
    result = CliRunner().invoke(main, ["score", "--sample", "2", "--data", "sklearn-digits", "--proxies", "fgnas-forward",
                                       "--aggregator", str(tmp_path / "a.json"), "--no-cache",
                                       "--out", str(tmp_path / "s.csv")])
    assert result.exit_code == 1
    assert "add fgnas to --proxies or drop --aggregator" in result.stderr
    assert not (tmp_path / "s.csv").exists()
