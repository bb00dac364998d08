"""The error a training run stops with when it cannot start or continue as asked."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """The run cannot start or continue as asked (the message says why)."""
