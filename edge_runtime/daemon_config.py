"""The device daemon's configuration: find the TOML file, check every key, and fill in the defaults.

The file is searched in this order: the `--config` path, `/etc/edge-nas/config.toml`, then
`$XDG_CONFIG_HOME/edge-nas/config.toml` (`~/.config/edge-nas/config.toml` without the
variable). Every mistake (a missing file, invalid TOML, an unknown key, a wrong type, a value
out of range) raises EdgeNasError with one line that names the file, the key and the fix.
`docs/edge-nas.example.toml` lists every key with its default.
"""
from __future__ import annotations

import difflib
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from cloud_sync import protocol
from models.errors import EdgeNasError

SYSTEM_CONFIG_PATH = Path("/etc/edge-nas/config.toml")
EXAMPLE_NAME = "docs/edge-nas.example.toml"
LOG_LEVELS = ("debug", "info", "warning", "error")

DEFAULT_BROKER_URL = "mqtt://localhost:1883"
DEFAULT_HEARTBEAT_S = 30.0
# systemd's default TimeoutStopSec is 90 s. The daemon gives its job far less, so a stop stays quick.
DEFAULT_STOP_TIMEOUT_S = 5.0
DEFAULT_KEEPALIVE_S = 30
DEFAULT_SESSION_EXPIRY_S = 24 * 3600
DEFAULT_WATCH_NEW_IMAGES = 100
DEFAULT_WATCH_INTERVAL_S = 60.0
# MQTT 5 sends the keepalive as a 16-bit and the session expiry as a 32-bit unsigned integer.
MAX_KEEPALIVE_S = 65535
MAX_SESSION_EXPIRY_S = 2**32 - 1
# A heartbeat expires after three intervals, and that expiry must also fit in 32 bits; a day is ample.
MAX_HEARTBEAT_S = 24 * 3600.0
# Python's thread join rejects a timeout beyond the platform's time_t. An hour is far above any
# checkpoint interval, and the unit's TimeoutStopSec must exceed this value anyway.
MAX_STOP_TIMEOUT_S = 3600.0
# Broker user names of the controllers and the coordinators (docs/broker.md, docs/daemon.md).
# A device with one of these ids would log in with their rights under the documented ACL.
RESERVED_DEVICE_IDS = ("operator", "coordinator")

# The defaults of a personalize job, equal to those of `edge-nas personalize`.
DEFAULT_SPACE = "nb201"
DEFAULT_BUDGET = 200
DEFAULT_FINALISTS = 8
DEFAULT_BATCH_SIZE = 64
DEFAULT_SEARCH = "random"
DEFAULT_SEED = 0

Check = Callable[[Any], Optional[str]]


def _at_least(low: float) -> Check:
    return lambda value: None if value >= low else f"must be at least {low:g}"


def _between(low: int, high: int) -> Check:
    return lambda value: None if low <= value <= high else f"must be between {low} and {high}"


def _positive_at_most(high: float) -> Check:
    def check(value: Any) -> Optional[str]:
        if math.isfinite(value) and 0 < value <= high:
            return None
        return f"must be above 0 and at most {high:g}"

    return check


def _positive(value: Any) -> Optional[str]:
    return None if math.isfinite(value) and value > 0 else "must be a positive number"


def _one_of(choices: Tuple[str, ...]) -> Check:
    return lambda value: None if value in choices else f"must be one of {', '.join(repr(c) for c in choices)}"


@dataclass(frozen=True)
class _Key:
    """One configuration key: its TOML type, its default (None: unset) and an optional range check."""

    kind: str  # "string", "integer", "number", "boolean", "count" (integer or "800k"), "path"
    default: Any = None
    check: Optional[Check] = None


# Table name ("" for the top level) -> key name -> _Key.
SCHEMA: Dict[str, Dict[str, _Key]] = {
    "": {
        "device_id": _Key("string"),
        "state_dir": _Key("path"),
        "data_dir": _Key("path"),
        "log_level": _Key("string", "info", _one_of(LOG_LEVELS)),
        "heartbeat_s": _Key("number", DEFAULT_HEARTBEAT_S, _positive_at_most(MAX_HEARTBEAT_S)),
        "stop_timeout_s": _Key("number", DEFAULT_STOP_TIMEOUT_S, _positive_at_most(MAX_STOP_TIMEOUT_S)),
    },
    "broker": {
        "url": _Key("string", DEFAULT_BROKER_URL),
        "username": _Key("string"),
        "password_file": _Key("path"),
        "ca_file": _Key("path"),
        "keepalive_s": _Key("integer", DEFAULT_KEEPALIVE_S, _between(5, MAX_KEEPALIVE_S)),
        "session_expiry_s": _Key("integer", DEFAULT_SESSION_EXPIRY_S, _between(0, MAX_SESSION_EXPIRY_S)),
    },
    "personalize": {
        "space": _Key("string", DEFAULT_SPACE),
        # The same ranges as the arguments of a personalize command (cloud_sync.protocol).
        "input_size": _Key("integer", None, _between(1, protocol.MAX_INPUT_SIZE)),
        "width_mult": _Key("number", None, _positive_at_most(protocol.MAX_WIDTH_MULT)),
        "budget": _Key("integer", DEFAULT_BUDGET, _between(1, protocol.MAX_BUDGET)),
        "finalists": _Key("integer", DEFAULT_FINALISTS, _between(1, protocol.MAX_ARCHS)),
        "search": _Key("string", DEFAULT_SEARCH, _one_of(("random", "evolution"))),
        "seed": _Key("integer", DEFAULT_SEED, _between(0, protocol.MAX_SEED)),
        "batch_size": _Key("integer", DEFAULT_BATCH_SIZE, _between(2, protocol.MAX_BATCH_SIZE)),
        "threads": _Key("integer", None, _at_least(1)),
    },
    "constraints": {
        "max_params": _Key("count"),
        "max_flops": _Key("count"),
        "max_latency_ms": _Key("number", None, _positive),
        "max_power_w": _Key("number", None, _positive),
        "max_energy_mj": _Key("number", None, _positive),
    },
    "watch": {
        "enabled": _Key("boolean", False),
        "new_images": _Key("integer", DEFAULT_WATCH_NEW_IMAGES, _at_least(1)),
        "interval_s": _Key("number", DEFAULT_WATCH_INTERVAL_S, _positive),
    },
}


@dataclass(frozen=True)
class BrokerConfig:
    """Broker connection settings of the daemon."""

    url: str
    username: Optional[str] = None
    password_file: Optional[Path] = None
    ca_file: Optional[Path] = None
    keepalive_s: int = DEFAULT_KEEPALIVE_S
    session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S

    def settings(self) -> Any:
        """Return the `cloud_sync.client.BrokerSettings` of this configuration."""
        from cloud_sync.client import BrokerSettings

        return BrokerSettings(
            self.url, username=self.username, password_file=self.password_file, ca_file=self.ca_file,
            keepalive_s=self.keepalive_s,
        )


@dataclass(frozen=True)
class JobDefaults:
    """The arguments of a personalize job that a command leaves out."""

    space: str = DEFAULT_SPACE
    input_size: Optional[int] = None
    width_mult: Optional[float] = None
    budget: int = DEFAULT_BUDGET
    finalists: int = DEFAULT_FINALISTS
    search: str = DEFAULT_SEARCH
    seed: int = DEFAULT_SEED
    batch_size: int = DEFAULT_BATCH_SIZE
    threads: Optional[int] = None
    constraints: Dict[str, Any] = field(default_factory=dict)

    def arguments(self) -> Dict[str, Any]:
        """Return the defaults as personalize-command arguments, leaving out unset ones."""
        values = {
            "space": self.space, "input_size": self.input_size, "width_mult": self.width_mult,
            "budget": self.budget, "finalists": self.finalists, "search": self.search, "seed": self.seed,
            "batch_size": self.batch_size,
        }
        arguments = {name: value for name, value in values.items() if value is not None}
        arguments["constraints"] = {name: value for name, value in self.constraints.items() if value is not None}
        return arguments


@dataclass(frozen=True)
class WatchConfig:
    """Re-run personalisation when `new_images` images have arrived in the data folder."""

    enabled: bool = False
    new_images: int = DEFAULT_WATCH_NEW_IMAGES
    interval_s: float = DEFAULT_WATCH_INTERVAL_S


@dataclass(frozen=True)
class DaemonConfig:
    """The checked configuration of one daemon, with every default filled in."""

    path: Optional[Path]
    device_id: str
    state_dir: Path
    data_dir: Path
    broker: BrokerConfig
    defaults: JobDefaults = field(default_factory=JobDefaults)
    watch: WatchConfig = field(default_factory=WatchConfig)
    log_level: str = "info"
    heartbeat_s: float = DEFAULT_HEARTBEAT_S
    stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S

    @property
    def jobs_path(self) -> Path:
        return self.state_dir / "jobs.sqlite"

    @property
    def cache_path(self) -> Path:
        return self.state_dir / "scores.sqlite"

    @property
    def results_dir(self) -> Path:
        return self.state_dir / "results"

    def describe(self) -> Dict[str, Any]:
        """Return the effective configuration as plain values (what `edge-nas daemon --check` prints)."""
        return {
            "config_file": str(self.path) if self.path else None,
            "device_id": self.device_id,
            "state_dir": str(self.state_dir),
            "data_dir": str(self.data_dir),
            "log_level": self.log_level,
            "heartbeat_s": self.heartbeat_s,
            "stop_timeout_s": self.stop_timeout_s,
            "broker": {
                "url": self.broker.url,
                "username": self.broker.username,
                "password_file": str(self.broker.password_file) if self.broker.password_file else None,
                "ca_file": str(self.broker.ca_file) if self.broker.ca_file else None,
                "keepalive_s": self.broker.keepalive_s,
                "session_expiry_s": self.broker.session_expiry_s,
            },
            "personalize": dict(self.defaults.arguments(), threads=self.defaults.threads),
            "watch": {
                "enabled": self.watch.enabled, "new_images": self.watch.new_images, "interval_s": self.watch.interval_s,
            },
        }


def config_search_paths(environ: Optional[Mapping[str, str]] = None) -> List[Path]:
    """Return the places searched for the configuration file when `--config` is not given, in order."""
    environ = os.environ if environ is None else environ
    xdg = environ.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg else _home(environ) / ".config"
    return [SYSTEM_CONFIG_PATH, base / "edge-nas" / "config.toml"]


def find_config(explicit: Optional[str] = None, environ: Optional[Mapping[str, str]] = None) -> Path:
    """Return the configuration file to read; raise EdgeNasError when it does not exist."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise EdgeNasError(
                f"configuration file {path} not found; check the --config path or create the file from {EXAMPLE_NAME}"
            )
        return path
    searched = config_search_paths(environ)
    for path in searched:
        if path.is_file():
            return path
    raise EdgeNasError(
        f"no configuration file found at {' or '.join(str(p) for p in searched)}; "
        f"create one from {EXAMPLE_NAME} or pass --config PATH"
    )


def load_config(explicit: Optional[str] = None, environ: Optional[Mapping[str, str]] = None) -> DaemonConfig:
    """Find, read and check the configuration file; raise EdgeNasError naming the first mistake."""
    environ = os.environ if environ is None else environ
    path = find_config(explicit, environ)
    return parse_config(_read_toml(path), path, environ)


def parse_config(document: Mapping[str, Any], path: Optional[Path], environ: Optional[Mapping[str, str]] = None) -> DaemonConfig:
    """Check a parsed TOML document against SCHEMA and build the configuration with its defaults."""
    from cloud_sync.client import default_device_id

    environ = os.environ if environ is None else environ
    where = str(path) if path is not None else "configuration"
    values = _checked_values(document, where)
    # Absolute, so that the folders in the log and the result paths sent to controllers do not depend on the working folder.
    base = path.parent.absolute() if path is not None else Path.cwd()
    top, broker, job, constraints, watch = (
        values[""], values["broker"], values["personalize"], values["constraints"], values["watch"],
    )

    device_id = top["device_id"] if top["device_id"] is not None else default_device_id()
    for key, check in (
        ("device_id", lambda: protocol.check_id(device_id, "device id")),
        ("broker.url", lambda: protocol.parse_broker_url(broker["url"])),
    ):
        try:
            check()
        except EdgeNasError as error:
            raise EdgeNasError(f"{where}: {key}: {error}") from None
    if device_id in RESERVED_DEVICE_IDS:
        raise EdgeNasError(
            f"{where}: device_id {device_id!r} is the broker user name of "
            f"{'the controllers' if device_id == 'operator' else 'the cloud coordinators'}; choose another device id"
        )
    _check_space(job["space"], job["width_mult"], where)

    state_dir = _resolve(top["state_dir"], base) if top["state_dir"] is not None else default_state_dir(environ)
    data_dir = _resolve(top["data_dir"], base) if top["data_dir"] is not None else state_dir / "data"
    broker_config = BrokerConfig(
        url=broker["url"],
        username=broker["username"],
        password_file=_resolve(broker["password_file"], base) if broker["password_file"] is not None else None,
        ca_file=_resolve(broker["ca_file"], base) if broker["ca_file"] is not None else None,
        keepalive_s=broker["keepalive_s"],
        session_expiry_s=broker["session_expiry_s"],
    )
    try:
        broker_config.settings().login()
    except EdgeNasError as error:
        raise EdgeNasError(f"{where}: [broker]: {error}") from None
    if job["finalists"] > job["budget"]:
        raise EdgeNasError(
            f"{where}: personalize.finalists ({job['finalists']}) must not exceed personalize.budget ({job['budget']})"
        )
    defaults = JobDefaults(constraints=dict(constraints), **job)
    return DaemonConfig(
        path=path,
        device_id=device_id,
        state_dir=state_dir,
        data_dir=data_dir,
        broker=broker_config,
        defaults=defaults,
        watch=WatchConfig(**watch),
        log_level=top["log_level"],
        heartbeat_s=float(top["heartbeat_s"]),
        stop_timeout_s=float(top["stop_timeout_s"]),
    )


def default_state_dir(environ: Optional[Mapping[str, str]] = None) -> Path:
    """Return `$STATE_DIRECTORY` (set by systemd's StateDirectory=), else the XDG state folder."""
    environ = os.environ if environ is None else environ
    systemd = environ.get("STATE_DIRECTORY")
    if systemd:
        # systemd lists several folders separated by ':' when the unit names several.
        return Path(systemd.split(":")[0])
    xdg = environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else _home(environ) / ".local" / "state"
    return base / "edge-nas"


def _home(environ: Mapping[str, str]) -> Path:
    home = environ.get("HOME")
    return Path(home) if home else Path.home()


def _read_toml(path: Path) -> Dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        try:
            import tomli as tomllib
        except ImportError:
            raise EdgeNasError(
                "reading the configuration needs the tomli package on Python before 3.11; install it with pip install tomli"
            ) from None
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as error:
        raise EdgeNasError(f"cannot read the configuration file {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise EdgeNasError(f"{path}: invalid TOML: the file is not UTF-8 ({error.reason} at byte {error.start}); "
                           "save it as UTF-8") from None
    except tomllib.TOMLDecodeError as error:
        raise EdgeNasError(f"{path}: invalid TOML: {error}; fix the syntax (see {EXAMPLE_NAME})") from None


def _checked_values(document: Mapping[str, Any], where: str) -> Dict[str, Dict[str, Any]]:
    """Return every key of SCHEMA with its checked value or default; raise EdgeNasError on the first mistake."""
    tables = [name for name in SCHEMA if name]
    for name, value in document.items():
        if name in SCHEMA[""] or name in tables:
            continue
        raise EdgeNasError(f"{where}: unknown key {name!r}{_suggestion(name, list(SCHEMA['']) + tables)}")
    values: Dict[str, Dict[str, Any]] = {}
    for table, keys in SCHEMA.items():
        if table:
            content = document.get(table, {})
            if not isinstance(content, dict):
                raise EdgeNasError(
                    f"{where}: {table} must be a table ([{table}]), got {_toml_type(content)}; "
                    f"put its keys under a [{table}] header"
                )
        else:
            content = {name: value for name, value in document.items() if name not in tables}
        for name in content:
            if name not in keys:
                raise EdgeNasError(
                    f"{where}: unknown key {_dotted(table, name)!r}{_suggestion(name, list(keys), table)}"
                )
        values[table] = {name: _checked(table, name, key, content.get(name), where) for name, key in keys.items()}
    return values


def _checked(table: str, name: str, key: _Key, value: Any, where: str) -> Any:
    if value is None:
        return key.default
    dotted = _dotted(table, name)
    if key.kind == "count":
        return _checked_count(dotted, value, where)
    expected = {
        "string": (str,), "path": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    }[key.kind]
    if isinstance(value, bool) and key.kind != "boolean" or not isinstance(value, expected):
        article = "an" if key.kind == "integer" else "a"
        hint = "; write it without quotes" if isinstance(value, str) and key.kind in ("integer", "number") else ""
        raise EdgeNasError(f"{where}: {dotted} must be {article} {key.kind}, got {_toml_type(value)} {value!r}{hint}")
    if key.kind in ("string", "path") and not value:
        raise EdgeNasError(f"{where}: {dotted} is empty; give a value or remove the key to use the default")
    if key.kind == "number":
        value = float(value)
    if key.check is not None:
        problem = key.check(value)
        if problem:
            raise EdgeNasError(f"{where}: {dotted} {problem}, got {value!r}")
    return value


def _checked_count(dotted: str, value: Any, where: str) -> int:
    from edge_runtime.cli_common import parse_count

    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise EdgeNasError(
            f"{where}: {dotted} must be an integer or a string such as \"800k\", got {_toml_type(value)} {value!r}"
        )
    try:
        return parse_count(str(value), dotted)  # type: ignore[return-value]
    except EdgeNasError as error:
        raise EdgeNasError(f"{where}: {error}") from None


def _check_space(name: str, width_mult: Optional[float], where: str) -> None:
    from models.spaces import get_space, list_spaces

    known = list_spaces()
    if name not in known:
        raise EdgeNasError(f"{where}: personalize.space {name!r} is not a search space; use one of {', '.join(known)}")
    if width_mult is not None and not hasattr(get_space(name), "width_mult"):
        # Otherwise every job would be rejected, because each takes this default.
        with_width = [other for other in known if hasattr(get_space(other), "width_mult")]
        raise EdgeNasError(
            f"{where}: personalize.width_mult is set, but search space {name!r} has no width multiplier; "
            f"remove width_mult or set personalize.space to {' or '.join(repr(other) for other in with_width)}"
        )


def _resolve(value: str, base: Path) -> Path:
    """Expand `~` and resolve a relative path against the configuration file's folder."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _dotted(table: str, name: str) -> str:
    return f"{table}.{name}" if table else name


def _suggestion(name: str, known: List[str], table: str = "") -> str:
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        return f"; did you mean {_dotted(table, close[0])!r}? Fix or remove it"
    return f"; known keys{' of [' + table + ']' if table else ''}: {', '.join(known)}; remove it or fix its name"


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "table"
    if isinstance(value, list):
        return "array"
    return type(value).__name__
