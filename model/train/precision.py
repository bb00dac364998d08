"""Mixed precision: which autocast dtype a run uses, and the frozen parts' storage dtype.

On GPUs the forward runs under autocast (bf16 where supported, else fp16 with loss scaling); the
frozen encoders and LLM are stored in that dtype, the trainable weights and AdamW state in
float32. CPU training runs in float32 unless `--precision bf16` is given.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from xllm.model.llm import cpu_bf16_is_fast
from xllm.model.train.config import TrainConfig

log = logging.getLogger("xllm.train")

# The name `load_model` takes for the frozen components' dtype, per autocast dtype.
STORAGE_DTYPE = {None: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """Mixed precision on GPUs (bf16 where supported); on the CPU only when bf16 is asked for
    (CPUs with AVX-512 bf16 run the frozen LLM's matmuls faster so)."""
    if config.precision == "fp32":
        return None
    if device.type != "cuda":
        if config.precision == "bf16" and not cpu_bf16_is_fast():
            log.warning(
                "--precision bf16 on a CPU without native bfloat16 matmuls: they are emulated, "
                "far slower than float32 (use --precision fp32)"
            )
        return torch.bfloat16 if config.precision == "bf16" else None
    if config.precision == "fp16" or not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """The forward's autocast context (a no-op in float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
