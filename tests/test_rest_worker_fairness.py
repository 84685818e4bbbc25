"""The REST worker's periodic jobs beside the requests, and replies of the wrong shape
(issue 16 item 13, REST half).

- Before, every periodic job (snapshots, open interest, both markets) waited while any
  request was outstanding: one slow backfill on Spot stopped USD-M open interest.
- Before, a depth reply that is a JSON array (not an object) raised out of the periodic
  loop and ended the REST worker; now it is a bad response: counted, logged, asked again.
"""

from __future__ import annotations

from typing import Any

import pytest

from ingestor.sim.server import SimConfig, Simulator

from .conftest import post_json
from .pipeline import Pipeline, sim_flags, wait_until
from .test_pipeline_processes import samples


def served(sim: Simulator, market: str, endpoint: str) -> int:
    return sum(n for path, n in sim.markets[market].rest.served.items() if path.endswith("/" + endpoint))


async def rest_status(pipe: Pipeline) -> dict[str, Any]:
    _, body = await pipe.health()
    return dict(body["workers"]["rest"])


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=2, seed=9)], indirect=True)
async def test_open_interest_goes_on_while_a_backfill_is_outstanding(sim: Simulator, system_db: str) -> None:
    # No periodic snapshots: after the books are built, Spot's only request is the backfill.
    pipe = await Pipeline(["--dsn", system_db, "--batch-age-ms", "100", "--snapshot-interval-s", "0",
                           "--open-interest-interval-s", "1", *sim_flags(sim)]).start()
    try:
        await pipe.wait_health(200, timeout=30)

        async def books_built() -> bool:
            st = await rest_status(pipe)
            return served(sim, "spot", "depth") >= 2 and st.get("requests_open") == 0

        await wait_until(books_built, 30, "the books' snapshots served")
        # The next Spot request (the backfill of the gap below) takes 40 s to answer.
        await post_json(sim.urls["admin"] + "/faults", {"kind": "rest_slow", "market": "spot", "delay": 40_000})
        await post_json(sim.urls["admin"] + "/faults", {"kind": "skip_trades", "market": "spot",
                                                        "symbol": "BTCUSDT", "count": 3})

        async def outstanding() -> bool:
            return not sim.markets["spot"].rest.pending and (await rest_status(pipe)).get("requests_open", 0) >= 1

        await wait_until(outstanding, 30, "the backfill outstanding")
        before = served(sim, "futures", "openInterest")

        async def going_on() -> bool:
            return served(sim, "futures", "openInterest") >= before + 3

        await wait_until(going_on, 30, "open interest polled meanwhile")
        assert (await rest_status(pipe)).get("requests_open", 0) >= 1  # still outstanding: it did not wait
    finally:
        assert await pipe.stop() == 0


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=2, seed=10)], indirect=True)
async def test_a_reply_of_the_wrong_shape_is_a_bad_response_not_the_end_of_the_worker(
        sim: Simulator, system_db: str) -> None:
    # Futures: periodic snapshots only, so the bad replies meet the depth job.
    pipe = await Pipeline(["--dsn", system_db, "--batch-age-ms", "100", "--snapshot-interval-s", "1",
                           "--open-interest-interval-s", "0", *sim_flags(sim)]).start()
    try:
        await pipe.wait_health(200, timeout=30)
        pid = (await rest_status(pipe))["pid"]
        await post_json(sim.urls["admin"] + "/faults", {"kind": "rest_bad_body", "market": "futures", "count": 3})

        async def answered() -> bool:
            return not sim.markets["futures"].rest.pending

        await wait_until(answered, 30, "the three bad replies sent")
        before = served(sim, "futures", "depth")

        async def asked_again() -> bool:
            return served(sim, "futures", "depth") >= before + 2 and (await rest_status(pipe)).get("alive")

        await wait_until(asked_again, 30, "futures snapshots fetched again")
        st = await rest_status(pipe)
        assert (st["pid"], st["restarts"]) == (pid, 0), "the REST worker ended"
        assert st["bad_responses"] == 3
        assert sum(v for _, v in samples(await pipe.metrics(), "ingestor_rest_bad_responses")) == 3
        assert len([ln for ln in pipe.log if "expected a JSON object" in ln]) == 3
    finally:
        assert await pipe.stop() == 0
