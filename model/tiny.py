"""`xllm init-tiny`: a complete model directory with tiny random weights in the real architectures.

Every component is the real class (GlmForCausalLM, Blip2VisionModel, Blip2QFormerModel,
WhisperEncoder, the C-Former) at toy width, with a real byte-level BPE tokenizer trained by
`tokenizers` on a small built-in corpus. Tests and the server's fallback model use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Blip2VisionModel,
    GlmConfig,
    GlmForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from xllm.model.config import (
    ComponentPath,
    QFormerInterfaceConfig,
    SpeechInterfaceConfig,
    Tags,
    XLLMConfig,
)
from xllm.model.encoders.speech import tiny_whisper_config
from xllm.model.encoders.vision import tiny_vision_config
from xllm.model.prompt import GLM4_CHAT_TEMPLATE

# GLM-4's special tokens, in its order, then the media tags (kept whole by the tokenizer).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
]
TAG_TOKENS = ["<image>", "</image>", "<audio>", "</audio>", "<video>", "</video>"]

CORPUS = """\
a red circle. a green square. a blue triangle. a yellow star. a purple circle. an orange square.
the circle is red. the square is green. the triangle is blue. the star is yellow.
what color is the shape? what shape is this? which way does it move? describe the picture.
the shape moves left. the shape moves right. the shape moves up. the shape moves down.
What is in the image? Describe the image. What do you see? Transcribe the audio.
Hello! How can I help you today? I can see an image, hear audio and watch a video.
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
Large language models can read images, speech and video as if they were foreign languages.
请忠实地识别该语音。请根据图片忠实地识别这段语音。这是一张图片。你好，很高兴见到你。
0 1 2 3 4 5 6 7 8 9 10 100 1000. Yes. No. Maybe. Thank you. Goodbye.
"""


def train_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + TAG_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines() * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:] + TAG_TOKENS,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = GLM4_CHAT_TEMPLATE
    return fast


CausalLM = TypeVar("CausalLM", bound=PreTrainedModel)


def stop_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int | list[int]]:
    """pad and eos ids of a tokenizer from here, as config kwargs: GLM-4 stops on
    <|endoftext|>, <|user|> (the next turn) and <|observation|>."""
    ids = tokenizer.convert_tokens_to_ids
    return {
        "pad_token_id": ids("<|endoftext|>"),
        "eos_token_id": [ids("<|endoftext|>"), ids("<|user|>"), ids("<|observation|>")],
    }


def with_stop_ids(model: CausalLM) -> CausalLM:
    """`generate` stops where the model's config says (HF reads generation_config)."""
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.pad_token_id = model.config.pad_token_id
    return model


def glm_for_tokenizer(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    max_len: int = 2048,
) -> GlmForCausalLM:
    """A random `GlmForCausalLM` in GLM-4's layout, sized freely, for a tokenizer from here."""
    config = GlmConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        partial_rotary_factor=0.5,
        attention_bias=True,
        max_position_embeddings=max_len,
        tie_word_embeddings=False,
        **stop_token_ids(tokenizer),
    )
    return with_stop_ids(GlmForCausalLM(config))


def tiny_glm(tokenizer: PreTrainedTokenizerFast, max_len: int = 2048) -> GlmForCausalLM:
    return glm_for_tokenizer(
        tokenizer, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, max_len=max_len
    )


def tiny_llama(tokenizer: PreTrainedTokenizerFast, max_len: int = 2048) -> LlamaForCausalLM:
    """A random `LlamaForCausalLM` (the default model's LLM family) for a tokenizer from here:
    what the llama.cpp backend runs."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_len,
        tie_word_embeddings=True,
        **stop_token_ids(tokenizer),
    )
    return with_stop_ids(LlamaForCausalLM(config))


def tiny_image_interface() -> QFormerInterfaceConfig:
    """A 2-layer, 32-wide Q-Former with 8 queries per image or video frame."""
    return QFormerInterfaceConfig(
        num_query_tokens=8,
        qformer={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "cross_attention_frequency": 1,
            "vocab_size": 64,
        },
        max_frames=8,
    )


def tiny_speech_interface(
    kind: str = "cformer", speech_states: Literal["encoder", "decoder"] = "encoder"
) -> SpeechInterfaceConfig:
    if speech_states == "decoder":  # the default model's design: one token per decoder state
        return SpeechInterfaceConfig(
            type="frame_stack",
            stack_frames=1,
            mlp_hidden_size=64,
            encoder_window="trimmed",
            speech_states="decoder",
        )
    return SpeechInterfaceConfig(
        type=kind, hidden_size=32, num_layers=1, num_heads=2, mlp_hidden_size=64
    )


def save_tiny_whisper(out: Path, decoder: bool = False) -> None:
    """Whisper's encoder (or, with `decoder`, a whole Whisper and a word-level tokenizer.json
    naming its 64 tokens) + its feature extractor, at toy width."""
    whisper_config = tiny_whisper_config()
    if decoder:
        # Whisper's end-of-text follows its text vocabulary (the ids below it are text).
        whisper_config.eos_token_id = whisper_config.pad_token_id = whisper_config.vocab_size - 1
        WhisperForConditionalGeneration(whisper_config).save_pretrained(out)
        words = CORPUS.lower().replace(".", " ").replace("?", " ").split()
        # " word", as Whisper's BPE writes a word after a space
        names = [f" {w}" for w in dict.fromkeys(words)][: whisper_config.vocab_size]
        names += [f" w{i}" for i in range(len(names), whisper_config.vocab_size)]
        vocab = {name: i for i, name in enumerate(names)}
        word_level = Tokenizer(models.WordLevel(vocab, unk_token=names[0]))
        word_level.pre_tokenizer = pre_tokenizers.Whitespace()
        word_level.save(str(out / "tokenizer.json"))
    else:
        WhisperEncoder(whisper_config).save_pretrained(out)
    window_seconds = whisper_config.max_source_positions // 50
    WhisperFeatureExtractor(feature_size=80, chunk_length=window_seconds).save_pretrained(out)


def init_tiny(
    out: str | Path,
    seed: int = 0,
    speech_interface: str = "cformer",
    llm: Literal["glm", "llama"] = "glm",
    speech_states: Literal["encoder", "decoder"] = "encoder",
) -> Path:
    """Write a tiny random model directory to `out` and return its path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = train_tokenizer()
    (tiny_llama(tokenizer) if llm == "llama" else tiny_glm(tokenizer)).save_pretrained(out / "llm")
    tokenizer.save_pretrained(out / "llm")

    vision_config = tiny_vision_config()
    Blip2VisionModel(vision_config).save_pretrained(out / "vision")
    size = vision_config.image_size
    BlipImageProcessorPil(size={"height": size, "width": size}).save_pretrained(out / "vision")

    save_tiny_whisper(out / "speech", decoder=speech_states == "decoder")

    config = XLLMConfig(
        llm=ComponentPath("llm"),
        vision=ComponentPath("vision"),
        speech=ComponentPath("speech"),
        image_interface=tiny_image_interface(),
        speech_interface=tiny_speech_interface(speech_interface, speech_states),
        tags=Tags(),
        name="xllm-tiny",
    )
    config.save(out)

    # Interfaces: built through the real loader, so the saved file is exactly what loading expects.
    from xllm.model.checkpoint import load_model, save_interfaces

    torch.manual_seed(seed + 1)
    model = load_model(out, device="cpu", require_interfaces=False)
    save_interfaces(model, out)
    return out
