"""torchrun with 2 CPU processes (gloo): DDP trains, and only rank 0 writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.train.helpers import read_metrics


def test_torchrun_two_processes(tiny_model_dir: Path, toy_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        "-m",
        "xllm.train",
        # stage 3 over the toy folder: *_train.jsonl mixed, modality-balanced batches
        "--stage",
        "3",
        "--modality",
        "all",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(toy_dir),
        "--out",
        str(out),
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--log-every",
        "1",
        "--num-workers",
        "0",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m["step"] for m in read_metrics(out)] == [1, 2]  # one writer, not two
    assert [p.name for p in (out / "checkpoints").iterdir() if p.is_dir()] == ["step-00000002"]
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert (out / "interfaces.safetensors").is_file()
    # A step's rows are counted over both ranks: 2 ranks x 2 rows.
    assert read_metrics(out)[-1]["rows"] == 8
