-- Each table gets a unique key on what makes two rows the same message, so that a message
-- stored twice is impossible whatever the path: the overlap of a rotated connection, a
-- batch sent again after a writer restart, a spool replayed after a crash. The writer
-- COPYs; when a COPY meets a key that is already there, it inserts the batch again
-- with ON CONFLICT DO NOTHING and counts what it skipped.
--
-- A hypertable's unique indexes must hold its time column: every key does, and since the
-- same message always carries the same event time, the key still says "this message".
-- Each key also serves the (market, symbol, time) queries, so it replaces that index.
-- Rows stored twice before this migration are removed first (one copy kept).

DELETE FROM agg_trades a USING agg_trades b
 WHERE a.ctid > b.ctid AND a.market = b.market AND a.symbol = b.symbol
   AND a.event_time = b.event_time AND a.aggregate_trade_id = b.aggregate_trade_id;
CREATE UNIQUE INDEX IF NOT EXISTS agg_trades_key ON agg_trades (market, symbol, event_time, aggregate_trade_id);
DROP INDEX IF EXISTS agg_trades_symbol_time;

DELETE FROM depth_updates a USING depth_updates b
 WHERE a.ctid > b.ctid AND a.market = b.market AND a.symbol = b.symbol
   AND a.event_time = b.event_time AND a.final_update_id = b.final_update_id;
CREATE UNIQUE INDEX IF NOT EXISTS depth_updates_key ON depth_updates (market, symbol, event_time, final_update_id);
DROP INDEX IF EXISTS depth_updates_symbol_time;

DELETE FROM mark_prices a USING mark_prices b
 WHERE a.ctid > b.ctid AND a.market = b.market AND a.symbol = b.symbol AND a.event_time = b.event_time;
CREATE UNIQUE INDEX IF NOT EXISTS mark_prices_key ON mark_prices (market, symbol, event_time);
DROP INDEX IF EXISTS mark_prices_symbol_time;

-- The liquidation stream sends at most one event per symbol per second.
DELETE FROM force_orders a USING force_orders b
 WHERE a.ctid > b.ctid AND a.market = b.market AND a.symbol = b.symbol
   AND a.event_time = b.event_time AND a.transaction_time = b.transaction_time;
CREATE UNIQUE INDEX IF NOT EXISTS force_orders_key ON force_orders (market, symbol, event_time, transaction_time);
DROP INDEX IF EXISTS force_orders_symbol_time;

DELETE FROM open_interest a USING open_interest b
 WHERE a.ctid > b.ctid AND a.market = b.market AND a.symbol = b.symbol AND a.time = b.time;
CREATE UNIQUE INDEX IF NOT EXISTS open_interest_key ON open_interest (market, symbol, time);
DROP INDEX IF EXISTS open_interest_symbol_time;

DELETE FROM depth_snapshots a USING depth_snapshots b
 WHERE a.ctid > b.ctid AND a.market = b.market AND a.symbol = b.symbol AND a.time = b.time;
CREATE UNIQUE INDEX IF NOT EXISTS depth_snapshots_key ON depth_snapshots (market, symbol, time);
DROP INDEX IF EXISTS depth_snapshots_symbol_time;

DELETE FROM book_syncs a USING book_syncs b
 WHERE a.ctid > b.ctid AND a.market = b.market AND a.symbol = b.symbol
   AND a.time = b.time AND a.last_update_id = b.last_update_id;
CREATE UNIQUE INDEX IF NOT EXISTS book_syncs_key ON book_syncs (market, symbol, time, last_update_id);

-- A gap is the hole between two events of one stream: the ids it misses (NULL for streams
-- without ids) and the time before it. Its row is written when the gap is found ('open')
-- and may be written again once closed (backfilled, resynced, unrecoverable): the
-- closing row updates the open one (ON CONFLICT ... DO UPDATE), an 'open' row never
-- overwrites a closed one.
DELETE FROM stream_gaps a USING stream_gaps b
 WHERE a.id > b.id AND a.market = b.market AND a.symbol = b.symbol AND a.stream = b.stream
   AND a.from_id IS NOT DISTINCT FROM b.from_id AND a.to_id IS NOT DISTINCT FROM b.to_id
   AND a.from_time IS NOT DISTINCT FROM b.from_time;
-- (COALESCE rather than NULLS NOT DISTINCT, which needs PostgreSQL 15.)
CREATE UNIQUE INDEX IF NOT EXISTS stream_gaps_key ON stream_gaps
    (market, symbol, stream, COALESCE(from_id, -1), COALESCE(to_id, -1), COALESCE(from_time, 'epoch'));
