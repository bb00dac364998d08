"""Helpers for the training tests."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train(model: Path, data: Path, out: Path, *args: str) -> list[dict]:
    """Run `xllm train` in-process; returns metrics.jsonl's records."""
    from xllm.main import main

    argv = ["train", "--model", str(model), "--data", str(data), "--out", str(out)]
    argv += ["--log-every", "1", "--num-workers", "0", "--device", "cpu", *args]
    assert main(argv) == 0
    return read_metrics(out)


def stage_args(stage: int, modality: str, max_steps: int, batch_size: int) -> tuple[str, ...]:
    """The flags that choose what a test run trains and for how long."""
    return (
        "--stage",
        str(stage),
        "--modality",
        modality,
        "--max-steps",
        str(max_steps),
        "--batch-size",
        str(batch_size),
    )
