-- One row per (market, symbol, bar): the bar and every indicator of FEATURES.md, as
-- the feature worker and `ingestor features replay` compute them. NULL where FEATURES.md
-- says the value is undefined (short history, zero deviation, no wall, book not synced).
-- Floats, not DECIMAL: these are derived statistics, not exchange quantities.

CREATE TABLE IF NOT EXISTS features (
    market      TEXT        NOT NULL,
    symbol      TEXT        NOT NULL,
    bar_time    TIMESTAMPTZ NOT NULL,
    bar_seconds INTEGER     NOT NULL,
    open                 DOUBLE PRECISION,
    high                 DOUBLE PRECISION,
    low                  DOUBLE PRECISION,
    close                DOUBLE PRECISION,
    volume               DOUBLE PRECISION,
    buy_volume           DOUBLE PRECISION,
    sell_volume          DOUBLE PRECISION,
    trades               BIGINT,
    quote_volume         DOUBLE PRECISION,
    delta                DOUBLE PRECISION,
    cvd                  DOUBLE PRECISION,
    bull_div             BOOLEAN,
    bear_div             BOOLEAN,
    ret                  DOUBLE PRECISION,
    rv                   DOUBLE PRECISION,
    vol_z                DOUBLE PRECISION,
    volu_z               DOUBLE PRECISION,
    panic_index          DOUBLE PRECISION,
    absorption           DOUBLE PRECISION,
    liq_long_notional    DOUBLE PRECISION,
    liq_short_notional   DOUBLE PRECISION,
    liq_notional         DOUBLE PRECISION,
    liq_intensity        DOUBLE PRECISION,
    cascade_exhaustion   DOUBLE PRECISION,
    obi                  DOUBLE PRECISION,
    buy_wall_price       DOUBLE PRECISION,
    buy_wall_qty         DOUBLE PRECISION,
    dist_to_buy_wall     DOUBLE PRECISION,
    buy_wall_age_s       DOUBLE PRECISION,
    sell_wall_price      DOUBLE PRECISION,
    sell_wall_qty        DOUBLE PRECISION,
    dist_to_sell_wall    DOUBLE PRECISION,
    sell_wall_age_s      DOUBLE PRECISION,
    fp_buy_imb           INTEGER,
    fp_sell_imb          INTEGER,
    fp_imbalance         DOUBLE PRECISION,
    fp_stacked_buy       INTEGER,
    fp_stacked_sell      INTEGER,
    signal               INTEGER,
    stop_price           DOUBLE PRECISION,
    take_profit          DOUBLE PRECISION
);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        -- A row per symbol per minute: a week per chunk is small.
        PERFORM create_hypertable('features', 'bar_time', chunk_time_interval => INTERVAL '7 days',
                                  if_not_exists => TRUE, migrate_data => TRUE);
    ELSE
        CREATE INDEX IF NOT EXISTS features_time_brin ON features USING brin (bar_time);
    END IF;
END
$$;

CREATE INDEX IF NOT EXISTS features_symbol_time ON features (market, symbol, bar_time);
