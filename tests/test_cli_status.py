"""`ingestor status` against a running pipeline: the simulator, `ingestor run` as a real
process tree on the machine's PostgreSQL, and `ingestor status` as a subprocess.

The renderer is checked on the /health body that pipeline serves (never a hand-written
shape that could drift from the supervisor's); the command on its exit codes: 0 healthy,
1 unhealthy (a real one: a socket worker frozen until it goes silent; and the real body
turned into a dead worker's 503), 2 when nothing answers.
"""

from __future__ import annotations

import asyncio
import copy
import os
import signal
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
import pytest_asyncio
from aiohttp import web

from ingestor.sim.server import SimConfig, Simulator
from ingestor.status import exit_code, render_status

from .databases import SYSTEM_PG, create_database, drop_database
from .pipeline import INGESTOR, Pipeline, free_port, sim_flags

# One pipeline for the module (starting one takes seconds); every test first waits until it
# is healthy again, so none depends on what another did to it.
pytestmark = pytest.mark.asyncio(loop_scope="module")

STATUS_TIMEOUT_S = 30.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pipe() -> AsyncIterator[Pipeline]:
    dsn = await create_database(SYSTEM_PG)
    try:
        async with Simulator(SimConfig(n_symbols=3, seed=11)) as sim:
            p = await Pipeline(["--dsn", dsn, "--shards", "2", *sim_flags(sim)]).start()
            try:
                yield p
            finally:
                await p.kill()
    finally:
        await drop_database(SYSTEM_PG, dsn)


def _all_flowing(body: dict[str, Any]) -> bool:
    workers = body["workers"]
    sockets = [w for name, w in workers.items() if name.startswith("socket-")]
    return (len(sockets) == 2 and all(w.get("streams") and w.get("connected_streams") == w["streams"]
                                      for w in sockets)
            and body["database"]["last_commit_age_s"] is not None
            and bool((workers.get("features") or {}).get("markets")))  # it has seen both markets' feeds


async def healthy(pipe: Pipeline) -> dict[str, Any]:
    return await pipe.wait_health(200, timeout=40, check=_all_flowing)


async def run_status(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("INGESTOR_")}
    proc = await asyncio.create_subprocess_exec(
        INGESTOR, "status", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**clean, **(env or {})})
    try:
        out, err = await asyncio.wait_for(proc.communicate(), STATUS_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def worker_line(text: str, name: str) -> str:
    """The workers table's row of ``name`` (its first line starting with the name)."""
    return next(line for line in text.splitlines() if line.split()[:1] == [name])


def dead(body: dict[str, Any], name: str) -> dict[str, Any]:
    """The same body as the supervisor gives it with ``name`` dead."""
    body = copy.deepcopy(body)
    body["workers"][name].update(alive=False, pid=None)
    body.update(status="unhealthy", problems=[f"{name} is not running"])
    return body


async def test_renderer_on_a_real_health_body(pipe: Pipeline) -> None:
    body = await healthy(pipe)
    text = render_status(body, pipe.url + "/health")
    assert text.splitlines()[0].startswith(f"ingestor OK at {pipe.url}/health")
    assert "problems: none" in text
    assert set(body["workers"]) == {"writer", "features", "rest", "socket-0", "socket-1"}
    for name, w in body["workers"].items():
        row = worker_line(text, name).split()
        assert row[1:5] == [w["kind"], "yes", str(w["pid"]), str(w["restarts"])], (name, row)
    connections = text.split("\nconnections\n")[1].split("\n\n")[0].splitlines()
    for name in ("socket-0", "socket-1"):
        w = body["workers"][name]
        row = next(line for line in connections if line.startswith(name)).split()
        assert row[1:3] == [f"{w['streams']}/{w['streams']}", f"{w['connections']}/{w['connections']}"]
    lag = text.split("\nlag and queues\n")[1].split("\n\n")[0]
    assert worker_line(lag, "writer").startswith("writer    last commit ") and "rows committed" in lag
    e2c = body["workers"]["writer"]["event_to_commit_s"]  # market data flows: committed every 100 ms
    assert 0 <= e2c["median"] <= e2c["max"] < 10, e2c
    assert "event to commit - median" not in lag and " median, " in worker_line(lag, "writer")
    input_lag = worker_line(lag, "features").split("input lag ")[1]
    assert all(f"{m} " in input_lag for m in body["workers"]["features"]["markets"]), input_lag
    books = text.split("\nfeature books\n")[1].split("\n\n")[0].splitlines()
    assert [line.split()[0] for line in books[1:]] == list(body["workers"]["features"]["markets"])
    detected = next(line for line in text.splitlines() if line.startswith("sequence gaps detected"))
    assert detected.split()[-1] == str(body["workers"]["socket-0"]["gaps"] + body["workers"]["socket-1"]["gaps"])
    assert "database  reachable yes, last commit" in text
    assert exit_code(200, body) == 0

    # The same body with a worker dead, and with one that has not reported yet (the
    # supervisor then knows only alive, pid, restarts): flagged, and nothing else breaks.
    broken = dead(body, "socket-1")
    text = render_status(broken)
    assert text.splitlines()[0].startswith("ingestor UNHEALTHY")
    assert "  - socket-1 is not running" in text
    assert worker_line(text, "socket-1").split()[2:5] == ["NO", "-", str(body["workers"]["socket-1"]["restarts"])]
    assert "DEAD" in worker_line(text, "socket-1")
    assert exit_code(503, broken) == 1 and exit_code(200, broken) == 1
    fresh = copy.deepcopy(body)
    fresh["workers"]["rest"] = {"alive": True, "pid": 1, "restarts": 0, "status_age_s": None}
    assert "starting" in worker_line(render_status(fresh), "rest")


async def test_status_exits_0_and_shows_every_worker(pipe: Pipeline) -> None:
    body = await healthy(pipe)
    code, out, err = await run_status("--url", pipe.url)
    assert code == 0, out + err
    for name, w in body["workers"].items():
        assert str(w["pid"]) in worker_line(out, name)
    # No --url: the URL comes from the settings, so INGESTOR_HTTP_PORT applies.
    port = str(urlsplit(pipe.url).port)
    code, out, err = await run_status(env={"INGESTOR_HTTP_PORT": port})
    assert code == 0, out + err
    assert f"ingestor OK at http://127.0.0.1:{port}/health" in out
    code, out, err = await run_status("--json", "--url", pipe.url + "/health")
    assert code == 0, err
    assert set(orjson.loads(out)["workers"]) == set(body["workers"])


async def test_watch_refreshes_until_ctrl_c(pipe: Pipeline) -> None:
    await healthy(pipe)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("INGESTOR_")}
    proc = await asyncio.create_subprocess_exec(
        INGESTOR, "status", "--url", pipe.url, "--watch", "0.5", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=clean)
    assert proc.stdout is not None
    lines: list[str] = []

    async def two_screens() -> None:  # up to the last line of the second screen
        assert proc.stdout is not None
        while sum(line.startswith("database  ") for line in lines) < 2:
            raw = await proc.stdout.readline()
            if not raw:
                raise AssertionError("status --watch ended:\n" + "".join(lines))
            lines.append(raw.decode())

    try:
        await asyncio.wait_for(two_screens(), STATUS_TIMEOUT_S)
        proc.send_signal(signal.SIGINT)
        rest, _ = await asyncio.wait_for(proc.communicate(), STATUS_TIMEOUT_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = "".join(lines) + rest.decode()
    assert sum("every 0.5 s, Ctrl-C stops" in line for line in text.splitlines()) >= 2, text
    assert sum(line.startswith("ingestor OK at ") for line in text.splitlines()) >= 2, text
    assert proc.returncode == 0  # Ctrl-C: the last look's verdict


async def test_a_frozen_socket_worker_makes_it_exit_1(pipe: Pipeline) -> None:
    body = await healthy(pipe)
    pid = body["workers"]["socket-0"]["pid"]
    os.kill(pid, signal.SIGSTOP)  # alive but silent: the supervisor calls it unhealthy after 5 s
    try:
        await pipe.wait_health(503, timeout=20, check=lambda b: any("socket-0 has not reported" in p
                                                                    for p in b["problems"]))
        code, out, err = await run_status("--url", pipe.url)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert code == 1, out + err
    assert out.splitlines()[0].startswith("ingestor UNHEALTHY")
    assert "SILENT" in worker_line(out, "socket-0")
    assert "  - socket-0 has not reported for" in out
    await healthy(pipe)


async def test_a_503_with_a_dead_worker_exits_1(pipe: Pipeline) -> None:
    broken = dead(await healthy(pipe), "socket-0")

    async def health(request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(broken), status=503, content_type="application/json")

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        code, out, err = await run_status("--url", f"http://{host}:{port}")
    finally:
        await runner.cleanup()
    assert code == 1, out + err
    assert "  - socket-0 is not running" in out
    assert "DEAD" in worker_line(out, "socket-0")


async def test_nothing_listening_exits_2_naming_the_url() -> None:
    port = free_port()
    code, out, err = await run_status("--url", f"http://127.0.0.1:{port}")
    assert code == 2
    assert out == ""
    assert err.strip().splitlines() == [err.strip()]  # one line
    assert f"http://127.0.0.1:{port}/health" in err
    code, out, err = await run_status(env={"INGESTOR_HTTP_PORT": str(port)})
    assert code == 2 and f"http://127.0.0.1:{port}/health" in err
