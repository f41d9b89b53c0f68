"""Sphinx configuration for the mesa_llm_parallel documentation."""

from __future__ import annotations

import pkgutil
from typing import Any

from sphinx.pycode import ModuleAnalyzer

import mesa_llm_parallel
import mesa_llm_parallel.parallel_stepping

project = "mesa_llm_parallel"
author = "mesa_llm_parallel contributors"
copyright = "mesa_llm_parallel contributors"
version = release = mesa_llm_parallel.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# MyST: ``{ref}``-able anchors for headings down to level 3, and ::: fences.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# autodoc: import the installed package; keep signatures readable.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"undoc-members": False}

# napoleon: the package uses Google-style docstrings only.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = False
napoleon_use_rtype = False

nitpicky = False

html_theme = "alabaster"
html_title = f"mesa_llm_parallel {release}"
html_theme_options = {
    "description": "Step Mesa agents concurrently when they wait on language models.",
    "fixed_sidebar": True,
}


# The functions of ``mesa_llm_parallel.parallel_stepping`` are documented once, in that
# module, but users import them from the package root too. Let a reference to the root
# name (``mesa_llm_parallel.shutdown``, or a bare name inside a root docstring) resolve
# to the documented entry instead of rendering as plain text.
def _resolve_root_alias(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    if node.get("refdomain") != "py":
        return None
    name = node["reftarget"].removeprefix("~").rpartition(".")[2]
    if name not in mesa_llm_parallel.parallel_stepping.__all__:
        return None
    domain = env.get_domain("py")
    target = f"mesa_llm_parallel.parallel_stepping.{name}"
    return domain.resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], target, node, contnode
    )


# Module-level data re-exported by the package root (``settings``, ``DEFAULT_MAX_WORKERS``,
# ``MODES``) is documented with ``#:`` comments in the submodule that defines it. autodoc
# looks for those comments in the package root only and falls back to the docstring of
# the value's type (``int``, ``tuple``, ``Settings``); use the defining comment instead.
def _submodule_attr_docs() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for info in pkgutil.iter_modules(mesa_llm_parallel.__path__, "mesa_llm_parallel."):
        docs = ModuleAnalyzer.for_module(info.name).find_attr_docs()
        for (namespace, name), lines in docs.items():
            if not namespace:
                found.setdefault(name, list(lines))
    return found


_ROOT_DATA_DOCS = _submodule_attr_docs()


def _use_defining_comment(
    app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    package, _, short = name.rpartition(".")
    if what == "data" and package == "mesa_llm_parallel" and short in _ROOT_DATA_DOCS:
        lines[:] = _ROOT_DATA_DOCS[short]


def setup(app: Any) -> dict[str, Any]:
    app.connect("missing-reference", _resolve_root_alias)
    app.connect("autodoc-process-docstring", _use_defining_comment)
    return {"parallel_read_safe": True}
