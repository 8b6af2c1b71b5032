"""Telemetry for the daemon's heartbeat: power per rail, temperatures, CPU load and GPU load.

Each reading is a dict with `available`. A reading this machine cannot take has
`available: false` and the `reason`, and never a guessed value. `root` replaces /sys and
/proc, so a test can build a fake tree.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from edge_runtime.power import PowerMeter, unique_label

logger = logging.getLogger(__name__)

# devfreq device names of Jetson GPUs: gv11b (Xavier), ga10b (Orin), gp10b (TX2), gm20b (Nano), or "gpu".
_GPU_NAME_PARTS = ("gpu", "gv11b", "ga10b", "gp10b", "gm20b")


class Telemetry:
    """Reader of the heartbeat's telemetry. Its CPU load is the busy share of CPU time since the previous read."""

    def __init__(self, meter: PowerMeter, root: Union[str, Path] = "/") -> None:
        self.meter = meter
        self.root = Path(root)
        self._last_cpu: Optional[Tuple[int, int]] = None

    def read(self) -> Dict[str, Any]:
        return {
            "power": self.power(),
            "temperatures": self.temperatures(),
            "cpu": self.cpu(),
            "gpu": self.gpu(),
        }

    def power(self) -> Dict[str, Any]:
        """Read the power per rail in watts and the board total from the daemon's power meter."""
        if not self.meter.available:
            return {"available": False, "reason": self.meter.reason}
        try:
            reading = self.meter.read()
        except Exception as error:  # meters raise OSError, ValueError or jtop's own exceptions
            return {"available": False, "reason": f"reading {self.meter.name} failed: {error}"}
        rails = {name: watts for name, watts in reading.rails_w.items() if math.isfinite(watts)}
        total = reading.total_w
        if total is None:
            rail = self.meter.total_rail(list(rails))
            # Without a board input rail the total stays unknown: summing nested rails would count power twice.
            total = rails.get(rail) if rail is not None else None
        return {"available": True, "source": self.meter.name, "rails_w": rails, "total_w": total}

    def temperatures(self) -> Dict[str, Any]:
        """Read the temperature of every thermal zone in degrees Celsius from /sys/class/thermal (millidegrees)."""
        zones: Dict[str, float] = {}
        folder = self.root / "sys" / "class" / "thermal"
        for zone in sorted(folder.glob("thermal_zone*")):
            name = _read_text(zone / "type") or zone.name
            value = _read_text(zone / "temp")
            try:
                celsius = int(value) / 1000.0 if value is not None else None
            except ValueError:
                celsius = None
            if celsius is not None:
                zones[unique_label(name, zones)] = celsius
        if not zones:
            return {"available": False, "reason": f"no readable thermal zone under {folder}"}
        return {"available": True, "celsius": zones}

    def cpu(self) -> Dict[str, Any]:
        """Read the CPU load: busy percent since the last read (from /proc/stat) and the load averages."""
        stat = self.root / "proc" / "stat"
        times = _cpu_times(stat)
        if times is None:
            return {"available": False, "reason": f"{stat} is not readable"}
        busy_percent = None
        if self._last_cpu is not None:
            busy = times[0] - self._last_cpu[0]
            total = times[1] - self._last_cpu[1]
            busy_percent = round(100.0 * busy / total, 1) if total > 0 else None
        self._last_cpu = times
        reading: Dict[str, Any] = {"available": True, "busy_percent": busy_percent, "cores": os.cpu_count()}
        try:
            reading["load_average"] = [round(value, 2) for value in os.getloadavg()]
        except OSError:
            reading["load_average"] = None
        return reading

    def gpu(self) -> Dict[str, Any]:
        """Read the GPU load in percent from the `load` file of a Jetson GPU (tenths of a percent)."""
        # NOTE: these paths follow the Jetson GPU driver's layout; they were checked against a
        # fake tree in the tests, not on a board.
        candidates: List[Path] = [self.root / "sys" / "devices" / "gpu.0" / "load"]
        devfreq = self.root / "sys" / "class" / "devfreq"
        for device in sorted(devfreq.glob("*")):
            if any(part in device.name.lower() for part in _GPU_NAME_PARTS):
                candidates.append(device / "device" / "load")
        for path in candidates:
            value = _read_text(path)
            if value is None:
                continue
            try:
                return {"available": True, "load_percent": int(value) / 10.0, "source": str(path)}
            except ValueError:
                logger.debug("the GPU load file %s contains %r, not a number", path, value)
        return {"available": False, "reason": "no GPU load file of a Jetson GPU under /sys on this machine"}


def _cpu_times(path: Path) -> Optional[Tuple[int, int]]:
    """(busy, total) jiffies of the `cpu` line of /proc/stat; idle and iowait count as not busy."""
    text = _read_text(path)
    if text is None:
        return None
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            try:
                values = [int(part) for part in parts[1:]]
            except ValueError:
                return None
            # Fields: user nice system idle iowait irq softirq steal guest guest_nice; guest time is
            # already inside user and nice, so the total stops at steal.
            counted = values[:8]
            idle = sum(values[3:5])
            return sum(counted) - idle, sum(counted)
    return None


def _read_text(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
