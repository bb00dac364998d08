"""An interrupted and resumed run ends with the same weights as an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train.helpers import stage_args, train

# Dropout in the Q-Former, gradient accumulation, a partial last batch, warmup + cosine and a
# DataLoader worker all take part, so every piece of state that resume restores matters.
ARGS = (
    "--stage",
    "2",
    "--modality",
    "image",
    "--max-steps",
    "6",
    "--batch-size",
    "4",
    "--grad-accum",
    "2",
    "--lr",
    "1e-2",
    "--warmup",
    "2",
    "--num-workers",
    "1",
)


def test_resume_is_exact(tiny_model_dir: Path, toy_dir: Path, tmp_path: Path) -> None:
    data = toy_dir / "image_train.jsonl"
    whole = train(tiny_model_dir, data, tmp_path / "whole", *ARGS)
    first = train(tiny_model_dir, data, tmp_path / "parts", *ARGS, "--stop-at-step", "3")
    assert [m["step"] for m in first] == [1, 2, 3]
    assert (tmp_path / "parts" / "checkpoints" / "step-00000003").is_dir()
    # metrics.jsonl goes on where the checkpoint left it
    resumed = train(tiny_model_dir, data, tmp_path / "parts", *ARGS, "--resume")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    a = load_file(str(tmp_path / "whole" / "interfaces.safetensors"))
    b = load_file(str(tmp_path / "parts" / "interfaces.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    for x, y in zip(whole, resumed, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6)
        assert x["lr"] == pytest.approx(y["lr"])


def test_out_with_a_run_needs_resume(
    tiny_model_dir: Path, toy_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from xllm.main import main

    data = toy_dir / "image_train.jsonl"
    train(tiny_model_dir, data, tmp_path / "out", "--max-steps", "1", "--batch-size", "6")
    argv = [
        "train",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "out"),
        "--max-steps",
        "2",
        "--device",
        "cpu",
    ]
    assert main(argv) == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_refuses_another_stage(
    tiny_model_dir: Path, toy_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from xllm.main import main

    out = tmp_path / "out"
    train(tiny_model_dir, toy_dir, out, *stage_args(2, "image", 1, 6))
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(toy_dir), "--out", str(out)]
    argv += [*stage_args(2, "video", 2, 6), "--device", "cpu", "--resume"]
    assert main(argv) == 2
    assert "cannot resume as stage 2 video" in capsys.readouterr().err
