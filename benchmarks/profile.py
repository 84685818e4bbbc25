"""Profile: where the ingestor's processes spend their CPU inside a live pipeline level.

Issue 6 asks for the profile behind each target that is not met on this box. The codec
suite times the socket worker's parts in-process; this one samples the real processes
while one pipeline level runs (``pipeline.run_level``: fresh database, the simulator's
tape, ``ingestor run``, the zero-loss audit), so picows, the event loop, the queues'
feeder threads and the pipe writes are in it too.

py-spy (``pip install py-spy``; not a project dependency) attaches to ``socket-0``,
``features`` and ``writer`` at the start of the window and samples each at 250 Hz,
non-blocking (the process is not paused), Python frames only. Samples of idle threads
are left out, so the shares are of the CPU a process used. Per process the report gives
the functions with the most samples of their own ("self", the line where the time went)
and the frames most often on the stack ("incl"), as percentages; process bootstrap frames
are left out of the latter.

Read the shares with care: a thread that waits for a lock or the GIL is not idle to
py-spy. The feature worker's thread hop to wait on an empty queue showed as about a fifth
of its samples, yet replacing it with the loop watching the queue's pipe changed its /proc
CPU by nothing measurable (1.43-1.49 CPU-s per million messages either way, 100,000 msg/s,
two runs each). /proc CPU (the pipeline suite) is the measure; this says where to look.

``python -m benchmarks profile [--rate 100000]``; about 40 s. Not part of ``all``.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks import pipeline
from benchmarks.report import metric

PROCESSES = ("socket-0", "features", "writer")
RATE_HZ = 250
TOP = 10
# Frames every sample of a child has: they say nothing about where its time goes.
_BOOTSTRAP = re.compile(r"^(<module>|spawn_main|_main|BaseProcess\.|run_child|main|run |run\.<locals>|Runner\.run "
                        r"|Thread\._bootstrap|Thread\.run)")


def _short(frame: str) -> str:
    """``func (/abs/path/pkg/mod.py:12)`` -> ``func (pkg/mod.py:12)``."""
    return re.sub(r"\((?:[^()]*/site-packages/|[^()]*/lib/python3\.\d+/|[^()]*/(?=ingestor/|benchmarks/))", "(",
                  frame)


def summarize(collapsed: str) -> tuple[int, Counter[str], Counter[str]]:
    """py-spy's raw output (``frame;frame;... count`` per line) -> samples, self and
    inclusive counts per frame (a frame counts once per sample however deep it recurs)."""
    total, own, incl = 0, Counter[str](), Counter[str]()
    for line in collapsed.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";")]
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    return total, own, incl


def run(quick: bool, rate: float | None = None) -> dict[str, Any]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise RuntimeError("py-spy is not installed: pip install py-spy")
    level = rate or 100_000.0
    window = 8.0
    out = Path(tempfile.mkdtemp(prefix="ingestor-profile-"))
    spies: dict[str, subprocess.Popen[bytes]] = {}

    def watch(pids: dict[int, str]) -> None:
        if spies:
            return
        for pid, name in pids.items():
            if name in PROCESSES:
                spies[name] = subprocess.Popen(
                    [spy, "record", "-p", str(pid), "-d", str(int(window - 1)), "-r", str(RATE_HZ), "-f", "raw",
                     "-o", str(out / f"{name}.txt"), "--nonblocking"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    result = asyncio.run(pipeline.run_level(1, level, pipeline.N_SYMBOLS, 2.0, window, tape=pipeline.quick_tape(),
                                            watch=watch))
    metrics = []
    for name in PROCESSES:
        spy_proc = spies.get(name)
        if spy_proc is None:
            continue
        _, err = spy_proc.communicate(timeout=60)
        path = out / f"{name}.txt"
        if not path.exists():
            metrics.append(metric(f"{name}: py-spy failed", None, "", err.decode(errors="replace")[-300:]))
            continue
        total, own, incl = summarize(path.read_text())
        metrics.append(metric(f"{name}: samples", total, "samples", f"{RATE_HZ} Hz over {window - 1:g} s, CPU only"))
        for frame, n in own.most_common(TOP):
            metrics.append(metric(f"{name} self: {frame}", round(100 * n / total, 1), "%"))
        shown = [(f, n) for f, n in incl.most_common() if not _BOOTSTRAP.match(f)][:TOP]
        for frame, n in shown:
            metrics.append(metric(f"{name} incl: {frame}", round(100 * n / total, 1), "%"))
    shutil.rmtree(out, ignore_errors=True)
    return {
        "suite": "profile",
        "title": "profile: where each ingestor process spends its CPU in a live pipeline level (py-spy)",
        "params": {"level_msg_per_s": level, "window_s": window, "rate_hz": RATE_HZ, "processes": ",".join(PROCESSES)},
        "metrics": metrics,
        "notes": [f"The level (nominal {level:,.0f} msg/s, one shard, the quick tape): {pipeline.verdict(result)}.",
                  "self: the line the sample was in; incl: on the stack. `Runner.run` self time is the event "
                  "loop's C code (uvloop, picows' frame parsing) with no Python frame of its own."],
    }
