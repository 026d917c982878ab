"""Logging setup: plain text or one JSON object per line, and the request log's structured fields.

A record may carry ``fields`` (a dict, passed as ``extra={"fields": ...}``): the JSON format puts
them at the top level of the object, the text format appends them as ``key=value``. The request
log (``fineserve.server.requests``) uses this for failed and slow requests; it never holds payloads.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import IO, Any

from fineserve.server.config import Settings

REQUEST_LOGGER = "fineserve.server.requests"
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(settings: Settings, stream: IO[str] | None = None, worker: int | None = None) -> None:
    """One handler on the root logger (stderr by default); the server's loggers at ``log_level``,
    everyone else's at WARNING. A worker process of ``--workers N`` tags its lines with its index
    (``[worker 1]`` in text, ``"worker": 1`` in JSON): the workers share the supervisor's stderr."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if settings.json_logs:
        handler.setFormatter(JsonFormatter(worker=worker))
    else:
        tag = "" if worker is None else f" [worker {worker}]"
        handler.setFormatter(TextFormatter(_TEXT_FORMAT.replace("%(name)s", f"%(name)s{tag}")))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("fineserve.server").setLevel(settings.log_level)


def untrusted(value: object) -> str:
    """Text from outside the server (a folder name, a client's string) as it may go in a log
    message: quoted, with newlines, terminal escapes and other unprintable or bidirectional
    characters escaped (``repr``), so it cannot forge or garble log lines."""
    return repr(str(value))


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = fields_of(record)
        if not fields:
            return line
        return line + " " + " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())


def _text_value(value: Any) -> str:
    text = str(value)
    # Quoted and escaped when it would not read as one token: a client's model name with a
    # newline or a terminal escape sequence cannot forge or garble log lines.
    plain = text and text.isprintable() and not any(c.isspace() or c in '"=' for c in text)
    return text if plain else json.dumps(text)


class JsonFormatter(logging.Formatter):
    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._worker is not None:
            entry["worker"] = self._worker
        entry.update(fields_of(record))
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)
