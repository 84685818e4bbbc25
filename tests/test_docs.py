"""The README's tables of settings and metrics list exactly what the code has, so they cannot
fall behind it unnoticed."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

from ingestor import metrics
from ingestor.config import Settings, env_name

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_setting_is_in_the_configuration_table() -> None:
    rows = re.findall(r"^\| `--([a-z-]+)[^|]*\| `(INGESTOR_[A-Z_]+)` \|", README, re.MULTILINE)
    documented = {env for _flag, env in rows}
    assert documented == {env_name(f.name) for f in fields(Settings)}


def test_every_metric_is_in_the_metrics_table() -> None:
    exported = set()
    for obj in vars(metrics).values():
        if isinstance(obj, Counter):
            exported.add(obj._name + "_total")  # the name prometheus_client exposes
        elif isinstance(obj, Gauge | Histogram):
            exported.add(obj._name)
    documented = set(re.findall(r"^\| `(ingestor_[a-z_]+)` \|", README, re.MULTILINE))
    assert documented == exported
