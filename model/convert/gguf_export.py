"""HF Llama-architecture causal LM -> GGUF (llama.cpp's container), for the llama.cpp backend.

Why: on the CPU, llama.cpp runs a decode step of a small LLM several times faster than PyTorch
eager (fused kernels, no per-module Python). The LLM the X2L interfaces were trained against is
the HF model in memory, so that is what gets written: its weights in the chosen type, the
architecture keys llama.cpp reads, and no vocabulary (`tokenizer.ggml.model = "none"`): xllm
tokenizes and detokenizes itself and feeds llama.cpp token ids and prompt embeddings, never text.

The inverse of what transformers does when it reads a GGUF (model/convert/gguf_llm.py): q and k
rows go back to llama.cpp's order (each head's rotary halves interleaved).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from xllm.model.config import ModelConfigError
from xllm.model.kv_cache import kv_shape

if TYPE_CHECKING:
    import gguf
    from transformers import PreTrainedModel

# Weight types of the written matrices (norms stay float32, as llama.cpp's converter keeps them)
GGUFWeights = Literal["f32", "f16", "bf16", "q8_0"]


def permute_for_llama_cpp(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows (heads * head_dim, in) from HF's rotary layout (first half, second half of
    each head) to llama.cpp's (the halves interleaved pairwise)."""
    out, inp = weight.shape
    return weight.reshape(heads, 2, out // heads // 2, inp).swapaxes(1, 2).reshape(out, inp)


def llama_gguf_writer(llm: PreTrainedModel, path: Path, weights: GGUFWeights) -> gguf.GGUFWriter:
    """A GGUF writer holding `llm`'s architecture keys and tensors, not yet written: the caller
    may add metadata (a vocabulary) before `write_gguf`."""
    import gguf

    config = llm.config
    if config.model_type != "llama":
        raise ModelConfigError(
            f"the llama.cpp backend runs Llama-architecture LLMs; this one is "
            f"'{config.model_type}': serve it with --llm-backend torch"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default" or config.attention_bias or config.mlp_bias:
        raise ModelConfigError(
            "the llama.cpp backend writes plain Llama models (default rotary embeddings, no "
            "biases); serve this LLM with --llm-backend torch"
        )
    heads = config.num_attention_heads
    _, kv_heads, head_dim = kv_shape(llm)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = config.tie_word_embeddings
    for name, tensor in llm.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue  # llama.cpp falls back to token_embd when there is no output.weight
        tensor = tensor.detach().float().cpu()
        if name.endswith("q_proj.weight"):
            tensor = permute_for_llama_cpp(tensor, heads)
        elif name.endswith("k_proj.weight"):
            tensor = permute_for_llama_cpp(tensor, kv_heads)
        gguf_name = names.get_name(name, try_suffixes=(".weight",))
        if gguf_name is None:
            raise ModelConfigError(f"no GGUF name for the LLM's tensor '{name}'")
        _add(writer, gguf_name, tensor.numpy(), weights)
    return writer


def _add(writer: gguf.GGUFWriter, name: str, array: np.ndarray, weights: GGUFWeights) -> None:
    import gguf

    if array.ndim == 1 or weights == "f32":
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    elif weights == "f16":
        writer.add_tensor(name, array.astype(np.float16))
    else:
        kind = (
            gguf.GGMLQuantizationType.BF16 if weights == "bf16" else gguf.GGMLQuantizationType.Q8_0
        )
        packed = gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), kind)
        writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=kind)


def write_gguf(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_llama_gguf(llm: PreTrainedModel, path: Path, weights: GGUFWeights) -> Path:
    """`llm` as a GGUF file without a vocabulary (token ids and embeddings in, logits out)."""
    writer = llama_gguf_writer(llm, path, weights)
    writer.add_tokenizer_model("none")
    write_gguf(writer)
    return path
