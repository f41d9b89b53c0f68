"""A loopback OpenAI-compatible chat-completions server, for demos and tests.

Core objects: :class:`LoopbackLLMServer` (the server), :class:`ServerStats` (what it
counted), :class:`Latency` (how long each answer takes) and :func:`deterministic_reply`
(what it answers).

The server listens on ``127.0.0.1`` on a free port and runs its own event loop in a
daemon thread, so it works the same from a script, a test, a notebook cell or a UI
thread, whatever loop the caller runs::

    from openai import OpenAI
    from mesa_llm_parallel.llm_server import LoopbackLLMServer

    with LoopbackLLMServer(latency=0.05, max_concurrent=32, rate_limit=100) as server:
        client = OpenAI(base_url=server.base_url, api_key="loopback")
        reply = client.chat.completions.create(
            model="loopback-chat", messages=[{"role": "user", "content": "Agree?"}]
        )
        print(reply.choices[0].message.content, server.stats().completed)

Endpoints: ``POST /v1/chat/completions`` answers in the shape of OpenAI's chat
completion object, and ``GET /v1/models`` lists one model. Every answer is a function
of the request: the reply of the last user message (:func:`deterministic_reply` by
default) and the latency of the seed and the messages (:class:`Latency`), so a seeded
simulation gets the same answers after the same waits in every run, whatever order its
requests arrive in.

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

Why the standard library: the server needs two JSON endpoints over HTTP/1.1 with
keep-alive, which ``asyncio`` streams plus a short, strict request parser cover, so it
ships with the package without adding a dependency (the demo's ``--server`` needs only
the ``openai`` client). One event loop serves thousands of idle keep-alive
connections cheaply, and the parser's scope is small enough to be exact: request line
and headers in one bounded read, ``Content-Length`` or chunked bodies, ``Expect:
100-continue``, persistent connections by default in HTTP/1.1 and on request in
HTTP/1.0, pipelined requests answered in order, and a ``400``/``413``/``431``/``501``/
``505`` followed by closing the connection for anything else. It is a test server
bound to the loopback interface: no TLS, no authentication (any API key is accepted),
no streaming responses.

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
import email.utils
import hashlib
import itertools
import json
import math
import random
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, Self

__all__ = [
    "DEFAULT_MODEL",
    "LATENCY_KINDS",
    "Latency",
    "LatencySpec",
    "LoopbackLLMServer",
    "ServerStats",
    "deterministic_reply",
]

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
_MAX_HEAD: Final = 64 * 1024  # request line and headers together
_MAX_BODY: Final = 16 * 1024 * 1024
_MAX_HEADERS: Final = 100
_BODY_TIMEOUT: Final = 30.0  # seconds to receive a body once its headers arrived
_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_REASONS: Final[Mapping[int, str]] = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    505: "HTTP Version Not Supported",
}


def deterministic_reply(prompt: str) -> str:
    """The server's default answer to a prompt: ``"agree"`` or ``"disagree"``.

    A pure function of the text (about two thirds of prompts get ``"agree"``), so
    agents that act on the answer make the same decisions in every run. It is the
    same rule as the demo's simulated language model.
    """
    digest = hashlib.sha256(prompt.encode()).digest()
    return "agree" if digest[0] % 3 else "disagree"


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
        errors: Chat-completion requests answered with another error (a bad body).
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


# -- HTTP ---------------------------------------------------------------------------
class _HTTPError(Exception):
    """A request the server cannot read: answer ``status`` and close the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclasses.dataclass(slots=True)
class _Request:
    method: str
    path: str
    version: str
    headers: dict[str, str]
    body: bytes = b""

    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        if self.version == "HTTP/1.1":
            return "close" not in tokens
        return "keep-alive" in tokens


def _parse_head(head: bytes) -> _Request:
    lines = head.split(b"\r\n")
    request_line = lines[0]
    parts = request_line.split(b" ")
    if len(parts) != 3 or not all(parts):
        raise _HTTPError(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise _HTTPError(400, "malformed method")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        if re.fullmatch(rb"HTTP/\d\.\d", version):
            raise _HTTPError(505, f"HTTP version {version.decode()} is not supported")
        raise _HTTPError(400, "malformed HTTP version")
    if len(lines) - 1 > _MAX_HEADERS:
        raise _HTTPError(431, f"more than {_MAX_HEADERS} header fields")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):  # also refuses obsolete line folding
            raise _HTTPError(400, "malformed header field")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    path = target.decode("latin-1").partition("?")[0]
    return _Request(method.decode("ascii"), path, version.decode("ascii"), headers)


def _content_length(raw: str) -> int:
    values = {v.strip() for v in raw.split(",")}
    if len(values) != 1:
        raise _HTTPError(400, "conflicting Content-Length values")
    value = values.pop()
    if not value.isascii() or not value.isdigit():
        raise _HTTPError(400, "malformed Content-Length")
    length = int(value)
    if length > _MAX_BODY:
        raise _HTTPError(413, f"request body larger than {_MAX_BODY} bytes")
    return length


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        line = await reader.readuntil(b"\r\n")
        size_text = line[:-2].partition(b";")[0].strip()
        if not size_text or not re.fullmatch(rb"[0-9A-Fa-f]{1,16}", size_text):
            raise _HTTPError(400, "malformed chunk size")
        size = int(size_text, 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # skip trailer fields
                pass
            return b"".join(chunks)
        total += size
        if total > _MAX_BODY:
            raise _HTTPError(413, f"request body larger than {_MAX_BODY} bytes")
        chunks.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise _HTTPError(400, "chunk not followed by CRLF")


def _error_body(message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _text_of(content: object) -> str:
    """The text of a message's content: a string, or a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text", ""), str)
        )
    return ""


def _words(text: str) -> int:
    return len(text.split())


type _Answer = tuple[int, dict[str, Any], dict[str, str]]


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
        reply: ``reply(last_user_message) -> str``, the assistant's answer
            (default :func:`deterministic_reply`).
        port: The port to listen on (default 0: a free port chosen by the system).
        idle_timeout: Seconds an idle keep-alive connection stays open.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`.

    Raises:
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
        reply: Callable[[str], str] | None = None,
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
        self._closing = False
        self._connections: set[asyncio.Task[None]] = set()
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
            loop.run_until_complete(self._close(server))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _open(self) -> asyncio.Server:
        if self._max_concurrent is not None:
            self._slots = asyncio.Semaphore(self._max_concurrent)
        server = await asyncio.start_server(
            self._serve_connection,
            _HOST,
            self._requested_port,
            backlog=4096,
            limit=_MAX_HEAD,
            reuse_address=True,
        )
        self._port = server.sockets[0].getsockname()[1]
        return server

    async def _close(self, server: asyncio.Server) -> None:
        self._closing = True
        server.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 5.0)

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:  # always, since asyncio runs this callback as a task
            self._connections.add(task)
        counters = self._counters
        counters.add("connections")
        counters.enter("open_connections", "peak_connections")
        try:
            while not self._closing:
                request = await self._read_request(reader, writer)
                if request is None:
                    return
                status, payload, headers = await self._answer(request)
                keep_alive = request.keep_alive()
                await _write(writer, status, payload, headers, request.version, keep_alive)
                if not keep_alive:
                    return
        except _HTTPError as exc:
            with contextlib.suppress(ConnectionError):
                body = _error_body(exc.message, "invalid_request_error")
                await _write(writer, exc.status, body, {}, "HTTP/1.1", keep_alive=False)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the client went away, or sent a body too slowly
        except asyncio.CancelledError:
            # Only stop() cancels connections. Ending normally matters: on Python 3.12.1,
            # asyncio's own done-callback for this task raises on a cancelled task.
            if not self._closing:
                raise
        finally:
            counters.add("open_connections", -1)
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()

    async def _read_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> _Request | None:
        """The next request on the connection, or None when the client is done."""
        try:
            async with asyncio.timeout(self._idle_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
                while head.startswith(b"\r\n"):  # stray CRLFs before a request are allowed
                    head = head[2:]
                    if not head.endswith(b"\r\n\r\n"):
                        head += await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise _HTTPError(431, f"request head larger than {_MAX_HEAD} bytes") from None
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            return None
        request = _parse_head(head[:-4])
        headers = request.headers
        async with asyncio.timeout(_BODY_TIMEOUT):
            if "transfer-encoding" in headers:
                if "content-length" in headers:
                    raise _HTTPError(400, "both Transfer-Encoding and Content-Length")
                if headers["transfer-encoding"].strip().lower() != "chunked":
                    raise _HTTPError(501, "only the chunked transfer coding is supported")
                await _continue(writer, request)
                request.body = await _read_chunked(reader)
            elif "content-length" in headers:
                length = _content_length(headers["content-length"])
                if length:
                    await _continue(writer, request)
                    request.body = await reader.readexactly(length)
        return request

    async def _answer(self, request: _Request) -> _Answer:
        path, method = request.path.rstrip("/"), request.method
        if path == "/v1/chat/completions":
            if method == "POST":
                return await self._chat_completion(request.body)
            allowed = "POST"
        elif path == "/v1/models":
            if method == "GET":
                self._counters.add("other_requests")
                return 200, self._models(), {}
            allowed = "GET"
        else:
            self._counters.add("other_requests")
            message = f"unknown path {request.path!r}; this server has /v1/chat/completions"
            return 404, _error_body(message, "invalid_request_error", "unknown_url"), {}
        self._counters.add("other_requests")
        message = f"{method} is not allowed on {request.path}; use {allowed}"
        return 405, _error_body(message, "invalid_request_error"), {"allow": allowed}

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
            return 429, _error_body(message, "requests", "rate_limit_exceeded"), headers
        try:
            model, messages, prompt = _read_chat_request(body)
        except ValueError as exc:
            counters.add("errors")
            return 400, _error_body(str(exc), "invalid_request_error"), self._quota_headers()
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
            seconds = self._latency.seconds_for(messages)
            if seconds:
                await asyncio.sleep(seconds)
            content = self._reply(prompt)
            if not isinstance(content, str):
                raise TypeError(f"reply returned {type(content).__name__}, not str")
        except Exception as exc:  # a faulty latency or reply callable
            counters.add("errors")
            return 500, _error_body(str(exc), "server_error"), {}
        finally:
            counters.add("in_flight", -1)
            if slots is not None:
                slots.release()
        counters.add("completed")
        prompt_tokens = sum(_words(_text_of(m.get("content"))) for m in messages)
        completion_tokens = _words(content)
        payload = {
            "id": f"chatcmpl-loopback-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "loopback",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
        return 200, payload, self._quota_headers()


def _optional_count(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int or None, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int or None (>= 1), got {value!r}")
    return value


def _read_chat_request(body: bytes) -> tuple[str, Sequence[Mapping[str, Any]], str]:
    """The model, the messages and the last user message's text of a request body.

    Raises:
        ValueError: The body is not a valid chat-completion request.
    """
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("the request body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise ValueError("'model' is required and must be a non-empty string")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' is required and must be a non-empty array")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError("every message must be an object with a 'role'")
    if data.get("stream"):
        raise ValueError("streaming ('stream': true) is not supported by the loopback server")
    users = [m for m in messages if m["role"] == "user"]
    prompt = _text_of(users[-1].get("content")) if users else ""
    return model, messages, prompt


async def _continue(writer: asyncio.StreamWriter, request: _Request) -> None:
    """Answer ``Expect: 100-continue`` before reading the body."""
    if request.version == "HTTP/1.1" and request.headers.get("expect", "").lower() == (
        "100-continue"
    ):
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()


async def _write(
    writer: asyncio.StreamWriter,
    status: int,
    payload: Mapping[str, Any],
    headers: Mapping[str, str],
    version: str,
    keep_alive: bool,
) -> None:
    body = json.dumps(payload, separators=(",", ":")).encode()
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
        f"date: {email.utils.formatdate(usegmt=True)}",
        "server: mesa-llm-parallel-loopback",
        "content-type: application/json",
        f"content-length: {len(body)}",
    ]
    if not keep_alive:
        lines.append("connection: close")
    elif version == "HTTP/1.0":
        lines.append("connection: keep-alive")
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    await writer.drain()
