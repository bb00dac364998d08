"""The frozen LLM: any local HF causal LM (first-class: GlmForCausalLM), optionally quantized."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from xllm.model.config import QUANTIZE_CHOICES, ModelConfigError, Quantize

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelConfigError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(device)


@functools.cache
def cpu_bf16_is_fast() -> bool:
    """Whether this CPU runs bfloat16 matmuls natively (oneDNN's AVX-512 / AVX-512 BF16 / AMX
    kernels). Without them (e.g. AVX2 only) PyTorch emulates bfloat16 and its matmuls run several
    to tens of times slower than float32 (docs/PERFORMANCE.md, "CPUs without bfloat16")."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on GPUs that support it (the fast path), float32 on the CPU."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelConfigError(f"unknown dtype '{dtype}'; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def quantization_config(
    quantize: Quantize, compute_dtype: torch.dtype
) -> BitsAndBytesConfig | None:
    if quantize == "none":
        return None
    if quantize == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=True,
        )
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ModelConfigError(f"unknown quantization '{quantize}'; choose one of {QUANTIZE_CHOICES}")


class _DropCastNotice(logging.Filter):
    """bitsandbytes logs "MatMul8bitLt: inputs will be cast ..." on every int8 matmul with float32
    inputs (the CPU path): hundreds of identical lines per generated token."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast" not in record.getMessage()


def _quiet_int8_cast_notice() -> None:
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropCastNotice) for f in bnb_logger.filters):
        bnb_logger.addFilter(_DropCastNotice())


class Int8WeightOnlyLinear(nn.Module):
    """A frozen `nn.Linear` with int8 weights, one scale per output row (symmetric), applied by
    torch's CPU kernel `_weight_int8pack_mm` to activations in the model's dtype.

    A batch-1 decode step on the CPU waits for its weights to stream from memory: int8 reads half
    the bytes of bf16 (a quarter of float32). x (..., in) -> (..., out) in x's dtype.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()  # (out, in)
        scale = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.register_buffer("weight", (weight / scale[:, None]).round().to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))  # (out,)
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # (N, in)
        out = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scale.to(x.dtype))
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], -1)


def int8_weight_only(model: nn.Module) -> int:
    """Swap every `nn.Linear` in `model` (the LM head included) for `Int8WeightOnlyLinear`;
    returns how many. A tied LM head keeps its float copy in the input embeddings."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8WeightOnlyLinear(child))
                swapped += 1
    return swapped


def load_llm(
    path: Path, device: torch.device, dtype: torch.dtype, quantize: Quantize = "none"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the LLM frozen in eval mode; only the LLM is ever quantized (encoders stay float).

    `int8` on the CPU is weight-only int8 (`Int8WeightOnlyLinear`); on CUDA, and `nf4`
    everywhere, bitsandbytes."""
    if not (path / "config.json").is_file():
        raise ModelConfigError(f"LLM checkpoint has no config.json: {path}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    kwargs: dict = {"dtype": dtype, "attn_implementation": "sdpa"}
    cpu_int8 = quantize == "int8" and device.type == "cpu"
    qconfig = None if cpu_int8 else quantization_config(quantize, dtype)
    if qconfig is not None:
        if quantize == "int8":
            _quiet_int8_cast_notice()
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if qconfig is None:
        model = model.to(device)
    model.eval().requires_grad_(False)
    if cpu_int8:
        int8_weight_only(model)
    return model, tokenizer
