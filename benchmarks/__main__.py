"""``python -m benchmarks SUITE [--quick] [--out DIR]``: run suites, write a report.

SUITE: codec, sim, pipeline, copy_ceiling, book, features, feature_worker, all; and, on
their own, soak, memory, sizing, profile."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import targets
from benchmarks.report import machine_info, markdown, write_report

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _sim(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks import sim_throughput

    return sim_throughput.run(args.quick, rate=getattr(args, "rate", None),
                              connections=getattr(args, "connections", None),
                              runs=getattr(args, "runs", None), window=getattr(args, "window", None))


def _pipeline(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks import pipeline

    shards = getattr(args, "shards", None)
    levels = getattr(args, "levels", None)
    return pipeline.run(args.quick, shards=tuple(shards) if shards else None,
                        levels=tuple(levels) if levels else None, window=getattr(args, "window", None),
                        live_model=getattr(args, "live_model", False))


def _book(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks import book

    return book.run(args.quick, runs=getattr(args, "runs", None), seconds=getattr(args, "seconds", None))


def _features(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks import features

    return features.run(args.quick)


def _copy_ceiling(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks import copy_ceiling

    return copy_ceiling.run(args.quick, connections=getattr(args, "connections", None),
                            seconds=getattr(args, "seconds", None), runs=getattr(args, "runs", None))


def _codec(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks import codec

    return codec.run(args.quick)


def _soak(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks import soak

    return soak.run(args.quick, minutes=getattr(args, "minutes", None), every=getattr(args, "every", None),
                    seed=getattr(args, "seed", 1))


def _memory(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks import memory

    return memory.run(args.quick, minutes=getattr(args, "minutes", None), rate=getattr(args, "rate", None))


def _sizing(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks import sizing

    return sizing.run(args.quick, seconds=getattr(args, "seconds", None))


def _profile(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks import profile

    return profile.run(args.quick, rate=getattr(args, "rate", None))


def _feature_worker(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks import feature_worker

    return feature_worker.run(args.quick)


# Every suite, in the order ``all`` runs them.
SUITES: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "codec": _codec,
    "sim": _sim,
    "pipeline": _pipeline,
    "copy_ceiling": _copy_ceiling,
    "book": _book,
    "features": _features,
    "feature_worker": _feature_worker,
}
# Suites that take minutes by design, or measure something other than speed (sizing: disk
# per row and per day, ~30 s quick): run on their own, never by ``all``.
LONG_SUITES: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {"soak": _soak, "memory": _memory,
                                                                          "sizing": _sizing, "profile": _profile}


def _numbers(kind: type[Any]) -> Callable[[str], list[Any]]:
    """A comma list, e.g. ``1,2,4``."""
    return lambda text: [kind(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quick", action="store_true", help="fewer and shorter runs (CI smoke)")
    common.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"report directory (default: {DEFAULT_OUT})")
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = parser.add_subparsers(dest="suite", required=True)
    sim = sub.add_parser("sim", parents=[common], help="simulator push throughput")
    sim.add_argument("--rate", type=float, default=None, help="--rate of the simulator (default 60000)")
    sim.add_argument("--connections", type=int, default=None, help="client connections (default 4)")
    sim.add_argument("--runs", type=int, default=None, help="runs per configuration (quick 3, full 5)")
    sim.add_argument("--window", type=float, default=None, help="counting window, s (quick 5, full 10)")
    pipe = sub.add_parser("pipeline", parents=[common], help="end to end: simulator -> ingestor -> PostgreSQL")
    pipe.add_argument("--shards", type=_numbers(int), default=None, help="shard counts (quick 1, full 1,2,4)")
    pipe.add_argument("--levels", type=_numbers(float), default=None,
                      help="offered msg/s, stepped up (quick 50000,100000,150000; full 25000 to 200000 by 25000)")
    pipe.add_argument("--window", type=float, default=None, help="measuring window, s (quick 8, full 20)")
    pipe.add_argument("--live-model", action="store_true",
                      help="the simulator steps its model live instead of playing a tape (tops out near 60,000 msg/s)")
    book = sub.add_parser("book", parents=[common], help="order book level-updates/s: NumpyBook vs dict-and-sort")
    book.add_argument("--runs", type=int, default=None, help="runs per payload (quick 3, full 5)")
    book.add_argument("--seconds", type=float, default=None,
                      help="simulated seconds of diffs per sim payload (quick 60, full 300)")
    sub.add_parser("codec", parents=[common], help="socket worker cost per message by stream type, no I/O")
    sub.add_parser("features", parents=[common], help="indicator cost per trade and per symbol-bar")
    ceil = sub.add_parser("copy_ceiling", parents=[common],
                          help="PostgreSQL's own COPY rate for these rows, and where it goes (jsonb, indexes)")
    ceil.add_argument("--connections", type=int, default=None, help="COPY connections (default: the writer's, 4)")
    ceil.add_argument("--seconds", type=float, default=None, help="timed seconds per measurement (quick 4, full 10)")
    ceil.add_argument("--runs", type=int, default=None, help="runs per configuration (quick 1, full 3)")
    sub.add_parser("feature_worker", parents=[common], help="feature worker vs the simulator's full firehose")
    soak = sub.add_parser("soak", parents=[common], help="minutes of the whole pipeline with faults throughout")
    soak.add_argument("--minutes", type=float, default=None, help="how long (quick 2, full 10)")
    soak.add_argument("--every", type=float, default=None, help="mean seconds between two faults (default 5)")
    soak.add_argument("--seed", type=int, default=1, help="the fault plan's seed")
    mem = sub.add_parser("memory", parents=[common], help="RSS of every ingestor process over minutes, steady rate")
    mem.add_argument("--minutes", type=float, default=None, help="how long (quick 2, full 10)")
    mem.add_argument("--rate", type=float, default=None, help="offered msg/s, live model (default 50000)")
    size = sub.add_parser("sizing", parents=[common],
                          help="bytes per row per table (real payloads, and the pipeline) and per day")
    size.add_argument("--seconds", type=float, default=None, help="pipeline part's recording, s (quick 12, full 30)")
    prof = sub.add_parser("profile", parents=[common],
                          help="py-spy samples of socket-0, features and writer during one pipeline level")
    prof.add_argument("--rate", type=float, default=None, help="offered msg/s of the level (default 100000)")
    sub.add_parser("all", parents=[common], help="every suite but soak, memory, sizing and profile")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = list(SUITES) if args.suite == "all" else [args.suite]
    started = time.time()
    report: dict[str, Any] = {
        "name": args.suite,
        "command": "python -m benchmarks " + shlex.join(sys.argv[1:] if argv is None else argv),
        "quick": args.quick,
        "started_unix": started,
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
        "machine": machine_info(),
        "suites": [],
    }
    failed = False
    for name in names:
        print(f"[benchmarks] {name} ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            result = {**SUITES, **LONG_SUITES}[name](args)
        except Exception:  # noqa: BLE001 - one failing suite must not lose the others
            failed = True
            result = {"suite": name, "metrics": [], "error": traceback.format_exc()}
        result["wall_s"] = time.monotonic() - t0
        report["suites"].append(result)
        print(f"[benchmarks] {name} done in {result['wall_s']:.1f} s", file=sys.stderr, flush=True)
    goals = targets.summary(report)
    if goals is not None:
        report["suites"].append(goals)
    report["wall_s"] = time.time() - started
    json_path, md_path = write_report(args.out, report)
    sys.stdout.write(markdown(report))
    print(f"[benchmarks] wrote {json_path} and {md_path}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
