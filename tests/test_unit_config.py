"""Unit tests of ``ingestor.config``: sources and their priority, conversions, validation, masking."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from ingestor.config import ConfigError, Settings, load_settings, mask_dsn


def load(tmp_path: Path, flags: dict[str, Any] | None = None, env: dict[str, str] | None = None,
         dotenv: str | None = None) -> Settings:
    env_file = tmp_path / ".env"
    if dotenv is not None:
        env_file.write_text(dotenv)
    return load_settings(flags or {}, env or {}, env_file)


def config_error(tmp_path: Path, **kw: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, **kw)
    return str(info.value)


# -- sources and priority -------------------------------------------------------------

def test_defaults_when_nothing_is_given(tmp_path: Path) -> None:
    s = load(tmp_path)
    assert s.dsn is None
    assert s.markets == ("spot", "futures")
    assert s.market_list == ("spot", "futures")
    assert s.symbols == ()
    assert s.top == 0
    assert s.shards == 1
    assert s.spot_ws_url == "wss://stream.binance.com:9443"
    assert s.futures_ws_url == "wss://fstream.binance.com"
    assert s.spot_depth_speed == "100ms"
    assert s.futures_depth_speed == "500ms"
    assert s.batch_rows == 5000
    assert s.rest_weight_share == 0.5
    assert s.log_level == "INFO"


def test_env_file_overrides_defaults(tmp_path: Path) -> None:
    s = load(tmp_path, dotenv="INGESTOR_SHARDS=3\nINGESTOR_BATCH_ROWS=10\n")
    assert (s.shards, s.batch_rows) == (3, 10)


def test_environ_overrides_env_file(tmp_path: Path) -> None:
    s = load(tmp_path, dotenv="INGESTOR_SHARDS=3\nINGESTOR_BATCH_ROWS=10\n", env={"INGESTOR_SHARDS": "5"})
    assert s.shards == 5
    assert s.batch_rows == 10  # still from the file


def test_flags_override_environ(tmp_path: Path) -> None:
    s = load(tmp_path, dotenv="INGESTOR_SHARDS=3\n", env={"INGESTOR_SHARDS": "5"}, flags={"shards": "7"})
    assert s.shards == 7


def test_a_flag_of_none_does_not_count(tmp_path: Path) -> None:
    s = load(tmp_path, dotenv="INGESTOR_SHARDS=3\n", env={"INGESTOR_TOP": "4"},
             flags={"shards": None, "top": None, "batch_rows": None})
    assert (s.shards, s.top, s.batch_rows) == (3, 4, 5000)


def test_missing_env_file_is_fine(tmp_path: Path) -> None:
    s = load_settings({}, {"INGESTOR_SHARDS": "2"}, tmp_path / "does-not-exist.env")
    assert s.shards == 2
    assert load_settings({}, {}, None).shards == 1


def test_other_variables_are_ignored(tmp_path: Path) -> None:
    s = load(tmp_path, env={"PATH": "/bin", "SHARDS": "9", "ingestor_shards": "9"}, dotenv="OTHER=1\n")
    assert s.shards == 1


@pytest.mark.parametrize("where", ["env", "dotenv"])
def test_unknown_ingestor_variable_is_an_error_naming_it(tmp_path: Path, where: str) -> None:
    kw: dict[str, Any] = (
        {"env": {"INGESTOR_SHARSD": "2"}} if where == "env" else {"dotenv": "INGESTOR_SHARSD=2\n"}
    )
    msg = config_error(tmp_path, **kw)
    assert "INGESTOR_SHARSD" in msg
    assert "INGESTOR_SHARDS" in msg  # the known names are listed


# -- conversions ----------------------------------------------------------------------

def test_conversions_from_strings(tmp_path: Path) -> None:
    s = load(tmp_path, env={
        "INGESTOR_SHARDS": "4",
        "INGESTOR_REST_WEIGHT_SHARE": "0.25",
        "INGESTOR_SNAPSHOT_INTERVAL_S": "12.5",
        "INGESTOR_MARKETS": " futures , ",
        "INGESTOR_SYMBOLS": "BTCUSDT, ETHUSDT,,",
        "INGESTOR_DATA_DIR": str(tmp_path / "data"),
        "INGESTOR_DSN": "postgresql://u@localhost/db",
    })
    assert s.shards == 4 and isinstance(s.shards, int)
    assert s.rest_weight_share == 0.25 and isinstance(s.rest_weight_share, float)
    assert s.snapshot_interval_s == 12.5
    assert s.markets == ("futures",)
    assert s.market_list == ("futures",)
    assert s.symbols == ("BTCUSDT", "ETHUSDT")
    assert s.data_dir == tmp_path / "data" and isinstance(s.data_dir, Path)
    assert s.dsn == "postgresql://u@localhost/db"


def test_path_expands_user(tmp_path: Path) -> None:
    s = load(tmp_path, env={"INGESTOR_DATA_DIR": "~/x"})
    assert s.data_dir == Path.home() / "x"


def test_flags_may_be_typed_values(tmp_path: Path) -> None:
    s = load(tmp_path, flags={"shards": 2, "markets": ["spot"], "symbols": ("ETHUSDT",), "data_dir": tmp_path})
    assert (s.shards, s.markets, s.symbols, s.data_dir) == (2, ("spot",), ("ETHUSDT",), tmp_path)


def test_empty_dsn_means_embedded(tmp_path: Path) -> None:
    assert load(tmp_path, env={"INGESTOR_DSN": ""}).dsn is None


@pytest.mark.parametrize(("name", "raw"), [("shards", "two"), ("shards", "1.5"), ("rest_weight_share", "half")])
def test_bad_number_names_the_setting(tmp_path: Path, name: str, raw: str) -> None:
    msg = config_error(tmp_path, env={"INGESTOR_" + name.upper(): raw})
    assert name in msg and repr(raw) in msg


def test_symbols_come_out_upper_case_without_repeats(tmp_path: Path) -> None:
    assert load(tmp_path, env={"INGESTOR_SYMBOLS": "btcusdt,EthUsdt"}).symbols == ("BTCUSDT", "ETHUSDT")
    assert load(tmp_path, flags={"symbols": "ethusdt,btcusdt,ETHUSDT"}).symbols == ("ETHUSDT", "BTCUSDT")


# -- validation -----------------------------------------------------------------------

@pytest.mark.parametrize("shards", ["0", "-1"])
def test_shards_at_least_one(tmp_path: Path, shards: str) -> None:
    assert f"shards must be at least 1 (got {shards})" in config_error(tmp_path, flags={"shards": shards})


@pytest.mark.parametrize(("markets", "shown"), [("spot,options", "spot,options"), ("", "nothing"), (",", "nothing")])
def test_bad_markets(tmp_path: Path, markets: str, shown: str) -> None:
    msg = config_error(tmp_path, env={"INGESTOR_MARKETS": markets})
    assert "markets must be some of spot,futures" in msg and f"(got {shown})" in msg


def test_symbols_and_top_together(tmp_path: Path) -> None:
    msg = config_error(tmp_path, flags={"symbols": "BTCUSDT", "top": "5"})
    assert "either symbols or top" in msg


def test_negative_top(tmp_path: Path) -> None:
    assert "top must be positive (got -3)" in config_error(tmp_path, flags={"top": "-3"})


@pytest.mark.parametrize("sym", ["BTC-USDT", "BTC/USDT", "BTCÜSDT"])
def test_not_a_symbol(tmp_path: Path, sym: str) -> None:
    assert "not a symbol" in config_error(tmp_path, flags={"symbols": sym})


@pytest.mark.parametrize(("name", "url", "why"), [
    ("spot_ws_url", "https://stream.binance.com:9443", "is not a ws/wss:// URL"),
    ("futures_ws_url", "fstream.binance.com", "is not a ws/wss:// URL"),
    ("futures_ws_url", "wss://", "is not a ws/wss:// URL"),
    ("spot_ws_url", "wss://[::1", "is not a ws/wss:// URL"),
    ("spot_rest_url", "wss://api.binance.com", "is not a http/https:// URL"),
    ("futures_rest_url", "ftp://fapi.binance.com", "is not a http/https:// URL"),
    ("spot_ws_url", "wss://stream.binance.com:port", "has a bad port"),
    ("futures_ws_url", "wss://fstream.binance.com:70000", "has a bad port"),
    ("spot_rest_url", "https://api.binance.com:-1", "has a bad port"),
])
def test_bad_urls(tmp_path: Path, name: str, url: str, why: str) -> None:
    msg = config_error(tmp_path, flags={name: url})
    assert msg == f"{name}: {url!r} {why}"


def test_good_urls(tmp_path: Path) -> None:
    s = load(tmp_path, flags={"spot_ws_url": "ws://127.0.0.1:8765", "futures_ws_url": "wss://[::1]:9443",
                              "spot_rest_url": "http://localhost:8080", "futures_rest_url": "https://x.test"})
    assert s.ws_url("spot") == "ws://127.0.0.1:8765"
    assert s.ws_url("futures") == "wss://[::1]:9443"
    assert s.rest_url("spot") == "http://localhost:8080"
    assert s.rest_url("futures") == "https://x.test"


@pytest.mark.parametrize(("name", "speed", "ok"), [
    ("spot_depth_speed", "100ms", True),
    ("spot_depth_speed", "1000ms", True),
    ("spot_depth_speed", "250ms", False),
    ("spot_depth_speed", "500ms", False),
    ("futures_depth_speed", "100ms", True),
    ("futures_depth_speed", "250ms", True),
    ("futures_depth_speed", "500ms", True),
    ("futures_depth_speed", "1000ms", False),
    ("futures_depth_speed", "500", False),
])
def test_depth_speeds(tmp_path: Path, name: str, speed: str, ok: bool) -> None:
    if ok:
        assert getattr(load(tmp_path, flags={name: speed}), name) == speed
    else:
        msg = config_error(tmp_path, flags={name: speed})
        assert msg.startswith(f"{name}: {speed!r} is not a documented speed")
        allowed = "1000ms, 100ms" if name.startswith("spot") else "100ms, 250ms, 500ms"
        assert msg.endswith(f"({allowed})")


@pytest.mark.parametrize(("spot", "futures", "spot_suffix", "futures_suffix"), [
    ("1000ms", "250ms", "@depth", "@depth"),
    ("100ms", "500ms", "@depth@100ms", "@depth@500ms"),
    ("100ms", "100ms", "@depth@100ms", "@depth@100ms"),
])
def test_depth_stream_suffix(tmp_path: Path, spot: str, futures: str, spot_suffix: str, futures_suffix: str) -> None:
    s = load(tmp_path, flags={"spot_depth_speed": spot, "futures_depth_speed": futures})
    assert s.depth_stream_suffix("spot") == spot_suffix
    assert s.depth_stream_suffix("futures") == futures_suffix


@pytest.mark.parametrize("dsn", ["mysql://u:hunter2@h/db", "sqlite:///x.db", "host=h password=hunter2 dbname=d"])
def test_dsn_must_be_postgres_and_the_error_hides_the_password(tmp_path: Path, dsn: str) -> None:
    msg = config_error(tmp_path, env={"INGESTOR_DSN": dsn})
    assert msg.startswith("dsn must be a postgresql:// URL")
    assert "hunter2" not in msg


@pytest.mark.parametrize("dsn", ["postgres://u:p@h/db", "postgresql://h:5433/db", "postgresql:///db?host=/run/pg"])
def test_postgres_dsns_are_accepted(tmp_path: Path, dsn: str) -> None:
    assert load(tmp_path, env={"INGESTOR_DSN": dsn}).dsn == dsn


@pytest.mark.parametrize("name", ["batch_rows", "batch_age_ms", "writer_connections", "snapshot_limit",
                                  "max_frame_bytes"])
def test_sizes_at_least_one(tmp_path: Path, name: str) -> None:
    assert config_error(tmp_path, flags={name: "0"}) == f"{name} must be at least 1 (got 0)"
    assert load(tmp_path, flags={name: "1"}) is not None


@pytest.mark.parametrize("level", ["debug", "INFO", "Warning", "ERROR"])
def test_log_levels(tmp_path: Path, level: str) -> None:
    assert load(tmp_path, flags={"log_level": level}).log_level == level


@pytest.mark.parametrize("level", ["TRACE", "CRITICAL", "", "verbose"])
def test_bad_log_level(tmp_path: Path, level: str) -> None:
    msg = config_error(tmp_path, env={"INGESTOR_LOG_LEVEL": level})
    assert msg == f"log_level: {level!r} is not one of DEBUG, INFO, WARNING, ERROR"


@pytest.mark.parametrize("share", ["0", "-0.1", "0.91", "1", "nan"])
def test_rest_weight_share_out_of_range(tmp_path: Path, share: str) -> None:
    assert "rest_weight_share must be in (0, 0.9]" in config_error(tmp_path, flags={"rest_weight_share": share})


@pytest.mark.parametrize("share", ["0.01", "0.9"])
def test_rest_weight_share_in_range(tmp_path: Path, share: str) -> None:
    assert load(tmp_path, flags={"rest_weight_share": share}).rest_weight_share == float(share)


@pytest.mark.parametrize(("name", "value"), [
    ("snapshot_interval_s", "-1"), ("open_interest_interval_s", "-0.5"),
    ("snapshot_interval_s", "nan"), ("open_interest_interval_s", "inf"),
])
def test_rest_intervals(tmp_path: Path, name: str, value: str) -> None:
    assert name in config_error(tmp_path, flags={name: value})
    assert getattr(load(tmp_path, flags={name: "0"}), name) == 0.0  # 0 disables


@pytest.mark.parametrize("name", ["compress_after_days", "retention_days"])
def test_negative_days_are_refused(tmp_path: Path, name: str) -> None:
    assert config_error(tmp_path, flags={name: "-1"}) == f"{name} must be >= 0 (got -1)"
    assert getattr(load(tmp_path, flags={name: "7"}), name) == 7


@pytest.mark.parametrize(("port", "ok"), [("0", True), ("65535", True), ("-1", False), ("65536", False)])
def test_http_port(tmp_path: Path, port: str, ok: bool) -> None:
    if ok:
        assert load(tmp_path, flags={"http_port": port}).http_port == int(port)
    else:
        assert "http_port must be 0-65535" in config_error(tmp_path, flags={"http_port": port})


# -- masking --------------------------------------------------------------------------

@pytest.mark.parametrize(("dsn", "masked"), [
    ("postgresql://user:s3cret@db.example:5432/market", "postgresql://user:***@db.example:5432/market"),
    ("postgresql://user:p%40ss%3Aw%2Fd@h/db", "postgresql://user:***@h/db"),  # percent-encoded
    ("postgresql://user:p@ss:w@h/db", "postgresql://user:***@h/db"),  # raw @ and :
    ("postgresql://user:pa?ss@h/db", "postgresql://user:***@h/db"),
    ("postgresql://user:pa#ss@h/db", "postgresql://user:***@h/db"),
    ("postgresql://user:pa/ss@h/db", "postgresql://user:***@h/db"),
    ("postgresql://user:pa[ss@h/db", "postgresql://user:***@h/db"),
    ("postgresql://user:@h/db", "postgresql://user:***@h/db"),
    ("postgresql://user:pw@[::1]:5432/db", "postgresql://user:***@[::1]:5432/db"),
    ("postgresql://h/db?sslmode=require&password=s3cret", "postgresql://h/db?sslmode=require&password=***"),
    ("host=h password=s3cret dbname=d", "host=h password=*** dbname=d"),
    ("host=h password = 'two words' dbname=d", "host=h password = *** dbname=d"),
    # Nothing to hide: unchanged.
    ("postgresql://user@h:5432/db", "postgresql://user@h:5432/db"),
    ("postgresql:///db?host=/run/postgresql", "postgresql:///db?host=/run/postgresql"),
    ("host=h dbname=d", "host=h dbname=d"),
])
def test_mask_dsn(dsn: str, masked: str) -> None:
    assert mask_dsn(dsn) == masked


@pytest.mark.parametrize("password", ["s3cret", "p@ss:w/rd?#", "pa[ss", "%40%3A", "with space"])
def test_masked_never_shows_the_password(tmp_path: Path, password: str) -> None:
    s = load(tmp_path, env={"INGESTOR_DSN": f"postgresql://ingest:{password}@db.example:5432/market"},
             flags={"symbols": "btcusdt,ethusdt", "data_dir": str(tmp_path)})
    out = s.masked()
    assert password not in repr(out)
    assert out["dsn"] == "postgresql://ingest:***@db.example:5432/market"
    assert out["symbols"] == "BTCUSDT,ETHUSDT"
    assert out["markets"] == "spot,futures"
    assert out["data_dir"] == str(tmp_path)
    assert out["shards"] == 1
    assert set(out) == {f.name for f in fields(Settings)}


def test_masked_without_dsn(tmp_path: Path) -> None:
    assert load(tmp_path).masked()["dsn"] is None


# -- the feature worker's settings ------------------------------------------------------

def test_feature_params_override_the_documented_defaults(tmp_path: Path) -> None:
    s = load(tmp_path, env={"INGESTOR_FEATURE_PARAMS": "bar_seconds=15, window=120,wall_factor=4.5"})
    fs = s.feature_settings()
    assert (fs.bar_seconds, fs.window, fs.wall_factor) == (15, 120, 4.5)
    assert fs.obi_levels == 10 and fs.rr == 2.0  # the rest keep FEATURES.md's defaults
    assert load(tmp_path).feature_settings().bar_seconds == 60


@pytest.mark.parametrize(("params", "message"), [
    ("windo=3", "'windo=3' is not NAME=VALUE with NAME one of bar_seconds"),
    ("window", "'window' is not NAME=VALUE"),
    ("window=x", "window must be an integer (got 'x')"),
    ("window=2.5", "window must be an integer (got '2.5')"),
    ("rr=abc", "rr must be a number (got 'abc')"),
    ("rr=nan", "rr must be finite (got 'nan')"),
    ("bar_seconds=7", "bar_seconds must be one of (1, 5, 15, 60, 300), not 7"),
    ("window=0", "window must be >= 1"),
    ("liq_half_life=0", "liq_half_life must be > 0"),
])
def test_bad_feature_params_are_refused_with_the_reason(tmp_path: Path, params: str, message: str) -> None:
    assert message in config_error(tmp_path, flags={"feature_params": params})


def test_features_switch_and_watchlist(tmp_path: Path) -> None:
    for raw, want in (("false", False), ("0", False), ("off", False), ("yes", True), ("TRUE", True)):
        assert load(tmp_path, env={"INGESTOR_FEATURES": raw}).features is want
    assert "features: 'maybe' is not a valid bool" in config_error(tmp_path, env={"INGESTOR_FEATURES": "maybe"})
    s = load(tmp_path, flags={"feature_watchlist": "btcusdt,ETHUSDT,btcusdt"})
    assert s.feature_watchlist == ("BTCUSDT", "ETHUSDT")
    assert "not a symbol" in config_error(tmp_path, flags={"feature_watchlist": "BTC-USDT"})
