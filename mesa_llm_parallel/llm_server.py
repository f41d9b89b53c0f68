"""The loopback server's former home, kept as a name: see :mod:`mesa_llm_parallel.testing`.

``mesa_llm_parallel.llm_server`` is the very module ``mesa_llm_parallel.testing._server``
(one module object under two names), so ``from mesa_llm_parallel.llm_server import
LoopbackLLMServer`` keeps working and patching an attribute through either name patches
the one module. That module re-exports the request and reply types, so every name of
:mod:`mesa_llm_parallel.testing` that concerns the server (``ChatRequest``,
``ChatReply``, ``ToolCall``, ``default_reply``, ``schema_example``, ``ServerStats``,
``Latency``...) imports from here too.
"""

from __future__ import annotations

import sys

from mesa_llm_parallel.testing import _server

sys.modules[__name__] = _server
