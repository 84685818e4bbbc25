"""Shared test fixtures: an in-process simulator and a small picows client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from ingestor.sim.server import SimConfig, Simulator

from .databases import BACKENDS, SYSTEM_PG, Servers, check_backend, create_database, drop_database

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
DOCS_DATA = Path(__file__).resolve().parent / "data" / "binance_docs"
# Real captures that together hold a snapshot and the diffs after it, per market.
CAPTURE_SETS = [
    ("spot", ["bmoscon_cryptofeed__sample_data-BINANCE.ws.1.0",
              "bmoscon_cryptofeed__sample_data-BINANCE.http.0.0"]),
    ("futures", ["bmoscon_cryptofeed__sample_data-BINANCE_FUTURES.ws.1.0",
                 "bmoscon_cryptofeed__sample_data-BINANCE_FUTURES.http.0.0"]),
    ("spot", ["bmoscon_cryptofeed__sample_data-BINANCE-ee25be.0@29970208"]),
    ("spot", ["nkaz001_hftbacktest__examples-spot-btcusdt_20240808.gz"]),
    ("futures", ["nkaz001_hftbacktest__examples-usdm-btcusdt_20240808.gz"]),
]


class Client(WSListener):
    """Collects text frames; counts pings; remembers how the server closed."""

    def __init__(self) -> None:
        self.frames: asyncio.Queue[bytes] = asyncio.Queue()
        self.closed = asyncio.Event()
        self.close_code: WSCloseCode | None = None
        self.pings = 0
        self.transport: WSTransport | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            self.frames.put_nowait(frame.get_payload_as_bytes())
        elif frame.msg_type == WSMsgType.PING:
            self.pings += 1
        elif frame.msg_type == WSMsgType.CLOSE:
            self.close_code = frame.get_close_code()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed.set()

    def send_json(self, obj: Any) -> None:
        assert self.transport is not None
        self.transport.send(WSMsgType.TEXT, orjson.dumps(obj))

    async def recv(self, timeout: float = 5.0) -> Any:
        return orjson.loads(await asyncio.wait_for(self.frames.get(), timeout))

    async def recv_raw(self, timeout: float = 5.0) -> bytes:
        return await asyncio.wait_for(self.frames.get(), timeout)

    async def reply(self, req_id: Any, timeout: float = 5.0) -> Any:
        """The next frame that is a reply to ``req_id`` (data frames are skipped)."""
        while True:
            msg = await self.recv(timeout)
            if isinstance(msg, dict) and "id" in msg and ("result" in msg or "error" in msg):
                if msg["id"] == req_id:
                    return msg


# Every await in the tests is bounded, so a broken server fails a test instead of hanging it.
CONNECT_TIMEOUT_S = 5.0
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=15)  # /pause may take up to 5 s by design


async def connect(url: str, factory: Any = Client, **kw: Any) -> Any:
    _, client = await asyncio.wait_for(ws_connect(factory, url, **kw), CONNECT_TIMEOUT_S)
    return client


async def get_json(url: str, **params: Any) -> tuple[int, Any, dict[str, str]]:
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as s, s.get(url, params=params) as r:
        return r.status, orjson.loads(await r.read()), dict(r.headers)


async def post_json(url: str, body: Any = None) -> Any:
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as s, \
            s.post(url, data=orjson.dumps(body)) as r:
        return orjson.loads(await r.read())


@pytest.fixture
async def sim(request: pytest.FixtureRequest) -> AsyncIterator[Simulator]:
    """A simulator; parametrize indirectly with a SimConfig to change it."""
    config = getattr(request, "param", None) or SimConfig(n_symbols=3)
    async with Simulator(config) as s:
        yield s


@pytest.fixture(scope="session")
def pg_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    servers = Servers(tmp_path_factory.mktemp("embedded"))
    yield servers
    servers.stop()


@pytest.fixture
async def system_db() -> AsyncIterator[str]:
    """A fresh, migrated database on the machine's PostgreSQL (TimescaleDB), dropped
    afterwards: the process tests' database (scenarios that stop the database start an
    embedded server of their own)."""
    dsn = await create_database(SYSTEM_PG)
    yield dsn
    await drop_database(SYSTEM_PG, dsn)


@pytest.fixture(params=BACKENDS)
async def db_dsn(request: pytest.FixtureRequest, pg_servers: Servers) -> AsyncIterator[str]:
    """A fresh, migrated database on each backend (TimescaleDB, plain PostgreSQL)."""
    admin = pg_servers.admin_dsn(request.param)
    dsn = await create_database(admin)
    await check_backend(dsn, request.param)
    yield dsn
    await drop_database(admin, dsn)
