"""The one REST client: Binance's weight budget kept from our side.

Binance counts request weight per IP in one-minute windows and reports the running total
in ``X-MBX-USED-WEIGHT-1M``. Going over the limit gets 429 with ``Retry-After``; carrying
on after a 429 gets 418 and a ban. So the client keeps its own count (corrected by the
header after every reply), waits for the next window rather than overrun its share of
the limit, and after a 429 or 418 sends nothing to that market until ``Retry-After`` has
passed.

Every wait (the budget's next window, ``Retry-After`` of up to an hour, a retry's
backoff, the reply itself) ends when ``stopping`` is set: ``get`` then raises
:class:`RestStopped`, and the caller keeps what it has (tests/test_rest_client_sim.py,
tests/test_rest_worker_stop.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import aiohttp

from ingestor.binance.rest_limits import PREFIX, WEIGHT_LIMIT
from ingestor.binance.streams import Market

log = logging.getLogger(__name__)


_T = TypeVar("_T")


class RestError(Exception):
    def __init__(self, status: int, body: bytes, url: str) -> None:
        super().__init__(f"HTTP {status} from {url}: {body[:200]!r}")
        self.status = status
        self.body = body


class RestStopped(Exception):
    """The client was told to stop: the request was not made, or its reply not awaited."""


@dataclass
class WeightBudget:
    """Our share of one market's per-minute weight, in fixed windows like Binance's."""

    limit: int
    window: int = -1
    used: int = 0
    blocked_until: float = 0.0  # wall clock, after 429/418

    def wait_s(self, weight: int, now: float) -> float:
        """Seconds to wait before spending ``weight`` (0: go now)."""
        if now < self.blocked_until:
            return self.blocked_until - now
        self._roll(now)
        if self.used + weight <= self.limit or self.used == 0:
            return 0.0
        return (self.window + 1) * 60 - now + 0.05

    def spend(self, weight: int, now: float) -> None:
        self._roll(now)
        self.used += weight

    def observe(self, used_header: str | None, now: float) -> None:
        """The server's count is the truth (other clients on the IP count too)."""
        if used_header is None:
            return
        try:
            used = int(used_header)
        except ValueError:
            return
        self._roll(now)
        self.used = max(self.used, used)

    def block(self, retry_after_s: float, now: float) -> None:
        self.blocked_until = max(self.blocked_until, now + retry_after_s)

    def _roll(self, now: float) -> None:
        window = int(now // 60)
        if window != self.window:
            self.window, self.used = window, 0


class RestClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_urls: Mapping[Market, str],
        weight_share: float = 0.5,
        clock: Callable[[], float] = time.time,
        stopping: asyncio.Event | None = None,
    ) -> None:
        self.session = session
        self.stopping = stopping
        self.base_urls = dict(base_urls)
        self.budgets = {m: WeightBudget(int(WEIGHT_LIMIT[m] * weight_share)) for m in base_urls}
        self.clock = clock
        self.requests: dict[tuple[Market, str, int], int] = {}  # (market, endpoint, status) -> n
        self.waited_s = 0.0

    async def get(self, market: Market, endpoint: str, params: Mapping[str, str | int] | None = None,
                  weight: int = 1, retries: int = 3) -> bytes:
        """GET ``<base><prefix>/<endpoint>``; returns the body of a 200 reply."""
        url = f"{self.base_urls[market]}{PREFIX[market]}/{endpoint}"
        budget = self.budgets[market]
        attempt = 0
        while True:
            if self.stopping is not None and self.stopping.is_set():
                raise RestStopped(url)
            delay = budget.wait_s(weight, self.clock())
            if delay > 0:
                self.waited_s += delay
                await self._sleep(delay, url)
                continue
            budget.spend(weight, self.clock())
            try:
                status, body, used, retry_after = await self._until_stop(self._fetch(url, params), url)
                budget.observe(used, self.clock())
            except (TimeoutError, aiohttp.ClientError) as exc:
                status, body, retry_after = 0, str(exc).encode(), None
            key = (market, endpoint, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            if status == 200:
                return body
            if status in (429, 418):
                wait = _retry_after_s(retry_after)
                budget.block(wait, self.clock())
                log.warning("%s %s: HTTP %d, backing off %.0f s (Retry-After)", market, endpoint, status, wait)
                continue  # not an attempt: the request is still owed
            attempt += 1
            if status and status < 500 or attempt > retries:
                raise RestError(status, body, url)
            backoff = min(30.0, 0.5 * 2**attempt)
            log.warning("%s %s: %s, retrying in %.1f s", market, endpoint,
                        f"HTTP {status}" if status else body.decode(errors="replace"), backoff)
            await self._sleep(backoff, url)

    async def _fetch(self, url: str, params: Mapping[str, str | int] | None) -> tuple[int, bytes, str | None,
                                                                                      str | None]:
        async with self.session.get(url, params=params) as resp:
            body = await resp.read()
            return resp.status, body, resp.headers.get("X-MBX-USED-WEIGHT-1M"), resp.headers.get("Retry-After")

    async def _sleep(self, seconds: float, url: str) -> None:
        """``seconds``, or until told to stop (then RestStopped)."""
        if self.stopping is None:
            await asyncio.sleep(seconds)
            return
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except TimeoutError:
            return
        raise RestStopped(url)

    async def _until_stop(self, work: Awaitable[_T], url: str) -> _T:
        """``work``'s result, unless told to stop first: then it is cancelled (RestStopped)."""
        if self.stopping is None:
            return await work
        job = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait((job, stop), return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when the caller is cancelled: neither task outlives this call
            for task in (job, stop):
                if not task.done():
                    task.cancel()
        if job.done() and not job.cancelled():
            return job.result()
        try:
            await job
        except asyncio.CancelledError:
            pass
        raise RestStopped(url)


def _retry_after_s(value: str | None) -> float:
    try:
        # Bounded: a nonsense header ("inf", a year) must not silence a market for good.
        return min(max(1.0, float(value)), 3600.0) if value else 60.0
    except ValueError:
        return 60.0
