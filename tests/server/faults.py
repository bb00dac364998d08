"""Fault injection for engine tests: nothing in the engine's code path, only a wrap of its
runner's step methods on the instance under test."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

STEPS = ("encode", "prefill", "decode")  # the runner's methods, each inside its step's try


def inject_faults(engine: Any, injector: Callable[[str], None] | None) -> None:
    """From now on call `injector(step)` before the runner's encode / prefill / decode (it may
    raise, or hang); None restores the runner's own methods. Any thread, any time."""
    runner = engine.runner
    for step in STEPS:
        if injector is None:
            runner.__dict__.pop(step, None)
            continue
        original = getattr(type(runner), step).__get__(runner)

        def faulty(*args: Any, _step: str = step, _original: Callable = original) -> Any:
            injector(_step)
            return _original(*args)

        setattr(runner, step, faulty)
