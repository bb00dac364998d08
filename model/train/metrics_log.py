"""What a run reports: metrics.jsonl (rank 0 appends one JSON object per logged step), the log
line of a record, and the terminal progress bar."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

METRICS_NAME = "metrics.jsonl"


class MetricsLog:
    """metrics.jsonl, appended by rank 0; a resumed run first drops lines past its checkpoint."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        self.written: list[dict[str, Any]] = []

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.written.append(record)
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")


def format_record(record: dict[str, Any]) -> str:
    """`step=3 loss=0.1234 ...`: floats to four significant digits."""
    return " ".join(f"{k}={_fmt(v)}" for k, v in record.items())


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def progress_bar(total: int, done: int, main: bool) -> Any:
    """A tqdm bar over optimizer steps, shown by rank 0 on a terminal only."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=done,
        unit="step",
        dynamic_ncols=True,
        disable=not (main and sys.stderr.isatty()),
    )
