"""Power meters: fabricated INA3221 sysfs trees, a fake jtop, the unavailable fallback, and sampling."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from edge_runtime.power import (
    JtopPowerMeter,
    PowerMeter,
    PowerReading,
    PowerSampler,
    SysfsPowerMeter,
    UnavailableMeter,
    open_power_meter,
    parse_jtop_power,
)
from models.errors import EdgeNasError


def write_files(folder: Path, files: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text + "\n")


@pytest.fixture
def hwmon_root(tmp_path):
    # Orin-style hwmon channels: VDD_IN 5000 mV x 1200 mA = 6 W, the CPU/GPU rail 5000 mV x 400 mA = 2 W.
    write_files(
        tmp_path / "class" / "hwmon" / "hwmon3",
        {
            "name": "ina3221",
            "in1_label": "VDD_IN",
            "in1_input": "5000",
            "curr1_input": "1200",
            "in2_label": "VDD_CPU_GPU_CV",
            "in2_input": "5000",
            "curr2_input": "400",
            "in3_label": "NC",
            "in3_input": "0",
            "curr3_input": "0",
        },
    )
    write_files(tmp_path / "class" / "hwmon" / "hwmon0", {"name": "thermal", "temp1_input": "40000"})
    return tmp_path


@pytest.fixture
def iio_root(tmp_path):
    # JetPack 4 iio channels in milliwatts: POM_5V_IN 3000 mW, POM_5V_GPU 500 mW.
    write_files(
        tmp_path / "bus" / "i2c" / "drivers" / "ina3221x" / "6-0040" / "iio:device0",
        {
            "rail_name_0": "POM_5V_IN",
            "in_power0_input": "3000",
            "rail_name_1": "POM_5V_GPU",
            "in_power1_input": "500",
        },
    )
    return tmp_path


@pytest.fixture
def no_jtop(monkeypatch):
    monkeypatch.setitem(sys.modules, "jtop", None)


def test_hwmon_rails_read_in_watts(hwmon_root):
    meter = SysfsPowerMeter.discover(hwmon_root)
    assert meter is not None
    reading = meter.read()
    assert reading.rails_w == pytest.approx({"VDD_IN": 6.0, "VDD_CPU_GPU_CV": 2.0})  # NC channel skipped


def test_iio_rails_read_in_watts(iio_root):
    meter = SysfsPowerMeter.discover(iio_root)
    assert meter is not None
    assert meter.read().rails_w == pytest.approx({"POM_5V_IN": 3.0, "POM_5V_GPU": 0.5})


def test_open_meter_prefers_sysfs_without_jtop(hwmon_root, no_jtop):
    meter = open_power_meter(sysfs_root=hwmon_root)
    assert isinstance(meter, SysfsPowerMeter)
    assert meter.available


def test_meter_unavailable_without_sources(tmp_path, no_jtop):
    meter = open_power_meter(sysfs_root=tmp_path)
    assert isinstance(meter, UnavailableMeter)
    assert not meter.available
    assert "jtop" in meter.reason
    assert "INA3221" in meter.reason
    with pytest.raises(EdgeNasError, match="power cannot be measured"):
        meter.read()


def test_unavailable_meter_rejects_sampling():
    with pytest.raises(EdgeNasError, match="no sensor"):
        PowerSampler(UnavailableMeter("no sensor"))


def test_sampler_total_uses_input_rail(hwmon_root):
    meter = SysfsPowerMeter.discover(hwmon_root)
    with PowerSampler(meter, interval_s=0.01) as sampler:
        pass
    summary = sampler.summary(mean_latency_ms=2.5)
    assert summary.samples >= 2  # one reading on entry and one on exit
    assert summary.total_w == pytest.approx(6.0)  # VDD_IN alone, not VDD_IN + its part
    assert summary.total_from == "rail VDD_IN"
    assert summary.energy_per_inference_mj == pytest.approx(15.0)  # 6 W x 2.5 ms


class FakeMeter(PowerMeter):
    name = "fake"

    def __init__(self, values):
        self.values = list(values)
        self.calls = 0

    def read(self):
        value = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1
        return PowerReading({"A": value, "B": 1.0})


def test_sampler_sums_rails_without_total_rail():
    with PowerSampler(FakeMeter([2.0, 4.0]), interval_s=10.0) as sampler:
        pass
    summary = sampler.summary()
    assert summary.rails_w == pytest.approx({"A": 3.0, "B": 1.0})  # mean of the entry and exit readings
    assert summary.total_w == pytest.approx(4.0)
    assert summary.total_from == "sum of rails"
    assert summary.energy_per_inference_mj is None


def test_sampler_reads_in_background():
    meter = FakeMeter([1.0])
    import time

    with PowerSampler(meter, interval_s=0.005) as sampler:
        time.sleep(0.1)
    assert sampler.summary().samples >= 5


@pytest.mark.parametrize(
    "power, rails, total",
    [
        ({"rail": {"VDD_IN": {"power": 5000, "online": True}, "VDD_SOC": {"power": 1500}}, "tot": {"power": 5000}},
         {"VDD_IN": 5.0, "VDD_SOC": 1.5}, 5.0),
        (({"cur": 4200, "avg": 4000}, {"POM_5V_IN": {"cur": 4200}, "POM_5V_GPU": {"cur": 800}}),
         {"POM_5V_IN": 4.2, "POM_5V_GPU": 0.8}, 4.2),
    ],
)
def test_parse_jtop_power_layouts(power, rails, total):
    reading = parse_jtop_power(power)
    assert reading.rails_w == pytest.approx(rails)
    assert reading.total_w == pytest.approx(total)


def fake_jtop_module(running: bool):
    class FakeJtop:
        power = {"rail": {"VDD_IN": {"power": 7000}}, "tot": {"power": 7000}}

        def start(self):
            if not running:
                raise RuntimeError("The jtop.service is not active")

        def ok(self):
            return True

        def close(self):
            pass

    module = types.ModuleType("jtop")
    module.jtop = FakeJtop
    return module


def test_jtop_meter_used_when_service_runs(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "jtop", fake_jtop_module(running=True))
    meter = open_power_meter(sysfs_root=tmp_path)
    assert isinstance(meter, JtopPowerMeter)
    with PowerSampler(meter, interval_s=10.0) as sampler:
        pass
    summary = sampler.summary(mean_latency_ms=1.0)
    assert summary.total_w == pytest.approx(7.0)
    assert summary.total_from == "jtop total"
    meter.close()


def test_jtop_service_down_falls_back_to_sysfs(hwmon_root, monkeypatch):
    monkeypatch.setitem(sys.modules, "jtop", fake_jtop_module(running=False))
    assert isinstance(open_power_meter(sysfs_root=hwmon_root), SysfsPowerMeter)
    unavailable = open_power_meter("jtop", sysfs_root=hwmon_root)
    assert "not running" in unavailable.reason
