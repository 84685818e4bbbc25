"""What the writer has done, as plain counters on the hot path, turned into metrics and
its status dict once a second (``publish``, ``status``).

``stalled_s`` is what /health's stall rule reads (``supervisor.health``, ``--writer-stall-s``):
how long the writer has had work pending and neither committed nor spooled anything; 0
when it has nothing to do. Test: tests/chaos/test_writer_faults.py (a table locked under every connection).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ingestor.wire.batching import Batch
from ingestor.writer.copier import CopyResult

LAG_SAMPLES = 16  # lag quantiles observed per batch: a per-row histogram without per-row calls
STREAM_TABLES = frozenset({"agg_trades", "depth_updates", "mark_prices", "force_orders"})


@dataclass
class WriterStats:
    rows: dict[str, int] = field(default_factory=dict)
    batches: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)
    gaps_closed: dict[tuple[str, str], int] = field(default_factory=dict)  # (market, how) -> trade gaps closed
    spooled_batches: int = 0
    replayed_batches: int = 0
    last_commit: float = 0.0  # wall clock of the last commit
    progress_at: float = field(default_factory=time.monotonic)  # last commit or spool sync, or no work
    # Event-to-commit lags of the market data committed since the last status report
    # (LAG_SAMPLES per batch): `ingestor status` shows their median and maximum.
    recent_lags: list[float] = field(default_factory=list)

    def committed(self, group: Sequence[Batch], result: CopyResult, elapsed: float, M: Any, worker: str) -> None:
        """A group committed in ``elapsed`` seconds: its counts, its duration and lags observed."""
        table = group[0].table
        self.last_commit = time.time()
        self.progress_at = time.monotonic()
        self.rows[table] = self.rows.get(table, 0) + result.inserted
        self.batches[table] = self.batches.get(table, 0) + 1
        if result.duplicates:
            self.duplicates[table] = self.duplicates.get(table, 0) + result.duplicates
        if result.rejected:
            self.rejected[table] = self.rejected.get(table, 0) + result.rejected
        info = group[0].backfill
        if result.closed_how is not None and info is not None:
            key = (info.market, result.closed_how)
            self.gaps_closed[key] = self.gaps_closed.get(key, 0) + 1
        M.COPY_SECONDS.labels(worker, table).observe(elapsed)
        ev = np.concatenate([np.frombuffer(b.event_ms, dtype=np.int64) for b in group])
        if len(ev):
            points = np.quantile(ev, np.linspace(0, 1, min(LAG_SAMPLES, len(ev))))
            lags = (self.last_commit * 1000 - points) / 1000
            hist = M.LAG_SECONDS.labels(worker, table)
            for lag in lags:
                hist.observe(max(float(lag), 0.0))
            if table in STREAM_TABLES:  # features rows are a bar old by design; gaps and syncs are not data
                self.recent_lags.extend(lags.tolist())

    def stalled_s(self, pending: int) -> float:
        """Seconds with work pending and nothing committed (0 with nothing pending)."""
        now = time.monotonic()
        if not pending:
            self.progress_at = now  # nothing to do is not a stall
        return round(now - self.progress_at, 1)

    def publish(self, M: Any, totals: Any, worker: str) -> None:
        """The running totals as counter increments (``metrics.Totals``)."""
        for table, n in self.rows.items():
            totals.set(M.ROWS_WRITTEN.labels(worker, table), n)
        for table, n in self.batches.items():
            totals.set(M.COPY_BATCHES.labels(worker, table), n)
        for table, n in self.duplicates.items():
            totals.set(M.ROWS_DUPLICATE.labels(worker, table), n)
        for table, n in self.rejected.items():
            totals.set(M.ROWS_REJECTED.labels(worker, table), n)
        for (market, how), n in self.gaps_closed.items():
            totals.set(M.GAPS_CLOSED.labels(worker, market, "aggTrade", how), n)
        totals.set(M.SPOOLED_BATCHES.labels(worker), self.spooled_batches)
        totals.set(M.REPLAYED_BATCHES.labels(worker), self.replayed_batches)

    def status(self) -> dict[str, Any]:
        """The counters' part of the writer's status dict (the recent lags are taken)."""
        lags, self.recent_lags = self.recent_lags, []
        return {
            "rows": dict(self.rows), "rejected_rows": dict(self.rejected), "duplicate_rows": dict(self.duplicates),
            "spooled_batches": self.spooled_batches, "replayed_batches": self.replayed_batches,
            "last_commit": self.last_commit or None,
            "event_to_commit_s": {"median": round(float(np.median(lags)), 3), "max": round(max(lags), 3)}
            if lags else None,
        }
