"""Test and demo tools: a loopback OpenAI-compatible server and models that call it.

Everything here stands in for a real language model, offline and deterministically:

* :class:`LoopbackLLMServer`: an OpenAI-compatible chat-completions server on
  ``127.0.0.1`` with a latency distribution, a concurrency cap and a rate limit. It
  answers text, tool calls (``message.tool_calls``), JSON valid against a
  ``response_format`` schema, and streams (``"stream": true``); a reply hook
  (``respond=``) gets each whole :class:`ChatRequest` and may answer anything.
* :class:`OpenAIChat`, :class:`ChatAgent`, :class:`ChatModel`: a Mesa model whose agents
  call such a server through the ``openai`` clients.
* :class:`OpinionModel` with :class:`SimulatedLLM` or :class:`ServerLLM`: the model of
  ``python -m mesa_llm_parallel.demo``.

The older modules ``mesa_llm_parallel.llm_server`` and ``mesa_llm_parallel.llm_example``
are the same module objects as ``mesa_llm_parallel.testing._server`` and
``mesa_llm_parallel.testing._example``: every name of the server (the server, its
statistics and latency, the request and reply types, :func:`default_reply`,
:func:`schema_example`...) imports from ``mesa_llm_parallel.llm_server`` as from here,
and the chat model's from ``mesa_llm_parallel.llm_example``. ``mesa_llm_parallel.demo``
re-exports the demo's model. The ``openai`` clients need ``pip install "mesa_llm_parallel[llm]"``.
"""

from __future__ import annotations

from mesa_llm_parallel.testing._demo_models import (
    OpinionAgent,
    OpinionModel,
    ServerLLM,
    SimulatedLLM,
    server_latency,
)
from mesa_llm_parallel.testing._example import ChatAgent, ChatModel, OpenAIChat
from mesa_llm_parallel.testing._replies import (
    MESSAGE_ROLES,
    TOOL_CHOICES,
    ChatReply,
    ChatRequest,
    ReplyValue,
    Responder,
    ToolCall,
    default_reply,
    deterministic_reply,
    schema_example,
)
from mesa_llm_parallel.testing._server import (
    DEFAULT_MODEL,
    LATENCY_KINDS,
    Latency,
    LatencySpec,
    LoopbackLLMServer,
    ServerStats,
)

__all__ = [
    "DEFAULT_MODEL",
    "LATENCY_KINDS",
    "MESSAGE_ROLES",
    "TOOL_CHOICES",
    "ChatAgent",
    "ChatModel",
    "ChatReply",
    "ChatRequest",
    "Latency",
    "LatencySpec",
    "LoopbackLLMServer",
    "OpenAIChat",
    "OpinionAgent",
    "OpinionModel",
    "ReplyValue",
    "Responder",
    "ServerLLM",
    "ServerStats",
    "SimulatedLLM",
    "ToolCall",
    "default_reply",
    "deterministic_reply",
    "schema_example",
    "server_latency",
]
