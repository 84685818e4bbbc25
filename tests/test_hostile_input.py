"""Hostile and broken input: the frame path fuzzed with random bytes and mutated real frames,
deeply nested JSON, a server that answers the handshake with garbage, and TLS peers whose
certificate does not verify. The worker never dies, counts what it refuses, stores
nothing malformed, and says so in the log."""

from __future__ import annotations

import asyncio
import logging
import ssl
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingestor.binance.rest_client import RestClient, RestError
from ingestor.sim import encode as enc
from ingestor.wire.batching import Batch
from ingestor.wire.copy_binary import tuple_offsets
from ingestor.workers.frames import FrameHandler

from .conftest import DOCS_DATA, REALDATA

# Real frames to mutate: the documentation's examples and, where present, real captures.
SEEDS: list[bytes] = [
    enc.envelope("btcusdt@aggTrade", (DOCS_DATA / "agg_trade_stream.json").read_bytes().strip()),
    enc.envelope("btcusdt@depth@100ms", (DOCS_DATA / "depth_update_stream.json").read_bytes().strip()),
    enc.envelope("!forceOrder@arr", (DOCS_DATA / "liquidation_stream.json").read_bytes().strip()),
    enc.envelope("!markPrice@arr@1s", b"[" + (DOCS_DATA / "mark_price_stream.json").read_bytes().strip() + b"]"),
]
_capture = REALDATA / "bmoscon_cryptofeed__sample_data-BINANCE_FUTURES.ws.1.0"
if _capture.exists():
    for _line in _capture.read_bytes().splitlines()[1:200]:
        _, _, _frame = _line.partition(b": ")
        if _frame.startswith(b'{"stream"'):
            SEEDS.append(_frame)

EVENTS = {"agg_trades": "aggTrade", "depth_updates": "depthUpdate", "force_orders": "forceOrder",
          "mark_prices": "markPriceUpdate"}


def payloads(batches: list[Batch]) -> list[tuple[str, Any]]:
    """Each stored row's table and parsed jsonb payload (its last field, after the version byte)."""
    out = []
    for b in batches:
        offsets = tuple_offsets(b.data)
        for i in range(len(offsets) - 1):
            row = b.data[offsets[i] : offsets[i + 1]]
            n = int.from_bytes(row[:2], "big")
            pos = 2
            last = b""
            for _ in range(n):
                size = int.from_bytes(row[pos : pos + 4], "big", signed=True)
                pos += 4
                if size >= 0:
                    last = row[pos : pos + size]
                    pos += size
            out.append((b.table, orjson.loads(last[1:]) if b.table in EVENTS else None))
    return out


def mutate(frame: bytes, cuts: list[tuple[int, int, bytes]]) -> bytes:
    data = bytearray(frame)
    for pos, length, insert in cuts:
        if not data:
            break
        p = pos % len(data)
        data[p : p + length % 8] = insert
    return bytes(data)


def check_handler(frames: list[bytes]) -> None:
    batches: list[Batch] = []
    h = FrameHandler("futures", batches.append)
    for f in frames:
        h.on_frame(f)  # never raises
    h.flush(force=True)
    accepted = sum(h.messages.values())
    assert accepted + sum(h.rejected.values()) >= len(frames)  # every frame counted one way or the other
    for table, payload in payloads(batches):
        if table in EVENTS:  # nothing malformed stored: each payload is its table's event
            assert isinstance(payload, dict) and payload.get("e") == EVENTS[table], (table, payload)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=300), max_size=20))
def test_random_bytes_never_kill_the_frame_path(frames: list[bytes]) -> None:
    check_handler(frames)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(range(len(SEEDS))),
                          st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 64),
                                             st.binary(max_size=6) | st.sampled_from(
                                                 [b'"', b"{", b"]", b"null", b"-1", b'"x"', b"1e999", b"\\u0000"])),
                                   max_size=3)), min_size=1, max_size=10))
def test_mutated_real_frames_never_kill_the_frame_path(plan: list[tuple[int, list[tuple[int, int, bytes]]]]) -> None:
    check_handler([mutate(SEEDS[i], cuts) for i, cuts in plan])


def test_deeply_nested_and_wrongly_typed_json_is_refused_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    batches: list[Batch] = []
    h = FrameHandler("futures", batches.append)
    deep = b"[" * 100_000 + b"]" * 100_000
    wrong = [
        b'{"e":"aggTrade","E":"soon","s":"BTCUSDT","a":1,"p":"1","q":"1","T":1,"m":true}',
        b'{"e":"depthUpdate","E":1,"s":"BTCUSDT","U":"1","u":2,"pu":0,"b":[],"a":[]}',
        b'{"e":"forceOrder","E":1,"o":{"s":"BTCUSDT","S":"SELL","q":{"x":1},"T":1}}',
        b'{"e":{"nested":"event"}}',
    ]
    with caplog.at_level(logging.WARNING):
        h.on_frame(enc.envelope("btcusdt@aggTrade", deep))
        for w in wrong:
            h.on_payload(w)
    h.flush(force=True)
    assert h.rejected == {"json": 1, "fields": 3, "unknown_event": 1}
    assert not [b for b in batches if b.table != "stream_gaps"]
    assert any("skipped a frame" in r.message for r in caplog.records)  # a clear log line, rate-limited


# ---- the connection: garbage in the handshake, certificates that do not verify ----------


async def test_a_server_answering_the_handshake_with_garbage_is_retried(caplog: pytest.LogCaptureFixture) -> None:
    from ingestor.binance.plan import Connection
    from ingestor.config import Settings
    from ingestor.workers.socket_worker import StreamConnection

    hits = 0

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal hits
        hits += 1
        await reader.read(1000)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello\x00\xff\xfe garbage")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    handler = FrameHandler("spot", lambda b: None)
    conn = StreamConnection(Connection("spot", "", ("btcusdt@aggTrade",)), f"ws://127.0.0.1:{port}/stream?streams="
                            "btcusdt@aggTrade", handler, Settings())

    class Ctx:
        stopping = asyncio.Event()

        def should_stop(self) -> bool:
            return self.stopping.is_set()

    ctx = Ctx()
    with caplog.at_level(logging.WARNING):
        task = asyncio.ensure_future(conn.run(ctx))  # type: ignore[arg-type]
        await asyncio.sleep(2.5)
        ctx.stopping.set()
        await asyncio.wait_for(task, 20)
    server.close()
    assert hits >= 2 and conn.connect_failures == hits  # tried again, with backoff, never died; counted
    assert any("connect failed" in r.message for r in caplog.records)


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
                   check=True, capture_output=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "cert.pem", d / "key.pem")
    return ctx


async def test_wss_and_https_refuse_a_certificate_that_does_not_verify(self_signed: ssl.SSLContext,
                                                                       tmp_path: Path) -> None:
    from picows import WSListener, ws_connect

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=self_signed)
    port = server.sockets[0].getsockname()[1]
    try:
        # The socket worker's connect: picows with no SSL context verifies (ssl=True).
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.wait_for(ws_connect(WSListener, f"wss://127.0.0.1:{port}/ws"), 10)
        # The REST client: aiohttp verifies by default; the error is a RestError, not data.
        async with aiohttp.ClientSession() as session:
            client = RestClient(session, {"spot": f"https://127.0.0.1:{port}"})
            with pytest.raises(RestError, match="certificate verify failed|CERTIFICATE_VERIFY_FAILED"):
                await client.get("spot", "ping", retries=0)
    finally:
        server.close()
