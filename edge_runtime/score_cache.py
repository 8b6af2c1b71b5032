"""SQLite cache of proxy results, so that an interrupted scoring run resumes where it stopped."""
from __future__ import annotations

import json
import logging
import os
import sqlite3
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

from models.proxies import ProxyResult

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS scores (
    space TEXT NOT NULL,
    arch TEXT NOT NULL,
    proxy TEXT NOT NULL,
    protocol TEXT NOT NULL,
    value REAL,
    valid INTEGER NOT NULL,
    reason TEXT NOT NULL,
    details TEXT NOT NULL,
    PRIMARY KEY (space, arch, proxy, protocol)
)
"""


def default_cache_path() -> Path:
    base = os.environ.get("EDGE_NAS_CACHE") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    if os.environ.get("EDGE_NAS_CACHE"):
        return Path(base)
    return Path(base) / "edge-nas" / "scores.sqlite"


def protocol_key(**fields: object) -> str:
    """A stable text key from the settings that change a score (data hash, batch, seed, version, options)."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)


class ScoreCache:
    """Proxy results keyed by space, architecture, proxy and protocol key. Each write commits at once."""

    def __init__(self, path: Optional[Path] = None) -> None:
        self.path = Path(path) if path is not None else default_cache_path()
        if str(self.path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._connection = sqlite3.connect(str(self.path), timeout=30)
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.execute(_SCHEMA)
        self._connection.commit()

    def get_many(self, space: str, arch: str, proxies: Iterable[str], protocol: Dict[str, str]) -> Dict[str, ProxyResult]:
        """Cached results for the proxies that have one; `protocol` maps each proxy to its key."""
        found: Dict[str, ProxyResult] = {}
        for proxy in proxies:
            row = self._connection.execute(
                "SELECT value, valid, reason, details FROM scores WHERE space=? AND arch=? AND proxy=? AND protocol=?",
                (space, arch, proxy, protocol[proxy]),
            ).fetchone()
            if row is not None:
                value, valid, reason, details = row
                found[proxy] = ProxyResult(value, bool(valid), reason, json.loads(details))
        return found

    def put_many(self, space: str, arch: str, results: Dict[str, ProxyResult], protocol: Dict[str, str]) -> None:
        rows = [
            (space, arch, proxy, protocol[proxy], r.value, int(r.valid), r.reason, json.dumps(r.details, default=str))
            for proxy, r in results.items()
        ]
        with self._connection:
            self._connection.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> "ScoreCache":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def split_cached(
    cache: Optional[ScoreCache], space: str, arch: str, proxies: Iterable[str], protocol: Dict[str, str]
) -> Tuple[Dict[str, ProxyResult], list]:
    proxies = list(proxies)
    cached = cache.get_many(space, arch, proxies, protocol) if cache is not None else {}
    return cached, [p for p in proxies if p not in cached]
