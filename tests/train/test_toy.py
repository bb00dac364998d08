"""`xllm data toy`: manifests whose media decode, and a clear message without espeak-ng."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xllm.model.media import load_media_file
from xllm.model.train.toy import COLORS, SHAPES


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_toy_world_manifests(toy_dir: Path) -> None:
    for name in ("image", "speech", "video", "mixed"):
        assert len(rows(toy_dir / f"{name}_train.jsonl")) == 6
        assert len(rows(toy_dir / f"{name}_val.jsonl")) == 2
    captions = [r["text"] for r in rows(toy_dir / "image_train.jsonl") if "text" in r]
    assert all(
        any(c in t.lower() for c in COLORS) and any(s in t for s in SHAPES) for t in captions
    )
    for row in rows(toy_dir / "mixed_train.jsonl") + rows(toy_dir / "video_val.jsonl"):
        for kind in ("image", "audio", "video"):
            if kind in row:
                media = load_media_file(toy_dir / row[kind], kind)
                if kind == "video":
                    assert media.frames and 96 <= min(media.frames[0].size) <= 256
    image = load_media_file(toy_dir / rows(toy_dir / "image_train.jsonl")[0]["image"], "image")
    assert min(image.size) >= 64 and max(image.size) <= 512


def test_toy_is_deterministic(toy_dir: Path, tmp_path: Path) -> None:
    from xllm.model.train.toy import generate_toy

    generate_toy(tmp_path, 6, seed=0, n_val=2, jobs=1)  # one process instead of two
    for name in ("image_train", "speech_val", "mixed_train"):
        assert rows(tmp_path / f"{name}.jsonl") == rows(toy_dir / f"{name}.jsonl")


def test_missing_espeak_says_what_to_install(
    monkeypatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from xllm.main import main

    monkeypatch.setattr("xllm.model.train.toy.shutil.which", lambda name: None)
    assert main(["data", "toy", "--out", str(tmp_path / "toy"), "--n", "2"]) == 2
    assert "apt-get install espeak-ng" in capsys.readouterr().err
