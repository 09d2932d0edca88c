"""Fixtures shared by several test modules."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def lm():
    """One loaded bundled captioner for the module (calls in the module reuse it); unloaded after."""
    import vlmlab

    vlmlab.unload()
    model = vlmlab.load()
    yield model
    vlmlab.unload()
