"""Structured logs: one JSON object per line on stderr, one line per served call.

Every record of the ``micrograd`` loggers becomes a JSON line with a UTC
timestamp, level, logger and message; request lines add the request id,
transport, method, status, nodes evaluated and duration, so a log pipeline
can filter and aggregate them without parsing prose.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
import uuid
from typing import Any, TextIO

__all__ = [
    "REQUEST_LOGGER",
    "JsonLines",
    "configure",
    "log_request",
    "request_id",
    "requests_logged",
]

REQUEST_LOGGER = "micrograd.server.requests"
"""The logger of the per-call lines (INFO); raise its level to silence them alone."""

_ROOT = "micrograd"
_FIELDS = "fields"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_requests = logging.getLogger(REQUEST_LOGGER)


class JsonLines(logging.Formatter):
    """Formats a record as one JSON object; ``extra={"fields": {...}}`` adds members."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a single line of JSON (exceptions included as text)."""
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        fields = getattr(record, _FIELDS, None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler writing to whatever ``sys.stderr`` is when a record comes (it may be replaced,
    as by a test runner's capture, after the handler was made)."""

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def configure(level: str | int, stream: TextIO | None = None) -> None:
    """Send every log record of the process to ``stream`` (stderr) as JSON lines.

    The ``micrograd`` loggers log at ``level``; every other library (aiohttp's
    tracebacks of broken connections, asyncio, gRPC's Python side) at WARNING
    or above. ``warnings`` and exceptions nobody caught (in any thread) become
    records too, so nothing reaches stderr as plain text from Python.
    Idempotent: calling it again replaces the handler it installed before.
    """
    ours = logging.getLogger(_ROOT)
    top = logging.getLogger()
    for logger in (ours, top):
        for handler in list(logger.handlers):
            if getattr(handler, "_micrograd_json", False):
                logger.removeHandler(handler)
    mine: logging.Handler = logging.StreamHandler(stream) if stream is not None else _Stderr()
    mine.setFormatter(JsonLines())
    mine._micrograd_json = True  # type: ignore[attr-defined]
    top.addHandler(mine)
    number = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    ours.setLevel(number)
    ours.propagate = True
    top.setLevel(max(int(number), logging.WARNING))
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_thread_uncaught


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
    """``sys.excepthook``: an exception nobody caught, as a JSON line."""
    logging.getLogger(_ROOT).critical("uncaught exception", exc_info=(kind, exc, tb))


def _log_thread_uncaught(args: threading.ExceptHookArgs) -> None:
    """``threading.excepthook``: an exception that ended a thread, as a JSON line."""
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger(_ROOT).error(
        "uncaught exception in thread %s",
        name,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def request_id(given: str | None = None) -> str:
    """The caller's request id when it is a sane token (``x-request-id``), else a fresh one."""
    if given and _REQUEST_ID.match(given):
        return given
    return uuid.uuid4().hex


def requests_logged() -> bool:
    """Whether per-call lines are written at the current level (skip their work if not)."""
    return _requests.isEnabledFor(logging.INFO)


def log_request(
    transport: str,
    method: str,
    request_id: str,
    status: str,
    nodes: int,
    seconds: float,
    **extra: Any,
) -> None:
    """Write the line of one finished call (INFO; WARNING for a server-side failure)."""
    if not _requests.isEnabledFor(logging.INFO):
        return
    fields = {
        "request_id": request_id,
        "transport": transport,
        "method": method,
        "status": status,
        "nodes": nodes,
        "duration_ms": round(seconds * 1000.0, 3),
    }
    fields.update(extra)
    level = logging.WARNING if status in ("INTERNAL", "UNKNOWN", "DATA_LOSS") else logging.INFO
    _requests.log(level, "%s %s %s", transport, method, status, extra={_FIELDS: fields})
