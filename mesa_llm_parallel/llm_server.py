"""The loopback server's former home, kept as a name: see :mod:`mesa_llm_parallel.testing`.

``mesa_llm_parallel.llm_server`` is the very module ``mesa_llm_parallel.testing._server``
(one module object under two names), so ``from mesa_llm_parallel.llm_server import
LoopbackLLMServer`` keeps working and patching an attribute through either name patches
the one module.
"""

from __future__ import annotations

import sys

from mesa_llm_parallel.testing import _server

sys.modules[__name__] = _server
