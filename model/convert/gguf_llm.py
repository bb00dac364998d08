"""GGUF causal LM (llama.cpp's container) -> HF causal LM directory with its tokenizer.

Why: small instruction-tuned LLMs are served in registries as GGUF files, often quantized
(Q4_1: 4-bit weights in blocks of 32 with a scale and a minimum each). transformers reads GGUF
itself: it undoes llama.cpp's q/k row permutation (llama.cpp interleaves the rotary halves),
dequantizes every block, and builds the tokenizer (vocabulary, merges, special tokens and chat
template) from the file's metadata. What is left for us is to ask for a plain dense model, to drop
the GGUF quantization config (a dense model saved with it would claim to be quantized), and to
save it with its tokenizer.

The weights are the GGUF file's, dequantized: a quantized file gives the quantized model's
function, not the original float model's.
"""

from __future__ import annotations

from pathlib import Path

import torch


def convert_gguf_llm(gguf_path: Path, out_dir: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write `out_dir` (config, safetensors in `dtype`, tokenizer, chat template) from a GGUF.

    Loading the result back with `AutoModelForCausalLM.from_pretrained(out_dir)` gives the model
    transformers builds from the GGUF file directly, cast to `dtype`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    directory, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(
        directory,
        gguf_file=name,
        dtype=dtype,
        # Dense weights: by default transformers may keep GGUF blocks packed for its own kernels.
        quantization_config=GgufConfig(dequantize=True),
    )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = ""  # else the GGUF's display name is saved as a model id
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    tokenizer.model_max_length = model.config.max_position_embeddings

    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
