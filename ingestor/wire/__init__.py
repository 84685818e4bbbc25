"""What crosses a process boundary, and what every process kind shares to make it.

The message types (``batching``: Batch, Backfill; ``feed``: the feature worker's items and
requests), the producer's end of acknowledged delivery (``delivery``), the child-process
start (``child``), and the PostgreSQL binary COPY encoding of every table (``copy_binary``,
``rows``). Every process kind imports this package; it imports none of them, only
``config``, ``binance``, ``feature_spec`` and ``logs`` below it (docs/architecture.md, Layers).
"""
