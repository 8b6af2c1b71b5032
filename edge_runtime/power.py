"""Board power readings behind one interface, sampled in a background thread while a model runs.

Sources, tried in this order by `open_power_meter`:

1. jetson-stats (`jtop`), when the package imports and its service is running.
2. The INA3221 power monitors in sysfs. Newer kernels (JetPack 5 and later) expose them
   through hwmon as `in<N>_label`, `curr<N>_input` (mA) and `in<N>_input` (mV). Older ones
   (JetPack 4) use the iio driver `ina3221x` with `rail_name_<N>` and `in_power<N>_input` (mW).
3. `UnavailableMeter` everywhere else, which reports the reason and never a guessed value.
"""
from __future__ import annotations

import logging
import math
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Dict, List, Optional, Sequence, Tuple, Union

from models.errors import EdgeNasError

logger = logging.getLogger(__name__)

DEFAULT_SYSFS_ROOT = Path("/sys")
DEFAULT_SAMPLE_INTERVAL_S = 0.05

# Rails that carry the whole module's input power on Jetson boards (Orin: VDD_IN; Xavier,
# Nano and TX2 under JetPack 4: POM_5V_IN). The other rails are parts of it, so adding
# them to it would count power twice.
TOTAL_RAIL_NAMES = ("VDD_IN", "POM_5V_IN", "VIN_SYS_5V0")

# Channel labels that mark an INA3221 input with nothing connected.
_UNCONNECTED_LABELS = ("", "NC")


@dataclass(frozen=True)
class PowerReading:
    """Instantaneous power per rail in watts, and the board total when the source reports one."""

    rails_w: Dict[str, float]
    total_w: Optional[float] = None


class PowerMeter:
    """A source of instantaneous power per rail, in watts."""

    name = "unavailable"

    @property
    def available(self) -> bool:
        return True

    @property
    def reason(self) -> str:
        """Why the meter cannot measure; empty when it can."""
        return ""

    def read(self) -> PowerReading:
        """Read the present power of each rail."""
        raise NotImplementedError

    def total_rail(self, rails: Sequence[str]) -> Optional[str]:
        """The rail that carries the whole board's power, or None when the rails must be summed."""
        for candidate in TOTAL_RAIL_NAMES:
            if candidate in rails:
                return candidate
        return None

    def close(self) -> None:
        """Release the meter's resources (a jtop connection)."""

    def describe(self) -> Dict[str, Any]:
        return {"source": self.name, "available": self.available, "reason": self.reason}


class UnavailableMeter(PowerMeter):
    """The meter used where no power source exists: it reports the reason and never a value."""

    name = "unavailable"

    def __init__(self, reason: str) -> None:
        self._reason = reason

    @property
    def available(self) -> bool:
        return False

    @property
    def reason(self) -> str:
        return self._reason

    def read(self) -> PowerReading:
        raise EdgeNasError(f"power cannot be measured on this machine: {self._reason}")


@dataclass(frozen=True)
class SysfsRail:
    """One INA3221 channel: its label and the files to read (current and voltage, or power)."""

    name: str
    power_file: Optional[Path] = None  # milliwatts
    current_file: Optional[Path] = None  # milliamperes
    voltage_file: Optional[Path] = None  # millivolts

    def read_watts(self) -> float:
        if self.power_file is not None:
            return _read_number(self.power_file) / 1000.0
        assert self.current_file is not None and self.voltage_file is not None
        return _read_number(self.current_file) * _read_number(self.voltage_file) / 1e6


class SysfsPowerMeter(PowerMeter):
    """INA3221 rails read from sysfs; `root` replaces /sys, so a test can build a fake tree."""

    name = "ina3221-sysfs"

    def __init__(self, rails: Sequence[SysfsRail], root: Path = DEFAULT_SYSFS_ROOT) -> None:
        if not rails:
            raise ValueError("a sysfs power meter needs at least one rail")
        self.rails = list(rails)
        self.root = root

    @classmethod
    def discover(cls, root: Union[str, Path] = DEFAULT_SYSFS_ROOT) -> Optional["SysfsPowerMeter"]:
        """Find readable INA3221 rails under `root`; return None when there are none."""
        root = Path(root)
        rails = find_hwmon_rails(root) or find_iio_rails(root)
        readable = []
        for rail in rails:
            try:
                rail.read_watts()
            except (OSError, ValueError) as error:
                logger.debug("power rail %s is not readable: %s", rail.name, error)
                continue
            readable.append(rail)
        return cls(readable, root) if readable else None

    def read(self) -> PowerReading:
        return PowerReading({rail.name: rail.read_watts() for rail in self.rails})

    def describe(self) -> Dict[str, Any]:
        described = super().describe()
        described["rails"] = [rail.name for rail in self.rails]
        return described


def find_hwmon_rails(root: Path) -> List[SysfsRail]:
    """Rails of the mainline `ina3221` hwmon driver: in<N>_label, curr<N>_input, in<N>_input."""
    folders = set()
    for pattern in ("class/hwmon/hwmon*", "bus/i2c/drivers/ina3221/*/hwmon/hwmon*"):
        for folder in root.glob(pattern):
            if _read_text(folder / "name") == "ina3221":
                folders.add(folder.resolve())
    rails: List[SysfsRail] = []
    for folder in sorted(folders):
        for label_file in sorted(folder.glob("in*_label"), key=_channel_number):
            channel = _channel_number(label_file)
            label = _read_text(label_file)
            current, voltage = folder / f"curr{channel}_input", folder / f"in{channel}_input"
            if label is None or label.strip() in _UNCONNECTED_LABELS or not current.exists() or not voltage.exists():
                continue
            rails.append(SysfsRail(_unique_name(label.strip(), rails), current_file=current, voltage_file=voltage))
    return rails


def find_iio_rails(root: Path) -> List[SysfsRail]:
    """Rails of the older `ina3221x` iio driver: rail_name_<N> with in_power<N>_input (mW)."""
    rails: List[SysfsRail] = []
    for folder in sorted(root.glob("bus/i2c/drivers/ina3221x/*/iio*device*")):
        for name_file in sorted(folder.glob("rail_name_*"), key=_channel_number):
            channel = _channel_number(name_file)
            label = _read_text(name_file)
            if label is None or label.strip() in _UNCONNECTED_LABELS:
                continue
            power = folder / f"in_power{channel}_input"
            current, voltage = folder / f"in_current{channel}_input", folder / f"in_voltage{channel}_input"
            if power.exists():
                rails.append(SysfsRail(_unique_name(label.strip(), rails), power_file=power))
            elif current.exists() and voltage.exists():
                rails.append(SysfsRail(_unique_name(label.strip(), rails), current_file=current, voltage_file=voltage))
    return rails


class JtopPowerMeter(PowerMeter):
    """Power from the jetson-stats service through a `jtop` connection (values in mW)."""

    name = "jtop"

    def __init__(self, connection: Any) -> None:
        self._jetson = connection

    @classmethod
    def connect(cls) -> Tuple[Optional["JtopPowerMeter"], str]:
        """Connect to the jtop service; return (meter, "") or (None, why not)."""
        try:
            from jtop import jtop
        except ImportError:
            return None, "jetson-stats (jtop) is not installed"
        try:
            connection = jtop()
        except Exception as error:  # jtop's constructor checks the service's socket and may raise
            return None, f"the jtop service is not reachable ({error}); start it with `sudo systemctl start jtop`"
        try:
            connection.start()
            if not connection.ok():
                raise RuntimeError("the jtop service sent no data")
        except Exception as error:  # jtop raises its own JtopException, among others, when the service is down
            _close_quietly(connection)
            return None, f"the jtop service is not running ({error}); start it with `sudo systemctl start jtop`"
        meter = cls(connection)
        try:
            meter.read()
        except (KeyError, TypeError, ValueError) as error:
            meter.close()
            return None, f"jtop returned power in an unknown layout ({error})"
        return meter, ""

    def read(self) -> PowerReading:
        return parse_jtop_power(self._jetson.power)

    def close(self) -> None:
        _close_quietly(self._jetson)


def parse_jtop_power(power: Any) -> PowerReading:
    """Convert jtop's `power` attribute (milliwatts) to a reading in watts.

    jetson-stats 4 returns {"rail": {name: {"power": mW, ...}}, "tot": {"power": mW, ...}};
    jetson-stats 3 returns a tuple (total, rails) whose entries hold {"cur": mW, ...}.
    """
    if isinstance(power, dict):
        rail_entries = power["rail"]
        total_entry = power.get("tot")
        key = "power"
    else:
        total_entry, rail_entries = power
        key = "cur"
    rails = {str(name): float(entry[key]) / 1000.0 for name, entry in rail_entries.items()}
    total = float(total_entry[key]) / 1000.0 if total_entry else None
    return PowerReading(rails, total)


def open_power_meter(
    source: str = "auto",
    *,
    sysfs_root: Union[str, Path] = DEFAULT_SYSFS_ROOT,
) -> PowerMeter:
    """Open the first power source that works: `auto` tries jtop, then sysfs; or name one."""
    if source not in ("auto", "jtop", "sysfs"):
        raise EdgeNasError(f"unknown power source {source!r}; expected auto, jtop or sysfs")
    reasons: List[str] = []
    if source in ("auto", "jtop"):
        meter, reason = JtopPowerMeter.connect()
        if meter is not None:
            return meter
        reasons.append(reason)
    if source in ("auto", "sysfs"):
        sysfs_meter = SysfsPowerMeter.discover(sysfs_root)
        if sysfs_meter is not None:
            return sysfs_meter
        reasons.append(f"no readable INA3221 power rails under {sysfs_root}")
    return UnavailableMeter("; ".join(reasons))


@dataclass(frozen=True)
class PowerSummary:
    """Mean power over a sampling window, and the energy of one inference derived from it."""

    source: str
    rails_w: Dict[str, float]
    total_w: float
    total_from: str
    samples: int
    seconds: float
    energy_per_inference_mj: Optional[float] = None
    details: Dict[str, Any] = field(default_factory=dict)

    def describe(self) -> Dict[str, Any]:
        return {
            "source": self.source,
            "mean_w_per_rail": dict(self.rails_w),
            "total_w": self.total_w,
            "total_from": self.total_from,
            "energy_per_inference_mj": self.energy_per_inference_mj,
            "samples": self.samples,
            "seconds": self.seconds,
        }


class PowerSampler:
    """Read a meter every `interval_s` in a background thread while the `with` body runs.

    One reading is taken on entry and one on exit, so even a short window has two. The
    summary is total board power while the model runs, idle power included: the energy per
    inference is that power times the mean latency.
    """

    def __init__(self, meter: PowerMeter, interval_s: float = DEFAULT_SAMPLE_INTERVAL_S) -> None:
        if not meter.available:
            raise EdgeNasError(f"power cannot be measured on this machine: {meter.reason}")
        if interval_s <= 0:
            raise ValueError(f"the sampling interval must be positive, got {interval_s}")
        self.meter = meter
        self.interval_s = interval_s
        self._readings: List[PowerReading] = []
        self._errors: List[str] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._started = 0.0
        self._seconds = 0.0

    def __enter__(self) -> "PowerSampler":
        self._readings.clear()
        self._errors.clear()
        self._stop.clear()
        self._started = time.perf_counter()
        self._take_reading()
        self._thread = threading.Thread(target=self._run, name="edge-nas-power", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._take_reading()
        self._seconds = time.perf_counter() - self._started

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._take_reading()

    def _take_reading(self) -> None:
        try:
            self._readings.append(self.meter.read())
        except (OSError, ValueError, KeyError, TypeError) as error:
            # A rail can fail once (an I2C read timing out); the summary reports how many failed.
            self._errors.append(str(error))

    def summary(self, mean_latency_ms: Optional[float] = None) -> PowerSummary:
        """Mean watts per rail and in total; with the mean latency, the energy per inference in mJ."""
        if not self._readings:
            detail = f": {self._errors[-1]}" if self._errors else ""
            raise EdgeNasError(f"the power meter {self.meter.name} returned no reading{detail}")
        if self._errors:
            logger.warning("%d of %d power readings failed, last error: %s",
                           len(self._errors), len(self._errors) + len(self._readings), self._errors[-1])
        names = sorted({name for reading in self._readings for name in reading.rails_w})
        rails = {}
        for name in names:
            values = [r.rails_w[name] for r in self._readings if math.isfinite(r.rails_w.get(name, math.nan))]
            if values:
                rails[name] = sum(values) / len(values)
        totals = [r.total_w for r in self._readings if r.total_w is not None and math.isfinite(r.total_w)]
        total_rail = self.meter.total_rail(list(rails))
        if totals and len(totals) == len(self._readings):
            total, total_from = sum(totals) / len(totals), f"{self.meter.name} total"
        elif total_rail is not None:
            total, total_from = rails[total_rail], f"rail {total_rail}"
        else:
            # NOTE: on a board whose rails nest (one feeds another), this sum counts power twice.
            total, total_from = sum(rails.values()), "sum of rails"
        energy = total * mean_latency_ms if mean_latency_ms is not None else None  # W x ms = mJ
        return PowerSummary(
            source=self.meter.name,
            rails_w=rails,
            total_w=total,
            total_from=total_from,
            samples=len(self._readings),
            seconds=self._seconds,
            energy_per_inference_mj=energy,
            details={"failed_readings": len(self._errors)},
        )


def _read_text(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _read_number(path: Path) -> float:
    return float(path.read_text().strip())


def _channel_number(path: Path) -> int:
    match = re.search(r"(\d+)", path.name)
    return int(match.group(1)) if match else -1


def unique_label(label: str, existing: Collection[str]) -> str:
    """Return `label`, or the first of `label#2`, `label#3`, ... that is not in `existing`."""
    if label not in existing:
        return label
    suffix = 2
    while f"{label}#{suffix}" in existing:
        suffix += 1
    return f"{label}#{suffix}"


def _unique_name(label: str, rails: Sequence[SysfsRail]) -> str:
    return unique_label(label, {rail.name for rail in rails})


def _close_quietly(connection: Any) -> None:
    try:
        connection.close()
    except Exception as error:  # closing a half-started jtop connection can raise anything
        logger.debug("closing the jtop connection failed: %s", error)
