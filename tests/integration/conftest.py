"""Fixtures for the integration tests; the machinery lives in harness.py."""

from __future__ import annotations

from .harness import short_dir, start_server

__all__ = ["short_dir", "start_server"]
