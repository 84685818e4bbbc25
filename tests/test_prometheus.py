"""A real Prometheus scraping a real ``ingestor run``.

The simulator, the ingestor's process tree and PostgreSQL are real (as in
tests/test_pipeline_processes.py); so is Prometheus, Debian's binary on loopback with its
own configuration and storage in tmp (scripts/test.sh installs it). Through Prometheus's
HTTP API the target is up, every worker's series arrive (gaps closed three ways among
them), and each expression of the Grafana dashboard is accepted and the main panels have
data. ``promtool check metrics`` lints the exposition, live and with every metric in it."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from ingestor import metrics
from ingestor.sim.server import SimConfig, Simulator

from .conftest import post_json
from .pipeline import Pipeline, free_port, sim_flags, wait_until
from .test_grafana_dashboard import dashboard_queries, exported_names, load_dashboard, substitute

MISSING = "run scripts/test.sh (it installs Debian's prometheus package) or apt-get install prometheus"
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=10)


def binary(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} not found: {MISSING}"
    return path


def promtool_lint(text: str) -> tuple[int, str]:
    """``promtool check metrics`` on an exposition: its exit code and everything it said."""
    done = subprocess.run([binary("promtool"), "check", "metrics"], input=text.encode(), capture_output=True,
                          timeout=60)
    return done.returncode, (done.stdout + done.stderr).decode(errors="replace").strip()


def help_mismatches(text: str) -> list[str]:
    """Families whose HELP is not the text written in ingestor.metrics."""
    written = {obj._name: obj._documentation for obj in vars(metrics).values()
               if isinstance(obj, Counter | Gauge | Histogram)}
    return [f"{fam.name}: {fam.documentation!r}" for fam in text_string_to_metric_families(text)
            if fam.documentation != written.get(fam.name)]


class Prometheus:
    """One ``prometheus`` process scraping ``target`` every second; its log kept in tmp."""

    def __init__(self, tmp: Path, target: str) -> None:
        self.tmp = tmp
        self.port = free_port()  # Prometheus does not report the port it bound: it is given one
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = tmp / "prometheus.yml"
        self.config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "  evaluation_interval: 1s\n"
            "scrape_configs:\n"
            "  - job_name: ingestor\n"
            "    static_configs:\n"
            f"      - targets: ['{target}']\n")
        self.log = tmp / "prometheus.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 20.0) -> Prometheus:
        with self.log.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                binary("prometheus"), f"--config.file={self.config}", f"--storage.tsdb.path={self.tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", stdout=log, stderr=log, start_new_session=True)

        async def ready() -> bool:
            assert self.proc is not None
            if self.proc.returncode is not None:
                raise AssertionError(f"prometheus exited ({self.proc.returncode}):\n{self.text()}")
            try:
                async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as s, s.get(self.url + "/-/ready") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await wait_until(ready, timeout, "prometheus ready")
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace")[-5000:]

    async def api(self, path: str, **params: str) -> dict[str, Any]:
        async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as s, s.get(self.url + path, params=params) as r:
            body: dict[str, Any] = orjson.loads(await r.read())
            return body

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """The result vector of an instant query; a query Prometheus refuses fails the test."""
        body = await self.api("/api/v1/query", query=expr)
        assert body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def values(self, expr: str) -> dict[tuple[tuple[str, str], ...], float]:
        """Each series of ``expr`` (its labels, sorted) -> its value now."""
        return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in await self.query(expr)}

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 15)
        except TimeoutError:
            os.killpg(self.proc.pid, signal.SIGKILL)
            await asyncio.wait_for(self.proc.wait(), 10)


# The panels whose queries must return series from a short run (the rest may rightly be
# empty: no spool, no COPY errors, no drift).
PANELS_WITH_DATA = ("Messages received /s per worker", "Rows sent to the writer /s", "Rows committed /s per table",
                    "Exchange event to commit", "COPY latency", "Queue depths", "Books by state",
                    "Gaps closed, by how", "REST requests /s by status", "Feature input lag", "Spool size")


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=2, seed=21)], indirect=True)
async def test_prometheus_scrapes_every_worker_and_runs_every_dashboard_query(
        sim: Simulator, system_db: str, tmp_path: Path) -> None:
    pipe = await Pipeline(["--dsn", system_db, "--batch-age-ms", "100", *sim_flags(sim)]).start()
    prom: Prometheus | None = None
    try:
        await pipe.wait_health(200)
        server = prom = Prometheus(tmp_path, urlsplit(pipe.url).netloc)
        await server.start()

        async def synced() -> bool:
            return sum((await server.values('ingestor_books{state="synced"}')).values()) == 4

        # A book gap only resyncs a synced book: wait for the four books before the faults.
        await wait_until(synced, 20, "4 synced books, seen through prometheus")
        await post_json(sim.urls["admin"] + "/faults", {"kind": "skip_trades", "market": "spot", "count": 3})
        await post_json(sim.urls["admin"] + "/faults", {"kind": "gap", "market": "futures", "symbol": "BTCUSDT"})

        targets = (await server.api("/api/v1/targets"))["data"]["activeTargets"]
        assert [(t["labels"]["job"], t["health"], t["lastError"]) for t in targets] == [("ingestor", "up", "")]
        assert await server.values('up{job="ingestor"}') == {
            (("__name__", "up"), ("instance", urlsplit(pipe.url).netloc), ("job", "ingestor")): 1.0}

        # Every worker's series, and the three ways a gap closes, each where it is closed.
        wanted: dict[str, float] = {
            'ingestor_messages_received_total{worker="socket-0"}': 0.0,
            'ingestor_rows_written_total{worker="writer", table="agg_trades"}': 0.0,
            'ingestor_rows_sent_total{worker="socket-0"}': 0.0,
            'ingestor_rest_requests_total{worker="rest", status="200"}': 0.0,
            'ingestor_feature_events_total{worker="features", kind="aggTrade"}': 0.0,
            'ingestor_gaps_closed_total{worker="writer", stream="aggTrade", how="backfilled"}': 0.0,
            'ingestor_gaps_closed_total{worker="socket-0", stream="depth", how="unrecoverable"}': 0.0,
            'ingestor_gaps_closed_total{worker="features", stream="book", how="resynced"}': 0.0,
        }

        async def arrived() -> bool:
            for expr in wanted:
                wanted[expr] = sum((await server.values(expr)).values())
            return all(v for v in wanted.values())

        try:
            await wait_until(arrived, 25, "every worker's series in prometheus")
        except AssertionError:
            raise AssertionError(f"{wanted}\n{pipe.text()}") from None

        # Every dashboard expression, variables substituted as Grafana's "All" would, is
        # accepted; the main panels have data.
        dash = load_dashboard()
        empty = []
        for where, expr in dashboard_queries(dash):
            result = await server.query(substitute(expr, dash))
            if not result and any(where.startswith(f"panel {title!r} ") for title in PANELS_WITH_DATA):
                empty.append(where)
        assert empty == []

        # The exposition itself: promtool finds nothing to lint, the HELP texts are the
        # ones written in ingestor.metrics, and every sample name is one the dashboard
        # test counts as exported.
        text = await pipe.metrics()
        assert await asyncio.to_thread(promtool_lint, text) == (0, "")
        assert help_mismatches(text) == []
        scraped = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
        assert scraped and scraped <= exported_names(), scraped - exported_names()
        assert await pipe.stop() == 0
    finally:
        try:
            if prom is not None:
                await prom.stop()
        finally:
            await pipe.kill()


# Every metric of ingestor.metrics with one labelled child, in a process of its own (the
# multiprocess mode is chosen at import), rendered by the /metrics handler's function.
_EVERY_METRIC = """
import sys
from pathlib import Path
from prometheus_client import Counter, Gauge, Histogram
from ingestor import metrics
from ingestor.health import exposition
for obj in vars(metrics).values():
    if isinstance(obj, Counter | Gauge | Histogram):
        child = obj.labels(*("x" for _ in obj._labelnames))
        if isinstance(obj, Histogram):
            child.observe(0.1)
        else:
            child.inc()
sys.stdout.buffer.write(exposition(Path(sys.argv[1])))
"""


def test_every_metric_passes_promtool_with_its_own_help(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", _EVERY_METRIC, str(tmp_path)], capture_output=True, env=env,
                          timeout=60, check=True)
    text = done.stdout.decode()
    families = {fam.name for fam in text_string_to_metric_families(text)}
    defined = {obj._name for obj in vars(metrics).values() if isinstance(obj, Counter | Gauge | Histogram)}
    assert families == defined
    assert promtool_lint(text) == (0, "")
    assert help_mismatches(text) == []
    assert "Multiprocess metric" not in text


def test_promtool_reports_what_breaks_the_conventions() -> None:
    # The lint above would pass vacuously if promtool said nothing about anything.
    bad = ("# HELP ingestor_copy_ms COPY time\n# TYPE ingestor_copy_ms gauge\ningestor_copy_ms 1\n"
           "# HELP ingestor_rows Rows\n# TYPE ingestor_rows counter\ningestor_rows 1\n")
    code, said = promtool_lint(bad)
    assert code != 0 and "ingestor_rows" in said and "ingestor_copy_ms" in said, said
