"""The loopback OpenAI-compatible server: responses, tool calls, structured output,
streaming, HTTP/1.1, quota, cap, statistics, and the module's old names."""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import re
import socket
import statistics
import sys
import threading
import time

import pytest

from mesa_llm_parallel.testing import (
    LATENCY_KINDS,
    ChatReply,
    ChatRequest,
    Latency,
    LoopbackLLMServer,
    ServerStats,
    ToolCall,
    default_reply,
    deterministic_reply,
    schema_example,
)

CHAT = "/v1/chat/completions"


def _body(content: str = "Should I cooperate?", **extra) -> dict:
    return {"model": "test-model", "messages": [{"role": "user", "content": content}], **extra}


def _post(conn: http.client.HTTPConnection, payload, path: str = CHAT, headers=None):
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    conn.request("POST", path, data, {"content-type": "application/json", **(headers or {})})
    response = conn.getresponse()
    return response, json.loads(response.read())


def _tool(name: str, parameters: dict | None = None) -> dict:
    function = {"name": name, "description": f"{name} something"}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


def _named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


@pytest.fixture
def server():
    with LoopbackLLMServer() as running:
        yield running


@pytest.fixture
def conn(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    yield connection
    connection.close()


# -- responses ----------------------------------------------------------------------
def test_chat_completion_has_the_openai_shape(server, conn):
    response, data = _post(conn, _body("hello there"))
    assert response.status == 200
    assert response.getheader("content-type") == "application/json"
    assert data["id"].startswith("chatcmpl-")
    assert data["object"] == "chat.completion"
    assert isinstance(data["created"], int)
    assert data["model"] == "test-model"  # echoes the requested model
    (choice,) = data["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == deterministic_reply("hello there")
    assert choice["finish_reason"] == "stop"
    usage = data["usage"]
    assert usage == {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}


def test_replies_are_deterministic_and_follow_the_last_user_message(conn):
    prompts = [f"agent {i}, step 3" for i in range(30)]
    first = [_post(conn, _body(p))[1]["choices"][0]["message"]["content"] for p in prompts]
    again = [_post(conn, _body(p))[1]["choices"][0]["message"]["content"] for p in prompts]
    assert first == again == [deterministic_reply(p) for p in prompts]
    assert set(first) == {"agree", "disagree"}
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "agent 1, step 3"}]},
        {"role": "assistant", "content": "ok"},
    ]
    _, data = _post(conn, {"model": "m", "messages": messages})
    assert data["choices"][0]["message"]["content"] == deterministic_reply("agent 1, step 3")


def test_custom_reply_function():
    with LoopbackLLMServer(reply=str.upper) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        _, data = _post(conn, _body("shout"))
        conn.close()
    assert data["choices"][0]["message"]["content"] == "SHOUT"


def test_models_endpoint_lists_the_model():
    with LoopbackLLMServer(model="tiny-llm") as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", "/v1/models")
        response = conn.getresponse()
        data = json.loads(response.read())
        conn.close()
        assert server.stats().other_requests == 1
        assert server.stats().requests == 0
    assert response.status == 200
    assert data["object"] == "list"
    assert [(m["id"], m["object"]) for m in data["data"]] == [("tiny-llm", "model")]


def _schema_format(json_schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": json_schema}


@pytest.mark.parametrize(
    ("payload", "param", "fragment"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"[1, 2]", None, "JSON object"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model", "'model'"),
        ({"model": "m", "messages": []}, "messages", "'messages'"),
        ({"model": "m", "messages": ["hi"]}, "messages[0]", "messages[0] is 'hi'"),
        (
            {"model": "m", "messages": [{"content": "hi"}]},
            "messages[0].role",
            "messages[0] has no 'role'",
        ),
        (
            {
                "model": "m",
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "hi"},
                    {"role": "robot", "content": "beep"},
                ],
            },
            "messages[2].role",
            "messages[2] has the role 'robot'; a message's 'role' is one of 'system', "
            "'developer', 'user', 'assistant', 'tool', 'function'",
        ),
        (_body(stream="yes"), "stream", "'stream' must be true or false, got 'yes'"),
        (_body(tools={"f": 1}), "tools", "'tools' must be an array"),
        (_body(tools=[_tool("ok"), {"type": "function"}]), "tools[1]", "every tool must be"),
        (_body(tool_choice="always"), "tool_choice", "'tool_choice' must be one of 'none', 'auto'"),
        (
            _body(tools=[_tool("vote")], tool_choice=_named("abstain")),
            "tool_choice",
            "names the function 'abstain', which is not among the tools ['vote']",
        ),
        (
            _body(tool_choice="required"),
            "tool_choice",
            "'tool_choice' 'required' needs 'tools' to call, and the request offers none",
        ),
        (
            _body(tools=[], tool_choice=_named("vote")),
            "tool_choice",
            "needs 'tools' to call, and the request offers none",
        ),
        (
            _body(response_format={"type": "yaml"}),
            "response_format.type",
            "'type' is one of 'text', 'json_object'",
        ),
        (
            _body(response_format="json"),
            "response_format",
            "'response_format' must be an object",
        ),
        (
            _body(response_format={"type": "json_schema"}),
            "response_format.json_schema",
            "needs 'json_schema'",
        ),
        (
            _body(response_format=_schema_format({"name": "x"})),
            "response_format.json_schema.schema",
            "'response_format.json_schema' has no 'schema'",
        ),
        (
            _body(response_format=_schema_format({"name": "x", "schema": "object"})),
            "response_format.json_schema.schema",
            "has the schema 'object'",
        ),
        (
            _body(response_format=_schema_format({"schema": {"type": "object"}})),
            "response_format.json_schema.name",
            "'response_format.json_schema.name' must be 1 to 64 letters, digits, '_' or '-'",
        ),
        (
            _body(response_format=_schema_format({"name": "my answer", "schema": {}})),
            "response_format.json_schema.name",
            "got 'my answer'",
        ),
        (_body(seed=1.5), "seed", "'seed' must be an integer, got 1.5"),
    ],
)
def test_invalid_requests_get_openai_error_bodies(server, conn, payload, param, fragment):
    response, data = _post(conn, payload)
    assert response.status == 400
    assert data["error"]["type"] == "invalid_request_error"
    assert data["error"]["param"] == param
    assert fragment in data["error"]["message"]
    stats = server.stats()
    assert (stats.requests, stats.errors, stats.completed) == (1, 1, 0)
    assert _post(conn, _body())[0].status == 200  # the connection stays usable


@pytest.mark.parametrize(
    "extra",
    [
        {"tool_choice": "none"},
        {"tool_choice": "auto"},
        {"tools": [], "tool_choice": "auto"},
        {"messages": [{"role": r, "content": "x"} for r in ("developer", "user", "function")]},
    ],
)
def test_requests_the_api_accepts_are_answered(conn, extra):
    response, data = _post(conn, {**_body(), **extra})
    assert response.status == 200, data


def test_the_openai_client_sees_the_param_of_a_400():
    openai = _openai()
    with LoopbackLLMServer() as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0)
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}], tool_choice="required"
            )
        client.close()
    assert caught.value.param == "tool_choice"
    assert caught.value.status_code == 400


def test_unknown_path_and_wrong_method(server, conn):
    response, data = _post(conn, _body(), path="/v1/completions")
    assert response.status == 404
    assert "unknown path" in data["error"]["message"]
    conn.request("GET", CHAT)
    response = conn.getresponse()
    data = json.loads(response.read())
    assert response.status == 405
    assert response.getheader("allow") == "POST"
    assert server.stats().other_requests == 2
    assert server.stats().requests == 0


# -- HTTP/1.1 -----------------------------------------------------------------------
def test_keep_alive_reuses_one_connection(server, conn):
    for _ in range(5):
        assert _post(conn, _body())[0].status == 200
    stats = server.stats()
    assert (stats.connections, stats.requests, stats.completed) == (1, 5, 5)


def _raw_exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes, then read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _request(body: bytes, *headers: str, version: str = "HTTP/1.1") -> bytes:
    head = [f"POST {CHAT} {version}", "host: test", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def test_pipelined_requests_chunked_body_and_connection_close(server):
    body = json.dumps(_body()).encode()
    chunked = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (10, body[:10], len(body) - 10, body[10:])
    data = (
        _request(body, f"content-length: {len(body)}")
        + _request(chunked, "transfer-encoding: chunked")
        + _request(body, f"content-length: {len(body)}", "connection: close")
    )
    reply = _raw_exchange(server.port, data)  # returns once the server closed
    assert reply.count(b"HTTP/1.1 200 OK") == 3
    assert reply.lower().count(b"connection: close") == 1
    stats = server.stats()
    assert (stats.connections, stats.completed) == (1, 3)


def test_http_1_0_closes_unless_asked_to_keep_alive(server):
    body = json.dumps(_body()).encode()
    reply = _raw_exchange(
        server.port, _request(body, f"content-length: {len(body)}", version="HTTP/1.0")
    )
    assert re.match(rb"HTTP/1\.[01] 200 OK", reply)  # and closed: _raw_exchange returned
    data = _request(
        body, f"content-length: {len(body)}", "connection: keep-alive", version="HTTP/1.0"
    ) + _request(body, f"content-length: {len(body)}", version="HTTP/1.0")
    reply = _raw_exchange(server.port, data)
    assert len(re.findall(rb"HTTP/1\.[01] 200 OK", reply)) == 2
    assert b"connection: keep-alive" in reply.lower()


def test_expect_100_continue(server):
    body = json.dumps(_body()).encode()
    head = _request(
        b"", f"content-length: {len(body)}", "expect: 100-continue", "connection: close"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head)
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        reply = b"".join(iter(lambda: sock.recv(65536), b""))
    assert reply.startswith(b"HTTP/1.1 200 OK")


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (_request(b"{}", "content-length: 2", "transfer-encoding: chunked"), 400),
        (_request(b"", "transfer-encoding: gzip"), 400),
        (_request(b"", "content-length: 99999999999"), 413),
        (_request(b"", "content-length: 1, 2"), 400),
        (_request(b"", " folded: header"), 400),
        (_request(b"", "x-big: " + "a" * 70_000), 400),
    ],
)
def test_malformed_requests_are_refused_and_closed(server, data, status):
    reply = _raw_exchange(server.port, data)  # read until the server closes
    assert re.match(rb"HTTP/1\.[01] %d " % status, reply)
    assert b'{"error":{"message":' in reply
    assert server.running  # the server goes on
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    assert _post(conn, _body())[0].status == 200
    conn.close()


def test_idle_connections_are_closed_after_the_idle_timeout():
    with LoopbackLLMServer(idle_timeout=0.05) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            assert sock.recv(10) == b""  # closed by the server, without a reply
        assert server.stats().requests == 0


def test_a_thousand_concurrent_keep_alive_connections():
    connections = 1100
    payload = json.dumps(_body()).encode()
    request = _request(payload, f"content-length: {len(payload)}")

    async def client(port: int) -> list[int]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        statuses = []
        for _ in range(2):  # two requests on the same connection
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            statuses.append(int(head.split(b" ")[1]))
        writer.close()
        await writer.wait_closed()
        return statuses

    async def main(port: int) -> list[list[int]]:
        return await asyncio.gather(*(client(port) for _ in range(connections)))

    with LoopbackLLMServer(latency=0.2) as server:
        results = asyncio.run(main(server.port))
        stats = server.stats()
    assert results == [[200, 200]] * connections
    assert stats.connections == stats.peak_connections == connections
    assert stats.completed == stats.requests == 2 * connections
    assert stats.peak_concurrency > connections // 2  # they really were served together


# -- the quota ----------------------------------------------------------------------
def test_over_the_quota_answers_429_with_retry_after():
    with LoopbackLLMServer(rate_limit=3) as limited:
        conn = http.client.HTTPConnection("127.0.0.1", limited.port, timeout=10)
        answers = [_post(conn, _body()) for _ in range(5)]
        stats = limited.stats()
        statuses = [response.status for response, _ in answers]
        assert statuses == [200, 200, 200, 429, 429]
        response, data = answers[3]
        retry_after = int(response.getheader("retry-after"))
        retry_after_ms = int(response.getheader("retry-after-ms"))
        assert retry_after == 1
        assert 0 < retry_after_ms <= 1000
        assert response.getheader("x-ratelimit-limit-requests") == "3"
        assert response.getheader("x-ratelimit-remaining-requests") == "0"
        assert data["error"]["type"] == "requests"
        assert data["error"]["code"] == "rate_limit_exceeded"
        assert "Rate limit" in data["error"]["message"]
        assert (stats.requests, stats.completed, stats.rate_limited) == (5, 3, 2)

        # Once the window has moved past the accepted requests, the quota is free again.
        threading.Event().wait(retry_after_ms / 1000 + 0.05)
        assert _post(conn, _body())[0].status == 200
        conn.close()


# -- the concurrency cap ------------------------------------------------------------
async def _burst(port: int, n: int) -> list[int]:
    """``n`` requests at once, each on its own connection; their statuses."""

    async def one(i: int) -> int:
        payload = json.dumps(_body(f"agent {i}")).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_request(payload, f"content-length: {len(payload)}", "connection: close"))
        reply = await reader.read()
        writer.close()
        await writer.wait_closed()
        return int(reply.split(b" ")[1])

    return list(await asyncio.gather(*(one(i) for i in range(n))))


def test_concurrency_cap_queues_the_excess():
    with LoopbackLLMServer(latency=0.02, max_concurrent=4) as server:
        statuses = asyncio.run(_burst(server.port, 40))
        stats = server.stats()
    assert statuses == [200] * 40  # queued, not refused
    assert stats.peak_concurrency == 4
    assert stats.peak_queued > 0
    assert stats.completed == 40
    assert (stats.in_flight, stats.queued) == (0, 0)


def test_no_cap_serves_everything_at_once():
    with LoopbackLLMServer(latency=0.1) as server:
        asyncio.run(_burst(server.port, 30))
        stats = server.stats()
    assert stats.peak_concurrency > 1
    assert stats.peak_queued == 0


# -- latency ------------------------------------------------------------------------
def _messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"agent {i}"}]


@pytest.mark.parametrize(
    "spec",
    [
        0.03,
        ("constant", {"seconds": 0.03}),
        ("uniform", {"low": 0.01, "high": 0.05}),
        ("lognormal", {"mean": 0.03, "sigma": 0.5}),
        ("gamma", {"mean": 0.03, "shape": 4}),
        ("exponential", {"mean": 0.03}),
        lambda rng: rng.choice([0.01, 0.05]),
    ],
)
def test_latency_is_a_reproducible_function_of_seed_and_messages(spec):
    latency = Latency.from_spec(spec, seed=7)
    draws = [latency.seconds_for(_messages(i)) for i in range(2000)]
    assert draws == [Latency.from_spec(spec, seed=7).seconds_for(_messages(i)) for i in range(2000)]
    assert draws[::-1] == [latency.seconds_for(_messages(i)) for i in reversed(range(2000))]
    assert all(d >= 0 for d in draws)
    assert statistics.fmean(draws) == pytest.approx(0.03, rel=0.1)


def test_latency_depends_on_the_seed_and_respects_bounds():
    a = [
        Latency.from_spec(("uniform", {"low": 0.01, "high": 0.02}), seed=1).seconds_for(
            _messages(i)
        )
        for i in range(200)
    ]
    b = [
        Latency.from_spec(("uniform", {"low": 0.01, "high": 0.02}), seed=2).seconds_for(
            _messages(i)
        )
        for i in range(200)
    ]
    assert a != b
    assert all(0.01 <= x <= 0.02 for x in a + b)
    assert set(LATENCY_KINDS) == {"constant", "uniform", "lognormal", "gamma", "exponential"}


@pytest.mark.parametrize(
    ("spec", "error", "fragment"),
    [
        (-1, ValueError, "must be finite and >= 0"),
        (True, TypeError, "latency must be"),
        ("fast", TypeError, "latency must be"),
        (("weibull", {"mean": 1}), ValueError, "unknown latency kind 'weibull'"),
        (("gamma", {"mean": 1}), ValueError, "takes the parameters mean, shape"),
        (("lognormal", {"mean": 0, "sigma": 1}), ValueError, "mean must be finite and > 0"),
        (("uniform", {"low": 2, "high": 1}), ValueError, "must be >= low"),
        (("uniform", [1, 2]), TypeError, "(kind, {param: value})"),
    ],
)
def test_bad_latency_specs(spec, error, fragment):
    with pytest.raises(error, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        Latency.from_spec(spec)


def test_a_faulty_latency_callable_gives_500_and_the_server_goes_on():
    with LoopbackLLMServer(latency=lambda rng: -1.0) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        response, data = _post(conn, _body())
        conn.close()
        stats = server.stats()
    assert response.status == 500
    assert data["error"]["type"] == "server_error"
    assert (stats.requests, stats.errors, stats.in_flight) == (1, 1, 0)


# -- statistics and lifecycle -------------------------------------------------------
def test_stats_are_frozen_and_reset(server, conn):
    _post(conn, _body())
    stats = server.stats()
    assert isinstance(stats, ServerStats)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.requests = 0  # type: ignore[misc]
    server.reset_stats()
    after = server.stats()
    assert (after.requests, after.completed, after.connections) == (0, 0, 0)
    assert after.open_connections == after.peak_connections == 1  # still open
    _post(conn, _body())
    assert server.stats().requests == 1


def test_stats_from_many_threads_while_serving():
    seen: list[ServerStats] = []
    with LoopbackLLMServer(latency=0.005) as server:
        stop = threading.Event()

        def watch():
            while not stop.wait(0.001):
                seen.append(server.stats())

        watcher = threading.Thread(target=watch)
        watcher.start()
        asyncio.run(_burst(server.port, 50))
        stop.set()
        watcher.join()
    assert all(s.completed <= s.requests and s.in_flight <= s.peak_concurrency for s in seen)


def test_lifecycle():
    server = LoopbackLLMServer()
    with pytest.raises(RuntimeError, match="no port until it is started"):
        _ = server.base_url
    assert not server.running
    assert server.start() is server
    assert server.running
    assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
    assert server.port > 0
    assert "127.0.0.1" in repr(server)
    with pytest.raises(RuntimeError, match="already started"):
        server.start()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    _post(conn, _body())  # leaves an idle keep-alive connection open
    server.stop()
    server.stop()  # idempotent
    assert not server.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
    conn.close()


def test_stop_while_requests_are_in_flight_returns_promptly():
    server = LoopbackLLMServer(latency=30.0).start()
    port = server.port
    results: list[object] = []

    def call():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            _post(conn, _body())
        except (http.client.HTTPException, OSError) as exc:
            results.append(exc)
        conn.close()

    caller = threading.Thread(target=call)
    caller.start()
    while server.stats().in_flight == 0:
        threading.Event().wait(0.005)
    server.stop()
    caller.join(5)
    assert not caller.is_alive()
    assert len(results) == 1  # the client saw its connection closed


def test_the_port_in_use_raises_at_start(server):
    with pytest.raises(OSError, match="address already in use"):
        LoopbackLLMServer(port=server.port).start()


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_concurrent": 0}, ValueError),
        ({"max_concurrent": 1.5}, TypeError),
        ({"rate_limit": 0}, ValueError),
        ({"rate_limit": True}, TypeError),
        ({"port": 70000}, ValueError),
        ({"port": "80"}, TypeError),
        ({"model": ""}, ValueError),
        ({"model": None}, TypeError),
        ({"reply": "agree"}, TypeError),
        ({"idle_timeout": 0}, ValueError),
    ],
)
def test_bad_arguments(kwargs, error):
    with pytest.raises(error):
        LoopbackLLMServer(**kwargs)


# -- the old module names -------------------------------------------------------------
def test_the_old_module_names_are_the_new_modules(monkeypatch):
    import mesa_llm_parallel.llm_example as old_example
    import mesa_llm_parallel.llm_server as old_server
    from mesa_llm_parallel import demo, testing
    from mesa_llm_parallel.llm_example import ChatModel as OldChatModel
    from mesa_llm_parallel.llm_server import LoopbackLLMServer as OldServer
    from mesa_llm_parallel.testing import _example, _server

    assert old_server is _server
    assert old_example is _example
    assert OldServer is testing.LoopbackLLMServer
    assert OldChatModel is testing.ChatModel
    assert demo.OpinionModel is testing.OpinionModel
    assert demo.SimulatedLLM is testing.SimulatedLLM
    assert set(old_server.__all__) <= set(dir(old_server))
    # One module under two names: patching the old name changes what the server does.
    monkeypatch.setattr(old_server, "deterministic_reply", lambda prompt: "patched")
    with LoopbackLLMServer() as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        _, data = _post(conn, _body("anything"))
        conn.close()
    assert data["choices"][0]["message"]["content"] == "patched"


SERVER_NAMES = sorted(
    {
        "ChatRequest",
        "ChatReply",
        "ToolCall",
        "default_reply",
        "deterministic_reply",
        "schema_example",
        "LoopbackLLMServer",
        "ServerStats",
        "Latency",
        "LatencySpec",
        "LATENCY_KINDS",
        "DEFAULT_MODEL",
        "TOOL_CHOICES",
        "MESSAGE_ROLES",
        "ReplyValue",
        "Responder",
    }
)


def test_the_old_server_module_gives_every_name_of_the_server():
    import mesa_llm_parallel.llm_server as old_server
    from mesa_llm_parallel import testing
    from mesa_llm_parallel.llm_server import ChatRequest as OldRequest
    from mesa_llm_parallel.llm_server import LoopbackLLMServer as OldServer
    from mesa_llm_parallel.llm_server import ToolCall as OldToolCall
    from mesa_llm_parallel.llm_server import default_reply as old_default_reply
    from mesa_llm_parallel.testing import _example, _server

    assert (OldRequest, OldServer, OldToolCall, old_default_reply) == (
        ChatRequest,
        LoopbackLLMServer,
        ToolCall,
        default_reply,
    )
    for name in SERVER_NAMES:
        assert getattr(old_server, name) is getattr(testing, name), name
    assert set(SERVER_NAMES) <= set(old_server.__all__)
    # Every public name of testing is the server's or the chat model's (or the demo's).
    demo = {"OpinionAgent", "OpinionModel", "ServerLLM", "SimulatedLLM", "server_latency"}
    assert set(testing.__all__) == set(_server.__all__) | set(_example.__all__) | demo


def _doc_imports() -> list[tuple[str, list[str]]]:
    """The ``from mesa_llm_parallel... import ...`` lines of docs/llm-server.md."""
    import pathlib

    text = (pathlib.Path(__file__).parent.parent / "docs" / "llm-server.md").read_text()
    found = []
    for match in re.finditer(r"^\s*from (mesa_llm_parallel[\w.]*) import ([^\n(]+)$", text, re.M):
        found.append((match[1], [n.strip() for n in match[2].split(",") if n.strip()]))
    return found


def test_every_import_of_the_docs_works_from_either_path():
    import importlib

    import mesa_llm_parallel.llm_example as old_example
    import mesa_llm_parallel.llm_server as old_server

    lines = _doc_imports()
    assert any("ToolCall" in names for _, names in lines)  # the hook example is found
    for module, names in lines:
        if module != "mesa_llm_parallel.testing":
            continue
        new = importlib.import_module(module)
        for name in names:
            old = old_server if name in SERVER_NAMES else old_example
            assert getattr(old, name) is getattr(new, name), (name, old.__name__)
        if set(names) <= set(SERVER_NAMES):  # a server-only line runs as it is written
            namespace: dict = {}
            exec(f"from mesa_llm_parallel.llm_server import {', '.join(names)}", namespace)  # noqa: S102
            assert all(namespace[n] is getattr(new, n) for n in names)


# -- the reply hook -------------------------------------------------------------------
VOTE = {
    "type": "object",
    "properties": {
        "choice": {"type": "string", "enum": ["yes", "no"]},
        "weight": {"type": "integer", "minimum": 3, "maximum": 9},
    },
    "required": ["choice", "weight"],
}
REACT_FORMAT = {  # what litellm sends for mesa-llm's ReActOutput (pydantic, strict)
    "type": "json_schema",
    "json_schema": {
        "name": "ReActOutput",
        "strict": True,
        "schema": {
            "properties": {
                "reasoning": {"description": "Step-by-step reasoning", "type": "string"},
                "action": {"description": "The action to take", "type": "string"},
            },
            "required": ["reasoning", "action"],
            "title": "ReActOutput",
            "type": "object",
            "additionalProperties": False,
        },
    },
}


def _openai():
    return pytest.importorskip("openai", reason="needs 'openai' (the llm extra)")


def test_respond_receives_the_whole_request():
    openai = _openai()
    seen: list[ChatRequest] = []

    def respond(request: ChatRequest) -> str:
        seen.append(request)
        return "ok"

    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "fine"},
        {"role": "user", "content": "second"},
    ]
    with LoopbackLLMServer(respond=respond) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0)
        response = client.chat.completions.create(
            model="m",
            messages=messages,
            tools=[_tool("vote", VOTE), _tool("pass")],
            tool_choice="none",
            response_format=REACT_FORMAT,
            seed=7,
            temperature=0.25,
        )
        client.close()
    assert response.choices[0].message.content == "ok"
    (request,) = seen
    assert request.model == "m"
    assert list(request.messages) == messages
    assert request.prompt == "second"
    assert request.tool_names == ("vote", "pass")
    assert request.tool("vote")["parameters"] == VOTE
    assert request.tool_choice == "none"
    assert request.response_format == REACT_FORMAT
    assert (request.seed, request.stream) == (7, False)
    assert request.body["temperature"] == 0.25
    with pytest.raises(KeyError, match=r"no tool named 'abstain'; the request offers \['vote'"):
        request.tool("abstain")


def test_tool_calls_reach_the_openai_client():
    openai = _openai()

    def respond(request: ChatRequest):
        return [ToolCall("vote", {"choice": "yes", "weight": 4}), ToolCall("pass", "{}", id="c2")]

    with LoopbackLLMServer(respond=respond) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0)
        response = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "go"}], tools=[_tool("vote", VOTE)]
        )
        client.close()
    (choice,) = response.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    first, second = choice.message.tool_calls
    assert (first.type, first.function.name) == ("function", "vote")
    assert json.loads(first.function.arguments) == {"choice": "yes", "weight": 4}
    assert first.id.startswith("call_")
    assert (second.id, second.function.name, second.function.arguments) == ("c2", "pass", "{}")


def test_call_ids_are_a_function_of_the_request(conn):
    body = _body("same", tools=[_tool("vote", VOTE)], tool_choice="required")
    ids = [_post(conn, body)[1]["choices"][0]["message"]["tool_calls"][0]["id"] for _ in "ab"]
    other = _post(conn, _body("other", tools=[_tool("vote", VOTE)], tool_choice="required"))[1]
    assert ids[0] == ids[1]
    assert other["choices"][0]["message"]["tool_calls"][0]["id"] != ids[0]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("text", ChatReply(content="text")),
        (ToolCall("f"), ChatReply(tool_calls=(ToolCall("f"),))),
        ((ToolCall("f"), ToolCall("g")), ChatReply(tool_calls=(ToolCall("f"), ToolCall("g")))),
        (ChatReply("both", [ToolCall("f")]), ChatReply("both", (ToolCall("f"),))),
    ],
)
def test_respond_may_return_text_calls_or_a_reply(value, expected):
    with LoopbackLLMServer(respond=lambda request: value) as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        _, data = _post(connection, _body("x"))
        connection.close()
    message = data["choices"][0]["message"]
    assert message["content"] == expected.content
    calls = [
        (c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls", [])
    ]
    assert calls == [(c.name, c.arguments_json()) for c in expected.tool_calls]
    assert data["choices"][0]["finish_reason"] == expected.finish_reason


@pytest.mark.parametrize("value", [None, 3, [], ["f"], {"name": "f"}])
def test_a_bad_respond_value_gives_500_naming_it(value):
    with LoopbackLLMServer(respond=lambda request: value) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        response, data = _post(conn, _body())
        conn.close()
        assert server.stats().errors == 1
    assert response.status == 500
    assert f"it returned {value!r}" in data["error"]["message"]
    assert (
        "a str, a ToolCall, a non-empty sequence of ToolCall or a ChatReply"
        in (data["error"]["message"])
    )


def test_a_raising_respond_hook_gives_500_naming_the_exception_and_logs_it(caplog):
    def respond(request: ChatRequest) -> str:
        raise ValueError("boom in hook")

    with (
        caplog.at_level("ERROR", logger="mesa_llm_parallel.testing"),
        LoopbackLLMServer(respond=respond) as server,
    ):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        response, data = _post(conn, _body())
        again, _ = _post(conn, _body())  # the server goes on
        conn.close()
        stats = server.stats()
    assert (response.status, again.status) == (500, 500)
    assert data["error"]["type"] == "server_error"
    assert data["error"]["message"] == "the reply hook raised ValueError: boom in hook"
    assert (stats.requests, stats.errors, stats.in_flight) == (2, 2, 0)
    records = [r for r in caplog.records if "the reply hook raised" in r.getMessage()]
    assert len(records) == 2
    assert records[0].levelname == "ERROR"
    assert records[0].exc_info is not None
    assert records[0].exc_info[0] is ValueError
    assert "Traceback" in caplog.text


class _UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text")


class _UnprintableAndUnreprError(_UnprintableError):
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def _fail_unexpected():
    pytest.fail("unexpected prompt")


def _raise(exc: BaseException):
    def raising():
        raise exc

    return raising


@pytest.mark.parametrize(
    ("raise_it", "exc_type", "message"),
    [
        (_fail_unexpected, pytest.fail.Exception, "Failed: unexpected prompt"),
        (_raise(SystemExit(3)), SystemExit, "SystemExit: 3"),
        (_raise(KeyboardInterrupt()), KeyboardInterrupt, "KeyboardInterrupt"),
        (_raise(GeneratorExit("closed")), GeneratorExit, "GeneratorExit: closed"),
        (
            _raise(asyncio.CancelledError("gave up")),
            asyncio.CancelledError,
            "CancelledError: gave up",
        ),
        (
            _raise(_UnprintableError("x")),
            _UnprintableError,
            "_UnprintableError: _UnprintableError('x')",
        ),
        (
            _raise(_UnprintableAndUnreprError("x")),
            _UnprintableAndUnreprError,
            "_UnprintableAndUnreprError: <unprintable _UnprintableAndUnreprError object>",
        ),
    ],
    ids=[
        "pytest.fail",
        "SystemExit",
        "KeyboardInterrupt",
        "GeneratorExit",
        "CancelledError",
        "unprintable",
        "unprintable-and-unrepr",
    ],
)
@pytest.mark.parametrize("hook", ["respond", "reply"])
def test_a_hook_raising_any_base_exception_gives_500_and_the_server_goes_on(
    caplog, raise_it, exc_type, message, hook
):
    calls = []

    def function(value):
        calls.append(value)
        if len(calls) == 1:
            raise_it()
        return "fine"

    what = "the reply hook" if hook == "respond" else "the reply function"
    with (
        caplog.at_level("ERROR", logger="mesa_llm_parallel.testing"),
        LoopbackLLMServer(**{hook: function}) as server,
    ):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        response, data = _post(conn, _body())
        again, later = _post(conn, _body())  # the same connection is still served
        conn.close()
        fresh = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        third, _ = _post(fresh, _body())  # and new ones
        fresh.close()
        stats = server.stats()
        assert server.running
    assert response.status == 500
    assert data["error"] == {
        "message": f"{what} raised {message}",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    assert (again.status, third.status) == (200, 200)
    assert later["choices"][0]["message"]["content"] == "fine"
    assert (stats.requests, stats.completed, stats.errors, stats.in_flight) == (3, 2, 1, 0)
    records = [r for r in caplog.records if f"{what} raised" in r.getMessage()]
    assert len(records) == 1
    assert records[0].exc_info is not None
    assert records[0].exc_info[0] is exc_type
    assert "Traceback" in caplog.text


def test_a_latency_callable_raising_system_exit_gives_500_and_the_server_goes_on(caplog):
    calls = []

    def latency(rng):
        calls.append(rng)
        if len(calls) == 1:
            raise SystemExit("no wait")
        return 0.0

    with LoopbackLLMServer(latency=latency) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        response, data = _post(conn, _body())
        again, _ = _post(conn, _body())
        conn.close()
        stats = server.stats()
    assert (response.status, again.status) == (500, 200)
    assert data["error"]["message"] == "the latency raised SystemExit: no wait"
    assert (stats.errors, stats.completed) == (1, 1)
    assert any(r.exc_info and r.exc_info[0] is SystemExit for r in caplog.records)


def test_a_base_exception_escaping_the_server_gives_500_and_the_server_goes_on(caplog, monkeypatch):
    original = LoopbackLLMServer._answer
    calls = []

    async def answer(self, method, target, body):
        calls.append(target)
        if len(calls) == 1:
            raise SystemExit(3)
        return await original(self, method, target, body)

    monkeypatch.setattr(LoopbackLLMServer, "_answer", answer)
    with LoopbackLLMServer() as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        response, data = _post(conn, _body())
        conn.close()
        fresh = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        again, _ = _post(fresh, _body())
        fresh.close()
    assert (response.status, again.status) == (500, 200)
    assert data["error"]["message"] == "the server failed to answer: SystemExit: 3"
    assert any(r.exc_info and r.exc_info[0] is SystemExit for r in caplog.records)


def test_async_hooks_are_awaited_on_the_server_loop():
    loops = set()
    entered = []
    everyone_in = []

    async def respond(request: ChatRequest) -> str:
        loops.add(asyncio.get_running_loop())
        if not everyone_in:
            everyone_in.append(asyncio.Event())
        entered.append(request.prompt)
        if len(entered) == 8:
            everyone_in[0].set()
        # Eight hooks wait here at once: only possible if the server serves others meanwhile.
        await asyncio.wait_for(everyone_in[0].wait(), 5)
        return f"async {request.prompt}"

    async def reply(prompt: str) -> str:
        await asyncio.sleep(0)
        return prompt.upper()

    with LoopbackLLMServer(respond=respond) as server:
        results = []

        def ask(i):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            results.append(_post(conn, _body(f"q{i}")))
            conn.close()

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert server.stats().peak_concurrency == 8
    assert sorted(data["choices"][0]["message"]["content"] for _, data in results) == [
        f"async q{i}" for i in range(8)
    ]
    assert len(loops) == 1
    with LoopbackLLMServer(reply=reply) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        response, data = _post(conn, _body("shout"))
        tools = _post(conn, _body("shout", tools=[_tool("say", VOTE)], tool_choice="required"))[1]
        conn.close()
    assert response.status == 200
    assert data["choices"][0]["message"]["content"] == "SHOUT"
    assert tools["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "say"


def test_a_raising_async_hook_gives_500_naming_the_exception(caplog):
    async def respond(request: ChatRequest) -> str:
        await asyncio.sleep(0)
        pytest.fail("unexpected prompt")

    with LoopbackLLMServer(respond=respond) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        response, data = _post(conn, _body())
        conn.close()
    assert response.status == 500
    assert data["error"]["message"] == "the reply hook raised Failed: unexpected prompt"
    assert any(r.exc_info and r.exc_info[0] is pytest.fail.Exception for r in caplog.records)


def test_stopping_while_an_async_hook_waits_cancels_it_quietly(caplog):
    entered = threading.Event()
    cancelled = threading.Event()

    async def respond(request: ChatRequest) -> str:
        entered.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "late"

    server = LoopbackLLMServer(respond=respond).start()
    outcome = []

    def ask():
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:
            outcome.append(_post(conn, _body()))
        except (OSError, http.client.HTTPException) as exc:
            outcome.append(exc)
        finally:
            conn.close()

    client = threading.Thread(target=ask)
    client.start()
    assert entered.wait(5)
    started = time.perf_counter()
    server.stop()
    client.join(10)
    assert time.perf_counter() - started < 3
    assert cancelled.is_set()
    assert isinstance(outcome[0], Exception)  # no answer, not a 500
    assert server.stats().errors == 0
    assert "reply hook raised" not in caplog.text


def test_a_raising_reply_function_gives_500_naming_the_exception(caplog):
    def reply(prompt: str) -> str:
        raise KeyError(prompt)

    with LoopbackLLMServer(reply=reply) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        response, data = _post(conn, _body("who?"))
        conn.close()
    assert response.status == 500
    assert data["error"]["message"] == "the reply function raised KeyError: 'who?'"
    assert any(r.exc_info and r.exc_info[0] is KeyError for r in caplog.records)


def test_a_reply_function_returning_no_text_gives_500_naming_it():
    with LoopbackLLMServer(reply=lambda prompt: 3) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        response, data = _post(conn, _body())
        conn.close()
    assert response.status == 500
    assert data["error"]["message"] == "the reply function returned 3, not a str"


def test_a_hook_calling_default_reply_on_a_bad_schema_is_not_blamed_twice(caplog):
    def respond(request: ChatRequest):
        return default_reply(request)

    endless = {"$defs": {"A": {"$ref": "#/$defs/A"}}, "$ref": "#/$defs/A"}
    body = _body(response_format=_schema_format({"name": "x", "schema": endless}))
    with LoopbackLLMServer(respond=respond) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        response, data = _post(conn, body)
        conn.close()
    assert response.status == 500
    message = data["error"]["message"]
    assert message.startswith("the reply hook raised ValueError: no finite value is valid")


def test_reply_and_respond_are_checked():
    with pytest.raises(ValueError, match=r"give reply .* or respond .*, not both"):
        LoopbackLLMServer(reply=str.upper, respond=lambda request: "x")
    with pytest.raises(TypeError, match="respond must be callable"):
        LoopbackLLMServer(respond="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ToolCall name must be a non-empty str, got ''"):
        ToolCall("")
    with pytest.raises(TypeError, match="ToolCall arguments must be a mapping or a JSON"):
        ToolCall("f", 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ChatReply content must be a str or None, got 3"):
        ChatReply(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tool_calls must be a sequence of ToolCall"):
        ChatReply(tool_calls=ToolCall("f"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tool_calls must hold ToolCall objects, got 'f'"):
        ChatReply(tool_calls=["f"])  # type: ignore[list-item]


# -- the default reply: tools and structured output -----------------------------------
def _validate(instance, schema):
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(instance, schema)


@pytest.mark.parametrize(
    ("tool_choice", "last_role", "called"),
    [
        ("required", "user", "vote"),
        ("required", "tool", "vote"),
        ({"type": "function", "function": {"name": "rate"}}, "user", "rate"),
        ("auto", "user", "vote"),
        (None, "user", "vote"),
        ("auto", "tool", None),
        ("none", "user", None),
    ],
)
def test_the_default_reply_calls_a_tool_by_the_documented_rule(
    conn, tool_choice, last_role, called
):
    rate = {"type": "object", "properties": {"stars": {"type": "number", "exclusiveMinimum": 0}}}
    messages = [{"role": "user", "content": "vote now"}]
    if last_role == "tool":
        messages.append({"role": "tool", "tool_call_id": "c1", "content": "done"})
    body = {"model": "m", "messages": messages, "tools": [_tool("vote", VOTE), _tool("rate", rate)]}
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    _, data = _post(conn, body)
    (choice,) = data["choices"]
    if called is None:
        assert choice["finish_reason"] == "stop"
        assert choice["message"]["content"] == deterministic_reply("vote now")
        assert "tool_calls" not in choice["message"]
        return
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == called
    _validate(json.loads(call["function"]["arguments"]), VOTE if called == "vote" else rate)


def test_a_tool_without_parameters_is_called_with_no_arguments(conn):
    _, data = _post(conn, _body(tools=[_tool("wait")], tool_choice="required"))
    (call,) = data["choices"][0]["message"]["tool_calls"]
    assert (call["function"]["name"], call["function"]["arguments"]) == ("wait", "{}")


SCHEMAS = {
    "scalars": {
        "type": "object",
        "properties": {
            "s": {"type": "string", "minLength": 12, "maxLength": 14},
            "n": {"type": "number", "exclusiveMinimum": 2.5, "exclusiveMaximum": 3},
            "i": {"type": "integer", "exclusiveMinimum": 4},
            "j": {"type": "integer", "maximum": -3},
            "b": {"type": "boolean"},
            "z": {"type": "null"},
            "e": {"enum": ["red", "green"]},
            "c": {"const": 42},
            "maybe": {"type": ["null", "integer"]},
        },
        "required": ["s", "n", "i", "j", "b", "z", "e", "c", "maybe"],
        "additionalProperties": False,
    },
    "arrays": {
        "type": "object",
        "properties": {
            "many": {"type": "array", "items": {"type": "integer"}, "minItems": 3},
            "none": {"type": "array", "items": {"type": "string"}, "maxItems": 0},
            "pair": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "number"}]},
        },
        "required": ["many", "none", "pair"],
    },
    "nested, $ref and anyOf": {
        "$defs": {
            "Move": {
                "type": "object",
                "properties": {"dx": {"type": "integer", "minimum": -1, "maximum": 1}},
                "required": ["dx"],
            }
        },
        "type": "object",
        "properties": {
            "moves": {"type": "array", "items": {"$ref": "#/$defs/Move"}, "minItems": 2},
            "target": {"anyOf": [{"$ref": "#/$defs/Move"}, {"type": "null"}]},
            "both": {
                "allOf": [{"$ref": "#/$defs/Move"}, {"properties": {"why": {"type": "string"}}}]
            },
        },
        "required": ["moves", "target", "both"],
    },
    "react": REACT_FORMAT["json_schema"]["schema"],
}


@pytest.mark.parametrize("name", SCHEMAS)
def test_the_default_json_schema_reply_is_valid(conn, name):
    schema = SCHEMAS[name]
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    _, data = _post(conn, _body("why?", response_format=response_format))
    value = json.loads(data["choices"][0]["message"]["content"])
    _validate(value, schema)
    assert value == schema_example(schema, text=deterministic_reply("why?"))


def test_the_react_reply_parses_as_mesa_llm_reads_it(conn):
    _, data = _post(conn, _body("observe", response_format=REACT_FORMAT))
    parsed = json.loads(data["choices"][0]["message"]["content"])
    assert parsed == {
        "reasoning": deterministic_reply("observe"),
        "action": deterministic_reply("observe"),
    }


def test_json_object_and_the_reply_function(conn):
    _, data = _post(conn, _body("q", response_format={"type": "json_object"}))
    assert json.loads(data["choices"][0]["message"]["content"]) == {
        "reply": deterministic_reply("q")
    }
    with LoopbackLLMServer(reply=str.upper) as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        _, data = _post(connection, _body("loud", response_format=REACT_FORMAT))
        connection.close()
    assert json.loads(data["choices"][0]["message"]["content"]) == {
        "reasoning": "LOUD",
        "action": "LOUD",
    }


def test_structured_output_through_the_openai_parse_helper():
    openai = _openai()
    pydantic = pytest.importorskip("pydantic")

    class Decision(pydantic.BaseModel):
        reasoning: str
        confidence: float
        votes: list[int]
        kind: str = pydantic.Field(json_schema_extra={"enum": ["stay", "move"]})

    with LoopbackLLMServer() as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0)
        response = client.chat.completions.parse(
            model="m", messages=[{"role": "user", "content": "decide"}], response_format=Decision
        )
        client.close()
    parsed = response.choices[0].message.parsed
    assert parsed == Decision(
        reasoning=deterministic_reply("decide"), confidence=0.0, votes=[0], kind="stay"
    )


def _defs(root: dict, **defs: dict) -> dict:
    return {"$defs": defs, **root}


def _ref(name: str) -> dict:
    return {"$ref": f"#/$defs/{name}"}


def _nested(levels: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"x": schema}, "required": ["x"]}
    return schema


def _obj(required: tuple[str, ...] = (), **properties: dict) -> dict:
    return {"type": "object", "properties": properties, "required": list(required)}


RECURSIVE = {
    "tree (items)": _defs(
        _ref("Node"),
        Node=_obj(("name", "children"), name={"type": "string"}, children={"items": _ref("Node")}),
    ),
    "linked list (anyOf with null)": _defs(
        _ref("Link"),
        Link=_obj(("name", "next"), name={"type": "string"}, next={"anyOf": [_ref("Link"), {}]}),
    ),
    "oneOf, the way out last": _defs(
        _ref("E"),
        E=_obj(("e",), e={"oneOf": [_ref("E"), {"type": "array", "items": _ref("E")}]}),
    ),
    "type list with null": _defs(
        _ref("T"), T={"type": ["object", "null"], "properties": {"t": _ref("T")}, "required": ["t"]}
    ),
    "optional property": _defs(_ref("O"), O=_obj(("n",), n={"type": "integer"}, more=_ref("O"))),
    "mutual recursion": _defs(
        _obj(("a",), a=_ref("A")),
        A=_obj(("b", "bs"), b={"anyOf": [_ref("B"), {"type": "null"}]}, bs={"items": _ref("B")}),
        B=_obj(("a",), a={"anyOf": [_ref("A"), {"type": "boolean"}]}),
    ),
    "an array of a definition with no finite value": _defs(
        _obj(("x",), x={"items": _ref("A")}), A=_obj(("a",), a=_ref("A"))
    ),
    "recursion under deep nesting": _defs(
        _obj(("deep",), deep=_nested(40)), D=_obj(("d",), d={"items": _ref("D"), "minItems": 0})
    ),
}
RECURSIVE["linked list (anyOf with null)"]["$defs"]["Link"]["properties"]["next"]["anyOf"][1] = {
    "type": "null"
}
ENDLESS = [
    _defs(_ref("A"), A=_ref("A")),
    _defs(_ref("A"), A=_obj(("a",), a=_ref("A"))),
    _defs(_ref("A"), A=_obj(("a",), a={"type": "array", "items": _ref("A"), "minItems": 1})),
    _defs(_ref("A"), A=_obj(("a",), a={"anyOf": [_ref("A"), {"items": _ref("A"), "minItems": 2}]})),
    _defs(_obj(("x",), x={"items": _ref("A"), "minItems": 1}), A=_obj(("a",), a=_ref("A"))),
]


@pytest.mark.parametrize("name", RECURSIVE)
def test_recursive_schemas_get_finite_valid_answers(conn, name):
    schema = RECURSIVE[name]
    value = schema_example(schema)
    _validate(value, schema)
    response_format = _schema_format({"name": "x", "schema": schema})
    response, data = _post(conn, _body("grow", response_format=response_format))
    assert response.status == 200, data
    _validate(json.loads(data["choices"][0]["message"]["content"]), schema)
    tool = _post(conn, _body("grow", tools=[_tool("grow", schema)], tool_choice="required"))[1]
    _validate(
        json.loads(tool["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]), schema
    )


def test_a_recursive_schema_is_expanded_once_then_ends():
    assert schema_example(RECURSIVE["tree (items)"]) == {
        "name": "agree",
        "children": [{"name": "agree", "children": []}],
    }
    assert schema_example(RECURSIVE["linked list (anyOf with null)"]) == {
        "name": "agree",
        "next": {"name": "agree", "next": None},
    }
    assert schema_example(RECURSIVE["optional property"]) == {"n": 0, "more": {"n": 0}}


def test_recursive_pydantic_models_through_the_openai_parse_helper():
    openai = _openai()
    pydantic = pytest.importorskip("pydantic")

    class Node(pydantic.BaseModel):
        name: str
        children: list[Node]

    class Link(pydantic.BaseModel):
        name: str
        next: Link | None

    class Chain(pydantic.BaseModel):
        name: str
        next: Chain | None = None
        links: list[Link] = pydantic.Field(default_factory=list)

    models = {}
    with LoopbackLLMServer() as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0)
        for model in (Node, Link, Chain):
            model.model_rebuild()
            _validate(schema_example(model.model_json_schema()), model.model_json_schema())
            response = client.chat.completions.parse(
                model="m", messages=[{"role": "user", "content": "grow"}], response_format=model
            )
            models[model] = response.choices[0].message.parsed
        client.close()
    # The client sends the root's definition inlined: it and one more level are made in
    # full, and the level below is the smallest.
    text = deterministic_reply("grow")
    leaf = Node(name=text, children=[])
    assert models[Node] == Node(name=text, children=[Node(name=text, children=[leaf])])
    end = Link(name=text, next=None)
    assert models[Link] == Link(name=text, next=Link(name=text, next=end))
    assert isinstance(models[Chain], Chain)


@pytest.mark.parametrize(
    ("schema", "fragment"),
    [
        ({"$ref": "#/$defs/Nope"}, "points at nothing"),
        ({"$ref": "other.json"}, "only $ref into the schema itself"),
        (False, "no value is valid"),
        ({"type": "integer", "minimum": 2, "maximum": 1}, "no integer meets the bounds"),
        ({"type": "string", "minLength": 3, "maxLength": 2}, "minLength 3 > maxLength 2"),
        ({"type": "array", "minItems": 3, "maxItems": 1}, "minItems 3 > maxItems 1"),
        ({"type": "tuple"}, "unknown JSON-schema type 'tuple'"),
        ({"type": "array", "items": False, "minItems": 1}, "forbids items past its prefixItems"),
        (_nested(120), "nests deeper than 100 levels"),
        *[
            (schema, "no finite value is valid against the schema: '#/$defs/A'")
            for schema in ENDLESS
        ],
    ],
)
def test_schemas_no_example_can_meet_are_named(schema, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        schema_example(schema)


def test_a_tool_whose_parameters_are_not_an_object_gives_400(conn):
    tools = [_tool("g"), _tool("f", {"type": "string"})]
    body = _body(tools=tools, tool_choice={"type": "function", "function": {"name": "f"}})
    response, data = _post(conn, body)
    assert response.status == 400
    assert data["error"]["param"] == "tools[1].function.parameters"
    assert data["error"]["type"] == "invalid_request_error"
    assert "the parameters of tool 'f' are not an object schema" in data["error"]["message"]


@pytest.mark.parametrize("schema", ENDLESS)
def test_a_schema_with_no_finite_value_gives_400_naming_it(server, conn, schema):
    with pytest.raises(ValueError, match="no finite value") as caught:
        schema_example(schema)
    response, data = _post(
        conn, _body(response_format=_schema_format({"name": "x", "schema": schema}))
    )
    assert response.status == 400
    assert data["error"] == {
        "message": str(caught.value),
        "type": "invalid_request_error",
        "param": "response_format.json_schema.schema",
        "code": None,
    }
    tools = [_tool("ok", VOTE), _tool("grow", schema)]
    response, data = _post(conn, _body(tools=tools, tool_choice=_named("grow")))
    assert response.status == 400
    assert data["error"]["param"] == "tools[1].function.parameters"
    assert data["error"]["message"] == f"the parameters of tool 'grow': {caught.value}"
    # Only a schema the answer needs is made: the first tool is called, the second unused.
    response, data = _post(conn, _body(tools=tools, tool_choice="required"))
    assert response.status == 200
    stats = server.stats()
    assert (stats.errors, stats.completed) == (2, 1)


def test_the_openai_client_does_not_retry_a_schema_with_no_finite_value():
    openai = _openai()
    with LoopbackLLMServer() as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="k")
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": "grow"}],
                response_format=_schema_format({"name": "x", "schema": ENDLESS[1]}),
            )
        client.close()
        assert server.stats().requests == 1
    assert caught.value.param == "response_format.json_schema.schema"
    assert "no finite value is valid against the schema" in caught.value.message


def test_default_reply_is_importable_for_hooks():
    request = ChatRequest.from_body(_body("hi", tools=[_tool("vote", VOTE)]))
    reply = default_reply(request, text=str.upper)
    assert reply.tool_calls == (ToolCall("vote", {"choice": "yes", "weight": 3}),)
    assert default_reply(ChatRequest.from_body(_body("hi")), text=str.upper) == ChatReply("HI")


# -- streaming ------------------------------------------------------------------------
def _stream_body(**extra):
    return _body("please stream this answer", stream=True, **extra)


def test_streams_are_server_sent_events_in_chunks(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("POST", CHAT, json.dumps(_stream_body(stream_options={"include_usage": True})))
    response = conn.getresponse()
    raw = response.read().decode()  # http.client undoes the chunked coding
    assert response.status == 200
    assert response.getheader("content-type").startswith("text/event-stream")
    assert response.getheader("transfer-encoding") == "chunked"
    events = [line.removeprefix("data: ") for line in raw.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    *choices, usage = chunks
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in choices)
    assert text == deterministic_reply("please stream this answer")
    assert [c["choices"][0]["finish_reason"] for c in choices][-1] == "stop"
    assert usage["choices"] == []
    assert usage["usage"]["prompt_tokens"] == 4
    _, again = _post(conn, _body())  # the connection is kept alive
    assert again["object"] == "chat.completion"
    conn.close()


def test_streaming_text_and_tool_calls_through_the_sync_client():
    openai = _openai()
    text = "one two three four"
    calls = [ToolCall("vote", {"choice": "no", "weight": 5}), ToolCall("pass")]
    answers = iter([text, calls])
    with LoopbackLLMServer(respond=lambda request: next(answers)) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0)
        messages = [{"role": "user", "content": "go"}]
        stream = client.chat.completions.create(
            model="m", messages=messages, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
        with client.chat.completions.stream(
            model="m", messages=messages, tools=[_tool("vote", VOTE), _tool("pass")]
        ) as events:
            final = events.get_final_completion()
        client.close()
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == 4
    message = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("vote", {"choice": "no", "weight": 5}),
        ("pass", {}),
    ]


def test_streaming_through_the_async_client():
    openai = _openai()

    async def ask(base_url: str) -> tuple[str, list]:
        async with openai.AsyncOpenAI(base_url=base_url, api_key="k", max_retries=0) as client:
            stream = await client.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": "stream"}],
                tools=[_tool("vote", VOTE)],
                tool_choice="required",
                stream=True,
            )
            deltas = [chunk.choices[0].delta async for chunk in stream]
        return deltas

    with LoopbackLLMServer() as server:
        deltas = asyncio.run(ask(server.base_url))
    calls = [call for delta in deltas for call in delta.tool_calls or ()]
    assert calls[0].function.name == "vote"
    arguments = "".join(call.function.arguments or "" for call in calls)
    assert json.loads(arguments) == {"choice": "yes", "weight": 3}


def test_without_aiohttp_the_server_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "aiohttp", None)  # makes `from aiohttp import web` fail
    monkeypatch.setitem(sys.modules, "aiohttp.web", None)
    with pytest.raises(ImportError, match=r"pip install 'mesa_llm_parallel\[testing\]'"):
        LoopbackLLMServer()
