"""Log lines: text (the default) or one JSON object per line, and never a secret.

Call events are logged with `extra={"call_id": …, "event": …, …}` (see relay/call/). The text format
shows those fields after the message as `key=value` (the call id is in the message already); the JSON format
gives every line `ts`, `level`, `logger`, `message`, and the fields (`call_id` when there is one).

Both formatters take the values of the configured secrets and replace any occurrence in a finished line with
'**********': the relay never logs them itself, and this also covers libraries' debug output (websockets logs
every request header of the upstream handshake at debug level, the upstream key included).
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import Any, Iterable

REDACTED = "**********"
# The attributes every LogRecord has: anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a record was given with `extra=`."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class _Redacting(logging.Formatter):
    def __init__(self, secrets: Iterable[str] = (), fmt: str | None = None) -> None:
        super().__init__(fmt)
        # Longest first: a secret that contains another is replaced whole. Very short values are left alone (a
        # 1-character "secret" would blank every line); the settings never hold such keys in practice.
        # Each also as it appears inside a JSON string.
        values = {s for s in secrets if len(s) >= 4}
        values |= {json.dumps(s, ensure_ascii=False)[1:-1] for s in values}
        self._secrets = sorted(values, key=len, reverse=True)

    def redact(self, line: str) -> str:
        for secret in self._secrets:
            if secret in line:
                line = line.replace(secret, REDACTED)
        return line


class TextFormatter(_Redacting):
    """`2026-01-01 12:00:00,000 INFO relay.call: call rtc_… ended: hangup event=ended reason=hangup …`"""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__(secrets, TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [f"{k}={v}" for k, v in extra_fields(record).items() if k != "call_id"]
        if fields:
            head, newline, rest = line.partition("\n")  # after the message, before a traceback
            line = head + " " + " ".join(fields) + newline + rest
        return self.redact(line)


class JsonFormatter(_Redacting):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, message, the extra fields, exc (a traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return self.redact(json.dumps(entry, default=str, ensure_ascii=False))


def setup_logging(level: str, log_format: str = "text", secrets: Iterable[str] = ()) -> None:
    """Log to stderr at `level`, in `log_format` ('text' or 'json'), with `secrets` never shown."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(secrets) if log_format == "json" else TextFormatter(secrets))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    if level != "debug":
        # aioice logs every ICE check of every call at info level: a dozen lines per call that say nothing to an
        # operator. Their warnings still show; --log-level debug shows everything.
        for noisy in ("aioice", "aiortc"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
