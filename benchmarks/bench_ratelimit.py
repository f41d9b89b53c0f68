"""Scenario 8: a server quota (HTTP 429 beyond it) and the library's start-rate limit.

The loopback server accepts at most ``Q`` chat completions in any sliding second and
answers the others at once with 429 and ``Retry-After``. A step of ``n`` agents cannot
finish before ``n / Q`` seconds: that is the *ideal* time the quota allows. Three
variants per mode (asyncio, and threading with 64 workers):

* **limited**: ``settings.rate_limit = 0.9 * Q``, clients without retries
  (``max_retries=0``, so that any 429 shows as a failed agent). Target: zero 429s in
  every sample, and a step within 1.15x of the ideal;
* **unlimited, no retries**: the same step without the limit: how many requests the
  server refuses;
* **unlimited, openai's default retries** (``max_retries=2``, honouring the server's
  ``retry-after-ms``): how many 429s, how many agents still get no answer, how long.

Before every sample the scenario waits 1.1 s, so the server's one-second window holds
none of the previous sample's requests. There is no warm-up: at the limited rate only
a handful of connections is ever open.
"""

from __future__ import annotations

import time
from typing import Any

from bench_common import Config, Row, Stats, fmt_stats, fmt_time
from bench_http import WORKERS, prepare_http, timed
from bench_http_agents import (
    AsyncChatAgent,
    HttpModel,
    SyncChatAgent,
    client_settings,
    make_async_client,
    make_sync_client,
)
from bench_server import ServerProcess

from mesa_llm_parallel import enable_automatic_parallel_stepping, settings
from mesa_llm_parallel._loops import thread_loop

__all__ = ["rate_limit"]

TARGET_RATIO = 1.15
HEADROOM = 0.9
LATENCY = 0.05
#: Pool size of these clients (only a few requests are in flight at the limited rate).
CONNECTIONS = 256
#: Seconds to wait before a sample: the server's window is one second.
DRAIN = 1.1


class _Variant:
    """One (mode, limited?, retries) combination with its model and clients."""

    def __init__(self, mode: str, *, limit: float | None, retries: int, base_url: str, n: int):
        self.mode, self.limit, self.retries, self.n = mode, limit, retries, n
        if mode == "asyncio":
            client = make_async_client(base_url, connections=CONNECTIONS, max_retries=retries)
            self.model = HttpModel(AsyncChatAgent, n, async_client=client)
        else:
            client = make_sync_client(base_url, connections=CONNECTIONS, max_retries=retries)
            self.model = HttpModel(SyncChatAgent, n, client=client)
        self.samples: list[dict[str, Any]] = []

    @property
    def name(self) -> str:
        if self.limit:
            return f"{self.mode}, rate_limit={self.limit:g}/s"
        return f"{self.mode}, no limit, max_retries={self.retries}"

    def run(self, server: ServerProcess) -> None:
        settings.reset()
        options: dict[str, Any] = {"rate_limit": self.limit} if self.limit else {}
        if self.mode == "threading":
            options["max_workers"] = WORKERS
        enable_automatic_parallel_stepping(self.mode, **options)
        time.sleep(DRAIN)
        server.reset_stats()
        sample = timed(self.model, self.model.step)
        stats = server.stats()
        self.samples.append(
            {
                "seconds": sample.seconds,
                "answered": sample.answered,
                "failures": sample.failures,
                "requests": stats["requests"],
                "rate_limited": stats["rate_limited"],
            }
        )
        settings.reset()

    def close(self) -> None:
        if self.mode == "asyncio":
            thread_loop().run_until_complete(self.model.async_client.close())
        else:
            self.model.client.close()


def rate_limit(cfg: Config) -> list[Row]:
    """Scenario 8, both modes."""
    prepare_http()
    quota, n = (100, 150) if cfg.quick else (200, 600)
    limit = HEADROOM * quota
    ideal = n / quota
    repeats = cfg.http_repeats
    rows: list[Row] = []
    with ServerProcess(latency=LATENCY, rate_limit=quota) as server:
        variants = []
        for mode in ("asyncio", "threading"):
            variants.append(_Variant(mode, limit=limit, retries=0, base_url=server.base_url, n=n))
        if not cfg.quick:
            for mode in ("asyncio", "threading"):
                for retries in (0, 2):
                    variants.append(
                        _Variant(mode, limit=None, retries=retries, base_url=server.base_url, n=n)
                    )
        else:
            variants.append(
                _Variant("asyncio", limit=None, retries=0, base_url=server.base_url, n=n)
            )
        try:
            limited = [v for v in variants if v.limit]
            unlimited = [v for v in variants if not v.limit]
            for round_ in range(repeats):
                for offset in range(len(limited)):
                    limited[(round_ + offset) % len(limited)].run(server)
                if round_ == 0:
                    for variant in unlimited:
                        variant.run(server)
        finally:
            for variant in variants:
                variant.close()
    for variant in variants:
        rows.append(_row(variant, quota=quota, ideal=ideal))
    return rows


def _row(v: _Variant, *, quota: int, ideal: float) -> Row:
    times = Stats.of([s["seconds"] for s in v.samples])
    refused = [s["rate_limited"] for s in v.samples]
    failed = [v.n - s["answered"] for s in v.samples]
    ratio = times.median / ideal
    data = {
        "mode": v.mode,
        "n": v.n,
        "quota": quota,
        "limit": v.limit,
        "max_retries": v.retries,
        "ideal": ideal,
        "latency": LATENCY,
        "step": times.as_dict(),
        "ratio_to_ideal": ratio,
        "samples": v.samples,
        "rate_limited_per_step": refused,
        "failed_agents_per_step": failed,
        "client": client_settings(CONNECTIONS, v.retries),
    }
    head = f"8. quota {quota}/s (429 beyond), {v.n} agents x {LATENCY * 1e3:.0f} ms, {v.name}"
    if v.limit:
        met = max(refused) == 0 and max(failed) == 0 and ratio <= TARGET_RATIO
        return Row(
            key=f"ratelimit_{v.mode}_limited",
            scenario=head,
            measured=f"{fmt_stats(times)}; 429s per step {refused}",
            baseline=f"ideal {v.n} / {quota} = {fmt_time(ideal)}",
            ratio=f"{ratio:.3f}x ideal",
            target=f"0 x 429 and <= {TARGET_RATIO}x ideal",
            met=met,
            reference="- (no rate limit)",
            data=data,
        )
    return Row(
        key=f"ratelimit_{v.mode}_unlimited_retries{v.retries}",
        scenario=head,
        measured=(
            f"{fmt_time(times.median)}; 429s {refused[0]}, agents without an answer {failed[0]}"
        ),
        baseline=f"ideal {fmt_time(ideal)}",
        ratio=f"{ratio:.2f}x ideal",
        target="- (info)",
        met=None,
        reference="-",
        data=data,
    )
