"""Shared pytest configuration for zarrckpt's tests."""

from __future__ import annotations

import os

# Hypothesis: fewer examples on CI keeps the default suite well under its time budget.
try:
    from hypothesis import settings

    settings.register_profile("ci", max_examples=40, deadline=None)
    settings.register_profile("dev", max_examples=100, deadline=None)
    settings.load_profile("ci" if os.environ.get("CI") else "dev")
except ImportError:  # pragma: no cover - hypothesis is in the test extra
    pass
