"""The loopback server's HTTP/1.1 layer: a short, strict request parser and the writer.

Request line and headers in one bounded read, ``Content-Length`` or chunked bodies,
``Expect: 100-continue``, persistent connections by default in HTTP/1.1 and on request
in HTTP/1.0, pipelined requests answered in order, and a ``400``/``413``/``431``/
``501``/``505`` followed by closing the connection for anything else. Answers are JSON,
or server-sent events sent with the chunked transfer coding.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

MAX_HEAD: Final = 64 * 1024  # request line and headers together
MAX_BODY: Final = 16 * 1024 * 1024
MAX_HEADERS: Final = 100
BODY_TIMEOUT: Final = 30.0  # seconds to receive a body once its headers arrived
TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
REASONS: Final[Mapping[int, str]] = {
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


class HTTPError(Exception):
    """A request the server cannot read: answer ``status`` and close the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclasses.dataclass(slots=True)
class Request:
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


def parse_head(head: bytes) -> Request:
    lines = head.split(b"\r\n")
    request_line = lines[0]
    parts = request_line.split(b" ")
    if len(parts) != 3 or not all(parts):
        raise HTTPError(400, "malformed request line")
    method, target, version = parts
    if not TOKEN.fullmatch(method):
        raise HTTPError(400, "malformed method")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        if re.fullmatch(rb"HTTP/\d\.\d", version):
            raise HTTPError(505, f"HTTP version {version.decode()} is not supported")
        raise HTTPError(400, "malformed HTTP version")
    if len(lines) - 1 > MAX_HEADERS:
        raise HTTPError(431, f"more than {MAX_HEADERS} header fields")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not TOKEN.fullmatch(name):  # also refuses obsolete line folding
            raise HTTPError(400, "malformed header field")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    path = target.decode("latin-1").partition("?")[0]
    return Request(method.decode("ascii"), path, version.decode("ascii"), headers)


def content_length(raw: str) -> int:
    values = {v.strip() for v in raw.split(",")}
    if len(values) != 1:
        raise HTTPError(400, "conflicting Content-Length values")
    value = values.pop()
    if not value.isascii() or not value.isdigit():
        raise HTTPError(400, "malformed Content-Length")
    length = int(value)
    if length > MAX_BODY:
        raise HTTPError(413, f"request body larger than {MAX_BODY} bytes")
    return length


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        line = await reader.readuntil(b"\r\n")
        size_text = line[:-2].partition(b";")[0].strip()
        if not size_text or not re.fullmatch(rb"[0-9A-Fa-f]{1,16}", size_text):
            raise HTTPError(400, "malformed chunk size")
        size = int(size_text, 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # skip trailer fields
                pass
            return b"".join(chunks)
        total += size
        if total > MAX_BODY:
            raise HTTPError(413, f"request body larger than {MAX_BODY} bytes")
        chunks.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise HTTPError(400, "chunk not followed by CRLF")


def error_body(message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


async def write_continue(writer: asyncio.StreamWriter, request: Request) -> None:
    """Answer ``Expect: 100-continue`` before reading the body."""
    if request.version == "HTTP/1.1" and request.headers.get("expect", "").lower() == (
        "100-continue"
    ):
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()


async def write(
    writer: asyncio.StreamWriter,
    status: int,
    payload: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    headers: Mapping[str, str],
    version: str,
    keep_alive: bool,
) -> None:
    """Write one answer: a JSON object, or (a sequence) server-sent events.

    Events are sent as ``data: {json}`` lines ending in ``data: [DONE]``, in the
    chunked transfer coding (HTTP/1.1) or with a length (HTTP/1.0).
    """
    lines = [
        f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}",
        f"date: {email.utils.formatdate(usegmt=True)}",
        "server: mesa-llm-parallel-loopback",
    ]
    if isinstance(payload, Mapping):
        body = json.dumps(payload, separators=(",", ":")).encode()
        lines += ["content-type: application/json", f"content-length: {len(body)}"]
    else:
        events = [f"data: {json.dumps(e, separators=(',', ':'))}\n\n".encode() for e in payload]
        events.append(b"data: [DONE]\n\n")
        lines += ["content-type: text/event-stream; charset=utf-8", "cache-control: no-cache"]
        if version == "HTTP/1.1":
            lines.append("transfer-encoding: chunked")
            body = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
        else:
            body = b"".join(events)
            lines.append(f"content-length: {len(body)}")
    if not keep_alive:
        lines.append("connection: close")
    elif version == "HTTP/1.0":
        lines.append("connection: keep-alive")
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    await writer.drain()
