"""CTranslate2 Whisper (the `model.bin` of faster-whisper) -> `WhisperForConditionalGeneration`.

Why: small Whisper checkpoints reach us as faster-whisper directories (`model.bin`,
`tokenizer.json`, `config.json`), not as HF checkpoints. The weights are the same as HF's; only
names, fusions and the container differ, so the conversion is exact up to the file's dtype.

The container (CTranslate2's `ModelSpec._serialize`, binary version 6), little-endian:

    u32 binary_version, str spec_name, u32 spec_revision, u32 n_variables
    n_variables x (str name, u8 rank, rank x u32 dims, u8 dtype_id, u32 n_bytes, bytes)
    u32 n_aliases, n_aliases x (str alias, str variable_name)

where `str` is a u16 length (counting a final NUL), the UTF-8 bytes and the NUL. Names are
scopes such as `encoder/layer_3/self_attention/linear_0/weight`. What differs from HF:

    self-attention   `linear_0` is q, k, v fused on the output axis (3D, D); `linear_1` is out_proj.
                     HF's k_proj has no bias: the fused bias holds zeros there.
    cross-attention  `linear_0` is q, `linear_1` is k and v fused (2D, D), `linear_2` is out_proj.
    layer norms      `gamma` / `beta` are HF's `weight` / `bias`; `ffn/layer_norm` is HF's
                     `final_layer_norm` of the layer.
    projection       `decoder/projection/weight` is usually an alias of the token embeddings
                     (HF ties `proj_out` to `embed_tokens`).

Special-token ids are not in `model.bin`: they come from `tokenizer.json` (English-only and
multilingual checkpoints number them differently).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import GenerationConfig, WhisperConfig

CT2_BINARY_VERSION = 6
# CTranslate2's DataType enum, in order (include/ctranslate2/types.h).
CT2_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.float16,
    torch.bfloat16,
)
# Whisper's timestamp tokens, <|0.00|> ... <|30.00|> in steps of 20 ms, follow <|notimestamps|>;
# tokenizer.json leaves them out, the embedding table has rows for them.
TIMESTAMP_STEP_SECONDS = 0.02
TIMESTAMP_TOKENS = 1501
# 100 mel frames per second, halved by the encoder's strided conv: a 30 s window is 1500 frames.
ENCODER_FRAMES_PER_SECOND = 50
# transformers' rule for multilingual checkpoints (English-only vocabularies are one token smaller).
MULTILINGUAL_MIN_VOCAB = 51865


class Ct2FormatError(ValueError):
    """The file is not a CTranslate2 model this reader understands; the message says why."""


@dataclass
class Ct2Model:
    """The variables of a CTranslate2 `model.bin`, aliases resolved to the tensors they name."""

    spec: str  # e.g. "WhisperSpec"
    revision: int
    variables: dict[str, torch.Tensor]  # scope name -> tensor (0-dim for scalars)
    aliases: dict[str, str]  # alias -> variable name (both present in `variables`)


class _Cursor:
    def __init__(self, data: bytearray) -> None:
        self.data = data
        self.offset = 0

    def unpack(self, fmt: str) -> int:
        (value,) = struct.unpack_from("<" + fmt, self.data, self.offset)
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("H")  # counts the final NUL
        raw = bytes(self.data[self.offset : self.offset + length - 1])
        self.offset += length
        return raw.decode("utf-8")

    def tensor(self, shape: list[int], dtype: torch.dtype, n_bytes: int) -> torch.Tensor:
        if self.offset + n_bytes > len(self.data):
            raise Ct2FormatError("truncated file")
        if n_bytes == 0:
            return torch.empty(shape, dtype=dtype)
        count = n_bytes // dtype.itemsize
        flat = torch.frombuffer(self.data, dtype=dtype, count=count, offset=self.offset)
        self.offset += n_bytes
        return flat.clone().reshape(shape)  # a copy: aligned, and the file buffer can go


def read_ct2_model(path: Path) -> Ct2Model:
    """Read every variable of a CTranslate2 `model.bin` (binary version 6) into tensors.

    Quantized weights (int8 / int16 with a `<name>_scale` variable) are dequantized to float32:
    CTranslate2 stores `rint(w * scale)`, so `w = q / scale`.
    """
    cursor = _Cursor(bytearray(path.read_bytes()))
    version = cursor.unpack("I")
    if version != CT2_BINARY_VERSION:
        raise Ct2FormatError(
            f"{path}: CTranslate2 binary version {version}; this reader knows {CT2_BINARY_VERSION}"
        )
    spec = cursor.string()
    revision = cursor.unpack("I")
    variables: dict[str, torch.Tensor] = {}
    for _ in range(cursor.unpack("I")):
        name = cursor.string()
        shape = [cursor.unpack("I") for _ in range(cursor.unpack("B"))]
        dtype_id = cursor.unpack("B")
        if dtype_id >= len(CT2_DTYPES):
            raise Ct2FormatError(f"{path}: {name} has unknown dtype id {dtype_id}")
        variables[name] = cursor.tensor(shape, CT2_DTYPES[dtype_id], cursor.unpack("I"))
    aliases: dict[str, str] = {}
    for _ in range(cursor.unpack("I")):
        alias = cursor.string()
        aliases[alias] = cursor.string()
    if cursor.offset != len(cursor.data):
        raise Ct2FormatError(f"{path}: {len(cursor.data) - cursor.offset} trailing bytes")
    for alias, target in aliases.items():
        if target not in variables:
            raise Ct2FormatError(f"{path}: alias {alias} names a missing variable {target}")
        variables[alias] = variables[target]
    for name in [n for n in variables if n + "_scale" in variables]:
        if variables[name].dtype in (torch.int8, torch.int16):
            scale = variables.pop(name + "_scale").float()
            weight = variables[name].float()
            variables[name] = weight / (scale[:, None] if scale.dim() == 1 else scale)
    return Ct2Model(spec=spec, revision=revision, variables=variables, aliases=aliases)


def _count_layers(variables: dict[str, torch.Tensor], stack: str) -> int:
    pattern = re.compile(rf"^{stack}/layer_(\d+)/")
    indices = {int(m.group(1)) for name in variables if (m := pattern.match(name))}
    if not indices or indices != set(range(len(indices))):
        raise Ct2FormatError(f"no contiguous {stack} layers in the model")
    return len(indices)


def _linear(variables: dict[str, torch.Tensor], scope: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (out, in), bias (out,)); a missing bias is zeros, as CTranslate2 fuses them."""
    weight = variables[f"{scope}/weight"]
    bias = variables.get(f"{scope}/bias")
    return weight, bias if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)


def _layer_norm(variables: dict[str, torch.Tensor], scope: str, hf: str) -> dict[str, torch.Tensor]:
    return {f"{hf}.weight": variables[f"{scope}/gamma"], f"{hf}.bias": variables[f"{scope}/beta"]}


def _attention(
    variables: dict[str, torch.Tensor], scope: str, hf: str, cross: bool
) -> dict[str, torch.Tensor]:
    """HF q/k/v/out projections of one attention block.

    self: linear_0 (3D, D) = [q; k; v], linear_1 = out.  cross: linear_0 (D, D) = q,
    linear_1 (2D, D) = [k; v], linear_2 = out. The k bias is dropped: HF's k_proj has none, and a
    key bias adds the same q.b to every score of a query, which the softmax cancels.
    """
    state: dict[str, torch.Tensor] = {}
    if cross:
        q_w, q_b = _linear(variables, f"{scope}/linear_0")
        kv_w, kv_b = _linear(variables, f"{scope}/linear_1")
        k_w, v_w = kv_w.chunk(2)
        _, v_b = kv_b.chunk(2)
        out_w, out_b = _linear(variables, f"{scope}/linear_2")
    else:
        qkv_w, qkv_b = _linear(variables, f"{scope}/linear_0")
        q_w, k_w, v_w = qkv_w.chunk(3)
        q_b, _, v_b = qkv_b.chunk(3)
        out_w, out_b = _linear(variables, f"{scope}/linear_1")
    state[f"{hf}.q_proj.weight"], state[f"{hf}.q_proj.bias"] = q_w, q_b
    state[f"{hf}.k_proj.weight"] = k_w
    state[f"{hf}.v_proj.weight"], state[f"{hf}.v_proj.bias"] = v_w, v_b
    state[f"{hf}.out_proj.weight"], state[f"{hf}.out_proj.bias"] = out_w, out_b
    return state


def _ffn(variables: dict[str, torch.Tensor], scope: str, hf: str) -> dict[str, torch.Tensor]:
    state = _layer_norm(variables, f"{scope}/layer_norm", f"{hf}.final_layer_norm")
    for ct2, name in (("linear_0", "fc1"), ("linear_1", "fc2")):
        state[f"{hf}.{name}.weight"], state[f"{hf}.{name}.bias"] = _linear(
            variables, f"{scope}/{ct2}"
        )
    return state


def whisper_state_dict(variables: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CTranslate2 Whisper variables -> `WhisperForConditionalGeneration` state dict."""
    v = variables
    state: dict[str, torch.Tensor] = {}
    enc, dec = "model.encoder", "model.decoder"
    for conv in ("conv1", "conv2"):  # weight (D, C_in, 3)
        state[f"{enc}.{conv}.weight"] = v[f"encoder/{conv}/weight"]
        state[f"{enc}.{conv}.bias"] = v[f"encoder/{conv}/bias"]
    state[f"{enc}.embed_positions.weight"] = v["encoder/position_encodings/encodings"]  # (1500, D)
    for i in range(_count_layers(v, "encoder")):
        scope, hf = f"encoder/layer_{i}", f"{enc}.layers.{i}"
        state |= _attention(v, f"{scope}/self_attention", f"{hf}.self_attn", cross=False)
        state |= _layer_norm(v, f"{scope}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
        state |= _ffn(v, f"{scope}/ffn", hf)
    state |= _layer_norm(v, "encoder/layer_norm", f"{enc}.layer_norm")

    state[f"{dec}.embed_tokens.weight"] = v["decoder/embeddings/weight"]  # (vocab, D)
    state[f"{dec}.embed_positions.weight"] = v["decoder/position_encodings/encodings"]  # (448, D)
    for i in range(_count_layers(v, "decoder")):
        scope, hf = f"decoder/layer_{i}", f"{dec}.layers.{i}"
        state |= _attention(v, f"{scope}/self_attention", f"{hf}.self_attn", cross=False)
        state |= _layer_norm(v, f"{scope}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
        state |= _attention(v, f"{scope}/attention", f"{hf}.encoder_attn", cross=True)
        state |= _layer_norm(v, f"{scope}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
        state |= _ffn(v, f"{scope}/ffn", hf)
    state |= _layer_norm(v, "decoder/layer_norm", f"{dec}.layer_norm")
    state["proj_out.weight"] = v.get("decoder/projection/weight", v["decoder/embeddings/weight"])
    return state


@dataclass
class WhisperSpecialTokens:
    """Ids of Whisper's control tokens, read from `tokenizer.json`'s added tokens."""

    end_of_text: int  # <|endoftext|>: eos, pad and HF's bos
    start_of_transcript: int  # <|startoftranscript|>: the decoder start
    translate: int
    transcribe: int
    start_of_prev: int
    no_timestamps: int
    languages: dict[str, int]  # "<|en|>" -> id, in tokenizer order

    @classmethod
    def from_tokenizer_json(cls, tokenizer: dict[str, Any]) -> WhisperSpecialTokens:
        ids = {t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])}
        needed = (
            "<|endoftext|>",
            "<|startoftranscript|>",
            "<|translate|>",
            "<|transcribe|>",
            "<|startofprev|>",
            "<|notimestamps|>",
        )
        missing = [t for t in needed if t not in ids]
        if missing:
            raise Ct2FormatError(f"tokenizer.json lacks Whisper's special tokens {missing}")
        sot, translate = ids["<|startoftranscript|>"], ids["<|translate|>"]
        # The language tokens lie between <|startoftranscript|> and <|translate|>.
        languages = {
            t: i for t, i in sorted(ids.items(), key=lambda kv: kv[1]) if sot < i < translate
        }
        return cls(
            end_of_text=ids["<|endoftext|>"],
            start_of_transcript=sot,
            translate=translate,
            transcribe=ids["<|transcribe|>"],
            start_of_prev=ids["<|startofprev|>"],
            no_timestamps=ids["<|notimestamps|>"],
            languages=languages,
        )


def whisper_config(
    variables: dict[str, torch.Tensor], special: WhisperSpecialTokens, ct2_config: dict[str, Any]
) -> WhisperConfig:
    """The `WhisperConfig` the tensors imply (sizes from shapes, heads from the stored scalars)."""
    from transformers import WhisperConfig

    embeddings = variables["decoder/embeddings/weight"]  # (vocab, D)
    conv1 = variables["encoder/conv1/weight"]  # (D, n_mels, 3)
    return WhisperConfig(
        vocab_size=embeddings.shape[0],
        num_mel_bins=conv1.shape[1],
        d_model=embeddings.shape[1],
        encoder_layers=_count_layers(variables, "encoder"),
        encoder_attention_heads=int(variables["encoder/num_heads"]),
        encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_layers=_count_layers(variables, "decoder"),
        decoder_attention_heads=int(variables["decoder/num_heads"]),
        decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
        pad_token_id=special.end_of_text,
        bos_token_id=special.end_of_text,
        eos_token_id=special.end_of_text,
        decoder_start_token_id=special.start_of_transcript,
        suppress_tokens=ct2_config.get("suppress_ids"),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin"),
        tie_word_embeddings=bool(
            torch.equal(
                variables["decoder/embeddings/weight"],
                variables.get("decoder/projection/weight", embeddings),
            )
        ),
        architectures=["WhisperForConditionalGeneration"],
    )


def whisper_generation_config(
    config: WhisperConfig, special: WhisperSpecialTokens, ct2_config: dict[str, Any]
) -> GenerationConfig:
    """The `GenerationConfig` HF's Whisper `generate` needs (task and language token ids)."""
    from transformers import GenerationConfig

    multilingual = config.vocab_size >= MULTILINGUAL_MIN_VOCAB
    heads = ct2_config.get("alignment_heads") or [
        [layer, head]
        for layer in range(config.decoder_layers // 2, config.decoder_layers)
        for head in range(config.decoder_attention_heads)
    ]
    extra: dict[str, Any] = {}
    if multilingual:
        extra["lang_to_id"] = special.languages
        extra["task_to_id"] = {"transcribe": special.transcribe, "translate": special.translate}
    else:
        extra["forced_decoder_ids"] = [[1, special.no_timestamps]]
    return GenerationConfig(
        alignment_heads=[list(h) for h in heads],
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin"),
        suppress_tokens=ct2_config.get("suppress_ids"),
        bos_token_id=special.end_of_text,
        eos_token_id=special.end_of_text,
        pad_token_id=special.end_of_text,
        decoder_start_token_id=special.start_of_transcript,
        no_timestamps_token_id=special.no_timestamps,
        prev_sot_token_id=special.start_of_prev,
        is_multilingual=multilingual,
        max_initial_timestamp_index=50,  # HF's Whisper default: the first timestamp within 1 s
        max_length=config.max_target_positions,
        return_timestamps=False,
        **extra,
    )


def convert_ct2_whisper(
    model_bin: Path,
    tokenizer_json: Path,
    out_dir: Path,
    ct2_config_json: Path | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a `WhisperForConditionalGeneration` directory from a faster-whisper model.

    Saves the model (in the file's float dtype unless `dtype` is given), its generation config,
    a `WhisperFeatureExtractor` with the model's mel bins and the tokenizer with Whisper's
    timestamp tokens added, so `WhisperProcessor.from_pretrained(out_dir)` works too.
    """
    from transformers import (
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizer,
    )

    ct2 = read_ct2_model(model_bin)
    if ct2.spec != "WhisperSpec":
        raise Ct2FormatError(f"{model_bin}: a {ct2.spec}, not a WhisperSpec")
    tokenizer_data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    ct2_config = json.loads(ct2_config_json.read_text()) if ct2_config_json else {}
    special = WhisperSpecialTokens.from_tokenizer_json(tokenizer_data)
    config = whisper_config(ct2.variables, special, ct2_config)
    state = whisper_state_dict(ct2.variables)
    dtype = dtype or state["model.encoder.conv1.weight"].dtype
    if not dtype.is_floating_point:
        dtype = torch.float32

    model = WhisperForConditionalGeneration(config).to(dtype)
    model.load_state_dict(state, strict=True)
    model.generation_config = whisper_generation_config(config, special, ct2_config)
    model.config.dtype = dtype
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)

    window_seconds = config.max_source_positions // ENCODER_FRAMES_PER_SECOND
    extractor = WhisperFeatureExtractor(
        feature_size=config.num_mel_bins, chunk_length=window_seconds
    )
    extractor.save_pretrained(out_dir)
    tokenizer = WhisperTokenizer(tokenizer_file=str(tokenizer_json))
    n_text = special.no_timestamps + 1
    if config.vocab_size >= n_text + TIMESTAMP_TOKENS and len(tokenizer) == n_text:
        tokenizer.add_tokens(
            [f"<|{i * TIMESTAMP_STEP_SECONDS:.2f}|>" for i in range(TIMESTAMP_TOKENS)]
        )
    tokenizer.save_pretrained(out_dir)
    return out_dir
