-- One row per trade, whatever path it came by (issue 16, item 10).
--
-- Until now agg_trades was keyed (and, on TimescaleDB, partitioned) on event_time. A
-- trade that came over the WebSocket carries its event time E; a trade fetched over
-- REST to fill a gap has none and was stored under its trade time T. The same trade id
-- could so be stored twice (backfilled first, its stream copy delivered after: a
-- rotated connection's overlap, a batch sent again after a writer restart). The trade
-- time T is the same on both paths, so the table now has a trade_time column and is
-- keyed and partitioned on it: (market, symbol, trade_time, aggregate_trade_id) says
-- "this trade" and the database refuses a second copy.
--
-- A hypertable's time dimension cannot be changed in place, so the table is rebuilt
-- (on both backends, one path): a new table, each trade copied once (the stream copy
-- kept where there are two: it has the real event time), the old table dropped. The
-- readers by event_time keep working; a BRIN index on event_time keeps their range
-- scans cheap (trades arrive in time order, and E is T plus milliseconds).

DO $$
DECLARE
    payload_type TEXT := (SELECT format_type(atttypid, atttypmod) FROM pg_attribute
                          WHERE attrelid = 'agg_trades'::regclass AND attname = 'payload');
BEGIN
    EXECUTE format($t$CREATE TABLE agg_trades_rebuilt (
        market             TEXT        NOT NULL,
        event_time         TIMESTAMPTZ NOT NULL,
        trade_time         TIMESTAMPTZ NOT NULL,
        symbol             TEXT        NOT NULL,
        aggregate_trade_id BIGINT      NOT NULL,
        payload            %s          NOT NULL
    )$t$, payload_type);
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        -- Same chunk interval as before (002); no default time index: the key serves it.
        PERFORM create_hypertable('agg_trades_rebuilt', 'trade_time', chunk_time_interval => INTERVAL '1 hour',
                                  create_default_indexes => FALSE);
    END IF;
END
$$;

-- T is in every aggTrade payload, stream or REST; the COALESCE only keeps a malformed
-- old row from failing the migration. Milliseconds as an interval: exact, no float.
INSERT INTO agg_trades_rebuilt (market, event_time, trade_time, symbol, aggregate_trade_id, payload)
SELECT DISTINCT ON (market, symbol, aggregate_trade_id)
       market, event_time,
       COALESCE('epoch'::timestamptz + (payload->>'T')::bigint * INTERVAL '1 millisecond', event_time),
       symbol, aggregate_trade_id, payload
  FROM agg_trades
 ORDER BY market, symbol, aggregate_trade_id, (payload->>'E') IS NULL, event_time;

DROP TABLE agg_trades;
ALTER TABLE agg_trades_rebuilt RENAME TO agg_trades;

CREATE UNIQUE INDEX IF NOT EXISTS agg_trades_key ON agg_trades (market, symbol, trade_time, aggregate_trade_id);
CREATE INDEX IF NOT EXISTS agg_trades_event_time_brin ON agg_trades USING brin (event_time);
