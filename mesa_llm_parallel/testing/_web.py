"""The loopback server's HTTP layer on aiohttp's low-level web server.

aiohttp parses the requests (request line, headers, ``Content-Length`` and chunked
bodies, keep-alive, pipelining) and refuses malformed ones with ``400`` before they
reach the server; this module counts connections, answers ``Expect: 100-continue``,
reads bodies of up to :data:`MAX_BODY` bytes and writes the server's answers, JSON or
server-sent events.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from aiohttp import web

#: Largest request body accepted, in bytes (larger ones get 413).
MAX_BODY: Final = 16 * 1024 * 1024

#: The server's answer: status, JSON object or events, extra headers.
type Answer = tuple[int, Mapping[str, Any] | Sequence[Mapping[str, Any]], Mapping[str, str]]

#: ``answer(method, path, body) -> Answer``, awaited for every request.
type Answerer = Callable[[str, str, bytes], Awaitable[Answer]]

_SERVER: Final = "mesa-llm-parallel-loopback"

_logger = logging.getLogger("mesa_llm_parallel.testing")


def import_web() -> Any:
    """The ``aiohttp.web`` module.

    Raises:
        ImportError: aiohttp is not installed; the message names the extra.
    """
    try:
        from aiohttp import web
    except ImportError as exc:
        raise ImportError(
            "LoopbackLLMServer serves HTTP with aiohttp: "
            "pip install 'mesa_llm_parallel[testing]' (or 'aiohttp>=3.9')"
        ) from exc
    return web


def error_body(
    message: str, kind: str, code: str | None = None, *, param: str | None = None
) -> dict[str, Any]:
    """An OpenAI-style error object.

    Args:
        message: What went wrong.
        kind: The error's ``type`` (``"invalid_request_error"``, ``"server_error"``...).
        code: The error's ``code``, if any.
        param: The request field at fault (``"tool_choice"``, ``"messages[2].role"``...).
    """
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def start(
    answer: Answerer,
    *,
    host: str,
    port: int,
    idle_timeout: float,
    on_open: Callable[[], None],
    on_close: Callable[[], None],
) -> tuple[int, Callable[[], Awaitable[None]]]:
    """Serve on ``host:port``; return the port and ``close()``, which closes every connection.

    ``on_open``/``on_close`` are called as each connection opens and closes.
    """
    web = import_web()
    from aiohttp.web_protocol import RequestHandler

    class Handler(RequestHandler):
        def handle_error(
            self,
            request: Any,
            status: int = 500,
            exc: BaseException | None = None,
            message: str | None = None,
        ) -> Any:
            """A request aiohttp could not read: an OpenAI-style error, then close."""
            text = message or (str(exc) if exc is not None else "") or "bad request"
            kind = "server_error" if status >= 500 else "invalid_request_error"
            response = _json(web, status, error_body(text, kind), {})
            response.force_close()
            return response

    class Server(web.Server):  # counts connections, makes Handlers
        def __call__(self) -> RequestHandler:
            return Handler(self, loop=asyncio.get_running_loop(), **self._kwargs)

        def connection_made(self, handler: RequestHandler, transport: Any) -> None:
            super().connection_made(handler, transport)
            on_open()

        def connection_lost(
            self, handler: RequestHandler, exc: BaseException | None = None
        ) -> None:
            super().connection_lost(handler, exc)
            on_close()

    def too_large() -> web.Response:
        message = f"request body larger than {MAX_BODY} bytes"
        response = _json(web, 413, error_body(message, "invalid_request_error"), {})
        response.force_close()
        return response

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        length = request.content_length
        if length is not None and length > MAX_BODY:  # refused before it is sent
            return too_large()
        expect = request.headers.get("Expect", "").lower()
        if expect == "100-continue" and request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:  # a chunked body grew too large
            return too_large()
        try:
            status, payload, headers = await answer(request.method, request.path, body)
        except (Exception, asyncio.CancelledError):
            raise  # aiohttp answers an Exception with 500; a cancellation ends the request
        except BaseException as exc:  # SystemExit, KeyboardInterrupt...: never stop the loop
            text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            message = f"the server failed to answer: {text}"
            _logger.exception("LoopbackLLMServer: %s; the client gets a 500", message)
            return _json(web, 500, error_body(message, "server_error"), {})
        if isinstance(payload, Mapping):
            return _json(web, status, payload, headers)
        response = web.StreamResponse(
            status=status,
            headers={
                "server": _SERVER,
                "content-type": "text/event-stream; charset=utf-8",
                "cache-control": "no-cache",
                **headers,
            },
        )
        if request.version >= (1, 1):
            response.enable_chunked_encoding()
        await response.prepare(request)
        for event in payload:
            await response.write(f"data: {json.dumps(event, separators=(',', ':'))}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def make_request(*args: Any) -> Any:  # (message, payload, protocol, writer, task)
        return web.BaseRequest(*args, asyncio.get_running_loop(), client_max_size=MAX_BODY)

    server = Server(
        handle,
        request_factory=make_request,
        handler_cancellation=True,
        keepalive_timeout=idle_timeout,
        lingering_time=0,  # a refused body is not read: the connection closes at once
        access_log=None,
    )
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(server, host, port, backlog=4096, reuse_address=True)

    async def close() -> None:
        listener.close()
        server.pre_shutdown()
        # Requests still being answered are cancelled (aiohttp waits for none when
        # the timeout is this short; 0 would mean no timeout at all).
        await server.shutdown(0.001)

    return listener.sockets[0].getsockname()[1], close


def _json(web: Any, status: int, payload: Mapping[str, Any], headers: Mapping[str, str]) -> Any:
    return web.Response(
        status=status,
        body=json.dumps(payload, separators=(",", ":")).encode(),
        headers={"server": _SERVER, "content-type": "application/json", **headers},
    )
