"""ruff and mypy are part of the suite, so local runs and CI agree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_ruff() -> None:
    dirs = [d for d in ("ingestor", "tests", "benchmarks") if (ROOT / d).is_dir()]
    r = _run("ruff", "check", *dirs)
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy() -> None:
    r = _run("mypy", "ingestor")
    assert r.returncode == 0, r.stdout + r.stderr
