-- Rows the database refused for a reason of their own (a data exception, a constraint, a
-- program limit such as an index row too large, an error a trigger raised for the row):
-- the writer isolates each one (the rest of its group is stored) and keeps it here with
-- its error, so nothing the exchange sent is dropped without a trace. ``raw`` is the row's
-- binary COPY tuple exactly as the writer had it; ``payload`` the exchange's message when
-- it could be cut out of the tuple (text, as sent: it may be the very thing refused).
CREATE TABLE IF NOT EXISTS rejected_rows (
    rejected_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    table_name  TEXT        NOT NULL,
    sqlstate    TEXT        NOT NULL,
    error       TEXT        NOT NULL,
    raw         BYTEA       NOT NULL,
    payload     TEXT
);
CREATE INDEX IF NOT EXISTS rejected_rows_time ON rejected_rows (rejected_at);
