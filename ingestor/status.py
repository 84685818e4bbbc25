"""``ingestor status``: a running ingestor's ``/health`` as tables a person reads.

``render_status`` is pure (a /health body in, text out); ``fetch_health`` is the one
network call. The body's shape is the supervisor's (``Supervisor.health``: each worker's
latest status dict with alive, pid, restarts and status age added), and any field may be
missing (a worker that has not reported yet has none of its own): what is missing shows
as ``-``, never as an error.
"""

from __future__ import annotations

import http.client
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson

from ingestor.config import Settings

# Exit codes of `ingestor status`.
HEALTHY, UNHEALTHY, UNREACHABLE = 0, 1, 2
FETCH_TIMEOUT_S = 5.0


class Unreachable(Exception):
    """No ingestor answered at the URL; the message names it."""


# -- fetching --------------------------------------------------------------------------

def health_url(settings: Settings) -> str:
    """Where ``ingestor run`` with these settings serves /health, seen from this machine."""
    host = settings.http_host
    if host in ("", "0.0.0.0"):  # every interface: loopback is one of them
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    if settings.http_port == 0:
        raise ValueError("http_port is 0 (any free port): give --url, as `ingestor run` logged it at start")
    return f"http://{host}:{settings.http_port}/health"


def normalise_url(url: str) -> str:
    """A base URL or a /health URL -> the /health URL."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{url!r} is not an http:// URL")
    return url if url.endswith("/health") else url + "/health"


# Straight to the address: an http_proxy meant for the internet has no business with a
# local process's health endpoint (aiohttp, which the tests use, ignores it too).
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def fetch_health(url: str, timeout: float = FETCH_TIMEOUT_S) -> tuple[int, dict[str, Any], bytes]:
    """(HTTP status, parsed body, raw body) of ``url``; Unreachable when nothing answers or
    what answers is not an ingestor's /health (a 503 is an answer: the body says why)."""
    try:
        with _OPENER.open(url, timeout=timeout) as reply:
            code, raw = reply.status, reply.read()
    except urllib.error.HTTPError as exc:  # 503 and the like: still a body to read
        code, raw = exc.code, exc.read()
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise Unreachable(f"cannot reach {url}: {reason}") from None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict) or "workers" not in body:
        raise Unreachable(f"{url} answered HTTP {code} without an ingestor's health JSON")
    return code, body, raw


def exit_code(http_status: int, body: Mapping[str, Any]) -> int:
    ok = http_status == 200 and body.get("status") == "ok" and not body.get("problems")
    return HEALTHY if ok else UNHEALTHY


# -- rendering --------------------------------------------------------------------------

def render_status(health: Mapping[str, Any], url: str = "") -> str:
    """The whole screen: verdict and problems, workers, connections, lag and queues, gaps,
    database."""
    workers: dict[str, Mapping[str, Any]] = dict(health.get("workers") or {})
    by_kind: dict[str, list[tuple[str, Mapping[str, Any]]]] = {}
    for name, w in workers.items():
        by_kind.setdefault(str(w.get("kind") or _kind_from_name(name)), []).append((name, w))
    parts = [_verdict(health, url), _workers(workers), _connections(by_kind.get("socket", [])),
             _lag(by_kind, health.get("database") or {}), _books(by_kind.get("features", [])), _gaps(by_kind),
             _database(health.get("database") or {})]
    return "\n\n".join(p for p in parts if p)


def _kind_from_name(name: str) -> str:
    # A worker that has not reported has no "kind" yet; the supervisor's names say it.
    return "socket" if name.startswith("socket-") else name


def _verdict(health: Mapping[str, Any], url: str) -> str:
    state = "STOPPING" if health.get("stopping") else ("OK" if health.get("status") == "ok" else "UNHEALTHY")
    head = f"ingestor {state}" + (f" at {url}" if url else "") + f"  (up {_duration(health.get('uptime_s'))})"
    problems = list(health.get("problems") or [])
    if not problems:
        return head + "\nproblems: none"
    return head + "\nproblems:\n" + "\n".join(f"  - {p}" for p in problems)


def _workers(workers: Mapping[str, Mapping[str, Any]]) -> str:
    rows = [[name, _kind(name, w), _yes(w.get("alive")), _n(w.get("pid")), _n(w.get("restarts")), _state(name, w),
             _age(w.get("status_age_s"))] for name, w in workers.items()]
    return _table(["worker", "kind", "alive", "pid", "restarts", "state", "reported"], rows)


def _kind(name: str, w: Mapping[str, Any]) -> str:
    return str(w.get("kind") or _kind_from_name(name))


def _state(name: str, w: Mapping[str, Any]) -> str:
    """One word or two: what an operator asks first about this worker."""
    if not w.get("alive"):
        return "DEAD"
    age = w.get("status_age_s")
    if age is None:
        return "starting"
    if age > 5.0:  # the supervisor's own limit for a silent child
        return f"SILENT {_age(age)}"
    kind = _kind(name, w)
    if kind == "socket":
        down = (w.get("connections") or 0) - (w.get("connected") or 0)
        return f"{down} CONN DOWN" if down > 0 else "streaming"
    if kind == "writer":
        if not w.get("db_ok", True):
            return "DB DOWN"
        if w.get("spool_full"):
            return "SPOOL FULL"
        return "spooling" if w.get("mode") == "spool" else "writing"
    return "running"


def _connections(sockets: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    if not sockets:
        return ""
    rows = [[name, _of(w.get("connected_streams"), w.get("streams")), _of(w.get("connected"), w.get("connections")),
             _rate(w.get("msgs_per_s")), _age(w.get("last_message_age_s")), _n(w.get("reconnects")),
             _n(w.get("rotations")), _n(w.get("gaps")), _n(w.get("rejected"))]
            for name, w in sockets]
    return "connections\n" + _table(["worker", "streams", "conns", "msgs/s", "last msg", "reconnects", "rotations",
                                     "gaps", "rejected"], rows)


def _lag(by_kind: Mapping[str, Sequence[tuple[str, Mapping[str, Any]]]], db: Mapping[str, Any]) -> str:
    """How far behind each worker is: the writer's last commit (the supervisor works out its
    age for the database block) and its exchange-event-to-commit lag over the last report,
    the feature worker's input lag, what producers hold."""
    lines = []
    for name, w in by_kind.get("writer", []):
        spool = (f"spool {_bytes(w.get('spool_bytes'))} ({_n(w.get('spooled_batches'))} batches spooled, "
                 f"{_n(w.get('replayed_batches'))} replayed{', FULL' if w.get('spool_full') else ''})")
        rows = w.get("rows")
        e2c = w.get("event_to_commit_s") or {}
        lines.append([name, f"last commit {_ago(db.get('last_commit_age_s'))}",
                      f"event to commit {_age(e2c.get('median'))} median, {_age(e2c.get('max'))} max (last second)",
                      f"queue {_n(w.get('queue_depth'))} batches", f"mode {w.get('mode') or '-'}", spool,
                      f"rows committed {sum(rows.values()) if isinstance(rows, dict) else '-'}"])
    for name, w in by_kind.get("features", []):
        markets: Mapping[str, Any] = w.get("markets") or {}
        lag = ", ".join(f"{m} {_age((v or {}).get('input_lag_s'))}" for m, v in markets.items()) or "-"
        lines.append([name, f"queue {_n(w.get('queue_depth'))} feeds", f"input lag {lag}",
                      f"bars waiting {_n(w.get('waiting_bars'))}"])
    for name, w in by_kind.get("socket", []):
        lines.append([name, f"pending rows {_n(w.get('pending_rows'))}",
                      f"unacked batches {_n(w.get('unacked_batches'))}"])
    for name, w in by_kind.get("rest", []):
        weight = ", ".join(f"{m} {v}" for m, v in (w.get("weight_used") or {}).items()) or "-"
        lines.append([name, f"open requests {_n(w.get('requests_open'))}", f"pending rows {_n(w.get('pending_rows'))}",
                      f"weight used {weight}", f"failed {_n(w.get('failed'))}"])
    if not lines:
        return ""
    width = max(len(line[0]) for line in lines)
    return "\n".join(["lag and queues"] + [f"{line[0]:<{width}}  " + ", ".join(line[1:]) for line in lines])


def _books(features: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    rows = []
    for _name, w in features:
        for market, m in (w.get("markets") or {}).items():
            books = m.get("books") or {}
            resyncs = ", ".join(f"{k} {v}" for k, v in sorted((m.get("resyncs") or {}).items())) or "-"
            rows.append([market, _n(books.get("synced")), _n(books.get("syncing")), _n(books.get("idle")),
                         _age(m.get("input_lag_s")), _n(m.get("bars")), resyncs,
                         f"{_n(m.get('drift_mismatches'))}/{_n(m.get('drift_checks'))}", _n(m.get("late"))])
    if not rows:
        return ""
    return "feature books\n" + _table(["market", "synced", "syncing", "idle", "input lag", "bars", "resyncs",
                               "drift", "late"], rows)


def _gaps(by_kind: Mapping[str, Sequence[tuple[str, Mapping[str, Any]]]]) -> str:
    sockets = [w for _, w in by_kind.get("socket", [])]
    features = [w for _, w in by_kind.get("features", [])]
    rests = [w for _, w in by_kind.get("rest", [])]
    book_gaps = sum(((m or {}).get("resyncs") or {}).get("gap", 0) for w in features
                    for m in (w.get("markets") or {}).values())
    rows = [
        ["sequence gaps detected (socket workers, since each started)", _total(sockets, "gaps")],
        ["trade backfills asked / trades backfilled over REST",
         f"{_total(sockets, 'backfills_asked')} / {_total(rests, 'trades_backfilled')}"],
        ["books resynced after a gap", str(book_gaps) if features else "-"],
        ["messages kept from the feature worker (its bars recomputed later)",
         f"{_total(sockets, 'feature_dropped')} (lost by it: {_total(features, 'lost')})"],
    ]
    return "gaps\n" + _table(["", ""], rows, show_header=False)


def _database(db: Mapping[str, Any]) -> str:
    line = f"database  reachable {_yes(db.get('reachable'))}, last commit {_ago(db.get('last_commit_age_s'))}"
    return line + (f"\n          error: {db['error']}" if db.get("error") else "")


# -- cells ------------------------------------------------------------------------------

def _table(columns: Sequence[str], rows: Iterable[Sequence[str]], show_header: bool = True) -> str:
    body = [list(columns)] if show_header else []
    body += [list(r) for r in rows]
    widths = [max(len(r[i]) for r in body) for i in range(len(body[0]))] if body else []
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in body)


def _total(items: Iterable[Mapping[str, Any]], key: str) -> str:
    values: list[Any] = [w[key] for w in items if w.get(key) is not None]
    return str(sum(values)) if values else "-"


def _n(v: Any) -> str:
    return "-" if v is None else str(v)


def _of(part: Any, whole: Any) -> str:
    return "-" if whole is None else f"{_n(part)}/{whole}"


def _yes(v: Any) -> str:
    return "-" if v is None else ("yes" if v else "NO")


def _rate(v: Any) -> str:
    return "-" if v is None else f"{v:,.1f}"


def _age(s: Any) -> str:
    if s is None:
        return "-"
    s = float(s)
    if s < 60:
        return f"{s:.2f} s" if s < 10 else f"{s:.0f} s"
    return _duration(s)


def _ago(s: Any) -> str:
    return "never" if s is None else f"{_age(s)} ago"


def _duration(s: Any) -> str:
    if s is None:
        return "-"
    s = int(s)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def _bytes(n: Any) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def status_once(url: str, as_json: bool) -> tuple[int, str]:
    """(exit code, what to print) for one look at ``url``."""
    try:
        code, body, raw = fetch_health(url)
    except Unreachable as exc:
        return UNREACHABLE, str(exc)
    return exit_code(code, body), raw.decode() if as_json else render_status(body, url)
