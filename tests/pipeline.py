"""Run ``ingestor run`` as a real process tree against an in-process simulator."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson

from ingestor.sim.server import Simulator

INGESTOR = str(Path(sys.executable).parent / "ingestor")
_HEALTH_LINE = re.compile(r"health and metrics on (http://\S+)/health")
TABLES = ("agg_trades", "depth_updates", "mark_prices", "force_orders", "open_interest", "depth_snapshots",
          "stream_gaps")


def free_port() -> int:
    """A loopback port free now (freed again before the caller binds it): for a server that
    does not report the port it bound, or a port where nothing must listen."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sim_flags(sim: Simulator) -> list[str]:
    flags = []
    for market in sim.markets:
        flags += [f"--{market}-ws-url", sim.urls[f"{market}_ws"], f"--{market}-rest-url", sim.urls[f"{market}_rest"]]
    return flags


class Pipeline:
    """One ``ingestor run`` process; its log is kept for assertions and failures."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.args = args
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.log: list[str] = []
        self.url = ""
        self._url_found = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 30.0) -> Pipeline:
        env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTOR_")}
        env.update(self.env or {})
        # Its own data directory (the writer's spool lives there), unless the test chose one.
        chosen = "--data-dir" in self.args or "XDG_DATA_HOME" in (self.env or {})
        data_dir = [] if chosen else ["--data-dir", tempfile.mkdtemp(prefix="ingestor-test-")]
        self.proc = await asyncio.create_subprocess_exec(
            INGESTOR, "run", "--http-port", "0", *data_dir, *self.args,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env,
            start_new_session=True,  # its own process group: kill() takes the workers too
        )
        self._reader = asyncio.ensure_future(self._read())
        done = asyncio.ensure_future(self._url_found.wait())
        exited = asyncio.ensure_future(self.proc.wait())
        await asyncio.wait((done, exited), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        done.cancel()
        exited.cancel()
        if not self.url:
            await self.kill()
            raise AssertionError("pipeline did not start:\n" + self.text())
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.log.append(line)
            m = _HEALTH_LINE.search(line)
            if m:
                self.url = m.group(1)
                self._url_found.set()

    def text(self) -> str:
        return "\n".join(self.log[-200:])

    async def health(self) -> tuple[int, dict[str, Any]]:
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as s, s.get(self.url + "/health") as r:
            return r.status, orjson.loads(await r.read())

    async def metrics(self) -> str:
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as s, s.get(self.url + "/metrics") as r:
            assert r.status == 200
            return await r.text()

    async def wait_health(self, status: int = 200, timeout: float = 30.0, check: Any = None) -> dict[str, Any]:
        """Until /health answers ``status`` (and ``check(body)`` holds)."""
        deadline = asyncio.get_running_loop().time() + timeout
        body: dict[str, Any] = {}
        while asyncio.get_running_loop().time() < deadline:
            try:
                code, body = await self.health()
                if code == status and (check is None or check(body)):
                    return body
            except (TimeoutError, aiohttp.ClientError):
                pass
            await asyncio.sleep(0.2)
        raise AssertionError(f"/health never gave {status}: {body}\n{self.text()}")

    async def stop(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            await self.kill()
            raise AssertionError("pipeline did not stop after SIGTERM:\n" + self.text()) from None
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 5)
        return rc

    async def kill(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await asyncio.wait_for(self.proc.wait(), 10)


async def table_counts(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in TABLES}
    finally:
        await conn.close()


async def wait_until(predicate: Any, timeout: float, what: str, period: float = 0.2) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if await predicate():
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(period)
