"""Scenarios 6 and 7: agents that ask a real server over HTTP through the ``openai`` clients.

The server is the package's :class:`~mesa_llm_parallel.llm_server.LoopbackLLMServer`,
run in a process of its own (``bench_server.py``), answering every request after a
constant latency. The agents (``bench_http_agents.py``) make one chat completion per
step: ``AsyncOpenAI`` in ``astep`` for asyncio mode, ``OpenAI`` in ``step`` for
threading mode and sequential Mesa. One client of each kind per model, reused for every
step, each with a pool of :data:`CONNECTIONS` kept-alive connections.

6. **http**: for each cell of the matrix (agents x server latency x mode), one
   ``model.step()`` interleaved with a bare baseline doing the same client calls:

   * asyncio mode against ``asyncio.gather`` of the same agents' ``astep()`` on the
     same persistent event loop (the library's loop for this thread, so both use the
     same client and the same pooled connections);
   * threading mode (``max_workers=64``) against ``ThreadPoolExecutor(64).map`` of the
     same agents' ``step()`` through the same sync client.

   Latency 0 measures the machinery over HTTP (the client's own cost included).
   Sequential Mesa is measured on a small sample and extrapolated to each size.
7. **http-cap**: the server serves at most ``C`` requests at once (a provider's
   concurrency limit; the rest queue at the server); the library's ``max_concurrency``
   is set to ``C``, against a bare gather under ``asyncio.Semaphore(C)`` and a bare
   ``ThreadPoolExecutor(C).map``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import operator
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from bench_common import Config, Row, Stats, fmt_ratio, fmt_stats, fmt_time
from bench_http_agents import (
    AsyncChatAgent,
    HttpModel,
    SyncChatAgent,
    client_settings,
    make_async_client,
    make_sync_client,
)
from bench_latency import verify_parallel
from bench_server import ServerProcess, raise_fd_limit

from mesa_llm_parallel import (
    disable_automatic_parallel_stepping,
    enable_automatic_parallel_stepping,
    settings,
)
from mesa_llm_parallel._loops import thread_loop  # the loop asyncio steps run on here

__all__ = [
    "CONNECTIONS",
    "TARGET_RATIO",
    "WORKERS",
    "HttpSide",
    "Sample",
    "asyncio_sides",
    "client_pool",
    "http_cap",
    "http_matrix",
    "interleave_samples",
    "measure_pair",
    "prepare_http",
    "stats_of",
    "threading_sides",
    "timed",
]

#: Connections in each client's pool; ``max_keepalive_connections`` is the same.
CONNECTIONS = 256
#: The thread pool of threading mode and of the bare ``ThreadPoolExecutor``.
WORKERS = 64
#: Our step against the bare baseline of the same calls.
TARGET_RATIO = 1.3
#: File descriptors wanted: the pools' connections, the server's, and some spare.
FD_WANTED = 65_536
#: Agents of the sequential sample, by latency (seconds).
SEQUENTIAL_SAMPLE = {0.0: 50, 0.05: 20, 0.5: 10}
SEQUENTIAL_SAMPLE_QUICK = {0.0: 20, 0.05: 10, 0.5: 4}


@dataclasses.dataclass(frozen=True)
class Sample:
    """One timed step: wall seconds, process CPU seconds, answers and failed requests."""

    seconds: float
    cpu: float
    answered: int
    failures: dict[str, int]


@dataclasses.dataclass
class HttpSide:
    """One variant of a comparison: how to run one step, and what it must answer."""

    name: str
    run: Callable[[], Sample]
    expect: int | None  # answers every step must get (None: not checked)


def prepare_http() -> tuple[int, int]:
    """Raise the open-files limit (see :func:`bench_server.raise_fd_limit`)."""
    return raise_fd_limit(FD_WANTED)


def timed(model: HttpModel, fn: Callable[[], object]) -> Sample:
    """Run ``fn`` once after a full collection; time it and read the model's answers."""
    model.failures = {}
    gc.collect()
    cpu = time.process_time()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return Sample(seconds, time.process_time() - cpu, model.answered(), dict(model.failures))


def _check(side: HttpSide, sample: Sample) -> None:
    if side.expect is not None and (sample.answered != side.expect or sample.failures):
        raise RuntimeError(
            f"{side.name}: {sample.answered} of {side.expect} agents answered "
            f"(failed requests: {sample.failures or 'none'}); the timing would be meaningless"
        )


def interleave_samples(
    sides: Sequence[HttpSide], repeats: int, *, warm_up: Sequence[int] | None = None
) -> list[list[Sample]]:
    """Run every side ``repeats`` times, rotating the order each round (AB BA AB ...).

    First, one warm-up step (not counted) of each side in ``warm_up`` (indexes; default
    every side) opens the clients' connections. Every sample is checked: all agents
    answered, no request failed (for the sides that say what they expect).
    """
    for index in range(len(sides)) if warm_up is None else warm_up:
        _check(sides[index], sides[index].run())
    samples: list[list[Sample]] = [[] for _ in sides]
    count = len(sides)
    for round_ in range(repeats):
        for offset in range(count):
            index = (round_ + offset) % count
            sample = sides[index].run()
            _check(sides[index], sample)
            samples[index].append(sample)
    return samples


def stats_of(samples: Sequence[Sample]) -> Stats:
    """The wall-time statistics of some samples."""
    return Stats.of([s.seconds for s in samples])


def cpu_per_request(samples: Sequence[Sample], n: int) -> float:
    """Median process CPU seconds per request."""
    return Stats.of([s.cpu / n for s in samples]).median


def _latency_label(latency: float) -> str:
    return f"{latency * 1e3:.0f} ms"


# -- one cell: asyncio mode ----------------------------------------------------------
@contextlib.contextmanager
def asyncio_sides(
    base_url: str, n: int, *, cap: int | None = None, connections: int | None = CONNECTIONS
) -> Iterator[tuple[HttpSide, HttpSide]]:
    """Our asyncio step and a bare gather of the same agents, same client, same loop.

    The bare gather runs on the loop the library steps on in this thread, so both
    sides share one ``AsyncOpenAI`` client and its pooled connections. With ``cap``,
    the library's ``max_concurrency`` and the bare side's ``asyncio.Semaphore`` are
    both ``cap``. ``connections=None`` gives the client ``openai``'s default pool.
    """
    settings.reset()
    enable_automatic_parallel_stepping("asyncio", max_concurrency=cap)
    loop = thread_loop()
    client = make_async_client(base_url, connections=connections, max_retries=0)
    model = HttpModel(AsyncChatAgent, n, async_client=client)
    agents = list(model.agents)

    async def gather() -> None:
        if cap is None:
            await asyncio.gather(*[agent.astep() for agent in agents])
            return
        semaphore = asyncio.Semaphore(cap)

        async def limited(agent: AsyncChatAgent) -> None:
            async with semaphore:
                await agent.astep()

        await asyncio.gather(*[limited(agent) for agent in agents])

    def bare() -> None:
        model.begin_round()
        loop.run_until_complete(gather())

    try:
        yield (
            HttpSide("our asyncio step", lambda: timed(model, model.step), n),
            HttpSide("bare gather", lambda: timed(model, bare), n),
        )
    finally:
        loop.run_until_complete(client.close())
        settings.reset()


# -- one cell: threading mode --------------------------------------------------------
@contextlib.contextmanager
def threading_sides(
    base_url: str, n: int, *, cap: int | None = None
) -> Iterator[tuple[HttpSide, HttpSide]]:
    """Our threading step (64 workers) and a bare executor map, same sync client.

    With ``cap``, the library's ``max_concurrency`` is ``cap`` (its pool grown to
    ``cap`` workers if it is smaller) and the bare executor has ``cap`` threads.
    """
    settings.reset()
    workers = max(WORKERS, cap or 0)
    enable_automatic_parallel_stepping("threading", max_workers=workers, max_concurrency=cap)
    client = make_sync_client(base_url, connections=CONNECTIONS, max_retries=0)
    model = HttpModel(SyncChatAgent, n, client=client)
    agents = list(model.agents)
    call_step = operator.methodcaller("step")
    try:
        with ThreadPoolExecutor(max_workers=cap or WORKERS) as executor:

            def bare() -> None:
                model.begin_round()
                for _ in executor.map(call_step, agents):
                    pass

            yield (
                HttpSide("our threading step", lambda: timed(model, model.step), n),
                HttpSide("bare executor map", lambda: timed(model, bare), n),
            )
    finally:
        client.close()
        settings.reset()


def measure_pair(
    mode: str, base_url: str, n: int, repeats: int, *, cap: int | None = None
) -> tuple[list[Sample], list[Sample]]:
    """Ours against the bare baseline, interleaved; the warm-up step is ours only.

    Both sides use the same client, so ours' warm-up opens the connections for both.
    """
    sides = asyncio_sides if mode == "asyncio" else threading_sides
    with sides(base_url, n, cap=cap) as pair:
        ours, base = interleave_samples(pair, repeats, warm_up=(0,))
    return ours, base


# -- sequential sample ---------------------------------------------------------------
def _measure_sequential(base_url: str, k: int, repeats: int) -> list[Sample]:
    disable_automatic_parallel_stepping()
    client = make_sync_client(base_url, connections=CONNECTIONS, max_retries=0)
    model = HttpModel(SyncChatAgent, k, client=client, parallel=False)
    try:
        # No warm-up: one agent at a time needs one connection, opened by the first.
        (samples,) = interleave_samples(
            [HttpSide("sequential step", lambda: timed(model, model.step), k)],
            repeats,
            warm_up=(),
        )
    finally:
        client.close()
    return samples


@dataclasses.dataclass(frozen=True)
class Cell:
    """One cell of the matrix."""

    latency: float
    n: int
    mode: str


def plan(cfg: Config) -> list[Cell]:
    """The cells a run measures (see docs/benchmarks.md for what each run includes)."""
    if cfg.quick:
        return [Cell(lat, 100, mode) for lat in (0.05, 0.0) for mode in ("asyncio", "threading")]
    cells = [
        Cell(latency, n, mode)
        for latency in (0.05, 0.5, 0.0)
        for n in (100, 1000)
        for mode in ("asyncio", "threading")
    ]
    cells.append(Cell(0.5, 5000, "asyncio"))
    if cfg.http_full:
        cells += [Cell(0.05, 5000, "asyncio"), Cell(0.05, 5000, "threading")]
        cells += [Cell(0.5, 5000, "threading"), Cell(0.0, 5000, "asyncio")]
    return cells


def _repeats(cfg: Config, cell: Cell) -> int:
    """Timed repeats per side: two for cells whose step takes several seconds."""
    rounds = -(-cell.n // WORKERS) if cell.mode == "threading" else -(-cell.n // CONNECTIONS)
    slow = cell.n >= 5000 or rounds * cell.latency > 5
    return min(cfg.http_repeats, 2) if slow else cfg.http_repeats


def _cell_row(cell: Cell, ours: list[Sample], base: list[Sample], server: dict[str, int]) -> Row:
    o, b = stats_of(ours), stats_of(base)
    ratio = o.median / b.median
    bare_name = (
        "bare gather" if cell.mode == "asyncio" else f"bare ThreadPoolExecutor({WORKERS}).map"
    )
    mode_label = "asyncio" if cell.mode == "asyncio" else f"threading ({WORKERS} workers)"
    what = "machinery over HTTP, " if cell.latency == 0 else ""
    return Row(
        key=f"http_{cell.mode}_{cell.n}_{cell.latency * 1e3:.0f}ms",
        scenario=(
            f"6. HTTP {mode_label}: {what}{cell.n:,} agents, server latency "
            f"{_latency_label(cell.latency)}, one model.step()"
        ),
        measured=fmt_stats(o),
        baseline=f"{bare_name} {fmt_stats(b)}",
        ratio=fmt_ratio(ratio),
        target=f"<= {TARGET_RATIO}x bare",
        met=ratio <= TARGET_RATIO,
        reference="see 9.",
        data={
            "n": cell.n,
            "latency": cell.latency,
            "mode": cell.mode,
            "ours": o.as_dict(),
            "bare": b.as_dict(),
            "ratio": ratio,
            "cpu_per_request_ours": cpu_per_request(ours, cell.n),
            "cpu_per_request_bare": cpu_per_request(base, cell.n),
            "server": server,
        },
    )


def http_matrix(cfg: Config) -> list[Row]:
    """Scenario 6: the matrix, the bare baselines and the sequential extrapolation."""
    prepare_http()
    for mode in ("asyncio", "threading"):
        settings.reset()
        enable_automatic_parallel_stepping(mode)
        verify_parallel(mode)
    settings.reset()
    cells = plan(cfg)
    samples_seq = SEQUENTIAL_SAMPLE_QUICK if cfg.quick else SEQUENTIAL_SAMPLE
    rows: list[Row] = []
    sequential: dict[float, float] = {}
    for latency in sorted({cell.latency for cell in cells}, reverse=True):
        with ServerProcess(latency=latency) as server:
            # Sequential Mesa on a small sample, extrapolated per agent.
            k = samples_seq[latency]
            seq_repeats = (
                min(cfg.sequential_repeats, 2) if latency >= 0.5 else cfg.sequential_repeats
            )
            seq = _measure_sequential(server.base_url, k, seq_repeats)
            per_agent = stats_of(seq).scaled(1 / k)
            sequential[latency] = per_agent.median
            sizes = sorted({c.n for c in cells if c.latency == latency})
            extrapolated = ", ".join(f"{n:,}: {fmt_time(per_agent.median * n)}" for n in sizes)
            rows.append(
                Row(
                    key=f"http_sequential_{latency * 1e3:.0f}ms",
                    scenario=(
                        f"6. HTTP sequential (Mesa untouched), server latency "
                        f"{_latency_label(latency)}: {k} agents measured, extrapolated "
                        f"(not run in full)"
                    ),
                    measured=f"{fmt_time(per_agent.median)} per agent (step of {k}: "
                    f"{fmt_stats(stats_of(seq))})",
                    baseline=f"extrapolated: {extrapolated}",
                    ratio="-",
                    target="- (baseline)",
                    met=None,
                    reference="-",
                    data={
                        "latency": latency,
                        "sample_agents": k,
                        "sample": stats_of(seq).as_dict(),
                        "per_agent": per_agent.as_dict(),
                        "extrapolated": {str(n): per_agent.median * n for n in sizes},
                    },
                )
            )
            for cell in (c for c in cells if c.latency == latency):
                server.reset_stats()
                ours, base = measure_pair(cell.mode, server.base_url, cell.n, _repeats(cfg, cell))
                row = _cell_row(cell, ours, base, server.stats())
                row.data["sequential_extrapolated"] = sequential[latency] * cell.n
                row.data["speedup"] = sequential[latency] * cell.n / stats_of(ours).median
                rows.append(row)
                print(f"    {row.scenario}: {row.measured} [{row.ratio}]", flush=True)
    rows.append(_speedup_row(rows))
    for row in rows:
        row.data.setdefault("client", client_settings(CONNECTIONS, 0))
    return rows


def _speedup_row(rows: list[Row]) -> Row:
    """Speed-ups at the largest size measured in every mode and latency."""
    cells = {
        (r.data["mode"], r.data["n"], r.data["latency"]): r.data["speedup"]
        for r in rows
        if "speedup" in r.data
    }
    modes = sorted({m for m, _, _ in cells})
    latencies = sorted({lat for _, _, lat in cells}, reverse=True)
    common = [
        n
        for n in sorted({n for _, n, _ in cells})
        if all((m, n, lat) in cells for m in modes for lat in latencies)
    ]
    n = common[-1] if common else 0
    parts = [
        f"{mode} "
        + ", ".join(f"{_latency_label(lat)} {cells[(mode, n, lat)]:.1f}x" for lat in latencies)
        for mode in modes
        if n
    ]
    return Row(
        key="http_speedup",
        scenario=f"6. HTTP speed-up over sequential (extrapolated), {n:,} agents",
        measured="; ".join(parts),
        baseline="sequential extrapolated from its sample",
        ratio="-",
        target="- (info)",
        met=None,
        reference="-",
        data={f"{m}_{k}_{lat * 1e3:.0f}ms": v for (m, k, lat), v in cells.items()},
    )


# -- scenario 7 ----------------------------------------------------------------------
def http_cap(cfg: Config) -> list[Row]:
    """Scenario 7: a concurrency cap at the server and the same cap in the library."""
    prepare_http()
    if cfg.quick:
        latency, n, cap = 0.05, 100, 20
    else:
        latency, n, cap = 0.5, 400, 100
    repeats = cfg.http_repeats
    ideal = -(-n // cap) * latency
    rows: list[Row] = []
    with ServerProcess(latency=latency, max_concurrent=cap) as server:
        for mode in ("asyncio",) if cfg.quick else ("asyncio", "threading"):
            server.reset_stats()
            ours, base = measure_pair(mode, server.base_url, n, repeats, cap=cap)
            stats = server.stats()
            o, b = stats_of(ours), stats_of(base)
            ratio = o.median / b.median
            bare = (
                f"bare gather under Semaphore({cap})"
                if mode == "asyncio"
                else f"bare ThreadPoolExecutor({cap}).map"
            )
            rows.append(
                Row(
                    key=f"http_cap_{mode}_{n}",
                    scenario=(
                        f"7. HTTP cap: server serves {cap} at once (latency "
                        f"{_latency_label(latency)}); {mode} with max_concurrency={cap}, "
                        f"{n} agents"
                    ),
                    measured=f"{fmt_stats(o)}; ideal {fmt_time(ideal)} "
                    f"({o.median / ideal:.2f}x); server queued at most {stats['peak_queued']}",
                    baseline=f"{bare} {fmt_stats(b)}",
                    ratio=fmt_ratio(ratio),
                    target=f"<= {TARGET_RATIO}x bare",
                    met=ratio <= TARGET_RATIO,
                    reference="- (no cap)",
                    data={
                        "n": n,
                        "latency": latency,
                        "cap": cap,
                        "mode": mode,
                        "ours": o.as_dict(),
                        "bare": b.as_dict(),
                        "ratio": ratio,
                        "ideal": ideal,
                        "server": stats,
                        "client": client_settings(CONNECTIONS, 0),
                    },
                )
            )
        # Without the library's cap, the client sends up to its pool size at once and
        # the server queues the rest: same time, but every queued request holds a
        # connection and waits with the clock running.
        server.reset_stats()
        with asyncio_sides(server.base_url, n) as (uncapped, _):
            (samples,) = interleave_samples([uncapped], 1)
        stats = server.stats()
        rows.append(
            Row(
                key=f"http_cap_asyncio_{n}_uncapped",
                scenario=(
                    f"7. HTTP cap: the same asyncio step WITHOUT max_concurrency (server "
                    f"still serves {cap} at once)"
                ),
                measured=(
                    f"{fmt_time(samples[0].seconds)}; server queued at most {stats['peak_queued']}"
                ),
                baseline="-",
                ratio="-",
                target="- (info)",
                met=None,
                reference="-",
                data={"n": n, "cap": cap, "seconds": samples[0].seconds, "server": stats},
            )
        )
    return rows


# -- scenario 10 (only when asked for) -----------------------------------------------
def client_pool(cfg: Config) -> list[Row]:
    """Scenario 10: our asyncio step with openai's default pool against the one we set.

    Not part of the default run (``--only client-pool``): it explains the client
    settings of scenarios 6-9. The two clients alternate, each on a model of its own.
    """
    prepare_http()
    n, latency = (200, 0.05) if cfg.quick else (1000, 0.05)
    repeats = cfg.http_repeats
    rows: list[Row] = []
    with (
        ServerProcess(latency=latency) as server,
        asyncio_sides(server.base_url, n, connections=None) as (default, _),
        asyncio_sides(server.base_url, n) as (ours, _),
    ):
        default.name, ours.name = "openai's default pool", f"pool of {CONNECTIONS}"
        counted: dict[str, list[int]] = {default.name: [], ours.name: []}

        def counting(side: HttpSide) -> HttpSide:
            def run() -> Sample:
                before = server.stats()["connections"]
                sample = side.run()
                counted[side.name].append(server.stats()["connections"] - before)
                return sample

            return HttpSide(side.name, run, side.expect)

        d, o = interleave_samples([counting(default), counting(ours)], repeats)
    ds, os_ = stats_of(d), stats_of(o)
    for name, stats, samples, connections in (
        (default.name, ds, d, None),
        (ours.name, os_, o, CONNECTIONS),
    ):
        rows.append(
            Row(
                key=f"client_pool_{'default' if connections is None else connections}",
                scenario=(
                    f"10. client pool: our asyncio step, {n:,} agents x "
                    f"{_latency_label(latency)}, {name}"
                ),
                measured=(
                    f"{fmt_stats(stats)}; {cpu_per_request(samples, n) * 1e3:.1f} ms CPU per "
                    f"request; new connections per step {counted[name][-repeats:]}"
                ),
                baseline=client_settings(connections, 0),
                ratio=fmt_ratio(stats.median / os_.median),
                target="- (info)",
                met=None,
                reference="-",
                data={
                    "n": n,
                    "latency": latency,
                    "connections": connections,
                    "step": stats.as_dict(),
                    "cpu_per_request": cpu_per_request(samples, n),
                    "new_connections_per_step": counted[name],
                },
            )
        )
    return rows
