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


def xllm(args: list[str], log_file: Path, steps: int, desc: str, threads: int = 1) -> None:
    """Run `xllm ARGS` in a subprocess with `threads` torch threads ($OMP_NUM_THREADS wins), its
    output to `log_file`, with a progress bar fed by its metrics."""
    from tqdm import tqdm

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
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


class PhasedRecipe:
    """A recipe's phases on one work directory (`out`), at one scale and seed: the record of
    finished phases, independent phases in parallel processes, lanes of dependent ones, and
    `xllm train` runs. Subclasses name their module and scales and define `phases()`."""

    name: str  # in log lines
    module: str  # `python -m MODULE --phase NAME` runs one phase alone
    scales: dict[str, Any]  # scale name -> a dataclass with `stages`: name -> (steps, batch, lr)
    stage_runs: dict[str, tuple[str, str]]  # `xllm train` run -> (--stage, --modality)
    warmup_divisor = 20  # warm-up steps: steps // warmup_divisor (at least 1)
    train_flags: tuple[str, ...] = ()  # more `xllm train` flags for every run

    def __init__(self, out: Path, scale_name: str, seed: int, jobs: int) -> None:
        from dataclasses import asdict

        self.out = out.resolve()
        self.scale_name = scale_name
        self.scale = self.scales[scale_name]
        self.seed = seed
        self.jobs = jobs
        self.records = PhaseRecords(self.out / "phases")
        self.record: dict[str, Any] = {"scale": asdict(self.scale), "seed": seed, "phases": {}}
        # torch threads of `xllm train` runs: one beside other phases (on a small shared CPU
        # more threads spin against each other), every core for a run alone (set by
        # recipe_main; a phase run with --phase is one of several in parallel)
        self.train_threads = 1

    def phases(self) -> dict[str, Phase]:
        raise NotImplementedError

    def save_record(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.record["phases"].update(self.records.all())
        (self.out / "recipe.json").write_text(json.dumps(self.record, indent=2) + "\n")

    def parallel(self, names: list[str]) -> None:
        """Run independent phases at once, each in its own process (one torch thread each)."""
        todo = [n for n in names if not self.records.done(n)]
        if not todo:
            return
        log.info("phases %s: in parallel", ", ".join(todo))
        run_parallel(todo, self.phase_command, self.out)

    def phase_command(self, name: str) -> list[str]:
        """This recipe's command line for running one phase alone."""
        return [
            sys.executable, "-m", self.module, "--out", str(self.out),
            "--scale", self.scale_name, "--seed", str(self.seed), "--jobs", str(self.jobs),
            "--phase", name,
        ]  # fmt: skip

    def lane(self, names: list[str]) -> dict[str, Any]:
        """Phases that depend on each other, one after another in this process."""
        phases = self.phases()
        for name in names:
            self.records.run(name, phases[name])
        return {}

    def train(self, stage: str, model: Path) -> dict[str, Any]:
        """`xllm train` for one of `stage_runs` on DIR/data, into DIR/runs/STAGE (resumed)."""
        steps, batch, lr = self.scale.stages[stage]
        number, modality = self.stage_runs[stage]
        out = self.out / "runs" / stage
        args = [
            "train", "--stage", number, "--modality", modality,
            "--model", str(model), "--data", str(self.out / "data"), "--out", str(out),
            "--max-steps", str(steps), "--batch-size", str(batch), "--lr", str(lr),
            "--warmup", str(max(1, steps // self.warmup_divisor)), "--seed", str(self.seed),
            "--num-workers", "1", "--device", "cpu", "--log-every", "10", "--resume",
            *self.train_flags,
        ]  # fmt: skip
        log_file = self.out / "runs" / f"{stage}.log"
        xllm(args, log_file, steps, stage, self.train_threads)
        return {"steps": steps, "batch_size": batch, "lr": lr, **last_metrics(out)}

    def run(self, stop_after: str | None = None) -> None:
        raise NotImplementedError


def recipe_main(
    argv: list[str] | None,
    recipe: type[PhasedRecipe],
    description: str,
    install: tuple[Callable[[Path], Path], str] | None = None,
) -> int:
    """The command line every recipe shares: build DIR (or one phase of it), then install it
    where a recipe has a place to install to (`install`: the function and its --help)."""
    import argparse
    import random

    parser = argparse.ArgumentParser(prog=f"python -m {recipe.module}", description=description)
    parser.add_argument("--out", required=True, type=Path, help="work + output directory")
    parser.add_argument("--scale", choices=sorted(recipe.scales), default="full")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="processes for data generation")
    parser.add_argument("--stop-after", default=None, help="end after this phase")
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)  # one phase (internal)
    if install is not None:
        parser.add_argument("--install", action="store_true", help=install[1])
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler()]
        + ([] if args.phase else [logging.FileHandler(args.out / "recipe.log")]),
    )
    import torch

    # One intra-op thread: on a small shared CPU, more threads spin against each other.
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    built = recipe(args.out, args.scale, args.seed, args.jobs)
    if args.phase:  # one of several phases in parallel: `xllm train` runs keep one thread
        built.records.run(args.phase, built.phases()[args.phase])
        return 0
    built.train_threads = os.cpu_count() or 1
    log.info("%s recipe: out=%s scale=%s seed=%d", recipe.name, args.out, args.scale, args.seed)
    built.run(args.stop_after)
    if install is not None and args.install and (args.out / "model" / "xllm.json").is_file():
        log.info("installed the %s model in %s", recipe.name, install[0](args.out / "model"))
    return 0
