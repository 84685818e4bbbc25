"""`ingestor simulate` as a real process: the JSON line, serving, clean exit on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

from .conftest import connect, get_json


async def test_simulate_prints_urls_serves_and_exits_zero_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ingestor.cli", "simulate", "--n-symbols", "2", "--seed", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        urls = json.loads(line)
        assert list(urls) == ["spot_ws", "futures_ws", "spot_rest", "futures_rest", "admin"]
        client = await connect(urls["futures_ws"] + "/public/ws/btcusdt@depth@100ms")
        event = await client.recv(timeout=5)
        assert event["e"] == "depthUpdate" and "pu" in event
        status, info, _h = await get_json(urls["spot_rest"] + "/api/v3/exchangeInfo")
        assert status == 200 and [s["symbol"] for s in info["symbols"]] == ["BTCUSDT", "ETHUSDT"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert proc.stdout.read() == ""  # exactly one line on stdout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_arguments_fail_fast_with_a_clear_message() -> None:
    for args, needle in (
        (["--faults", "explode@1s"], "unknown fault kind"),
        (["--markets", "options"], "expected a comma list"),
        (["--symbols", "btc-usdt"], "upper-case"),
        (["--replay", "/nonexistent/file"], "does not exist"),
    ):
        r = subprocess.run([sys.executable, "-m", "ingestor.cli", "simulate", *args],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode != 0, args
        assert needle in r.stderr, (args, r.stderr)
        assert r.stdout == ""


async def test_workers_share_the_ports_and_publish_the_same_sequence() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ingestor.cli", "simulate", "--n-symbols", "2", "--workers", "2",
         "--markets", "futures", "--rate", "300"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        urls = json.loads(proc.stdout.readline())
        assert "spot_ws" not in urls
        clients = [await connect(urls["futures_ws"] + "/market/ws/btcusdt@aggTrade") for _ in range(6)]
        seqs = []
        for c in clients:
            # 200 trades (over a second at this rate): the connections, opened one after
            # another on a loaded host, still overlap.
            seqs.append({(e["a"], e["p"], e["q"]) for e in [await c.recv(timeout=10) for _ in range(200)]})
        # Every process runs the same seeded model from the same start: where two
        # connections saw the same trade id, they saw the same trade.
        common = set.intersection(*seqs)
        assert common, "connections saw disjoint id ranges"
        by_id: dict[int, tuple[str, str]] = {}
        for seq in seqs:
            for a, p, q in seq:
                assert by_id.setdefault(a, (p, q)) == (p, q)
        port = urls["futures_ws"].rsplit(":", 1)[1]
        listeners = subprocess.run(["ss", "-Htln", f"sport = :{port}"], capture_output=True, text=True)
        assert len(listeners.stdout.splitlines()) == 2, listeners.stdout  # two processes, one port
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
