"""The Grafana dashboard asks only for series the ingestor exports.

Every PromQL expression in deploy/grafana/dashboards/ingestor.json (panel targets, rows'
nested panels, template variable queries) is cut into tokens, and each metric name it
names must be one that ``ingestor.metrics`` defines, with the suffix its type gives it in
the exposition. A renamed metric, or a ``_total`` forgotten, fails here rather than
showing "No data" on a screen. tests/test_prometheus.py sends the same expressions to a
real Prometheus, which proves they parse."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import Counter, Gauge, Histogram

from ingestor import metrics

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dashboards" / "ingestor.json"
DATASOURCE_UID = "prometheus"  # the provisioned datasource's uid (deploy/grafana/provisioning)


# ---- what the ingestor exports -------------------------------------------------------------


def exported_names() -> set[str]:
    """Sample names of every metric in ``ingestor.metrics``, as the multiprocess exposition
    writes them: counters as ``_total``, histograms as ``_bucket``/``_sum``/``_count``. No
    ``_created``: the multiprocess collector sums many processes' files and writes none
    (tests/test_prometheus.py checks these names against a live scrape)."""
    names: set[str] = set()
    for obj in vars(metrics).values():
        if isinstance(obj, Counter):
            names.add(obj._name + "_total")
        elif isinstance(obj, Histogram):
            names.update(obj._name + suffix for suffix in ("_bucket", "_sum", "_count"))
        elif isinstance(obj, Gauge):
            names.add(obj._name)
    return names


# ---- PromQL tokens -------------------------------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<var>\$\{[^}]*\}|\$\w+)                            # Grafana variables: $__rate_interval, ${market}
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\w*)   # 0.99, 1e3, 0x1f and durations: 5m, 1h30m
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=@,(){}\[\]])
""", re.VERBOSE)

# Words that are PromQL syntax, never a metric name, wherever they stand.
_AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
                 "topk", "quantile", "limitk", "limit_ratio"}
_KEYWORDS = {"bool", "offset", "and", "or", "unless", "atan2", "inf", "nan"}
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}  # each may take "(labels)"


def tokens(expr: str) -> list[tuple[str, str]]:
    """(kind, text) pairs without whitespace. An unknown character or unbalanced brackets
    are errors: a reading that skipped them could pass an expression it did not understand."""
    out, pos, stack = [], 0, []
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise ValueError(f"cannot read {expr[pos:pos + 20]!r} in {expr!r}")
        kind, text = m.lastgroup or "", m.group()
        if kind != "ws":
            out.append((kind, text))
        if kind == "op" and text in "([{":
            stack.append(")]}"["([{".index(text)])
        elif kind == "op" and text in ")]}" and (not stack or stack.pop() != text):
            raise ValueError(f"unbalanced {text!r} at {pos} in {expr!r}")
        pos = m.end()
    if stack:
        raise ValueError(f"{''.join(reversed(stack))!r} missing at the end of {expr!r}")
    return out


def _closing(toks: list[tuple[str, str]], i: int, open_: str, close: str) -> int:
    """Index of the bracket closing the one at ``i``."""
    depth = 0
    for j in range(i, len(toks)):
        if toks[j] == ("op", open_):
            depth += 1
        elif toks[j] == ("op", close):
            depth -= 1
            if depth == 0:
                return j
    raise ValueError(f"unbalanced {open_!r}")


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions (followed by
    "("), aggregations, keywords or the labels in {...}, by/without/on/ignoring/group_*
    lists and [...] ranges; plus ``{__name__="..."}`` matchers."""
    toks = tokens(expr)
    names: set[str] = set()
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else ("", "")
        if (kind, text) == ("op", "{"):
            end = _closing(toks, i, "{", "}")
            inner = toks[i + 1 : end]
            for k in range(len(inner) - 2):
                if inner[k] == ("ident", "__name__") and inner[k + 1] == ("op", "=") and inner[k + 2][0] == "string":
                    names.add(inner[k + 2][1][1:-1])
            i = end + 1
            continue
        if (kind, text) == ("op", "["):
            i = _closing(toks, i, "[", "]") + 1
            continue
        if kind == "ident":
            word = text.lower()
            if word in _LABEL_LISTS and nxt == ("op", "("):
                i = _closing(toks, i + 1, "(", ")") + 1
                continue
            if not (word in _AGGREGATIONS or word in _KEYWORDS or word in _LABEL_LISTS or nxt == ("op", "(")):
                names.add(text)
        i += 1
    return names


def unknown_metrics(expr: str) -> set[str]:
    return metric_names(expr) - exported_names()


# ---- the dashboard's queries ---------------------------------------------------------------


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))  # a collapsed row keeps its panels inside it


_LABEL_VALUES = re.compile(r"^\s*label_values\((?:(?P<selector>.+),)?\s*(?P<label>\w+)\s*\)\s*$", re.DOTALL)
_QUERY_RESULT = re.compile(r"^\s*query_result\((?P<expr>.+)\)\s*$", re.DOTALL)


def variable_promql(query: str) -> str | None:
    """The PromQL inside a Prometheus template variable's query (Grafana's own functions:
    ``label_values([selector,] label)``, ``query_result(expr)``); None when it has none."""
    if m := _LABEL_VALUES.match(query):
        return m.group("selector")
    if m := _QUERY_RESULT.match(query):
        return m.group("expr")
    raise ValueError(f"a template query this test cannot read: {query!r}")


def dashboard_queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every expression the dashboard runs."""
    out = []
    for p in _panels(dash.get("panels", [])):
        for t in p.get("targets", []):
            out.append((f"panel {p.get('title')!r} target {t.get('refId')}", t["expr"]))
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            promql = variable_promql(query)
            if promql is not None:
                out.append((f"variable {v['name']!r}", promql))
    return out


def problems(dash: dict[str, Any]) -> list[str]:
    return [f"{where}: {sorted(bad)} not exported ({expr})"
            for where, expr in dashboard_queries(dash) if (bad := unknown_metrics(expr))]


# Values for Grafana's variables when an expression is sent to Prometheus directly.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h", "__interval_ms": "15000",
                    "__range_s": "3600", "__range_ms": "3600000"}
_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$([A-Za-z_]\w*)")  # not $1: a label_replace group


def substitute(expr: str, dash: dict[str, Any]) -> str:
    """``expr`` with Grafana's variables replaced as "All" would: the variable's allValue."""
    values = dict(GRAFANA_BUILTINS)
    for v in dash.get("templating", {}).get("list", []):
        values[v["name"]] = v.get("allValue") or ".*"
    return _VAR.sub(lambda m: values[m.group(1) or m.group(2)], expr)


# ---- the tokenizer itself ------------------------------------------------------------------


@pytest.mark.parametrize(("expr", "expected"), [
    ('sum by (worker, table) (rate(ingestor_rows_written_total{table=~"agg.*", worker!="x"}[$__rate_interval]))',
     {"ingestor_rows_written_total"}),
    ("histogram_quantile(0.99, sum without (worker) (rate(ingestor_copy_seconds_bucket[5m] offset 1h)))",
     {"ingestor_copy_seconds_bucket"}),
    # Labels in on()/group_left(), a label value that looks like a metric, a function-named label.
    ('sum(rate(a_total[1m])) by (market) / on (market) group_left (rate) max by (market) (b{rate="c_total"})',
     {"a_total", "b"}),
    ('count({__name__="ingestor_books", market="spot"}) > bool 2 or vector(0)', {"ingestor_books"}),
    ("topk(5, x:recorded:rate5m) unless y @ start()", {"x:recorded:rate5m", "y"}),
    ('label_replace(up, "dst", "$1", "src", "(.*)")', {"up"}),
])
def test_metric_names_are_told_apart_from_functions_labels_and_keywords(expr: str, expected: set[str]) -> None:
    assert metric_names(expr) == expected


def test_a_name_the_ingestor_does_not_export_is_caught() -> None:
    # The counter without its _total, a histogram without _bucket, a name that never existed.
    assert unknown_metrics("sum(rate(ingestor_rows_written[5m]))") == {"ingestor_rows_written"}
    assert unknown_metrics("histogram_quantile(0.5, rate(ingestor_copy_seconds[5m]))") == {"ingestor_copy_seconds"}
    assert unknown_metrics('ingestor_rows_written_total{table="x"} / ingestor_nothing') == {"ingestor_nothing"}
    assert unknown_metrics("sum by (le) (rate(ingestor_copy_seconds_bucket[5m]))") == set()


def test_an_unreadable_expression_is_an_error_not_an_empty_set() -> None:
    with pytest.raises(ValueError):
        metric_names("sum(rate(x[5m])")
    with pytest.raises(ValueError):
        tokens("rate(x[5m]); y")


def test_variable_queries_are_read_for_their_promql() -> None:
    assert variable_promql("label_values(ingestor_books{market='spot'}, state)") == "ingestor_books{market='spot'}"
    assert variable_promql("label_values(market)") is None
    assert variable_promql("query_result(sum by (market) (ingestor_books))") == "sum by (market) (ingestor_books)"
    with pytest.raises(ValueError):
        variable_promql("metrics(ingestor_.*)")


# ---- the dashboard -------------------------------------------------------------------------


def test_every_dashboard_expression_names_only_exported_metrics() -> None:
    dash = load_dashboard()
    queries = dashboard_queries(dash)
    assert len(queries) >= 30 and all(metric_names(expr) for _, expr in queries)
    assert problems(dash) == []


def test_a_bad_expression_in_a_collapsed_row_is_found() -> None:
    dash = copy.deepcopy(load_dashboard())
    collapsed = [p for p in dash["panels"] if p["type"] == "row" and p.get("collapsed")]
    assert collapsed and collapsed[0]["panels"], "the dashboard has a collapsed row with panels"
    collapsed[0]["panels"][0]["targets"].append({"refId": "Z", "expr": "rate(ingestor_rows_written[5m])"})
    found = problems(dash)
    assert len(found) == 1 and "target Z" in found[0] and "['ingestor_rows_written']" in found[0]


def test_the_dashboard_covers_what_operations_watch() -> None:
    used = set().union(*(metric_names(expr) for _, expr in dashboard_queries(load_dashboard())))
    for name in ("ingestor_messages_received_total", "ingestor_rows_sent_total", "ingestor_rows_written_total",
                 "ingestor_event_to_commit_seconds_bucket", "ingestor_copy_seconds_bucket",
                 "ingestor_reconnects_total", "ingestor_gaps_detected_total", "ingestor_gaps_closed_total",
                 "ingestor_queue_depth", "ingestor_spool_bytes", "ingestor_spool_full", "ingestor_book_syncs_total",
                 "ingestor_book_drift_checks_total", "ingestor_rest_requests_total",
                 "ingestor_feature_input_lag_seconds"):
        assert name in used, name


def test_the_dashboard_is_a_provisionable_grafana_dashboard() -> None:
    dash = load_dashboard()
    assert dash["uid"] == "ingestor" and dash["schemaVersion"] >= 39 and dash["id"] is None
    panels = list(_panels(dash["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        if p["type"] != "row":
            # Grafana resolves the provisioned datasource by uid; a name would break on rename.
            assert p["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, p["title"]
            assert p["targets"] and all(t["datasource"]["uid"] == DATASOURCE_UID for t in p["targets"]), p["title"]
    for v in dash["templating"]["list"]:
        assert v["datasource"]["uid"] == DATASOURCE_UID
    # Every variable an expression uses is defined (or one of Grafana's own).
    defined = set(GRAFANA_BUILTINS) | {v["name"] for v in dash["templating"]["list"]}
    for _, expr in dashboard_queries(dash):
        used = {a or b for a, b in _VAR.findall(expr)}
        assert used <= defined, (expr, used - defined)
