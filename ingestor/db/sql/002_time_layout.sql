-- Time layout, detected: with TimescaleDB available (installed and preloaded) the
-- tables become hypertables with chunk intervals sized for each table's volume; on plain
-- PostgreSQL they get BRIN time indexes (rows arrive in time order, so BRIN stays tiny).
-- Both get a (market, symbol, time) btree, the shape of nearly every research query.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')
       AND EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')
       AND current_setting('shared_preload_libraries') LIKE '%timescaledb%' THEN
        CREATE EXTENSION IF NOT EXISTS timescaledb;
    END IF;

    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        -- Chunks of roughly a few GB at a full feed: trades and book diffs by the hour,
        -- one mark-price array per second for the day, rare liquidations and open
        -- interest by the week, 1000-level snapshots by the day.
        PERFORM create_hypertable('agg_trades', 'event_time', chunk_time_interval => INTERVAL '1 hour',
                                  if_not_exists => TRUE, migrate_data => TRUE);
        PERFORM create_hypertable('depth_updates', 'event_time', chunk_time_interval => INTERVAL '1 hour',
                                  if_not_exists => TRUE, migrate_data => TRUE);
        PERFORM create_hypertable('mark_prices', 'event_time', chunk_time_interval => INTERVAL '1 day',
                                  if_not_exists => TRUE, migrate_data => TRUE);
        PERFORM create_hypertable('force_orders', 'event_time', chunk_time_interval => INTERVAL '7 days',
                                  if_not_exists => TRUE, migrate_data => TRUE);
        PERFORM create_hypertable('open_interest', 'time', chunk_time_interval => INTERVAL '7 days',
                                  if_not_exists => TRUE, migrate_data => TRUE);
        PERFORM create_hypertable('depth_snapshots', 'time', chunk_time_interval => INTERVAL '1 day',
                                  if_not_exists => TRUE, migrate_data => TRUE);
    ELSE
        CREATE INDEX IF NOT EXISTS agg_trades_time_brin ON agg_trades USING brin (event_time);
        CREATE INDEX IF NOT EXISTS depth_updates_time_brin ON depth_updates USING brin (event_time);
        CREATE INDEX IF NOT EXISTS mark_prices_time_brin ON mark_prices USING brin (event_time);
        CREATE INDEX IF NOT EXISTS force_orders_time_brin ON force_orders USING brin (event_time);
        CREATE INDEX IF NOT EXISTS open_interest_time_brin ON open_interest USING brin (time);
        CREATE INDEX IF NOT EXISTS depth_snapshots_time_brin ON depth_snapshots USING brin (time);
    END IF;
END
$$;

CREATE INDEX IF NOT EXISTS agg_trades_symbol_time ON agg_trades (market, symbol, event_time);
CREATE INDEX IF NOT EXISTS depth_updates_symbol_time ON depth_updates (market, symbol, event_time);
CREATE INDEX IF NOT EXISTS mark_prices_symbol_time ON mark_prices (market, symbol, event_time);
CREATE INDEX IF NOT EXISTS force_orders_symbol_time ON force_orders (market, symbol, event_time);
CREATE INDEX IF NOT EXISTS open_interest_symbol_time ON open_interest (market, symbol, time);
CREATE INDEX IF NOT EXISTS depth_snapshots_symbol_time ON depth_snapshots (market, symbol, time);
