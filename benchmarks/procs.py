"""Child processes of the benchmarks: started, read, stopped, their stderr kept."""

from __future__ import annotations

import signal
import subprocess
import tempfile
import threading


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
