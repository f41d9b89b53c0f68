"""Benchmark suite of mesa_llm_parallel: parallel stepping against its targets.

How to run it (from the repository root)::

    ./dev bench                      # full run, about 10 minutes on 2 cores
    ./dev bench --quick              # smoke run, under 40 seconds, no network
    ./dev bench --plots              # full run, then the figures in docs/_static/bench/
    ./dev bench --plots-from docs/_static/bench/results.json   # redraw only
    ./dev bench --json results.json  # also write every figure and sample as JSON
    ./dev bench --only machinery flag-off --repeats 9
    ./dev bench --only http ratelimit reference --http-full    # the heavy cells too

``./dev bench`` runs ``.venv/bin/python benchmarks/run.py`` with the same options.

Scenarios (each is one or more rows of the printed table, with its target):

1. asyncio mode, 1,000 agents awaiting ``asyncio.sleep(0.05)``: one ``model.step()``,
   and its ratio to a bare ``asyncio.gather`` of the same coroutines;
2. threading mode, 64 workers, 1,000 agents in ``time.sleep(0.05)``: one
   ``model.step()``, and its ratio to a bare ``ThreadPoolExecutor(64).map``;
3. machinery: 10,000 and 1,000 agents that do nothing, per-agent cost in both modes,
   and the asyncio machinery against a bare ``asyncio.gather``;
4. flag off: Mesa's BoltzmannWealth and Schelling examples with the patch installed
   but not asked for, against Mesa untouched;
5. the sequential baseline, measured on 20 agents and extrapolated to 1,000;
6. ``http``: agents calling the loopback server (its own process) through the real
   ``openai`` clients: 100 / 1,000 (/ 5,000) agents x 0 / 50 / 500 ms x asyncio and
   threading, each against the bare baseline of the same client calls, and sequential
   Mesa measured on a sample and extrapolated;
7. ``http-cap``: the server serves C requests at once, the library's
   ``max_concurrency`` is C, against a bare gather under a semaphore (and a bare pool);
8. ``ratelimit``: a server quota with 429s beyond it, with and without the library's
   ``rate_limit`` at 90% of it;
9. ``reference``: mesa-llm 0.3.2's parallel stepping in venvs of its own under
   ``.cache/`` (made on first use; needs PyPI; never with ``--quick``), same server,
   same agents, interleaved with ours;
10. ``client-pool`` (only with ``--only``): the same asyncio step with ``openai``'s
    default connection pool against the pool the HTTP scenarios configure;
11. ``hosts``: one asyncio step of 1,000 trivial agents from a kernel cell (nested), an
    asyncio application (background loop thread), threading mode (async-only agents on
    the home loop) and agents stepping sub-agents, each in a fresh interpreter;
12. ``mixed``: 10,000 / 50,000 cheap sync agents beside 100 agents awaiting 50 ms,
    against the cheap agents' own sequential time plus 50 ms;
13. ``scale``: 100 ... 100,000 agents awaiting 0.5 s against a bare ``asyncio.gather``,
    with the peak memory of each step (and, at 100,000, where the time goes);
14. ``clients``: the CPU per chat completion of openai's httpx and aiohttp transports
    and of litellm, 1,000 and 5,000 agents x 500 ms, each client in a process of its own
    (needs ``.cache/venv-mesa-llm``);
15. ``sweep``: 16 runs x 50 agents x 5 steps under one server quota (100 requests/s,
    64 in flight, 200 ms): Mesa's ``batch_run``, ours in one process, ours on a 2-worker
    Dask cluster, against the time the quota allows.

The machine is assumed shared and noisy: variants are interleaved within one run and
figures are medians of repeats (minimum beside them). Compare ratios, not absolute
times across runs. The exit status is 0 unless ``--strict`` is given and a target is
missed (or a scenario fails to run at all).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# The sibling modules are imported as top-level modules: this file runs as a script.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_clients import clients
from bench_common import Config, Row, environment
from bench_flag_off import flag_off
from bench_hosts import hosts
from bench_http import client_pool, http_cap, http_matrix
from bench_latency import asyncio_latency, sequential_baseline, threading_latency
from bench_machinery import machinery
from bench_ratelimit import rate_limit
from bench_reference import reference
from bench_scale import mixed, scale
from bench_sweep import sweep

import mesa_llm_parallel

SCENARIOS: dict[str, Callable[[Config], list[Row]]] = {
    "asyncio": asyncio_latency,
    "threading": threading_latency,
    "machinery": machinery,
    "flag-off": flag_off,
    "sequential": sequential_baseline,
    "http": http_matrix,
    "http-cap": http_cap,
    "ratelimit": rate_limit,
    "reference": reference,
    "client-pool": client_pool,
    "hosts": hosts,
    "mixed": mixed,
    "scale": scale,
    "clients": clients,
    "sweep": sweep,
}
#: Scenarios run only when named with --only.
OPT_IN = ("client-pool",)
#: Where ``--plots`` writes the figures and the JSON they are drawn from.
PLOTS_DIR = Path(__file__).resolve().parent.parent / "docs" / "_static" / "bench"

REFERENCE_NOTE = (
    "reference = mesa-llm 0.3.2's parallel stepping, measured on this kind of machine on "
    "Mesa 3.4.2 (where its patch works: its best case), from the project notes"
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="./dev bench",
        description="Measure mesa_llm_parallel against its targets and print a table.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: few repeats, small workloads, no venv creation (< 40 s)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repeats per variant (default 7, 2 with --quick)",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=None,
        help=(
            "interleaved pairs per flag-off workload: small models (default 31, 3 with "
            "--quick); the large ones get two thirds as many, at least 5 (skipped with --quick)"
        ),
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(SCENARIOS),
        default=None,
        metavar="SCENARIO",
        help=(
            f"run only these scenarios ({', '.join(SCENARIOS)}; "
            f"{', '.join(OPT_IN)} runs only when named here)"
        ),
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write JSON here")
    parser.add_argument(
        "--plots",
        action="store_true",
        help=(
            f"after the run, write the figures (PNG) and the run's JSON to "
            f"{PLOTS_DIR.relative_to(PLOTS_DIR.parents[2])}/"
        ),
    )
    parser.add_argument(
        "--plots-from",
        type=Path,
        default=None,
        metavar="JSON",
        help="run nothing: draw the figures from the JSON of an earlier run",
    )
    parser.add_argument(
        "--http-repeats",
        type=int,
        default=None,
        help="timed repeats per variant in the HTTP scenarios (default 3, 1 with --quick)",
    )
    parser.add_argument(
        "--http-full",
        action="store_true",
        help=(
            "also the heavy HTTP cells: 5,000 agents in every mode and latency, and the "
            "reference's slowest cells (adds about 13 minutes)"
        ),
    )
    parser.add_argument(
        "--no-install",
        action="store_true",
        help="never create the reference venvs (the reference scenario then needs them cached)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 1 when a target is not met"
    )
    args = parser.parse_args(argv)
    for name in ("repeats", "pairs", "http_repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def make_config(args: argparse.Namespace) -> Config:
    repeats = args.repeats or (2 if args.quick else 7)
    pairs = args.pairs or (3 if args.quick else 31)
    return Config(
        quick=args.quick,
        repeats=repeats,
        flag_off_pairs=pairs,
        flag_off_large_pairs=max(5, 2 * pairs // 3),
        sequential_repeats=1 if args.quick else 3,
        http_repeats=args.http_repeats or (1 if args.quick else 3),
        http_full=args.http_full,
        allow_install=not (args.quick or args.no_install),
    )


def speedup_row(rows: list[Row]) -> Row | None:
    """How many times faster than sequential, when scenarios 1, 2 and 5 all ran."""
    by_key = {row.key: row for row in rows}
    try:
        seq = by_key["sequential_1000_50ms_extrapolated"].data["extrapolated_1000"]["median"]
        asy = by_key["asyncio_1000_50ms"].data["ours"]["median"]
        thr = by_key["threading_1000_50ms"].data["ours"]["median"]
    except KeyError:
        return None
    return Row(
        key="speedup_vs_sequential",
        scenario="5. speed-up over sequential (extrapolated), 1,000 agents x 50 ms",
        measured=f"asyncio {seq / asy:.0f}x, threading {seq / thr:.0f}x",
        baseline=f"sequential {seq:.1f} s (extrapolated)",
        ratio="-",
        target="- (info)",
        met=None,
        reference="asyncio 621x, threading 5.9x (50.9 s / 0.082 s, / 8.6 s)",
        data={"asyncio": seq / asy, "threading": seq / thr},
    )


COLUMNS = (
    ("scenario", "scenario"),
    ("measured", "measured: median (min)"),
    ("baseline", "baseline, same run"),
    ("ratio", "ratio"),
    ("target", "target"),
    ("result", "result"),
    ("reference", "reference (Mesa 3.4.2)"),
)


def format_table(rows: list[Row]) -> str:
    """The rows as a Markdown pipe table (also readable in a terminal)."""
    cells = [[str(getattr(row, attr)) for attr, _ in COLUMNS] for row in rows]
    header = [title for _, title in COLUMNS]
    widths = [max(len(c) for c in col) for col in zip(header, *cells, strict=True)]

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    separator = "| " + " | ".join("-" * w for w in widths) + " |"
    return "\n".join([line(header), separator, *(line(c) for c in cells)])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plots_from is not None:
        from bench_plots import write_plots

        payload = json.loads(args.plots_from.read_text(encoding="utf-8"))
        for path in write_plots(payload, PLOTS_DIR):
            print(f"wrote {path}")
        return 0
    cfg = make_config(args)
    env = environment()
    print(f"mesa_llm_parallel benchmarks ({'quick smoke run' if cfg.quick else 'full run'})")
    print(f"  date      {env['date']}")
    print(f"  python    {env['python']}")
    print(
        f"  mesa      {env['mesa']}    mesa_llm_parallel {env['mesa_llm_parallel']} "
        f"(git {env['git_revision']})"
    )
    print(f"  nproc     {env['nproc']}    load average at start {env['load_average_at_start']}")
    print(f"  machine   {env['platform']}")
    print(f"  openai    {env['openai']}    ulimit -n {env['open_files_limit']}")
    print(f"  cpu       {env['cpu']}")
    print(
        f"  repeats   {cfg.repeats} per variant; flag-off pairs {cfg.flag_off_pairs} (small "
        f"models), {cfg.flag_off_large_pairs} (large); figures are medians, min in brackets"
    )
    if cfg.quick:
        print("  NOTE: --quick figures are a smoke test, not results")
    print(flush=True)

    names = args.only or [name for name in SCENARIOS if name not in OPT_IN]
    rows: list[Row] = []
    errors: dict[str, str] = {}
    durations: dict[str, float] = {}
    for name in names:
        print(f"running {name} ...", flush=True)
        start = time.perf_counter()
        try:
            new_rows = SCENARIOS[name](cfg)
        except Exception as exc:  # report it and go on with the other scenarios
            errors[name] = f"{type(exc).__name__}: {exc}"
            print(f"  FAILED: {errors[name]}", flush=True)
            continue
        finally:
            durations[name] = time.perf_counter() - start
        rows += new_rows
        for row in new_rows:
            print(f"  {row.result:7} {row.scenario}: {row.measured} [{row.ratio}]", flush=True)
        print(f"  ({durations[name]:.1f} s)", flush=True)
    extra = speedup_row(rows)
    if extra is not None:
        rows.append(extra)
    mesa_llm_parallel.shutdown()

    print()
    print(format_table(rows))
    print()
    print(REFERENCE_NOTE)
    with_target = [row for row in rows if row.met is not None]
    missed = [row for row in with_target if not row.met]
    print(
        f"targets met: {len(with_target) - len(missed)} of {len(with_target)}"
        + (f"; NOT MET: {', '.join(row.key for row in missed)}" if missed else "")
    )
    for name, error in errors.items():
        print(f"scenario {name} failed: {error}")
    print(f"total {sum(durations.values()):.0f} s")

    payload = {
        "environment": env,
        "config": {
            "quick": cfg.quick,
            "repeats": cfg.repeats,
            "flag_off_pairs": cfg.flag_off_pairs,
            "flag_off_large_pairs": cfg.flag_off_large_pairs,
            "sequential_repeats": cfg.sequential_repeats,
            "http_repeats": cfg.http_repeats,
            "http_full": cfg.http_full,
            "scenarios": names,
            "command": " ".join(
                ["benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])]
            ),
        },
        "rows": [row.as_dict() for row in rows],
        "errors": errors,
        "durations_s": durations,
        "reference_note": REFERENCE_NOTE,
    }
    text = json.dumps(payload, indent=2) + "\n"
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text, encoding="utf-8")
        print(f"wrote {args.json}")
    if args.plots:
        from bench_plots import write_plots

        PLOTS_DIR.mkdir(parents=True, exist_ok=True)
        (PLOTS_DIR / "results.json").write_text(text, encoding="utf-8")
        print(f"wrote {PLOTS_DIR / 'results.json'}")
        for path in write_plots(payload, PLOTS_DIR):
            print(f"wrote {path}")

    if errors:
        return 1
    return 1 if (args.strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
