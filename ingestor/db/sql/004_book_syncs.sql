-- What the feature worker needs to be reproduced from stored data (issue 4).
--
-- symbol_info: each symbol's exchangeInfo entry, a row whenever it changes (written at
-- start by the supervisor). The indicators depend on the tick size, which Binance
-- changes now and then, so a replay must use the one that held at the time.
CREATE TABLE IF NOT EXISTS symbol_info (
    market    TEXT        NOT NULL,
    time      TIMESTAMPTZ NOT NULL,
    symbol    TEXT        NOT NULL,
    tick_size NUMERIC     NOT NULL,
    payload   JSONB       NOT NULL
);
CREATE INDEX IF NOT EXISTS symbol_info_symbol_time ON symbol_info (market, symbol, time);

-- book_syncs: every time the feature worker built a book from a REST snapshot, which
-- snapshot (its stored time and lastUpdateId) and why (start, gap, drift). The book's
-- deep levels depend on the snapshot it was built from, so a replay builds its books
-- from the same snapshots to give the same rows.
CREATE TABLE IF NOT EXISTS book_syncs (
    market         TEXT        NOT NULL,
    time           TIMESTAMPTZ NOT NULL,
    symbol         TEXT        NOT NULL,
    snapshot_time  TIMESTAMPTZ NOT NULL,
    last_update_id BIGINT      NOT NULL,
    reason         TEXT        NOT NULL,
    buffered       INTEGER     NOT NULL
);
CREATE INDEX IF NOT EXISTS book_syncs_symbol_time ON book_syncs (market, symbol, snapshot_time);

-- One features row per (market, symbol, bar size, bar): a replay replaces rows, never
-- adds a second one. Unique indexes on a hypertable must hold its time column: it does.
CREATE UNIQUE INDEX IF NOT EXISTS features_bar_key ON features (market, symbol, bar_seconds, bar_time);
-- It serves every query by symbol; the others only cost writes (and the time-only one that
-- create_hypertable adds would tempt the planner away from it).
DROP INDEX IF EXISTS features_symbol_time;
DROP INDEX IF EXISTS features_bar_time_idx;
