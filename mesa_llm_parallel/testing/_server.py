"""A loopback OpenAI-compatible chat-completions server, for demos and tests.

Core objects: :class:`LoopbackLLMServer` (the server), :class:`ServerStats` (what it
counted) and :class:`Latency` (how long each answer takes). What it answers is
:func:`~mesa_llm_parallel.testing.default_reply` unless a reply hook says otherwise.

The server listens on ``127.0.0.1`` on a free port and runs its own event loop in a
daemon thread, so it works the same from a script, a test, a notebook cell or a UI
thread, whatever loop the caller runs::

    from openai import OpenAI
    from mesa_llm_parallel.testing import LoopbackLLMServer

    with LoopbackLLMServer(latency=0.05, max_concurrent=32, rate_limit=100) as server:
        client = OpenAI(base_url=server.base_url, api_key="loopback")
        reply = client.chat.completions.create(
            model="loopback-chat", messages=[{"role": "user", "content": "Agree?"}]
        )
        print(reply.choices[0].message.content, server.stats().completed)

Endpoints: ``POST /v1/chat/completions`` answers in the shape of OpenAI's chat
completion object (text or ``tool_calls``; as server-sent ``chat.completion.chunk``
events with ``"stream": true``), and ``GET /v1/models`` lists one model. Every answer
is a function of the request: the reply (:func:`~mesa_llm_parallel.testing.default_reply`
by default) and the latency of the seed and the messages (:class:`Latency`), so a
seeded simulation gets the same answers after the same waits in every run, whatever
order its requests arrive in.

Three limits model a real provider:

* **latency**: each request is answered after a delay drawn from a distribution;
* **max_concurrent**: at most this many requests are served at once. Requests beyond
  it are *queued*, not refused: they wait in arrival order for a free slot, holding
  their connection, and their latency starts only once they have a slot;
* **rate_limit**: at most this many chat-completion requests are accepted in any
  sliding 1-second window. A request over the quota is answered at once with HTTP 429,
  a ``Retry-After`` header (whole seconds, at least 1), a ``retry-after-ms`` header
  (which the ``openai`` clients prefer) and an OpenAI-style error body. Refused
  requests do not count against the quota.

HTTP: aiohttp's low-level web server parses the requests (keep-alive, pipelining,
chunked bodies) and refuses malformed ones with ``400``; bodies over 16 MiB get ``413``.
It needs ``pip install "mesa_llm_parallel[testing]"``. It is a test server bound to
the loopback interface: no TLS, no authentication (any API key is accepted).

Threads: the server's counters are kept under a lock, so :meth:`LoopbackLLMServer.stats`
and :meth:`~LoopbackLLMServer.reset_stats` may be called from any thread while
requests are being served. :meth:`~LoopbackLLMServer.stop` closes every open
connection; a request still waiting for its answer then gets none.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import inspect
import itertools
import json
import logging
import math
import random
import re
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, Final, Self

from mesa_llm_parallel.testing import _web as web
from mesa_llm_parallel.testing._replies import (
    MESSAGE_ROLES,
    TOOL_CHOICES,
    ChatReply,
    ChatRequest,
    ReplyValue,
    Responder,
    ToolCall,
    _default_reply,
    _RequestError,
    _text_of,
    as_reply,
    default_reply,
    deterministic_reply,
    schema_example,
)

# The request and reply types are re-exported: ``mesa_llm_parallel.llm_server`` (this
# module under its former name) gives every name of the server's public interface.
__all__ = [
    "DEFAULT_MODEL",
    "LATENCY_KINDS",
    "MESSAGE_ROLES",
    "TOOL_CHOICES",
    "ChatReply",
    "ChatRequest",
    "Latency",
    "LatencySpec",
    "LoopbackLLMServer",
    "ReplyValue",
    "Responder",
    "ServerStats",
    "ToolCall",
    "default_reply",
    "deterministic_reply",
    "schema_example",
]

#: Where the server logs the tracebacks of what its callables raised.
logger = logging.getLogger("mesa_llm_parallel.testing")

#: The model name the server lists in ``GET /v1/models`` unless told otherwise.
DEFAULT_MODEL: Final = "loopback-chat"

#: The latency distributions by name, with the parameters each one takes.
LATENCY_KINDS: Final[Mapping[str, tuple[str, ...]]] = {
    "constant": ("seconds",),
    "uniform": ("low", "high"),
    "lognormal": ("mean", "sigma"),
    "gamma": ("mean", "shape"),
    "exponential": ("mean",),
}

#: A latency specification: seconds, ``(kind, params)``, or ``callable(rng) -> seconds``.
type LatencySpec = (
    float | tuple[str, Mapping[str, float]] | Callable[[random.Random], float] | Latency
)

_HOST: Final = "127.0.0.1"


# -- latency ------------------------------------------------------------------------
def _positive(kind: str, name: str, value: object, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"latency {kind!r}: {name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"latency {kind!r}: {name} must be finite and {bound}, got {value!r}")
    return float(value)


class Latency:
    """How long the server waits before answering a request.

    Each request's latency is drawn from a :class:`random.Random` seeded with the
    server's seed and a digest of the request's messages. It therefore depends only
    on what was asked, not on when or in which order requests arrived: a seeded
    simulation waits the same times in every run, even with hundreds of requests in
    flight. Identical requests wait identical times.

    Build one with :meth:`from_spec`. Accepted specifications:

    * a number: that many seconds for every request (``0.05``);
    * ``(kind, params)`` with a kind of :data:`LATENCY_KINDS`:
      ``("constant", {"seconds": s})``, ``("uniform", {"low": a, "high": b})``,
      ``("lognormal", {"mean": m, "sigma": s})`` (``sigma`` of the underlying normal),
      ``("gamma", {"mean": m, "shape": k})``, ``("exponential", {"mean": m})``;
    * a callable ``f(rng) -> seconds`` given the request's seeded generator;
    * a :class:`Latency` (used as it is).
    """

    __slots__ = ("_draw", "_seed", "description")

    def __init__(
        self, draw: Callable[[random.Random], float], *, seed: int = 0, description: str = ""
    ) -> None:
        if not callable(draw):
            raise TypeError(f"latency must be callable with a random.Random, got {draw!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self._draw = draw
        self._seed = seed
        self.description = description or getattr(draw, "__name__", "callable")

    @classmethod
    def from_spec(cls, spec: LatencySpec, *, seed: int = 0) -> Latency:
        """Build the latency of a specification (see the class docstring).

        Raises:
            TypeError: A specification or parameter of the wrong type.
            ValueError: An unknown kind, missing or extra parameters, or a bad value.
        """
        if isinstance(spec, Latency):
            return spec
        if isinstance(spec, bool):
            raise TypeError(f"latency must be seconds, (kind, params) or a callable, got {spec!r}")
        if isinstance(spec, int | float):
            seconds = _positive("constant", "seconds", spec, allow_zero=True)
            return cls(lambda _rng: seconds, seed=seed, description=f"constant {seconds:g} s")
        if isinstance(spec, tuple):
            return cls._from_kind(spec, seed)
        if callable(spec):
            return cls(spec, seed=seed)
        raise TypeError(
            f"latency must be seconds, (kind, params) or a callable, got {type(spec).__name__}"
        )

    @classmethod
    def _from_kind(cls, spec: tuple[Any, ...], seed: int) -> Latency:
        if len(spec) != 2 or not isinstance(spec[0], str) or not isinstance(spec[1], Mapping):
            raise TypeError(f"a latency distribution is (kind, {{param: value}}), got {spec!r}")
        kind, params = spec
        if kind not in LATENCY_KINDS:
            accepted = ", ".join(repr(k) for k in LATENCY_KINDS)
            raise ValueError(f"unknown latency kind {kind!r}; the kinds are: {accepted}")
        expected = LATENCY_KINDS[kind]
        if set(params) != set(expected):
            raise ValueError(
                f"latency {kind!r} takes the parameters {', '.join(expected)}; "
                f"got {', '.join(map(str, params)) or 'none'}"
            )
        p = {
            name: _positive(kind, name, params[name], allow_zero=kind in ("constant", "uniform"))
            for name in expected
        }
        draw: Callable[[random.Random], float]
        if kind == "constant":
            seconds = p["seconds"]
            draw = lambda _rng: seconds  # noqa: E731
        elif kind == "uniform":
            low, high = p["low"], p["high"]
            if high < low:
                raise ValueError(f"latency 'uniform': high ({high!r}) must be >= low ({low!r})")
            draw = lambda rng: rng.uniform(low, high)  # noqa: E731
        elif kind == "lognormal":
            sigma = p["sigma"]
            mu = math.log(p["mean"]) - sigma * sigma / 2  # so that the mean is `mean`
            draw = lambda rng: rng.lognormvariate(mu, sigma)  # noqa: E731
        elif kind == "gamma":
            shape, mean = p["shape"], p["mean"]
            draw = lambda rng: rng.gammavariate(shape, mean / shape)  # noqa: E731
        else:
            rate = 1.0 / p["mean"]
            draw = lambda rng: rng.expovariate(rate)  # noqa: E731
        described = ", ".join(f"{name}={p[name]:g}" for name in expected)
        return cls(draw, seed=seed, description=f"{kind}({described})")

    def seconds_for(self, messages: object) -> float:
        """The latency of a request with these messages, in seconds.

        Raises:
            ValueError: A callable latency returned a negative or non-finite value.
        """
        key = json.dumps(messages, sort_keys=True, separators=(",", ":"), default=str)
        digest = hashlib.sha256(key.encode()).hexdigest()
        rng = random.Random(f"{self._seed}:{digest}")  # noqa: S311 - a simulation, not secrets
        seconds = self._draw(rng)
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise TypeError(f"latency {self.description} returned {seconds!r}, not a number")
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"latency {self.description} returned {seconds!r} seconds")
        return float(seconds)

    def __repr__(self) -> str:
        return f"Latency({self.description}, seed={self._seed})"


# -- statistics ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class ServerStats:
    """What the server counted since it started or since :meth:`~LoopbackLLMServer.reset_stats`.

    Attributes:
        requests: ``POST /v1/chat/completions`` requests received, whatever the outcome.
        completed: Chat-completion requests answered with 200.
        rate_limited: Chat-completion requests answered with 429 (over the quota).
        errors: Chat-completion requests answered with another error: 400 (an invalid
            request) or 500 (a reply hook, reply function or latency that raised or
            returned something unusable).
        other_requests: Requests to any other path or with another method.
        in_flight: Requests being served right now (holding a slot, waiting their latency).
        queued: Requests waiting for a slot right now (over ``max_concurrent``).
        peak_concurrency: Most requests served at once; never above ``max_concurrent``.
        peak_queued: Most requests waiting for a slot at once.
        connections: TCP connections accepted. Fewer connections than requests means
            the clients reused connections (HTTP keep-alive).
        open_connections: Connections open right now.
        peak_connections: Most connections open at once.
    """

    requests: int = 0
    completed: int = 0
    rate_limited: int = 0
    errors: int = 0
    other_requests: int = 0
    in_flight: int = 0
    queued: int = 0
    peak_concurrency: int = 0
    peak_queued: int = 0
    connections: int = 0
    open_connections: int = 0
    peak_connections: int = 0


class _Counters:
    """The mutable counters behind :class:`ServerStats`, guarded by one lock."""

    __slots__ = ("lock", "values")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.values = {field.name: 0 for field in dataclasses.fields(ServerStats)}

    def add(self, name: str, amount: int = 1) -> None:
        with self.lock:
            self.values[name] += amount

    def enter(self, current: str, peak: str) -> None:
        with self.lock:
            values = self.values
            values[current] += 1
            if values[current] > values[peak]:
                values[peak] = values[current]

    def move(self, leave: str, current: str, peak: str) -> None:
        """One request leaves ``leave`` and enters ``current`` (tracking its peak)."""
        with self.lock:
            values = self.values
            values[leave] -= 1
            values[current] += 1
            if values[current] > values[peak]:
                values[peak] = values[current]

    def snapshot(self) -> ServerStats:
        with self.lock:
            return ServerStats(**self.values)

    def reset(self) -> None:
        """Zero the totals; peaks restart from what is open or in flight now."""
        with self.lock:
            v = self.values
            for name in v:
                if name not in ("in_flight", "queued", "open_connections"):
                    v[name] = 0
            v["peak_concurrency"] = v["in_flight"]
            v["peak_queued"] = v["queued"]
            v["peak_connections"] = v["open_connections"]


type _Answer = tuple[int, dict[str, Any] | list[dict[str, Any]], dict[str, str]]


# -- the server ---------------------------------------------------------------------
class LoopbackLLMServer:
    """An OpenAI-compatible chat-completions server on ``127.0.0.1``, in a thread.

    Args:
        latency: How long each request takes to answer, once it has a slot: seconds,
            ``(kind, params)`` or ``callable(rng) -> seconds`` (see :class:`Latency`).
        max_concurrent: Most requests served at once; the others queue in arrival
            order (None: no cap).
        rate_limit: Most chat-completion requests accepted in any 1-second window;
            the others are answered at once with 429 (None: no quota).
        seed: Seeds the latency draws.
        model: The model name listed by ``GET /v1/models``. Requests may name any
            model; the answer echoes the name they gave.
        reply: ``reply(last_user_message) -> str``, the text of the default answers
            (default :func:`~mesa_llm_parallel.testing.deterministic_reply`): the
            content of text answers and the strings of JSON answers; requests that
            offer tools still get tool calls (see
            :func:`~mesa_llm_parallel.testing.default_reply`). It may be an
            ``async def`` function, which the server awaits.
        respond: ``respond(request) -> str | ToolCall | Sequence[ToolCall] | ChatReply``,
            the whole answer to each :class:`~mesa_llm_parallel.testing.ChatRequest`
            (every message, ``tools``, ``tool_choice``, ``response_format``...). It
            may call :func:`~mesa_llm_parallel.testing.default_reply` for the default.
            Give ``reply`` or ``respond``, not both. It runs on the server's event
            loop, in the server's thread: a plain function blocks every other request
            while it runs, so keep it quick; an ``async def`` one is awaited there, so
            other requests are served while it awaits. Make it thread-safe if it
            shares state. When it raises, whatever it raises (``pytest.fail``'s
            ``Failed``, ``SystemExit`` and ``KeyboardInterrupt`` too), the client gets
            a 500 naming the exception (``"the reply hook raised ValueError: ..."``),
            the traceback is logged at ERROR on the ``mesa_llm_parallel.testing``
            logger, and the server goes on serving.
        port: The port to listen on (default 0: a free port chosen by the system).
        idle_timeout: Seconds an idle keep-alive connection stays open.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`.

    Raises:
        ImportError: aiohttp, which serves the HTTP, is not installed (``pip install
            "mesa_llm_parallel[testing]"``).
        TypeError: An argument of the wrong type.
        ValueError: An argument out of range.
    """

    def __init__(
        self,
        *,
        latency: LatencySpec = 0.0,
        max_concurrent: int | None = None,
        rate_limit: int | None = None,
        seed: int = 0,
        model: str = DEFAULT_MODEL,
        reply: Callable[[str], str | Awaitable[str]] | None = None,
        respond: Responder | None = None,
        port: int = 0,
        idle_timeout: float = 60.0,
    ) -> None:
        self._latency = Latency.from_spec(latency, seed=seed)
        self._max_concurrent = _optional_count("max_concurrent", max_concurrent)
        self._rate_limit = _optional_count("rate_limit", rate_limit)
        if not isinstance(model, str):
            raise TypeError(f"model must be a str, got {model!r}")
        if not model:
            raise ValueError("model must be a non-empty name")
        self._model = model
        if reply is not None and not callable(reply):
            raise TypeError(f"reply must be callable(str) -> str or None, got {reply!r}")
        self._reply = reply or deterministic_reply
        if respond is not None and not callable(respond):
            raise TypeError(f"respond must be callable(ChatRequest) or None, got {respond!r}")
        if respond is not None and reply is not None:
            raise ValueError(
                "give reply (the text of the default answers) or respond (whole answers), not both"
            )
        self._respond_hook = respond
        web.import_web()  # ImportError naming the extra, before any thread starts
        if isinstance(port, bool) or not isinstance(port, int):
            raise TypeError(f"port must be an int, got {port!r}")
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be from 0 to 65535, got {port!r}")
        self._requested_port = port
        if isinstance(idle_timeout, bool) or not isinstance(idle_timeout, int | float):
            raise TypeError(f"idle_timeout must be a number of seconds, got {idle_timeout!r}")
        if not math.isfinite(idle_timeout) or idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be finite and > 0 seconds, got {idle_timeout!r}")
        self._idle_timeout = float(idle_timeout)

        self._counters = _Counters()
        self._window: collections.deque[float] = collections.deque()  # accepted request times
        self._ids = itertools.count(1)
        self._state_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._port: int | None = None
        self._stopped = False
        self._slots: asyncio.Semaphore | None = None

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> Self:
        """Bind a port and start serving in a background thread; return the server.

        Raises:
            RuntimeError: The server was already started (a server runs once).
            OSError: The port could not be bound.
        """
        with self._state_lock:
            if self._thread is not None or self._stopped:
                raise RuntimeError("this server was already started or stopped; create a new one")
            ready = threading.Event()
            failure: list[BaseException] = []
            thread = threading.Thread(
                target=self._run,
                args=(ready, failure),
                name="mesa-llm-loopback-server",
                daemon=True,
            )
            self._thread = thread
            thread.start()
            ready.wait()
            if failure:
                self._stopped = True
                thread.join()
                raise failure[0]
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Close every connection, stop the loop and join the thread (idempotent).

        A request still waiting for its answer gets none: its connection is closed.
        """
        with self._state_lock:
            thread, loop = self._thread, self._loop
            self._stopped = True
        if thread is None or loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop already stopped
            loop.call_soon_threadsafe(loop.stop)
        if thread is not threading.current_thread():
            thread.join(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- configuration (fixed when the server is made) -----------------------------------
    @property
    def latency(self) -> Latency:
        """How long each request is served."""
        return self._latency

    @property
    def max_concurrent(self) -> int | None:
        """Most requests served at once (None: no cap)."""
        return self._max_concurrent

    @property
    def rate_limit(self) -> int | None:
        """Most chat-completion requests accepted in any 1-second window (None: no quota)."""
        return self._rate_limit

    @property
    def model(self) -> str:
        """The model name listed by ``GET /v1/models``."""
        return self._model

    @property
    def running(self) -> bool:
        """Whether the server is serving requests."""
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._stopped

    @property
    def port(self) -> int:
        """The port the server listens on.

        Raises:
            RuntimeError: The server has not been started.
        """
        if self._port is None:
            raise RuntimeError("the server has no port until it is started")
        return self._port

    @property
    def base_url(self) -> str:
        """The URL to give an OpenAI client, ``http://127.0.0.1:PORT/v1``."""
        return f"http://{_HOST}:{self.port}/v1"

    def __repr__(self) -> str:
        where = self.base_url if self._port is not None else "not started"
        return (
            f"<LoopbackLLMServer {where} latency={self.latency.description} "
            f"max_concurrent={self.max_concurrent} rate_limit={self.rate_limit}>"
        )

    # -- statistics -------------------------------------------------------------------
    def stats(self) -> ServerStats:
        """What the server has counted so far (a consistent snapshot; any thread)."""
        return self._counters.snapshot()

    def reset_stats(self) -> None:
        """Zero the totals (any thread). The quota's window is not reset."""
        self._counters.reset()

    # -- the server thread ------------------------------------------------------------
    def _run(self, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            server = loop.run_until_complete(self._open())
        except BaseException as exc:  # reported to start() in the caller's thread
            failure.append(exc)
            loop.close()
            ready.set()
            return
        self._loop = loop
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(server())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _open(self) -> Callable[[], Awaitable[None]]:
        if self._max_concurrent is not None:
            self._slots = asyncio.Semaphore(self._max_concurrent)
        counters = self._counters

        def opened() -> None:
            counters.add("connections")
            counters.enter("open_connections", "peak_connections")

        self._port, close = await web.start(
            self._answer,
            host=_HOST,
            port=self._requested_port,
            idle_timeout=self._idle_timeout,
            on_open=opened,
            on_close=lambda: counters.add("open_connections", -1),
        )
        return close

    async def _answer(self, method: str, target: str, body: bytes) -> _Answer:
        path = target.rstrip("/")
        if path == "/v1/chat/completions":
            if method == "POST":
                return await self._chat_completion(body)
            allowed = "POST"
        elif path == "/v1/models":
            if method == "GET":
                self._counters.add("other_requests")
                return 200, self._models(), {}
            allowed = "GET"
        else:
            self._counters.add("other_requests")
            message = f"unknown path {target!r}; this server has /v1/chat/completions"
            return 404, web.error_body(message, "invalid_request_error", "unknown_url"), {}
        self._counters.add("other_requests")
        message = f"{method} is not allowed on {target}; use {allowed}"
        return 405, web.error_body(message, "invalid_request_error"), {"allow": allowed}

    def _models(self) -> dict[str, Any]:
        entry = {"id": self.model, "object": "model", "created": 0, "owned_by": "mesa-llm-parallel"}
        return {"object": "list", "data": [entry]}

    def _admit(self) -> float | None:
        """Count the request against the quota; None if admitted, else seconds to wait."""
        quota = self._rate_limit
        if quota is None:
            return None
        now = time.monotonic()
        window = self._window
        while window and window[0] <= now - 1.0:
            window.popleft()
        if len(window) >= quota:
            return window[0] + 1.0 - now
        window.append(now)
        return None

    def _quota_headers(self) -> dict[str, str]:
        if self.rate_limit is None:
            return {}
        remaining = max(0, self.rate_limit - len(self._window))
        return {
            "x-ratelimit-limit-requests": str(self.rate_limit),
            "x-ratelimit-remaining-requests": str(remaining),
        }

    async def _chat_completion(self, body: bytes) -> _Answer:
        counters = self._counters
        counters.add("requests")
        wait = self._admit()
        if wait is not None:
            counters.add("rate_limited")
            message = (
                f"Rate limit reached: at most {self.rate_limit} requests per second. "
                f"Please try again in {wait * 1000:.0f}ms."
            )
            headers = {
                "retry-after": str(max(1, math.ceil(wait))),
                "retry-after-ms": str(max(1, math.ceil(wait * 1000))),
                **self._quota_headers(),
            }
            return 429, web.error_body(message, "requests", "rate_limit_exceeded"), headers
        try:
            request = _read_chat_request(body)
        except ValueError as exc:
            counters.add("errors")
            error = web.error_body(str(exc), "invalid_request_error", param=_param(exc))
            return 400, error, self._quota_headers()
        slots = self._slots
        if slots is None or not slots.locked():
            if slots is not None:
                await slots.acquire()  # free: returns at once
            counters.enter("in_flight", "peak_concurrency")
        else:  # every slot is taken: wait in line
            counters.enter("queued", "peak_queued")
            try:
                await slots.acquire()
            except BaseException:  # cancelled while queued (the server stops)
                counters.add("queued", -1)
                raise
            counters.move("queued", "in_flight", "peak_concurrency")
        try:
            seconds = await _call("the latency", self._latency.seconds_for, list(request.messages))
            if seconds:
                await asyncio.sleep(seconds)
            reply = await self._respond(request)
        except _RequestError as exc:  # a schema the default reply cannot meet
            counters.add("errors")
            error = web.error_body(str(exc), "invalid_request_error", param=exc.param)
            return 400, error, self._quota_headers()
        except Exception as exc:  # a faulty latency or reply hook (logged by _call)
            counters.add("errors")
            return 500, web.error_body(str(exc), "server_error"), {}
        finally:
            counters.add("in_flight", -1)
            if slots is not None:
                slots.release()
        counters.add("completed")
        completion_id = f"chatcmpl-loopback-{next(self._ids)}"
        return 200, _completion(completion_id, request, reply), self._quota_headers()

    async def _respond(self, request: ChatRequest) -> ChatReply:
        """The reply to a request: the hook's (checked) or the default one.

        Raises:
            _CallbackError: The hook or the reply function raised.
            TypeError: The hook or the reply function returned something unusable.
            _RequestError: The default reply needs a value of a schema that has none.
        """
        if self._respond_hook is not None:
            return as_reply(await _call("the reply hook", self._respond_hook, request))
        # The default reply uses the reply function's text of the prompt exactly once.
        content = await _call("the reply function", self._reply, request.prompt)
        if not isinstance(content, str):
            raise TypeError(f"the reply function returned {content!r}, not a str")
        return _default_reply(request, lambda _prompt: content)


class _CallbackError(Exception):
    """A user's callable raised; the message names it and the exception."""


async def _call(what: str, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)``, awaited if it returns an awaitable (an ``async def`` hook).

    Whatever it raises is logged and re-raised naming ``what``: ``BaseException`` s
    too, for it runs in the server's thread, where ``SystemExit``,
    ``KeyboardInterrupt`` or pytest's ``Failed`` would otherwise stop the server's
    loop or drop the connection. Only the cancellation of the request's own task (the
    server stops, or the client went away) goes through as it is.

    Raises:
        _CallbackError: ``function`` raised; the message is ``"<what> raised
            <type>: <text>"`` and the traceback is logged at ERROR.
        asyncio.CancelledError: The request's task was cancelled.
    """
    try:
        result = function(*args)
        if inspect.isawaitable(result):
            result = await result
    except _CallbackError:
        raise
    except BaseException as exc:
        if isinstance(exc, asyncio.CancelledError) and _being_cancelled():
            raise
        message = f"{what} raised {_describe(exc)}"
        logger.exception("LoopbackLLMServer: %s; the client gets a 500", message)
        raise _CallbackError(message) from exc
    return result


def _being_cancelled() -> bool:
    """Whether the running task has been asked to stop (its cancellation, not a hook's)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _describe(exc: BaseException) -> str:
    """``"<type>: <text>"`` of an exception, even when its ``__str__`` raises."""
    name = type(exc).__name__
    try:
        text = str(exc)
    except Exception:  # an unprintable exception is still reported
        try:
            text = repr(exc)
        except Exception:
            text = f"<unprintable {name} object>"
    return f"{name}: {text}" if text else name


def _param(exc: BaseException) -> str | None:
    """The field an invalid request's error names (``param`` of the error body)."""
    param = getattr(exc, "param", None)
    return param if isinstance(param, str) else None


def _optional_count(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int or None, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int or None (>= 1), got {value!r}")
    return value


def _read_chat_request(body: bytes) -> ChatRequest:
    """The request of a body.

    Raises:
        ValueError: The body is not a valid chat-completion request.
    """
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"the request body is not valid JSON: {exc}") from None
    return ChatRequest.from_body(data)


def _words(text: str) -> int:
    return len(text.split())


def _call_ids(request: ChatRequest, reply: ChatReply) -> list[str]:
    """Each tool call's id: its own, or a digest of the messages and its position."""
    ids = []
    key = None
    for index, call in enumerate(reply.tool_calls):
        if call.id is not None:
            ids.append(call.id)
            continue
        if key is None:
            key = json.dumps(request.messages, sort_keys=True, default=str).encode()
        digest = hashlib.sha256(key + b"%d" % index).hexdigest()
        ids.append(f"call_{digest[:24]}")
    return ids


def _completion(
    completion_id: str, request: ChatRequest, reply: ChatReply
) -> dict[str, Any] | list[dict[str, Any]]:
    """The chat-completion object of a reply, or its chunks when the request streams."""
    ids = _call_ids(request, reply)
    calls = [
        {
            "id": call_id,
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments_json()},
        }
        for call_id, call in zip(ids, reply.tool_calls, strict=True)
    ]
    content = reply.content
    prompt_tokens = sum(_words(_text_of(m.get("content"))) for m in request.messages)
    completion_tokens = _words(content or "") + sum(
        _words(c["function"]["arguments"]) + 1 for c in calls
    )
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    head = {
        "id": completion_id,
        "created": int(time.time()),
        "model": request.model,
        "system_fingerprint": "loopback",
    }
    if not request.stream:
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        if calls:
            message["tool_calls"] = calls
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": reply.finish_reason,
        }
        return {**head, "object": "chat.completion", "choices": [choice], "usage": usage}
    options = request.body.get("stream_options")
    include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": "" if content else None}]
    deltas += [{"content": piece} for piece in re.findall(r"\s*\S+\s*", content or "")]
    for index, call in enumerate(calls):
        function = call["function"]
        start = {"name": function["name"], "arguments": ""}
        deltas.append(
            {
                "tool_calls": [
                    {"index": index, "id": call["id"], "type": "function", "function": start}
                ]
            }
        )
        deltas.append(
            {"tool_calls": [{"index": index, "function": {"arguments": function["arguments"]}}]}
        )
    deltas.append({})
    chunk = {**head, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}
    events = [
        {
            **chunk,
            "choices": [
                {
                    "index": 0,
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": None if i < len(deltas) - 1 else reply.finish_reason,
                }
            ],
            **extra,
        }
        for i, delta in enumerate(deltas)
    ]
    if include_usage:
        events.append({**chunk, "choices": [], "usage": usage})
    return events
