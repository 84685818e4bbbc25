"""``/health`` (JSON, 200 healthy, 503 not) and ``/metrics`` (every process's series),
served by the supervisor on 127.0.0.1 unless configured otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess


class HealthSource(Protocol):
    """What ``/health`` asks (the supervisor): a Protocol rather than an import, because the
    supervisor imports this module and layers import only downward (tests/test_layers.py)."""

    def health(self) -> tuple[bool, dict[str, Any]]: ...


def exposition(metrics_dir: Path) -> bytes:
    """Every process's series in Prometheus text format, from a fresh registry holding only
    the multiprocess collector (the default one would add this process's own collectors).
    The HELP texts are those written in ``ingestor.metrics``, not "Multiprocess metric":
    prometheus_client keeps them in the mmap files with the values (client_python #804,
    long before the 0.20 setup.cfg asks for; tests/test_prometheus.py holds it to that)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(metrics_dir))
    return generate_latest(registry)


class HealthServer:
    def __init__(self, supervisor: HealthSource, metrics_dir: Path) -> None:
        self.supervisor = supervisor
        self.metrics_dir = metrics_dir
        self.runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> str:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port)
        await site.start()
        bound = self.runner.addresses[0] if self.runner.addresses else (host, port)
        return f"http://{bound[0]}:{bound[1]}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _health(self, request: web.Request) -> web.Response:
        healthy, body = self.supervisor.health()
        return web.Response(body=orjson.dumps(body), status=200 if healthy else 503,
                            content_type="application/json")

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=exposition(self.metrics_dir), headers={"Content-Type": CONTENT_TYPE_LATEST})
