"""The recipe's phase records: a finished phase is recorded once and skipped when run again."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from xllm.model.recipes.phases import PhasedRecipe, PhaseRecords, last_metrics, recipe_main


def test_a_finished_phase_is_skipped_and_its_figures_kept(tmp_path: Path) -> None:
    records = PhaseRecords(tmp_path / "phases")
    calls: list[str] = []

    def phase() -> dict[str, int]:
        calls.append("ran")
        return {"figure": len(calls)}

    records.run("b", phase)
    records.run("a", lambda: None)
    records.run("b", phase)
    assert calls == ["ran"]
    assert records.done("b") and not records.done("c")
    everything = records.all()
    assert list(everything) == ["a", "b"]
    assert everything["b"]["figure"] == 1 and "seconds" in everything["b"]
    assert set(everything["a"]) == {"seconds"}


def test_last_metrics_reads_the_last_training_record(tmp_path: Path) -> None:
    assert last_metrics(tmp_path) == {}
    lines = [
        {"step": 1, "loss": 2.0, "lr": 0.1},
        {"step": 2, "loss": 1.5, "lr": 0.1},
        {"step": 2, "eval_loss": 1.0},
    ]
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"step": 3, "lo'
    (tmp_path / "metrics.jsonl").write_text(text)
    assert last_metrics(tmp_path) == {"step": 2, "loss": 1.5}


@dataclass
class ProbeScale:
    stages: dict = field(default_factory=dict)


PROBE_SCALES = {"full": ProbeScale()}
PROBE_RUNS: dict[str, tuple[str, str]] = {}


def test_train_runs_take_every_core_only_when_alone(tmp_path: Path, monkeypatch) -> None:
    """A phase run with --phase runs beside others (one torch thread per `xllm train`); the
    recipe's own process runs its phases alone (every core)."""
    seen: list[tuple[str, int]] = []

    class Probe(PhasedRecipe):
        name = module = "probe"
        scales = PROBE_SCALES
        stage_runs = PROBE_RUNS

        def phases(self) -> dict:
            return {"x": lambda: seen.append(("phase", self.train_threads))}

        def run(self, stop_after: str | None = None) -> None:
            seen.append(("run", self.train_threads))

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert recipe_main(["--out", str(tmp_path)], Probe, "probe") == 0
    assert recipe_main(["--out", str(tmp_path), "--phase", "x"], Probe, "probe") == 0
    assert seen == [("run", os.cpu_count()), ("phase", 1)]


def test_training_uses_bfloat16_autocast_only_where_the_cpu_has_it(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    """The default-model recipe trains under bf16 autocast on CPUs with native bf16 matmuls and
    in float32 elsewhere (emulated bf16 is far slower); `--precision bf16` asked for on such a
    CPU still runs, with a warning."""
    import torch

    from xllm.model.recipes.default_model import Recipe
    from xllm.model.train.config import TrainConfig
    from xllm.model.train.precision import autocast_dtype

    recipe = Recipe(tmp_path, "smoke", 0, 1)
    cpu = torch.device("cpu")
    for native, precision in ((True, "bf16"), (False, "fp32")):
        for where in ("xllm.model.llm", "xllm.model.train.precision"):
            monkeypatch.setattr(f"{where}.cpu_bf16_is_fast", lambda n=native: n)
        flags = recipe.train_flags
        assert flags[flags.index("--precision") + 1] == precision
        caplog.clear()
        with caplog.at_level("WARNING", logger="xllm.train"):
            assert autocast_dtype(TrainConfig(precision="bf16"), cpu) == torch.bfloat16
        assert ("emulated" in caplog.text) == (not native)
        assert autocast_dtype(TrainConfig(precision="auto"), cpu) is None  # float32 by default
