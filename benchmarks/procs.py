"""Child processes of the benchmarks: started, read, stopped, their stderr kept; the CPU seconds
of a process tree and of a database's PostgreSQL backends, read from /proc."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

PG_ROOT = "postgresql://postgres@127.0.0.1:5432"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Service:
    """A child process with stderr kept in a temporary file (shown when it fails)."""

    def __init__(self, name: str, cmd: list[str], read_stdout: bool = False) -> None:
        self.name = name
        self.cmd = cmd
        self.read_stdout = read_stdout  # else discarded: an unread pipe could fill and block the child
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        stdout = subprocess.PIPE if self.read_stdout else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.cmd, stdout=stdout, stderr=self.stderr, text=True)

    def first_line(self, timeout: float) -> str:
        """The first stdout line (the simulator's URLs), or an error after ``timeout``."""
        assert self.proc is not None and self.proc.stdout is not None
        stdout = self.proc.stdout
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not line or not line[0].strip():
            raise RuntimeError(f"{self.name}: no output line within {timeout} s: {self.stderr_tail()}")
        return line[0]

    def stop(self, timeout: float) -> int:
        """SIGTERM and wait; the exit code (-9: it had to be killed)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -9

    def stderr_tail(self, n: int = 2000) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-n:]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds user+system) from /proc/<pid>/stat."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants (the --workers processes, mp's resource tracker)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _proc_stat(int(entry))
            if st is not None:
                parents[int(entry)] = st[0]
    tree = [root]
    for pid in tree:
        tree += [c for c, p in parents.items() if p == pid and c not in tree]
    return tree


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        st = _proc_stat(pid)
        if st is not None:
            out[pid] = st[1]
    return out


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> dict[int, float]:
    return {pid: after[pid] - before[pid] for pid in after if pid in before}


async def postgres_backends(conn: Any, db: str) -> list[int]:
    rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", db)
    return [r["pid"] for r in rows]
