"""Prometheus metrics of the worker processes (multiprocess mode).

Imported only inside child processes, after the supervisor has set
``PROMETHEUS_MULTIPROC_DIR``: prometheus_client picks its multiprocess storage at import.
Every series carries a ``worker`` label (socket-0, rest, writer...) so one scrape of the
supervisor shows each process. Values are added per batch or per second, never per
message.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MESSAGES = Counter("ingestor_messages_received", "WebSocket messages received, by event type",
                   ["worker", "market", "event"])
BYTES = Counter("ingestor_received_bytes", "WebSocket payload bytes received", ["worker", "market"])
REJECTED = Counter("ingestor_frames_rejected", "Frames counted and skipped, by reason",
                   ["worker", "market", "reason"])
STALE = Counter("ingestor_stale_events", "Events at or behind the last id seen, not stored again",
                ["worker", "market"])
GAPS = Counter("ingestor_gaps_detected", "Sequence gaps detected", ["worker", "market", "stream"])
RECONNECTS = Counter("ingestor_reconnects", "WebSocket reconnects", ["worker", "market"])
CONNECTED = Gauge("ingestor_connected_streams", "Streams on open connections", ["worker", "market"],
                  multiprocess_mode="livesum")
BATCHES_SENT = Counter("ingestor_batches_sent", "Batches handed to the writer", ["worker", "table"])
ROWS_SENT = Counter("ingestor_rows_sent", "Rows handed to the writer", ["worker", "table"])
QUEUE_DEPTH = Gauge("ingestor_queue_depth", "Batches waiting in a queue", ["worker", "queue"],
                    multiprocess_mode="livesum")
ROWS_WRITTEN = Counter("ingestor_rows_written", "Rows committed to PostgreSQL", ["worker", "table"])
COPY_BATCHES = Counter("ingestor_copy_batches", "COPY statements committed", ["worker", "table"])
COPY_ERRORS = Counter("ingestor_copy_errors", "COPY statements that failed", ["worker", "table", "kind"])
ROWS_REJECTED = Counter("ingestor_rows_rejected", "Rows the database refused (isolated and logged)",
                        ["worker", "table"])
COPY_SECONDS = Histogram("ingestor_copy_seconds", "COPY statement duration", ["worker", "table"],
                         buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
LAG_SECONDS = Histogram("ingestor_event_to_commit_seconds",
                        "Exchange event time to commit, sampled per batch", ["worker", "table"],
                        buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5, 10, 30, 60))
REST_REQUESTS = Counter("ingestor_rest_requests", "REST requests by endpoint and HTTP status",
                        ["worker", "market", "endpoint", "status"])
REST_WEIGHT = Gauge("ingestor_rest_weight_used", "Request weight used in the current minute",
                    ["worker", "market"], multiprocess_mode="livesum")


class Totals:
    """Running totals kept as plain ints on the hot path, turned into counter increments
    when a process reports (once a second): metrics cost nothing per message."""

    def __init__(self) -> None:
        self._seen: dict[int, int] = {}

    def set(self, counter: Counter, total: int) -> None:
        """``counter`` is a labelled child; ``total`` the count since the process started."""
        key = id(counter)  # labelled children are cached by prometheus_client: stable ids
        prev = self._seen.get(key, 0)
        if total > prev:
            counter.inc(total - prev)
        self._seen[key] = total
