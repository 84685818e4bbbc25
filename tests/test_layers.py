"""The layers of docs/architecture.md ("Layers") hold, checked by import-linter.

The contracts live in pyproject.toml (``[tool.importlinter]``): layers that import only
downward, process kinds that never import each other, a simulator that shares only
``binance/`` with the recorder, nothing below ``db/`` touching a database, and no import
cycle in ``ingestor/`` or ``benchmarks/``. ``lint-imports`` reads the source (nothing is
imported), so a wrong import fails here whether or not any test runs its code.

The contracts are themselves tested: a copy of the tree with one wrong import of each kind
must break the contract that forbids it, so a contract that checks nothing cannot pass.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The console script installed with the test extras, next to this interpreter.
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(cwd: Path, *contract_ids: str) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the tree at ``cwd`` (it puts ``cwd`` first on the import path, so
    a copy is analysed, not the installed package); no cache written into the tree."""
    args = [str(LINT_IMPORTS), "--no-cache"]
    for cid in contract_ids:
        args += ["--contract", cid]
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_every_import_contract_holds() -> None:
    r = lint_imports(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout, r.stdout


def test_no_import_cycle_in_ingestor_or_benchmarks() -> None:
    r = lint_imports(ROOT, "acyclic")
    assert r.returncode == 0, r.stdout + r.stderr


def _copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "results")
    for pkg in ("ingestor", "benchmarks"):
        shutil.copytree(ROOT / pkg, dest / pkg, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}\n")


# (what is wrong, file changed, line appended or None for a new module, contract that must break)
WRONG_IMPORTS = [
    ("the protocol layer imports the writer", "ingestor/binance/streams.py",
     "from ingestor.writer import process  # noqa", "layers"),
    ("the bottom layer imports a process kind", "ingestor/wire/batching.py",
     "from ingestor.features import engine  # noqa", "layers"),
    ("a type from above, only for type checking", "ingestor/config.py",
     "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ingestor.supervisor import Supervisor  # noqa",
     "layers"),
    ("a module placed in no layer", "ingestor/newthing.py", None, "layers"),
    ("the writer imports a socket worker's module", "ingestor/writer/copier.py",
     "from ingestor.workers import frames  # noqa", "process-kinds"),
    ("the simulator uses the recorder's encoding", "ingestor/sim/encode.py",
     "from ingestor.wire import rows  # noqa", "simulator"),
    ("the bottom layer opens a database connection", "ingestor/wire/delivery.py",
     "import asyncpg  # noqa", "no-database-below-db"),
    ("the package needs the benchmarks", "ingestor/sim/audit.py",
     "from benchmarks import report  # noqa", "package"),
    ("a cycle between two benchmark modules", "benchmarks/procs.py",
     "from benchmarks import pipeline  # noqa", "acyclic"),
    ("a cycle inside a package of ingestor", "ingestor/sim/hub.py",
     "from ingestor.sim import server  # noqa", "acyclic"),
]


@pytest.mark.parametrize(("what", "path", "line", "contract"), WRONG_IMPORTS, ids=[w[0] for w in WRONG_IMPORTS])
def test_a_wrong_import_breaks_its_contract(tmp_path: Path, what: str, path: str, line: str | None,
                                            contract: str) -> None:
    _copy_tree(tmp_path)
    target = tmp_path / path
    if line is None:
        target.write_text('"""A new module."""\n')
    else:
        _append(target, line)
    r = lint_imports(tmp_path, contract)
    assert r.returncode == 1 and "BROKEN" in r.stdout, f"{what}: contract {contract} still kept\n{r.stdout}{r.stderr}"
