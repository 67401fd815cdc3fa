"""Fixtures for the integration tests; the machinery lives in harness.py."""

from __future__ import annotations

from .harness import start_server

__all__ = ["start_server"]
