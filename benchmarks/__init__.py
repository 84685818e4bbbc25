"""Benchmarks of the ingestor project, run as ``python -m benchmarks <suite|all> [--quick]``.

Each suite is a module with ``run(quick: bool, **options) -> dict`` returning a result
in the shape :mod:`benchmarks.report` writes (JSON and a Markdown table). Suites:

- ``sim``: :mod:`benchmarks.sim_throughput`, what one ``ingestor simulate`` process
  pushes to a client that only counts frames, and what its model generates.
"""
