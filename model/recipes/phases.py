"""Running the recipe's phases: each at most once (a record per finished phase, so a rerun of the
recipe skips it and an interrupted build continues), independent ones in parallel processes, and
`xllm` commands as subprocesses with a progress bar fed by their metrics."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("xllm.recipe")

Phase = Callable[[], dict[str, Any] | None]  # runs a phase; returns its figures


class PhaseRecords:
    """DIR/phases/NAME.json for every finished phase: its seconds and figures."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.json"

    def done(self, name: str) -> bool:
        return self.path(name).is_file()

    def run(self, name: str, fn: Phase) -> None:
        """Run phase `name` unless it finished before; record its time and figures."""
        if self.done(name):
            seconds = json.loads(self.path(name).read_text())["seconds"]
            log.info("phase %s: done before (%.0f s), skipped", name, seconds)
            return
        log.info("phase %s: start", name)
        start = time.time()
        figures = fn() or {}
        seconds = time.time() - start
        self.directory.mkdir(parents=True, exist_ok=True)
        result = {"seconds": round(seconds, 1), **figures}
        self.path(name).write_text(json.dumps(result, indent=2) + "\n")
        log.info("phase %s: %.0f s %s", name, seconds, json.dumps(figures))

    def all(self) -> dict[str, Any]:
        """Every finished phase's record, by name (sorted)."""
        paths = sorted(self.directory.glob("*.json"))
        return {path.stem: json.loads(path.read_text()) for path in paths}


def run_parallel(names: list[str], command: Callable[[str], list[str]], log_dir: Path) -> None:
    """Run `command(name)` for every phase at once, each in its own process, its output to
    LOG_DIR/phase-NAME.log; raises when any of them fails."""
    processes = {}
    for name in names:
        sink = (log_dir / f"phase-{name}.log").open("a")
        processes[name] = subprocess.Popen(command(name), stdout=sink, stderr=subprocess.STDOUT)
    failed = [n for n, p in processes.items() if p.wait() != 0]
    if failed:
        raise RuntimeError(f"phase(s) {failed} failed: see {log_dir}/phase-NAME.log")


def xllm(args: list[str], log_file: Path, steps: int, desc: str) -> None:
    """Run `xllm ARGS` in a subprocess (one torch thread: the fastest on a shared small CPU),
    its output to `log_file`, with a progress bar fed by its metrics."""
    from tqdm import tqdm

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "xllm", *args]
    log.info("$ xllm %s", " ".join(args))
    metrics = Path(args[args.index("--out") + 1]) / "metrics.jsonl"
    with log_file.open("a") as sink, tqdm(total=steps, desc=desc, mininterval=5.0) as progress:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
        while process.poll() is None:
            time.sleep(2)
            step = last_metrics(metrics.parent).get("step", 0)
            progress.update(max(0, step - progress.n))
        progress.update(max(0, steps - progress.n))
    if process.returncode != 0:
        tail = log_file.read_text()[-3000:]
        raise RuntimeError(f"xllm {args[0]} failed ({process.returncode}); log tail:\n{tail}")


def last_metrics(run_dir: Path) -> dict[str, Any]:
    """The step and loss of a run's last training record (metrics.jsonl), {} before the first."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    last: dict[str, Any] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "step" in row and "loss" in row:
            last = row
    return {k: v for k, v in last.items() if k in ("step", "loss")}
