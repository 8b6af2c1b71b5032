"""The cloud side of edge-nas: the MQTT protocol between device and cloud, and the coordinator."""
from __future__ import annotations
