"""`EngineConfig`, and how many KV slots of `max_model_len` positions it settles to: at most
max_batch, fewer where the KV budget (bytes, a share of CPU memory, a share of the GPU) holds
fewer."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from xllm.model.config import LLMBackend, Quantize
from xllm.model.kv_cache import kv_bytes_per_position

if TYPE_CHECKING:
    from xllm.model.xllm import XLLM

log = logging.getLogger("xllm.engine")

DEFAULT_MAX_MODEL_LEN = 8192


@dataclass
class EngineConfig:
    max_batch: int = 32  # sequences decoding together (= KV slots)
    max_queue: int = 64  # requests waiting beyond those
    # Positions per slot; default: the model's context, capped at DEFAULT_MAX_MODEL_LEN because
    # slots are preallocated (GLM-4-9B's 128k context x 32 slots would be ~170 GB of KV cache).
    max_model_len: int | None = None
    prefill_chunk: int = 512
    # max_tokens of a request that gives none; None: the model's own (xllm.json `sampling`)
    default_max_tokens: int | None = None
    encoder_cache_mb: int = 256
    # Encoder inputs (images, video frames, audio windows; cached media cost nothing) that one
    # iteration's admissions may bring; None: no limit. Bounds the time an iteration spends
    # encoding, so a burst of media requests gets first tokens group by group.
    max_encoder_batch: int | None = None
    # Reuse the K/V of a prompt's prefix that a slot still holds (a finished or running
    # sequence's; server/engine/prefix_cache.py) instead of prefilling it again
    prefix_cache: bool = True
    stall_timeout: float | None = None  # seconds one iteration may take before "wedged"; None: off
    # torch.compile the decode step (static shapes per batch and kv-length bucket; CUDA graphs
    # on CUDA); None: on for CUDA, off for the CPU (inductor's compile time is not repaid there)
    compile: bool | None = None
    compile_backend: str = "inductor"  # tests check the bucketing with "aot_eager"
    # On CUDA: the share of the GPU's memory this server may use (weights, activations and KV
    # cache, like vLLM); the KV slots are sized from it, at most max_batch. None: max_batch slots.
    gpu_memory_utilization: float | None = None
    # Bytes the KV cache may take; the slots (at most max_batch) are sized from it. None: on the
    # CPU, CPU_KV_SHARE of the memory available at start-up; on CUDA, max_batch slots (or
    # gpu_memory_utilization's share).
    kv_cache_memory_bytes: int | None = None
    # What runs the frozen LLM over the KV slots (model/generate.py `SlotLLM`): PyTorch on any
    # device, or llama.cpp on the CPU (model/llamacpp.py), which writes its own copy of the
    # weights quantized as llamacpp_quantize says (int8: Q8_0); PyTorch then loads it unquantized
    llm_backend: LLMBackend = "torch"
    llamacpp_quantize: Quantize = "none"


# A CPU server's default KV budget, as a share of MemAvailable: weights, activations, media and
# the API process live in the rest.
CPU_KV_SHARE = 0.25


def available_memory_bytes() -> int:
    """MemAvailable of /proc/meminfo (Linux); elsewhere the physical memory as os.sysconf has it."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def slots_for_budget(budget_bytes: int, slot_bytes: int, what: str) -> int:
    """Whole KV slots in `budget_bytes`; ValueError naming `what` set the budget when none fits."""
    slots = max(budget_bytes, 0) // slot_bytes
    if slots < 1:
        raise ValueError(
            f"{what} leaves {budget_bytes / 2**30:.2f} GiB for the KV cache, less than one slot "
            f"({slot_bytes / 2**30:.2f} GiB): give it more memory or lower max_model_len"
        )
    return slots


# Outside the KV cache: the CUDA context's workspaces, cuBLAS and CUDA-graph pools (estimate).
WORKSPACE_RESERVE_BYTES = 512 * 2**20


def slots_for_memory(
    *, free_bytes: int, total_bytes: int, utilization: float, slot_bytes: int, reserve_bytes: int
) -> int:
    """KV slots that fit this server's share of the GPU (vLLM's --gpu-memory-utilization).

    The share is utilization x total memory; what is in use already (the loaded model, other
    processes: total - free) and the activation reserve come off it; whole slots fill the rest.
    Raises ValueError when not even one slot fits.
    """
    budget = int(utilization * total_bytes) - (total_bytes - free_bytes) - reserve_bytes
    return slots_for_budget(budget, slot_bytes, f"gpu_memory_utilization {utilization:g}")


def activation_reserve_bytes(llm: torch.nn.Module, prefill_chunk: int, max_batch: int) -> int:
    """Peak memory besides weights and KV cache, roughly: one prefill chunk's hidden and MLP
    tensors and the decode step's float32 logits with their copies in sampling."""
    config = llm.config.get_text_config()  # type: ignore[operator]
    chunk = prefill_chunk * (4 * config.hidden_size + 3 * config.intermediate_size) * 4
    logits = 4 * max_batch * config.vocab_size * 4
    return chunk + logits + WORKSPACE_RESERVE_BYTES


def kv_slots(model: XLLM, config: EngineConfig, max_model_len: int) -> int:
    """max_batch, or fewer where the KV budget (bytes, CPU memory, a GPU share) holds fewer."""
    llm = model.llm
    slot_bytes = kv_bytes_per_position(llm) * max_model_len
    on_cuda = model.device.type == "cuda"
    if config.kv_cache_memory_bytes is not None or not on_cuda:
        if config.gpu_memory_utilization is not None and not on_cuda:
            log.info("gpu_memory_utilization does not apply on the CPU")
        if config.kv_cache_memory_bytes is not None:
            budget, what = config.kv_cache_memory_bytes, "kv_cache_memory"
        else:
            available = available_memory_bytes()
            budget = int(CPU_KV_SHARE * available)
            what = f"{CPU_KV_SHARE:.0%} of the {available / 2**30:.1f} GiB of memory available"
        fit = slots_for_budget(budget, slot_bytes, what)
        slots = min(fit, config.max_batch)
        log.info(
            "KV cache sized from memory",
            extra={
                "slots": slots,
                "max_batch": config.max_batch,
                "max_model_len": max_model_len,
                "kv_cache_mb": round(slots * slot_bytes / 2**20, 1),
                "budget_mb": round(budget / 2**20, 1),
            },
        )
        return slots
    if config.gpu_memory_utilization is None:
        return config.max_batch
    torch.cuda.empty_cache()  # blocks the allocator caches count as used otherwise
    free, total = torch.cuda.mem_get_info(model.device)
    fit = slots_for_memory(
        free_bytes=free,
        total_bytes=total,
        utilization=config.gpu_memory_utilization,
        slot_bytes=slot_bytes,
        reserve_bytes=activation_reserve_bytes(llm, config.prefill_chunk, config.max_batch),
    )
    log.info(
        "KV cache sized from GPU memory",
        extra={"slots_that_fit": fit, "max_batch": config.max_batch, "free_bytes": free},
    )
    return min(fit, config.max_batch)
