import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from edge_runtime.cli import main

GOLDEN = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_1x1~1|nor_conv_3x3~2|"
EMPTY = "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"


@pytest.fixture
def archs_file(tmp_path):
    path = tmp_path / "archs.txt"
    path.write_text(f"{GOLDEN}\n\n# a comment\n{EMPTY}\n")
    return str(path)


@pytest.fixture
def small_npz(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "small.npz"
    np.savez_compressed(path, x=rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8), y=np.arange(12) % 3,
                        classes=np.array(["a", "b", "c"]))
    return str(path)


def _run(*args):
    return CliRunner().invoke(main, list(args))


def _read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_score_writes_rows_in_input_order_with_meta(tmp_path, archs_file, small_npz):
    out = tmp_path / "out" / "scores.csv"
    result = _run("score", "--archs", archs_file, "--data", small_npz, "--proxies", "params,naswot",
                  "--out", str(out), "--batch-size", "8")
    assert result.exit_code == 0, result.output
    rows = _read_csv(out)
    assert [r["arch"] for r in rows] == [GOLDEN, EMPTY]
    assert list(rows[0]) == ["arch", "params", "params_valid", "naswot", "naswot_valid"]
    assert rows[1]["naswot_valid"] in ("0", "1")
    if rows[1]["naswot_valid"] == "0":
        assert rows[1]["naswot"] == ""
    meta = json.loads((tmp_path / "out" / "scores.meta.json").read_text())
    assert meta["protocol"]["num_classes"] == 3  # from the file's classes array
    assert meta["protocol"]["input_size"] == 16
    assert meta["protocol"]["batch_size"] == 8
    assert len(meta["protocol"]["data_hash"]) == 16
    assert "naswot" in meta["timings"]


def test_score_resumes_from_cache(tmp_path, archs_file, small_npz):
    args = ["score", "--archs", archs_file, "--data", small_npz, "--proxies", "naswot", "--batch-size", "8"]
    first = _run(*args, "--out", str(tmp_path / "a.csv"))
    second = _run(*args, "--out", str(tmp_path / "b.csv"))
    assert first.exit_code == 0
    assert second.exit_code == 0
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
    cached = json.loads((tmp_path / "b.meta.json").read_text())
    fresh = json.loads((tmp_path / "a.meta.json").read_text())
    assert cached["timings"] == fresh["timings"]  # the second run read the first run's stored results


def test_sample_is_seeded(tmp_path, small_npz):
    def run(seed, name):
        result = _run("score", "--sample", "3", "--seed", str(seed), "--data", small_npz, "--proxies", "params",
                      "--out", str(tmp_path / name), "--batch-size", "4")
        assert result.exit_code == 0, result.output
        return [r["arch"] for r in _read_csv(tmp_path / name)]

    assert run(1, "a.csv") == run(1, "b.csv")
    assert run(1, "a.csv") != run(2, "c.csv")


def test_digits_sample_runs_as_data(tmp_path, archs_file):
    result = _run("score", "--archs", archs_file, "--data", "sklearn-digits", "--proxies", "params",
                  "--out", str(tmp_path / "s.csv"), "--batch-size", "4")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--proxies", "naswot,bogus"], "unknown proxy 'bogus'; known proxies:"),
        (["--data", "missing.npz"], "data not found"),
        (["--batch-size", "64"], "fewer than the batch size 64"),
        (["--num-classes", "2"], "out of range for 2 classes"),
    ],
)
def test_bad_input_gives_one_line_and_nonzero_exit(tmp_path, archs_file, small_npz, extra, fragment):
    args = {"--archs": archs_file, "--data": small_npz, "--proxies": "naswot", "--out": str(tmp_path / "s.csv"),
            "--batch-size": "8"}
    for key, value in zip(extra[::2], extra[1::2]):
        args[key] = value
    result = _run("score", *[item for pair in args.items() for item in pair])
    assert result.exit_code == 1
    assert fragment in result.stderr
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.output
    assert not (tmp_path / "s.csv").exists()


def test_malformed_architecture_names_line_and_position(tmp_path, small_npz):
    path = tmp_path / "archs.txt"
    path.write_text(GOLDEN + "\n" + GOLDEN.replace("nor_conv_1x1~1", "nor_conv_1x1~0") + "\n")
    result = _run("score", "--archs", str(path), "--data", small_npz, "--proxies", "params", "--out", str(tmp_path / "s.csv"))
    assert result.exit_code == 1
    assert "line 2" in result.stderr
    assert "input 2 of node 3" in result.stderr


def test_unwritable_output_is_rejected_before_scoring(tmp_path, archs_file, small_npz):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = _run("score", "--archs", archs_file, "--data", small_npz, "--proxies", "params",
                  "--out", str(blocker / "scores.csv"))
    assert result.exit_code == 1
    assert "cannot write to" in result.stderr


def test_architecture_choice_must_be_exactly_one(tmp_path, archs_file, small_npz):
    result = _run("score", "--archs", archs_file, "--all", "--data", small_npz, "--proxies", "params",
                  "--out", str(tmp_path / "s.csv"))
    assert result.exit_code == 1
    assert "exactly one of --archs" in result.stderr


def test_installed_command_prints_no_traceback(tmp_path, small_npz):
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"garbage")
    completed = subprocess.run(
        [sys.executable, "-m", "edge_runtime.cli", "score", "--sample", "2", "--data", str(corrupt),
         "--proxies", "params", "--out", str(tmp_path / "s.csv")],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 1
    assert completed.stderr.startswith("error: ")
    assert "Traceback" not in completed.stderr


def test_proxies_command_lists_aggregates():
    result = CliRunner().invoke(main, ["proxies"])
    assert result.exit_code == 0
    assert "naswot" in result.output
    assert "fgnas-forward    combines fgnas_fc, params" in result.output
    listed = json.loads(CliRunner().invoke(main, ["proxies", "--json"]).output)
    entries = {entry["name"]: entry for entry in listed}
    assert entries["fgnas"]["aggregate"] is True
    assert entries["fgnas"]["components"] == ["fgnas_fc", "fgnas_gi", "fgnas_gc", "params"]
    assert entries["naswot"]["aggregate"] is False


def test_sample_zero_names_the_count(tmp_path):
    result = CliRunner().invoke(main, ["score", "--sample", "0", "--data", "sklearn-digits", "--proxies", "params",
                                       "--out", str(tmp_path / "s.csv")])
    assert result.exit_code == 1
    assert "--sample must be a positive count, got 0" in result.stderr


def test_output_under_a_file_is_named(tmp_path):
    (tmp_path / "afile").write_text("")
    result = CliRunner().invoke(main, ["score", "--sample", "2", "--data", "sklearn-digits", "--proxies", "params",
                                       "--out", str(tmp_path / "afile" / "s.csv")])
    assert result.exit_code == 1
    assert "is a file, not a folder" in result.stderr
