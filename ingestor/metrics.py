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
# Counted where each gap's stream_gaps row gets its final closed_how: the socket workers
# (unrecoverable at once: diffs, id-less streams), the writer (a trade gap's backfill
# committed: backfilled, or unrecoverable when REST lacked ids), the feature worker (a
# book rebuilt: resynced). For aggTrade, detected minus closed is the backfills in flight.
GAPS_CLOSED = Counter("ingestor_gaps_closed", "Gaps closed in stream_gaps, by how: backfilled, resynced, unrecoverable",
                      ["worker", "market", "stream", "how"])
RECONNECTS = Counter("ingestor_reconnects", "WebSocket reconnects", ["worker", "market"])
CONNECT_FAILURES = Counter("ingestor_connect_failures",
                           "WebSocket connects that failed (DNS, TCP, TLS, a bad handshake); retried with backoff",
                           ["worker", "market"])
ROTATIONS = Counter("ingestor_connection_rotations", "Connections replaced make-before-break before their lifetime",
                    ["worker", "market"])
CONNECTED = Gauge("ingestor_connected_streams", "Streams on open connections", ["worker", "market"],
                  multiprocess_mode="livesum")
ROWS_SENT = Counter("ingestor_rows_sent", "Rows handed to the writer", ["worker", "table"])
BUFFER_BYTES = Gauge("ingestor_buffer_bytes", "Bytes of batches a producer keeps until the writer acknowledges them",
                     ["worker"], multiprocess_mode="livesum")
BACKPRESSURE = Gauge("ingestor_backpressure", "1 while a producer is over its --max-buffer-mb share and takes no data",
                     ["worker"], multiprocess_mode="livesum")
QUEUE_DEPTH = Gauge("ingestor_queue_depth", "Batches waiting in a queue", ["worker", "queue"],
                    multiprocess_mode="livesum")
ROWS_WRITTEN = Counter("ingestor_rows_written", "Rows committed to PostgreSQL", ["worker", "table"])
COPY_BATCHES = Counter("ingestor_copy_batches", "COPY statements committed", ["worker", "table"])
COPY_ERRORS = Counter("ingestor_copy_errors", "COPY statements that failed", ["worker", "table", "kind"])
ROWS_REJECTED = Counter("ingestor_rows_rejected", "Rows the database refused (isolated and logged)",
                        ["worker", "table"])
ROWS_DUPLICATE = Counter("ingestor_rows_duplicate", "Rows already stored, skipped (a message that came twice)",
                         ["worker", "table"])
SPOOLED_BATCHES = Counter("ingestor_spooled_batches", "Batches written to the disk spool", ["worker"])
REPLAYED_BATCHES = Counter("ingestor_replayed_batches", "Spooled batches committed to the database", ["worker"])
SPOOL_BYTES = Gauge("ingestor_spool_bytes", "Bytes in the disk spool", ["worker"], multiprocess_mode="livesum")
SPOOL_FULL = Gauge("ingestor_spool_full", "1 while the spool is full and batches wait unacknowledged", ["worker"],
                   multiprocess_mode="livesum")
SPOOL_QUARANTINED = Counter("ingestor_spool_quarantined_bytes",
                            "Spool bytes that could not be read back (cut short or corrupted), moved to quarantine/",
                            ["worker"])
WRITER_STALLED = Gauge("ingestor_writer_stalled_seconds",
                       "Seconds the writer has had work pending and committed or spooled nothing (0 when idle)",
                       ["worker"], multiprocess_mode="livemax")
COPY_SECONDS = Histogram("ingestor_copy_seconds", "COPY statement duration", ["worker", "table"],
                         buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
LAG_SECONDS = Histogram("ingestor_event_to_commit_seconds",
                        "Exchange event time to commit, sampled per batch", ["worker", "table"],
                        buckets=(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1, 2, 5, 10,
                                 30, 60))
REST_REQUESTS = Counter("ingestor_rest_requests", "REST requests by endpoint and HTTP status",
                        ["worker", "market", "endpoint", "status"])
REST_BAD_RESPONSES = Counter("ingestor_rest_bad_responses", "REST 200 replies whose JSON is not what the "
                             "endpoint returns (asked again later)", ["worker"])
REST_WEIGHT = Gauge("ingestor_rest_weight_used", "Request weight used in the current minute",
                    ["worker", "market"], multiprocess_mode="livesum")

# The feature worker.
BOOKS = Gauge("ingestor_books", "Order books by sync state (idle, syncing, synced)", ["worker", "market", "state"],
              multiprocess_mode="livesum")
BOOK_SYNCS = Counter("ingestor_book_syncs", "Books built from a REST snapshot, by reason (start, gap, drift)",
                     ["worker", "market", "reason"])
BOOK_SNAPSHOT_REQUESTS = Counter("ingestor_book_snapshot_requests", "Snapshots the feature worker asked for, "
                                 "by kind (first, retry: the book still did not sync)", ["worker", "market", "kind"])
DRIFT_CHECKS = Counter("ingestor_book_drift_checks",
                       "Books compared with a later REST snapshot, by result (ok, mismatch, skipped)",
                       ["worker", "market", "result"])
DRIFT_LEVELS = Counter("ingestor_book_drift_levels", "Levels at which a book disagreed with a later snapshot",
                       ["worker", "market"])
FEATURE_EVENTS = Counter("ingestor_feature_events", "Events the feature worker processed, by kind",
                         ["worker", "market", "kind"])
FEATURE_LOST = Counter("ingestor_feature_events_lost", "Events kept back from the feature worker while it was "
                       "behind (stored all the same), by kind", ["worker", "market", "kind"])
FEATURE_REJECTED = Counter("ingestor_feature_events_rejected", "Events the feature worker could not use, by kind",
                           ["worker", "market", "kind"])
FEATURE_LATE = Counter("ingestor_feature_late_events",
                       "Trades and liquidations that came after their bar had closed (not counted in it)",
                       ["worker", "market"])
FEATURE_BARS = Counter("ingestor_feature_bars", "Feature rows (symbol-bars) emitted", ["worker", "market"])
FEATURE_INPUT_LAG = Gauge("ingestor_feature_input_lag_seconds",
                          "Wall clock minus the latest event time the feature worker has processed",
                          ["worker", "market"], multiprocess_mode="livemax")
FEATURE_BAR_DELAY = Histogram("ingestor_feature_bar_delay_seconds",
                              "Bar end to its feature row being emitted (the earliest bar of each turn)",
                              ["worker", "market"], buckets=(0.5, 1, 1.5, 2, 3, 5, 10, 30, 60, 120, 300))
FEATURE_VALUE = Gauge("ingestor_feature_value", "Latest indicator of a symbol on the feature watchlist",
                      ["worker", "market", "symbol", "indicator"], multiprocess_mode="livesum")


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
