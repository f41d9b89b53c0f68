"""Shared fixtures: every test starts with Mesa unpatched and default settings."""

from __future__ import annotations

import pytest

import mesa_llm_parallel as mlp


@pytest.fixture(autouse=True)
def clean_state():
    """Undo any patch and setting a test leaves behind."""
    mlp.disable_automatic_parallel_stepping()
    mlp.settings.reset()
    yield
    mlp.disable_automatic_parallel_stepping()
    mlp.settings.reset()
