"""``ingestor demo --chaos`` as a user runs it, on the embedded default: every kind of fault
in a seeded order (a database outage with the writer killed mid-replay, the writer stalled,
every producer killed mid-batch, an internal server error included), and the summary it
prints."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from ..test_features_show_report import ingestor


@pytest.mark.timeout(330)
async def test_demo_chaos_injects_every_fault_and_loses_nothing_it_promises(tmp_path: Path) -> None:
    rc, out, err = await ingestor("demo", "--chaos", "--seed", "5", "--duration", "75", "--chaos-every", "1.2",
                                  "--json", env={"XDG_DATA_HOME": str(tmp_path)}, timeout=300)
    assert rc == 0, err[-3000:]
    c = orjson.loads(out.strip().splitlines()[-1])["chaos"]
    kinds = {"drop", "stall", "gap", "skip_trades", "malformed", "non_json", "unknown_event", "bogus_id",
             "hold_close", "rest_429",
             "rest_5xx", "rest_slow", "kill_socket", "kill_writer", "kill_features", "kill_rest", "db_outage",
             "stall_writer", "kill_mid_batch", "server_error"}
    assert set(c["faults"]) == kinds, c["faults"]
    assert c["rotations"] >= 2
    t = c["tables"]
    assert t["agg_trades"]["sent"] > 1000 and t["agg_trades"]["lost"] == 0 and t["agg_trades"]["extra"] > 0
    for table, tally in t.items():
        assert tally["duplicated"] == 0 and tally["uncovered"] == 0, (table, t)
    assert c["gaps"].get("backfilled", 0) > 0 and c["gaps"].get("resynced", 0) > 0
    assert "open" not in c["gaps"]  # every gap closed one way or the other
