"""How log lines look: for a terminal, for the journal, or as JSON for log shippers.

Under systemd (`$JOURNAL_STREAM` set: stderr goes to the journal) a line carries no
timestamp of ours (the journal adds its own) and starts with its syslog priority, `<3>` for
an error (sd-daemon(3)), so that `journalctl -p warning` and the colours work.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime

TEXT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
JOURNAL = "%(levelname)-7s %(name)s: %(message)s"
# syslog priorities (sd-daemon(3)), by the logging level at or above them.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


class JournalFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(JOURNAL)

    def format(self, record: logging.LogRecord) -> str:
        priority = next((p for level, p in _PRIORITIES if record.levelno >= level), 7)
        # Every line of a traceback gets it: the journal takes each line as an entry.
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, and the
    traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["traceback"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def formatter(log_format: str, env: Mapping[str, str]) -> logging.Formatter:
    """The formatter of `--log-format` (text or json) in environment `env`."""
    if log_format == "json":
        return JsonFormatter()
    if env.get("JOURNAL_STREAM"):
        return JournalFormatter()
    return logging.Formatter(TEXT)
