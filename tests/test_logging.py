"""Log lines: the JSON formatter on its own, the setting, a spawned child that learns the
format from its Settings alone, and the pipeline's reconnect, gap and book-resync lines
with their context, one line per event."""

from __future__ import annotations

import logging
import multiprocessing
import os
import subprocess
import sys
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from ingestor.config import ConfigError, Settings, load_settings
from ingestor.logs import JsonFormatter, text_formatter
from ingestor.sim.server import SimConfig, Simulator
from ingestor.wire.child import ChildContext, run_child

from .conftest import post_json
from .pipeline import INGESTOR, Pipeline, sim_flags, wait_until

FIXED = {"ts", "level", "logger", "worker", "msg"}


def record(msg: str, *args: Any, extra: dict[str, Any] | None = None, exc_info: Any = None) -> logging.LogRecord:
    return logging.getLogger("ingestor.test").makeRecord(
        "ingestor.test", logging.WARNING, __file__, 1, msg, args, exc_info, extra=extra)


# -- the formatter ------------------------------------------------------------------------

def test_a_json_line_holds_the_fixed_keys_and_the_context_only() -> None:
    rec = record("%s %s: gap, ids %d..%d missing", "spot", "BTCUSDT", 5, 9,
                 extra={"event": "gap", "market": "spot", "symbol": "BTCUSDT", "from_id": 5, "to_id": 9})
    line = JsonFormatter("socket-0").format(rec)
    assert "\n" not in line
    obj = orjson.loads(line)
    assert set(obj) == FIXED | {"event", "market", "symbol", "from_id", "to_id"}  # no LogRecord internals
    assert obj["msg"] == "spot BTCUSDT: gap, ids 5..9 missing"
    assert (obj["level"], obj["logger"], obj["worker"]) == ("WARNING", "ingestor.test", "socket-0")
    assert (obj["from_id"], obj["to_id"]) == (5, 9)
    ts = datetime.fromisoformat(obj["ts"])
    assert obj["ts"].endswith("Z") and ts.utcoffset() == timedelta(0)
    assert abs(ts.timestamp() - rec.created) < 0.001


def test_context_cannot_pass_for_a_fixed_key_and_odd_values_are_shown() -> None:
    rec = record("x", extra={"level": "DEBUG", "worker": "elsewhere", "path": Path("/a/b"), "err": ValueError("bad")})
    obj = orjson.loads(JsonFormatter("writer").format(rec))
    assert (obj["level"], obj["worker"]) == ("WARNING", "writer")
    assert (obj["path"], obj["err"]) == ("/a/b", "bad")


def test_a_traceback_stays_inside_its_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = record("failed", exc_info=sys.exc_info())
    line = JsonFormatter("rest").format(rec)
    assert "\n" not in line
    exc = orjson.loads(line)["exc"]
    assert exc.startswith("Traceback") and exc.endswith("ValueError: boom")


def test_the_text_format_keeps_the_readable_message_alone() -> None:
    rec = record("%s %s: gap", "spot", "BTCUSDT", extra={"event": "gap", "from_id": 5})
    line = text_formatter("socket-1").format(rec)
    assert line.endswith(" WARNING socket-1 ingestor.test: spot BTCUSDT: gap")
    assert "from_id" not in line and "event" not in line


# -- the setting ----------------------------------------------------------------------------

def test_log_format_setting_from_env_and_flag_validated() -> None:
    assert load_settings(environ={}, env_file=None).log_format == "text"
    assert load_settings(environ={"INGESTOR_LOG_FORMAT": "json"}, env_file=None).log_format == "json"
    assert load_settings({"log_format": "text"}, environ={"INGESTOR_LOG_FORMAT": "json"},
                         env_file=None).log_format == "text"
    with pytest.raises(ConfigError, match="log_format: 'xml' is not one of text, json"):
        load_settings(environ={"INGESTOR_LOG_FORMAT": "xml"}, env_file=None)


def test_the_group_flag_reaches_the_settings() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTOR_")}
    done = subprocess.run([INGESTOR, "--log-format", "json", "config", "--json"], capture_output=True, env=env,
                          timeout=60, check=True)
    assert orjson.loads(done.stdout)["log_format"] == "json"
    bad = subprocess.run([INGESTOR, "config"], capture_output=True, env={**env, "INGESTOR_LOG_FORMAT": "yaml"},
                         timeout=60)
    assert bad.returncode == 2 and b"log_format: 'yaml'" in bad.stderr


async def _probe(ctx: ChildContext) -> None:
    logging.getLogger("ingestor.probe").warning("probe %d", 7, extra={"event": "probe", "n": 7})


def _probe_child(settings: Settings) -> None:
    run_child(settings, "probe-child", None, _probe)


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_a_spawned_child_logs_as_its_settings_say(fmt: str, capfd: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INGESTOR_LOG_FORMAT", raising=False)  # the Settings are the only way in
    child = multiprocessing.get_context("spawn").Process(target=_probe_child, args=(Settings(log_format=fmt),))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    if fmt == "json":
        objs = [orjson.loads(line) for line in lines]  # every line, the child's "stopped" one too
        assert [(o["msg"], o["worker"], o["n"]) for o in objs if o.get("event") == "probe"] == [
            ("probe 7", "probe-child", 7)]
        assert any(o["msg"].startswith("stopped after") for o in objs)
    else:
        assert [line.split(" ", 2)[2] for line in lines if "probe 7" in line] == [
            "WARNING probe-child ingestor.probe: probe 7"]


# -- the pipeline ---------------------------------------------------------------------------

def events(log: list[str], event: str, worker_prefix: str = "") -> list[dict[str, Any]]:
    out = []
    for line in log:
        obj = orjson.loads(line)
        if obj.get("event") == event and obj["worker"].startswith(worker_prefix):
            out.append(obj)
    return out


@pytest.mark.parametrize("sim", [SimConfig(n_symbols=3, seed=5)], indirect=True)
async def test_pipeline_json_lines_for_reconnects_gaps_and_resyncs(sim: Simulator, system_db: str) -> None:
    pipe = await Pipeline(["--dsn", system_db, "--shards", "2", *sim_flags(sim)],
                          env={"INGESTOR_LOG_FORMAT": "json"}).start()
    try:
        await pipe.wait_health(200)
        await post_json(sim.urls["admin"] + "/faults", {"kind": "drop"})  # every connection, both markets
        await pipe.wait_health(200, timeout=15)
        await post_json(sim.urls["admin"] + "/faults", [{"kind": "gap", "count": 2},
                                                         {"kind": "skip_trades", "market": "spot", "count": 3}])

        async def seen() -> bool:
            lines = list(pipe.log)
            return all(events(lines, e) for e in ("reconnect", "gap", "gap_closed", "book_resync"))

        await wait_until(seen, 25, "reconnect, gap, gap closed and book resync lines")

        # One line per event: each socket worker's lines match the counts it reports.
        async def one_line_each() -> bool:
            _, body = await pipe.health()
            lines = list(pipe.log)
            for name in ("socket-0", "socket-1"):
                w = body["workers"][name]
                if (len(events(lines, "reconnect", name)) != w["reconnects"]
                        or len(events(lines, "gap", name)) != w["gaps"]):
                    return False
            return True

        await wait_until(one_line_each, 10, "a log line per reconnect and per gap")
        assert await pipe.stop() == 0
    finally:
        await pipe.kill()

    objs = [orjson.loads(line) for line in pipe.log]  # every line of every process is JSON
    assert all(FIXED <= set(o) for o in objs)
    assert set(Counter(o["worker"] for o in objs)) >= {"supervisor", "writer", "features", "rest", "socket-0",
                                                       "socket-1"}
    reconnects = events(pipe.log, "reconnect")
    assert {r["market"] for r in reconnects} == {"spot", "futures"}
    for r in reconnects:
        assert {"route", "streams", "reason", "reconnects", "delay_s"} <= set(r), r
        assert r["reason"] and "reconnecting" in r["msg"]
    id_gaps = [g for g in events(pipe.log, "gap", "socket-") if g["symbol"] != "*"]
    assert {g["stream"] for g in id_gaps} >= {"depth", "aggTrade"}, id_gaps
    for g in id_gaps:
        assert g["to_id"] >= g["from_id"] and g["missing"] == g["to_id"] - g["from_id"] + 1
        assert g["closed_how"] == ("open" if g["stream"] == "aggTrade" else "unrecoverable")
        assert f"{g['from_id']}..{g['to_id']}" in g["msg"]
    closed = events(pipe.log, "gap_closed", "rest")
    assert any(c["market"] == "spot" and c["closed_how"] == "backfilled" for c in closed), closed
    for c in closed:  # each closes a gap a socket worker reported
        assert any((g["market"], g["symbol"], g["from_id"], g["to_id"]) == (c["market"], c["symbol"], c["from_id"],
                                                                            c["to_id"]) for g in id_gaps), c
    resyncs = events(pipe.log, "book_resync", "features")
    assert any(r["reason"] == "gap" and r["to_id"] >= r["from_id"] for r in resyncs), resyncs
    assert all({"market", "symbol", "last_update_id", "buffered"} <= set(r) for r in resyncs)
