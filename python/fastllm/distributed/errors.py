"""Errors of the distributed executor."""

from __future__ import annotations


class WorkerError(RuntimeError):
    """A worker died or failed: the distributed executor has stopped (every later step raises
    this too), and the engine that owns it is unhealthy."""
