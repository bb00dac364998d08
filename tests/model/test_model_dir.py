"""Model directories: save trained interfaces, load them back; errors name the file or key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from xllm.model.checkpoint import load_model, save_interfaces
from xllm.model.config import INTERFACES_NAME, ModelConfigError
from xllm.model.media import DecodedVideo


def multimodal_logits(model, media) -> torch.Tensor:
    """Logits over a whole prompt holding an image, an audio clip and a video with sound."""
    video = DecodedVideo(
        frames=[media.image(seed=10 + i, size=(64, 64)) for i in range(3)],
        timestamps=[0.0, 1.0, 2.0],
        audio=media.waveform(0.5, seed=3),
    )
    items = [
        model.prepare("image", media.image(seed=1)),
        model.prepare("audio", media.waveform(0.7, seed=2)),
        model.prepare("video", video),
    ]
    turns = [("user", "Look at <image>, hear <audio> and watch <video>.")]
    with torch.inference_mode():
        prompt = model.prompt_embeddings(turns, items)
        assert [[kind for kind, _ in item] for item in prompt.encoded] == [
            ["image"],
            ["audio"],
            ["video", "audio"],
        ]
        return model.llm(inputs_embeds=prompt.embeds[None]).logits[0]


@pytest.fixture
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny model directory, free to break."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def test_round_trip_of_changed_interfaces(tiny_model_dir: Path, tmp_path: Path, media) -> None:
    model = load_model(tiny_model_dir, device="cpu")
    before = multimodal_logits(model, media)
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.interfaces().values():
            for p in module.parameters():
                p.copy_(torch.randn_like(p) * 0.2)
    changed = multimodal_logits(model, media)
    # The interfaces really feed the LLM (new CIF weights may even change the audio's length).
    assert changed.shape != before.shape or (changed - before).abs().max() > 1e-3

    out = tmp_path / "trained"
    save_interfaces(model, out, base_dir=tiny_model_dir)
    # Only the config and the interfaces are written; components are referenced in place.
    assert sorted(p.name for p in out.iterdir()) == [INTERFACES_NAME, "xllm.json"]
    saved = json.loads((out / "xllm.json").read_text())
    for name in ("llm", "vision", "speech"):
        assert Path(saved[name]["path"]) == (tiny_model_dir / name).resolve()

    again = load_model(out, device="cpu")
    for name, module in model.interfaces().items():
        theirs = again.interfaces()[name].state_dict()
        for key, value in module.state_dict().items():
            torch.testing.assert_close(theirs[key], value, rtol=0, atol=0, msg=f"{name}.{key}")
    torch.testing.assert_close(multimodal_logits(again, media), changed, rtol=0, atol=0)


def test_frame_stack_model_round_trip(tmp_path: Path, media) -> None:
    from xllm.model.tiny import init_tiny

    path = init_tiny(tmp_path / "fs", speech_interface="frame_stack")
    model = load_model(path, device="cpu")
    assert type(model.speech_interface).__name__ == "FrameStackProjector"
    prepared = model.prepare("audio", media.waveform(1.0))
    with torch.inference_mode():
        (tokens,) = model.encode([prepared])
    assert tokens[0][1].shape == (10, 64)  # 50 frames stacked by 5
    save_interfaces(model, tmp_path / "out", base_dir=path)
    torch.testing.assert_close(
        multimodal_logits(load_model(tmp_path / "out", device="cpu"), media),
        multimodal_logits(model, media),
    )


def test_missing_interfaces_file(model_copy: Path) -> None:
    (model_copy / INTERFACES_NAME).unlink()
    with pytest.raises(ModelConfigError, match=INTERFACES_NAME):
        load_model(model_copy, device="cpu")
    # Training may start from fresh interfaces.
    assert load_model(model_copy, device="cpu", require_interfaces=False).image_interface


def test_missing_llm_config(model_copy: Path) -> None:
    (model_copy / "llm" / "config.json").unlink()
    with pytest.raises(ModelConfigError) as info:
        load_model(model_copy, device="cpu")
    assert "config.json" in str(info.value) and str(model_copy / "llm") in str(info.value)


def test_missing_component_directory(model_copy: Path) -> None:
    shutil.rmtree(model_copy / "speech")
    with pytest.raises(ModelConfigError, match=r"speech\.path"):
        load_model(model_copy, device="cpu")


def test_missing_directory_and_config(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match="not found"):
        load_model(tmp_path / "nowhere", device="cpu")
    with pytest.raises(ModelConfigError, match=r"xllm\.json"):
        load_model(tmp_path, device="cpu")


def edit_config(model_dir: Path, edit) -> None:
    path = model_dir / "xllm.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda c: c["image_interface"].update(num_query_tokns=4), ["image_interface", "tokns"]),
        (lambda c: c["speech_interface"].update(type="conformer"), ["conformer"]),
        (lambda c: c.update(speach={"path": "speech"}), ["speach"]),
        (lambda c: c.pop("llm"), ["'llm'"]),
        (lambda c: c.update(llm="llm"), ["'llm'"]),
        (lambda c: c.update(tags={"img": ["<i>", "</i>"]}), ["tags", "img"]),
        (lambda c: c.update(sampling={"temp": 0.5}), ["sampling", "temp"]),
        # A shape change the saved interfaces do not have.
        (lambda c: c["image_interface"].update(num_query_tokens=4), [INTERFACES_NAME, "image"]),
        (lambda c: c["speech_interface"].update(type="frame_stack"), [INTERFACES_NAME, "speech"]),
    ],
)
def test_bad_config_keys_are_named(model_copy: Path, edit, words: list[str]) -> None:
    edit_config(model_copy, edit)
    with pytest.raises(ModelConfigError) as info:
        load_model(model_copy, device="cpu")
    for word in words:
        assert word in str(info.value)


def test_invalid_json(model_copy: Path) -> None:
    (model_copy / "xllm.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match="not valid JSON"):
        load_model(model_copy, device="cpu")


def test_half_precision_encoders_feed_float32_interfaces(tiny_model_dir: Path, media) -> None:
    """With bf16 encoders (a GPU, or --dtype bfloat16) the interfaces stay float32; encode() must
    bridge the two (it used to fail on audio with "mat1 and mat2 must have the same dtype")."""
    model = load_model(tiny_model_dir, device="cpu")
    reference = multimodal_logits(model, media)
    model.vision.to(torch.bfloat16)
    model.speech.to(torch.bfloat16)
    assert all(
        p.dtype == torch.float32 for m in model.interfaces().values() for p in m.parameters()
    )
    half = multimodal_logits(model, media)
    assert half.dtype == torch.float32
    if half.shape == reference.shape:  # bf16 features may move a CIF fire count by one
        assert (half - reference).abs().max() < 0.5


@pytest.mark.parametrize(
    ("dtype", "native_bf16", "llm", "encoders"),
    [
        ("auto", True, torch.float32, torch.float32),
        ("bfloat16", True, torch.bfloat16, torch.bfloat16),
        ("bfloat16", False, torch.bfloat16, torch.float32),
    ],
)
def test_cpu_encoders_run_in_bfloat16_when_asked_and_native(
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    dtype: str,
    native_bf16: bool,
    llm: torch.dtype,
    encoders: torch.dtype,
) -> None:
    """--dtype bfloat16 on the CPU puts the encoders in bf16 beside the LLM where the CPU has
    native bf16 matmuls; on one without (AVX2: emulated, several times slower than float32) they
    stay float32 and the log says why. The default stays float32; the interfaces are float32."""
    monkeypatch.setattr("xllm.model.checkpoint.cpu_bf16_is_fast", lambda: native_bf16)
    with caplog.at_level("INFO", logger="xllm.model"):
        model = load_model(tiny_model_dir, device="cpu", dtype=dtype)
    assert model.llm.dtype == llm
    for encoder in (model.vision, model.speech):
        assert {p.dtype for p in encoder.parameters()} == {encoders}
    assert {p.dtype for m in model.interfaces().values() for p in m.parameters()} == {torch.float32}
    told = "no native bfloat16" in caplog.text
    assert told == (llm != encoders)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_pipeline(tiny_model_dir: Path, media) -> None:
    from xllm.model.generate import generate
    from xllm.model.sampling import SamplingParams

    model = load_model(tiny_model_dir, device="cuda")  # auto: bf16 LLM and encoders
    assert model.llm.dtype in (torch.bfloat16, torch.float16)
    logits = multimodal_logits(model, media)
    assert torch.isfinite(logits).all()
    embeds = model.prompt_embeddings([("user", "hi")], []).embeds
    deltas = list(generate(model.llm, model.tokenizer, embeds, SamplingParams(max_tokens=8)))
    assert 1 <= len(deltas) <= 8
