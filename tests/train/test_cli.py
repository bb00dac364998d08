"""Configuration (YAML + flags), user errors, and `xllm eval`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.train.helpers import stage_args, train
from xllm.model.evaluation.metrics import keyword_hit, score
from xllm.model.train.config import build_config, load_yaml


def test_flags_override_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("stage: 1\nmodality: speech\nlr: 3.0e-5\ngrad-accum: 4\nmodel: m\n")
    config = build_config(
        load_yaml(path), {"lr": 1e-3, "data": Path("d"), "out": Path("o"), "grad_accum": None}
    )
    assert (config.stage, config.modality, config.lr, config.grad_accum) == (1, "speech", 1e-3, 4)
    assert config.model == Path("m")


@pytest.mark.parametrize(
    ("yaml", "flags", "message"),
    [
        ("lr: 1e-4\nbogus: 1\n", [], "unknown option 'bogus'"),
        ("", ["--stage", "3", "--modality", "image"], "use --modality all"),
        ("", ["--stage", "1", "--modality", "video"], "stage 1 trains image or speech"),
    ],
)
def test_config_mistakes_exit_2(tmp_path: Path, capsys, yaml: str, flags: list, message: str):
    from xllm.main import main

    config = tmp_path / "c.yaml"
    config.write_text(yaml)
    argv = ["train", "--config", str(config), "--model", "m", "--data", "d", "--out", "o", *flags]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_eval_scores(tiny_model_dir: Path, toy_dir: Path, tmp_path: Path, capsys) -> None:
    from xllm.main import main

    out = tmp_path / "model"
    train(tiny_model_dir, toy_dir / "video_train.jsonl", out, *stage_args(2, "video", 1, 6))
    capsys.readouterr()
    argv = [
        "eval",
        "--model",
        str(out),
        "--data",
        str(toy_dir / "video_val.jsonl"),
        "--task",
        "direction",
        "--max-tokens",
        "3",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "direction" and result["rows"] == 2
    assert 0.0 <= result["keyword_accuracy"] <= 1.0
    assert json.loads((out / "eval" / "video_val-direction.json").read_text()) == result


def test_metrics() -> None:
    assert keyword_hit("A red circle.", "a RED circle, surely")
    assert not keyword_hit("A red circle.", "a blue circle")
    assert keyword_hit("Left.", "It goes left.")
    asr = score("asr", ["the star is blue"], ["The star is blue."])
    assert asr == {"wer": 0.0, "cer": 0.0}
    assert score("asr", ["a red circle"], ["a red"])["wer"] == pytest.approx(1 / 3)
