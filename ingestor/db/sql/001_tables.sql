-- The original design's tables, each with a `market` column ('spot' | 'futures')
-- because Spot and Futures share symbol names; plus stream_gaps, the audit of every
-- detected gap. Idempotent: safe to run again.

CREATE TABLE IF NOT EXISTS agg_trades (
    market             TEXT        NOT NULL,
    event_time         TIMESTAMPTZ NOT NULL,
    symbol             TEXT        NOT NULL,
    aggregate_trade_id BIGINT      NOT NULL,
    payload            JSONB       NOT NULL
);

CREATE TABLE IF NOT EXISTS depth_updates (
    market          TEXT        NOT NULL,
    event_time      TIMESTAMPTZ NOT NULL,
    symbol          TEXT        NOT NULL,
    first_update_id BIGINT      NOT NULL,
    final_update_id BIGINT      NOT NULL,
    payload         JSONB       NOT NULL
);

CREATE TABLE IF NOT EXISTS mark_prices (
    market     TEXT        NOT NULL,
    event_time TIMESTAMPTZ NOT NULL,
    symbol     TEXT        NOT NULL,
    payload    JSONB       NOT NULL
);

CREATE TABLE IF NOT EXISTS force_orders (
    market           TEXT        NOT NULL,
    event_time       TIMESTAMPTZ NOT NULL,
    transaction_time TIMESTAMPTZ NOT NULL,
    symbol           TEXT        NOT NULL,
    side             TEXT        NOT NULL,
    quantity         DECIMAL     NOT NULL,
    payload          JSONB       NOT NULL
);

CREATE TABLE IF NOT EXISTS open_interest (
    market        TEXT        NOT NULL,
    time          TIMESTAMPTZ NOT NULL,
    symbol        TEXT        NOT NULL,
    open_interest DECIMAL     NOT NULL,
    payload       JSONB       NOT NULL
);

CREATE TABLE IF NOT EXISTS depth_snapshots (
    market      TEXT        NOT NULL,
    time        TIMESTAMPTZ NOT NULL,
    symbol      TEXT        NOT NULL,
    market_type TEXT        NOT NULL,
    payload     JSONB       NOT NULL
);

-- Missing ids are from_id..to_id inclusive (trade ids, or depth update ids); from_time
-- and to_time are the event times on either side of the hole. closed_how is 'open'
-- until something closes it ('backfilled', 'resynced', 'unrecoverable').
CREATE TABLE IF NOT EXISTS stream_gaps (
    id          BIGSERIAL   PRIMARY KEY,
    market      TEXT        NOT NULL,
    symbol      TEXT        NOT NULL,
    stream      TEXT        NOT NULL,
    from_id     BIGINT,
    to_id       BIGINT,
    from_time   TIMESTAMPTZ,
    to_time     TIMESTAMPTZ,
    detected_at TIMESTAMPTZ NOT NULL,
    closed_how  TEXT        NOT NULL DEFAULT 'open',
    closed_rows BIGINT,
    closed_at   TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS stream_gaps_detected_at_idx ON stream_gaps (detected_at);
