"""The daemon's systemd integration: sd_notify messages, and one structured log line per event on stderr.

`SystemdNotifier` speaks the sd_notify protocol with the standard library: one datagram of
`KEY=VALUE` lines to the unix socket named by `$NOTIFY_SOCKET` (see `man sd_notify`). Outside
systemd the variable is unset and every call does nothing.

`LogfmtFormatter` writes each record as one logfmt line (`level=info logger=... msg="..."`).
When stderr is connected to the journal (`$JOURNAL_STREAM` names it), each line starts with
the syslog priority in angle brackets, which journald reads as the entry's priority.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import time
from typing import Any, List, Mapping, Optional, Tuple

logger = logging.getLogger(__name__)

# syslog priorities of the logging levels, for journald's "<N>" line prefix.
_SYSLOG_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


class SystemdNotifier:
    """Sender of READY, STATUS, WATCHDOG and STOPPING notifications to systemd, when systemd listens."""

    def __init__(self, environ: Optional[Mapping[str, str]] = None) -> None:
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET") or ""
        # An address starting with '@' names a socket in Linux's abstract namespace.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_interval_s = _watchdog_interval(environ)
        self._socket: Optional[socket.socket] = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *lines: str) -> bool:
        """Send one notification of `KEY=VALUE` lines; return whether it was sent."""
        if not self.enabled:
            return False
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.sendto("\n".join(lines).encode("utf-8"), self.address)
        except OSError as error:
            logger.warning("sending %s to systemd failed: %s", lines[0].split("=")[0], error)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str) -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _watchdog_interval(environ: Mapping[str, str]) -> Optional[float]:
    """Return half of `$WATCHDOG_USEC` in seconds, as `man sd_watchdog_enabled` advises, or None without a watchdog for this process."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = environ.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2e6


class LogfmtFormatter(logging.Formatter):
    """Formatter of `level=... logger=... msg="..."` lines, with `ts=` first unless journald adds its own time."""

    def __init__(self, journald: bool = False) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        fields: List[Tuple[str, Any]] = []
        if not self.journald:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
            fields.append(("ts", f"{stamp}.{int(record.msecs):03d}"))
        fields += [("level", record.levelname.lower()), ("logger", record.name), ("msg", record.getMessage())]
        if record.exc_info:
            fields.append(("error", self.formatException(record.exc_info)))
        line = " ".join(f"{key}={_logfmt_value(value)}" for key, value in fields)
        if self.journald:
            return f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>{line}"
        return line


def _logfmt_value(value: Any) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\\') and text.isprintable():
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f'"{escaped}"'


def stderr_is_journal(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Return whether stderr is the journal stream that systemd names in `$JOURNAL_STREAM` (device:inode)."""
    environ = os.environ if environ is None else environ
    stream = environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in stream.split(":"))
        status = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return status.st_dev == device and status.st_ino == inode


def configure_logging(level: str, environ: Optional[Mapping[str, str]] = None) -> None:
    """Send every log record at `level` or above to stderr as logfmt lines, replacing other root handlers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter(journald=stderr_is_journal(environ)))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
