"""Unit-test fixtures shared by every module."""

from __future__ import annotations

import pytest
import structlog


@pytest.fixture(autouse=True)
def _restore_logging():
    """`wisp`'s `main` configures logging for a process (level, the stderr of the moment): put
    the test session's back, so later tests neither log into a closed capture nor lose levels."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
