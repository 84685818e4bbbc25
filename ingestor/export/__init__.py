"""``ingestor export``: one table's rows over a time range into a Parquet or CSV file.

``columns``: the registry of tables, columns, their SQL and types (the flattening of
payloads); ``sinks``: Arrow batches into Parquet row groups or CSV; ``progress``: the
stderr bar; ``job``: the cursor loop that joins them.
"""
