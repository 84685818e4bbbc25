"""The ``ingestor`` command line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import orjson

from ingestor.binance.streams import MARKETS, Market
from ingestor.export.columns import TABLE_NAMES as EXPORT_TABLES
from ingestor.logs import LOG_FORMATS, setup_logging
from ingestor.sim.faults import FaultSpecError, parse_faults
from ingestor.sim.model import ModelParams
from ingestor.timespec import TimeParam

if TYPE_CHECKING:
    from ingestor.config import Settings


def _markets(text: str) -> tuple[Market, ...]:
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in items if x not in MARKETS]
    if bad or not items:
        raise click.BadParameter(f"expected a comma list of {', '.join(MARKETS)}; got {text!r}")
    return items  # type: ignore[return-value]


@click.group()
@click.option("--log-level", default=None,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              help="overrides INGESTOR_LOG_LEVEL  [default: INFO]")
@click.option("--log-format", default=None, type=click.Choice(LOG_FORMATS, case_sensitive=False),
              help="text, or json: one object per line  (overrides INGESTOR_LOG_FORMAT)  [default: text]")
@click.pass_context
def main(ctx: click.Context, log_level: str | None, log_format: str | None) -> None:
    """Binance market-data recorder, exchange simulator and order-flow indicators."""
    ctx.obj = {"log_level": log_level, "log_format": log_format}
    # Until a command has its settings (INGESTOR_LOG_* included): build_settings sets it up again.
    setup_logging(log_level or "INFO", log_format or "text", "supervisor")


def _setting_flags(f: Callable[..., Any], keep: Callable[[str], bool]) -> Callable[..., Any]:
    """One flag per Settings field that ``keep`` names (``--spot-ws-url``); unset flags
    leave the value to the environment, ``.env`` or the default."""
    from dataclasses import fields

    from ingestor.config import Settings, env_name

    for fld in reversed(fields(Settings)):
        if keep(fld.name):
            f = click.option("--" + fld.name.replace("_", "-"), fld.name, default=None, metavar="VALUE",
                             help=f"{fld.metadata['help']}  [env {env_name(fld.name)}]")(f)
    return f


def settings_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Every setting as a flag but the group's --log-level and --log-format."""
    return _setting_flags(f, lambda name: name not in ("log_level", "log_format"))


def build_settings(ctx: click.Context, flags: dict[str, Any]) -> Settings:
    from ingestor.config import ConfigError, load_settings

    obj = ctx.obj or {}
    flags = dict(flags, log_level=obj.get("log_level"), log_format=obj.get("log_format"))
    try:
        settings = load_settings(flags)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    setup_logging(settings.log_level, settings.log_format, "supervisor")
    return settings


@main.command()
@settings_options
@click.pass_context
def run(ctx: click.Context, **flags: Any) -> None:
    """Record market data into PostgreSQL until SIGINT/SIGTERM (then drain and exit 0)."""
    import uvloop

    from ingestor.supervisor import StartupError, run_supervisor

    settings = build_settings(ctx, flags)
    try:
        code = uvloop.run(run_supervisor(settings))
    except StartupError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)


@main.command()
@settings_options
@click.pass_context
def migrate(ctx: click.Context, **flags: Any) -> None:
    """Apply the schema migrations (ingestor/db/sql/) and exit."""
    import asyncio

    from ingestor.supervisor import StartupError, open_database

    settings = build_settings(ctx, flags)

    async def go() -> None:
        dsn, embedded = await open_database(settings)
        if embedded is not None:
            embedded.stop()

    try:
        asyncio.run(go())
    except StartupError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo("schema up to date")


@main.command()
@settings_options
@click.option("--duration", default=None, type=click.FloatRange(1),
              help="seconds to record  [default: 20; 60 with --chaos]")
@click.option("--chaos", is_flag=True, help="inject a seeded mix of every fault (drops, stalls, gaps, bad frames, "
              "429/5xx/slow REST, killed workers, a database outage on the embedded server, rotation) and "
              "report what was lost and duplicated")
@click.option("--seed", default=1, show_default=True, help="the chaos plan's seed")
@click.option("--chaos-every", default=3.0, show_default=True, type=click.FloatRange(0.5),
              help="mean seconds between two faults")
@click.option("--n-symbols", default=3, show_default=True, type=click.IntRange(1, 200),
              help="symbols per market in the simulator")
@click.option("--json", "as_json", is_flag=True, help="one JSON object at the end, no progress lines")
@click.pass_context
def demo(ctx: click.Context, duration: float | None, chaos: bool, seed: int, chaos_every: float, n_symbols: int,
         as_json: bool, **flags: Any) -> None:
    """Run the simulator and the pipeline together, then compare stored rows with what was sent."""
    from dataclasses import replace

    import uvloop

    from ingestor.config import Settings
    from ingestor.demo import print_table, run_demo
    from ingestor.supervisor import StartupError

    settings = build_settings(ctx, flags)
    if (ctx.obj or {}).get("log_level") is None and settings.log_level == Settings.log_level:
        # The progress lines are the demo's output; the workers' INFO chatter would bury them.
        settings = replace(settings, log_level="WARNING")
        logging.getLogger().setLevel(logging.WARNING)

    def progress(line: str) -> None:
        if not as_json:
            click.echo(line, err=True)

    try:
        result = uvloop.run(run_demo(settings, duration or (60.0 if chaos else 20.0), n_symbols, progress,
                                     seed if chaos else None, chaos_every))
    except StartupError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(orjson.dumps(result).decode())
    else:
        print_table(result)


@main.command("config")
@settings_options
@click.option("--json", "as_json", is_flag=True, help="one JSON object instead of a table")
@click.pass_context
def config_cmd(ctx: click.Context, as_json: bool, **flags: Any) -> None:
    """Print the effective settings (flags > INGESTOR_* env > .env > defaults), secrets masked."""
    from ingestor.config import env_name

    settings = build_settings(ctx, flags)
    values = settings.masked()
    if as_json:
        click.echo(orjson.dumps(values).decode())
        return
    width = max(len(env_name(k)) for k in values)
    for key, value in values.items():
        shown = "(embedded)" if key == "dsn" and value is None else value
        click.echo(f"{env_name(key):<{width}}  {shown}")


@main.group()
def features() -> None:
    """The order-flow indicators: replay them from stored data, look at the latest bars."""


def _quiet_settings(ctx: click.Context, flags: dict[str, Any]) -> Settings:
    """Settings for a command whose output is the point: the database's INFO lines would only
    clutter it, unless a log level was asked for."""
    from dataclasses import replace

    from ingestor.config import Settings

    settings = build_settings(ctx, flags)
    if (ctx.obj or {}).get("log_level") is None and settings.log_level == Settings.log_level:
        settings = replace(settings, log_level="WARNING")
        logging.getLogger().setLevel(logging.WARNING)
    return settings


def _with_database(settings: Settings, job: Callable[[str], Awaitable[str]]) -> str:
    """Run ``job(dsn)`` against the configured (or embedded) database; its expected failures
    become one-line errors with exit code 1."""
    import asyncio

    from ingestor.features.query import NoFeatures
    from ingestor.features.replay import ReplayError
    from ingestor.features.report import ReportError
    from ingestor.supervisor import StartupError, open_database

    async def go() -> str:
        dsn, embedded = await open_database(settings)
        try:
            return await job(dsn)
        finally:
            if embedded is not None:
                embedded.stop()

    try:
        return asyncio.run(go())
    except (StartupError, NoFeatures, ReportError, ReplayError, OSError) as exc:
        raise click.ClickException(str(exc)) from None


_BAR_HELP = "bar size in seconds  [default: the size with the most recent bar]"


@features.command("show")
@settings_options
@click.option("--symbol", required=True, help="e.g. BTCUSDT")
@click.option("--market", default="futures", show_default=True, type=click.Choice(MARKETS))
@click.option("--last", default=30, show_default=True, type=click.IntRange(1, 10_000), help="bars to show")
@click.option("--bar", "bar_seconds", default=None, type=click.IntRange(1), help=_BAR_HELP)
@click.option("--json", "as_json", is_flag=True, help="every column of the rows as a JSON list")
@click.pass_context
def features_show(ctx: click.Context, symbol: str, market: str, last: int, bar_seconds: int | None,
                  as_json: bool, **flags: Any) -> None:
    """Print the latest bars of one symbol, oldest first: price, flow, indicators, walls, signal."""
    from ingestor.features.show import show

    settings = _quiet_settings(ctx, flags)
    click.echo(_with_database(settings, lambda dsn: show(dsn, market, symbol.upper(), last, bar_seconds, as_json)))


@main.command()
@settings_options
@click.option("--since", "since", default="-24h", show_default=True, type=TimeParam(),
              help="gaps detected from: 2026-11-27T10:00 (UTC), Unix s or ms, -2h")
@click.option("--open", "only_open", is_flag=True, help="only gaps not closed yet")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(1), help="newest gaps shown")
@click.option("--json", "as_json", is_flag=True, help="the rows as a JSON list")
@click.pass_context
def gaps(ctx: click.Context, since: int, only_open: bool, limit: int, as_json: bool, **flags: Any) -> None:
    """List the holes in the recorded streams and how each was closed (backfilled, resynced,
    unrecoverable, or still open). --markets and --symbols narrow it."""
    from ingestor.gaps import list_gaps, render

    settings = _quiet_settings(ctx, flags)

    async def job(dsn: str) -> str:
        recs = await list_gaps(dsn, since, settings.market_list, settings.symbols, only_open, limit)
        return render(recs, as_json, since)

    click.echo(_with_database(settings, job))


@main.command()
@click.option("--url", default=None, help="the ingestor's /health URL or base URL  [default: http://HTTP_HOST:"
              "HTTP_PORT/health from INGESTOR_HTTP_HOST and INGESTOR_HTTP_PORT, .env, or 127.0.0.1:9108]")
@click.option("--json", "as_json", is_flag=True, help="print the /health JSON as it came")
@click.option("--watch", type=click.FloatRange(0.2), is_flag=False, flag_value=2.0, default=None,
              metavar="[SECONDS]", help="refresh in place every SECONDS (2 when not given) until Ctrl-C")
@click.pass_context
def status(ctx: click.Context, url: str | None, as_json: bool, watch: float | None) -> None:
    """Show a running ingestor's workers, connections, lag, gaps and database, from its /health.

    Exit code: 0 healthy, 1 unhealthy (the problems are listed), 2 nothing answering at the URL."""
    import time

    from ingestor import status as st

    try:
        url = st.normalise_url(url) if url is not None else st.health_url(build_settings(ctx, {}))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--url") from None
    if watch is None:
        code, text = st.status_once(url, as_json)
        click.echo(f"ingestor status: {text}" if code == st.UNREACHABLE else text, err=code == st.UNREACHABLE)
        sys.exit(code)
    code = st.UNREACHABLE
    try:
        while True:
            code, text = st.status_once(url, as_json)
            if not as_json:  # one JSON document per line; the table replaces the last one
                click.clear()
                click.echo(f"{time.strftime('%H:%M:%S')}  every {watch:g} s, Ctrl-C stops")
            click.echo(text)
            time.sleep(watch)
    except KeyboardInterrupt:
        sys.exit(code)


@features.command("replay")
@settings_options
@click.option("--from", "start", required=True, type=TimeParam(),
              help="start: 2026-11-27T10:00 (UTC), Unix s or ms, -2h, now-1d (rounded up to a whole bar)")
@click.option("--to", "end", default="now", show_default=True, type=TimeParam(),
              help="end, excluded (rounded down to a whole bar)")
@click.option("--bar", "bar_seconds", default=None, type=click.IntRange(1),
              help="bar size in seconds: 1, 5, 15, 60 or 300  [default: the configured bar_seconds]")
@click.option("--out", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="write a .parquet or .csv file instead of replacing the rows in the features table")
@click.option("--warmup-bars", default=0, show_default=True, type=click.IntRange(0, 100_000),
              help="bars computed before --from but not written, so the rolling windows start full")
@click.pass_context
def features_replay(ctx: click.Context, start: int, end: int, bar_seconds: int | None, out: Path | None,
                    warmup_bars: int, **flags: Any) -> None:
    """Recompute the features from stored trades, book snapshots and diffs, and liquidations,
    with the live worker's code: the same input gives the same rows.

    --symbols and --markets choose what to replay (default: every symbol with stored
    exchange info, both markets)."""
    from dataclasses import replace

    from ingestor.features.replay import ReplayRange
    from ingestor.features.replay_job import run_replay

    if start >= end:
        raise click.BadParameter("must be before --to", param_hint="--from")
    settings = _quiet_settings(ctx, flags)
    fs = settings.feature_settings()
    if bar_seconds is not None:
        try:
            fs = replace(fs, bar_seconds=bar_seconds)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--bar") from None
    rng = ReplayRange(start, end, settings.market_list, settings.symbols, warmup_bars * fs.bar_seconds * 1000)
    click.echo(_with_database(settings, lambda dsn: run_replay(
        dsn, fs, rng, out, settings.snapshot_limit, lambda line: click.echo(line, err=True))))


@main.command()
@settings_options
@click.option("--symbol", required=True, help="e.g. BTCUSDT")
@click.option("--from", "start", required=True, type=TimeParam(),
              help="first bar: 2026-11-27T10:00 (UTC), Unix s or ms, -2h, now-1d")
@click.option("--to", "end", default="now", show_default=True, type=TimeParam(), help="end of the range (excluded)")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="image file to write (.png; .svg and .pdf work too)")
@click.option("--market", default="futures", show_default=True, type=click.Choice(MARKETS))
@click.option("--bar", "bar_seconds", default=None, type=click.IntRange(1), help=_BAR_HELP)
@click.option("--max-bars", default=20_000, show_default=True, type=click.IntRange(1),
              help="refuse ranges holding more bars than this")
@click.pass_context
def report(ctx: click.Context, symbol: str, start: int, end: int, out: Path, market: str, bar_seconds: int | None,
           max_bars: int, **flags: Any) -> None:
    """Chart one symbol's features over a time range: price with walls and signals, CVD, panic
    index, absorption, order book imbalance, liquidations."""
    from ingestor.features.report import report as draw

    if start >= end:
        raise click.BadParameter("must be before --to", param_hint="--from")
    settings = _quiet_settings(ctx, flags)
    click.echo(_with_database(settings, lambda dsn: draw(dsn, market, symbol.upper(), start, end, bar_seconds, out,
                                                         max_bars)))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=0, show_default=True,
              help="0: free ports; P: spot ws P, futures ws P+1, spot rest P+2, futures rest P+3, admin P+4")
@click.option("--markets", default="spot,futures", show_default=True)
@click.option("--symbols", default=None, help="comma list, e.g. BTCUSDT,ETHUSDT")
@click.option("--n-symbols", default=5, show_default=True, type=click.IntRange(1, 2000))
@click.option("--rate", default=200.0, show_default=True, type=click.FloatRange(0),
              help="calm-regime taker orders per second per market (about one aggTrade each)")
@click.option("--seed", default=1, show_default=True)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="processes sharing the WebSocket ports (SO_REUSEPORT)")
@click.option("--faults", default="", help="schedule, e.g. drop@5s/30s:market=futures,gap@10s")
@click.option("--replay", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="recorded messages to play instead of the synthetic market (repeatable)")
@click.option("--speed", default=1.0, show_default=True, type=click.FloatRange(0),
              help="replay pace multiplier; 0 = as fast as possible")
@click.option("--panic-every", default=120.0, show_default=True, type=click.FloatRange(0.1),
              help="mean seconds between panic regimes (x4 activity, directional)")
@click.option("--cascade-every", default=60.0, show_default=True, type=click.FloatRange(0.1),
              help="mean seconds between liquidation cascades per symbol (futures)")
@click.option("--max-lifetime", default=86400.0, show_default=True, type=click.FloatRange(0.1),
              help="seconds before the server closes a connection (Binance: 24 h)")
@click.option("--tape-seconds", default=0.0, show_default=True, type=click.FloatRange(0),
              help="record this many model seconds ahead (at --rate) and play the recording instead of "
                   "stepping the model live: rates one core could not generate (0: live model)")
@click.option("--tape-rate", default=0.0, show_default=True, type=click.FloatRange(0),
              help="with --tape-seconds: play at this many msgs/s over all markets (0: as recorded)")
@click.option("--tape-cache", default=None, type=click.Path(file_okay=False),
              help="with --tape-seconds: directory where recordings are kept and reused")
@click.option("--tape-record-only", is_flag=True,
              help="with --tape-seconds and --tape-cache: record the tape into the cache, print its size, exit")
def simulate(host: str, port: int, markets: str, symbols: str | None, n_symbols: int, rate: float,
             seed: int, workers: int, faults: str, replay: tuple[str, ...], speed: float,
             panic_every: float, cascade_every: float, max_lifetime: float, tape_seconds: float,
             tape_rate: float, tape_cache: str | None, tape_record_only: bool) -> None:
    """Serve Binance's WebSocket and REST protocols on loopback.

    Prints one JSON line with the base URLs when ready; runs until SIGINT/SIGTERM.
    """
    if tape_seconds and (replay or workers > 1):
        raise click.UsageError("--tape-seconds plays the model's own recording: not with --replay or --workers")
    if tape_rate and not tape_seconds:
        raise click.UsageError("--tape-rate needs --tape-seconds")
    if tape_record_only and not (tape_seconds and tape_cache):
        raise click.UsageError("--tape-record-only needs --tape-seconds and --tape-cache")
    from dataclasses import replace

    from ingestor.binance.streams import DEFAULT_LIMITS
    from ingestor.sim.server import SimConfig

    try:
        fault_list = parse_faults(faults)
    except FaultSpecError as exc:
        raise click.BadParameter(str(exc), param_hint="--faults") from None
    sym = tuple(s.strip().upper() for s in symbols.split(",") if s.strip()) if symbols else None
    limits = {m: replace(lim, max_lifetime_s=max_lifetime) for m, lim in DEFAULT_LIMITS.items()}
    params = ModelParams(rate=rate, panic_every_s=panic_every, cascade_every_s=cascade_every)
    config = SimConfig(host=host, port=port, markets=_markets(markets), symbols=sym,
                       n_symbols=n_symbols, seed=seed, model=params, limits=limits,
                       faults=fault_list, replay=replay, speed=speed, reuse_port=workers > 1,
                       tape_seconds=tape_seconds, tape_rate=tape_rate, tape_cache=tape_cache)
    if tape_record_only:
        from ingestor.sim.server import record_tapes

        tapes = record_tapes(config)
        _print_json_line({m: {"messages": t.messages, "rate": round(t.rate, 1), "bytes": len(t.blob)}
                          for m, t in tapes.items()})
        return
    import uvloop

    from ingestor.sim.run import run_simulator

    try:
        uvloop.run(run_simulator(config, workers, _print_json_line))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


def _print_json_line(obj: object) -> None:
    sys.stdout.write(orjson.dumps(obj).decode() + "\n")
    sys.stdout.flush()


def _database_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Only the settings that find the database. An export's --symbols and --batch-rows are
    its own: the recording's (INGESTOR_SYMBOLS in a .env) must not narrow an export unasked."""
    return _setting_flags(f, ("dsn", "data_dir", "payload_type").__contains__)


def _export_symbols(text: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(s.strip().upper() for s in text.split(",") if s.strip()))
    bad = [s for s in items if not (s.isascii() and s.isalnum())]
    if bad:
        raise click.BadParameter(f"not a symbol: {bad[0]!r}", param_hint="--symbols")
    return items


@main.command("export")
@_database_options
@click.option("--table", required=True, type=click.Choice(EXPORT_TABLES), help="the table to export")
@click.option("--from", "start", required=True, type=TimeParam(),
              help="first row's time, included: 2026-11-27T10:00 (UTC), Unix s or ms, -2h, now-1d")
@click.option("--to", "end", default="now", show_default=True, type=TimeParam(), help="end of the range, excluded")
@click.option("--symbols", default="", help="comma list, e.g. BTCUSDT,ETHUSDT  [default: every symbol]")
@click.option("--market", default=None, type=click.Choice(MARKETS), help="one market  [default: both]")
@click.option("--format", "fmt", default=None, type=click.Choice(["parquet", "csv"]),
              help="file format  [default: from --out's extension, .parquet/.pq or .csv]")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="the file to write (replaced if it exists)")
@click.option("--flatten/--no-flatten", default=True, show_default=True,
              help="payload fields as typed columns (price, quantity, bid_prices, ...) or the payload as JSON text")
@click.option("--batch-rows", default=None, type=click.IntRange(1),
              help="rows fetched and written at a time (one Parquet row group); bounds memory  "
                   "[default: 100000; depth_updates 10000, depth_snapshots 200, features 50000]")
@click.pass_context
def export(ctx: click.Context, table: str, start: int, end: int, symbols: str, market: str | None, fmt: str | None,
           out: Path, flatten: bool, batch_rows: int | None, **flags: Any) -> None:
    """Write one table's rows of a time range to a Parquet or CSV file, streamed from the database
    in batches (never the whole range in memory), in time order. Progress on stderr."""
    from ingestor.export.job import ExportError, ExportRequest, check_output, run_export
    from ingestor.export.progress import Progress
    from ingestor.export.sinks import SUFFIXES

    if start >= end:
        raise click.BadParameter("must be before --to", param_hint="--from")
    try:
        check_output(out)
    except ExportError as exc:
        raise click.BadParameter(str(exc), param_hint="--out") from None
    fmt = fmt or SUFFIXES.get(out.suffix.lower())
    if fmt is None:
        raise click.BadParameter(f"{out.name}: give --format, or a name ending in .parquet or .csv",
                                 param_hint="--out")
    req = ExportRequest(table, start, end, (market,) if market else MARKETS, _export_symbols(symbols), fmt, out,
                        flatten, batch_rows)
    settings = _quiet_settings(ctx, flags)
    progress = Progress(sys.stderr, sys.stderr.isatty(), f"export {table}")

    async def job(dsn: str) -> str:
        return (await run_export(dsn, req, progress)).summary()

    try:
        click.echo(_with_database(settings, job))
    except ExportError as exc:
        raise click.ClickException(str(exc)) from None


if __name__ == "__main__":
    main()
