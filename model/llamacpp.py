"""`LlamaCppSlots`: the frozen LLM run by llama.cpp (through llama-cpp-python's C API) over the
engine's KV slots, for CPU deployments.

Why: a decode step of a small LLM in PyTorch eager is mostly per-module dispatch and unfused
norm/rotary/attention glue around matmuls; llama.cpp runs the same step as one graph of fused
CPU kernels. The X2L interfaces and encoders stay in PyTorch: prompts go in as embeddings
(`llama_batch.embd`, as llama.cpp's own multimodal path does), generated tokens as ids. The
weights are the HF model's, written to a GGUF once at start-up (model/convert/gguf_export.py).

Slot s is llama.cpp sequence s, each in its own KV stream (`kv_unified = False`: a decode row
attends only its own sequence's cells); one spare sequence holds K/V while two slots exchange
theirs. llama.cpp requires each sequence's positions to grow by one, so every write at
position p first drops the sequence's cells from p on: a reused slot never attends stale K/V.
"""

from __future__ import annotations

import ctypes
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from xllm.model.config import ModelConfigError
from xllm.model.convert.gguf_export import GGUFWeights, write_llama_gguf
from xllm.model.kv_cache import kv_shape

log = logging.getLogger("xllm.llamacpp")

CONTEXT_PAD = 256  # positions: llama.cpp's padding of a context's size

INSTALL_HINT = "pip install 'xllm[llamacpp]' (it builds llama.cpp from source: gcc and cmake)"


def import_llama_cpp() -> Any:
    """llama-cpp-python's low-level module, or ModelConfigError saying how to install it."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise ModelConfigError(
            f"the llama.cpp backend needs llama-cpp-python: {INSTALL_HINT}"
        ) from exc
    return llama_cpp


def gguf_weights_for(dtype: torch.dtype, quantize: str) -> GGUFWeights:
    """The GGUF weight type that serves `--dtype`/`--quantize` on llama.cpp: the float types as
    they are, int8 as Q8_0 (8-bit blocks of 32 with a scale); nf4 has no llama.cpp counterpart."""
    if quantize == "int8":
        return "q8_0"
    if quantize != "none":
        raise ModelConfigError(
            f"the llama.cpp backend serves --quantize none or int8 (Q8_0), not '{quantize}'"
        )
    return {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]


class LlamaCppSlots:
    """`num_slots` sequences of up to `max_len` positions each; logits come back as float32
    torch tensors, so sampling, grammars and logprobs are the same code as on the torch path."""

    def __init__(
        self,
        llm: PreTrainedModel,
        num_slots: int,
        max_len: int,
        weights: GGUFWeights,
        threads: int,
        max_tokens_per_call: int = 512,
    ) -> None:
        self._lib = lib = import_llama_cpp()
        self.num_slots, self.max_len = num_slots, max_len
        # KV cells per sequence: llama.cpp pads a context to a multiple of CONTEXT_PAD and would
        # split an unpadded one unevenly between the sequences
        self._cells = -(-max_len // CONTEXT_PAD) * CONTEXT_PAD
        self.spare = num_slots  # the exchange's temporary sequence
        if num_slots + 1 > lib.llama_max_parallel_sequences():
            raise ModelConfigError(
                f"the llama.cpp backend holds at most {lib.llama_max_parallel_sequences() - 1} "
                f"sequences; lower --max-batch"
            )
        self.n_embd = llm.config.hidden_size
        # K and V of every layer, per cell: f16 (llama.cpp's default), or f32 beside f32
        # weights (float32 end to end: the torch path's numbers to float tolerance)
        kv_f32 = weights == "f32"
        layers, kv_heads, head_dim = kv_shape(llm)
        self._bytes_per_cell = 2 * layers * kv_heads * head_dim * (4 if kv_f32 else 2)
        self.vocab = llm.get_output_embeddings().weight.shape[0]
        lib.llama_backend_init()
        self._silence = lib.llama_log_callback(_log_llama_cpp)  # kept: C holds the pointer
        lib.llama_log_set(self._silence, ctypes.c_void_p(0))
        # Written to /tmp, never the model directory, and gone once llama.cpp has mapped it
        # (a mapping outlives its file's name): a killed server leaves no 270 MB behind
        with tempfile.TemporaryDirectory(prefix="xllm-llamacpp-") as directory:
            path = write_llama_gguf(llm, Path(directory) / "llm.gguf", weights)
            gguf_bytes = path.stat().st_size
            self._model = lib.llama_model_load_from_file(
                str(path).encode(), lib.llama_model_default_params()
            )
        if not self._model:
            raise ModelConfigError("llama.cpp could not load the LLM's GGUF")
        params = lib.llama_context_default_params()
        params.n_ctx = (num_slots + 1) * self._cells
        params.n_seq_max = num_slots + 1
        params.kv_unified = False
        if kv_f32:
            params.type_k = params.type_v = lib.GGML_TYPE_F32
        # one call takes an iteration's prefill chunks (the scheduler's budget) or decode rows
        params.n_batch = params.n_ubatch = max(max_tokens_per_call, num_slots)
        params.n_outputs_max_per_seq = params.n_batch  # a prompt's own logprobs: every position
        params.n_threads = params.n_threads_batch = threads
        self._ctx = lib.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise ModelConfigError("llama.cpp could not create a context for the KV slots")
        self._memory = lib.llama_get_memory(self._ctx)
        self.max_tokens_per_call = params.n_batch
        self._tokens = lib.llama_batch_init(params.n_batch, 0, 1)
        self._embeds = lib.llama_batch_init(params.n_batch, self.n_embd, 1)
        self._state = bytearray()  # a sequence's K/V in transit between slots (move)
        log.info(
            "llama.cpp backend ready",
            extra={
                "weights": weights,
                "gguf_mb": round(gguf_bytes / 2**20, 1),
                "threads": threads,
            },
        )

    @property
    def bytes(self) -> int:
        """The KV cache's size (all streams, the spare included)."""
        return (self.num_slots + 1) * self._cells * self._bytes_per_cell

    # --- forwards ---
    def prefill(
        self,
        first_slot: int,
        chunks: Sequence[tuple[torch.Tensor, int]],
        every_position: bool = False,
    ) -> torch.Tensor:
        """Chunk i = (embeds (q_i, H), start_i) written at start_i.. of slot first_slot + i.

        Returns each row's logits after its last position, (B, V) float32; with every_position
        (one chunk) those of all its positions, (1, q, V). The chunks go to llama.cpp together
        (a prompt's prefill is compute-bound: one call for many short prompts reads the weights
        once), in as few calls as max_tokens_per_call allows.
        """
        assert not every_position or len(chunks) == 1, "every_position takes one chunk"
        rows, group, total = [], [], 0
        for row, (embeds, start) in enumerate(chunks):
            if group and total + embeds.shape[0] > self.max_tokens_per_call:
                rows.append(self._prefill_group(group, every_position))
                group, total = [], 0
            group.append((first_slot + row, embeds, start))
            total += embeds.shape[0]
        rows.append(self._prefill_group(group, every_position))
        logits = torch.cat(rows)
        return logits[None] if every_position else logits

    def _prefill_group(
        self, group: list[tuple[int, torch.Tensor, int]], every_position: bool
    ) -> torch.Tensor:
        """One llama.cpp call for (sequence, embeds (q, H), start) chunks; the logits of each
        chunk's last position (or of every position), in order."""
        batch = self._embeds
        host = np.ascontiguousarray(
            torch.cat([embeds for _, embeds, _ in group]).detach().float().cpu().numpy()
        )  # (sum q, H)
        assert host.shape[0] <= self.max_tokens_per_call, "a chunk is at most max_tokens_per_call"
        ctypes.memmove(batch.embd, host.ctypes.data, host.nbytes)
        i = 0
        for seq, embeds, start in group:
            n = embeds.shape[0]
            for j in range(n):
                batch.pos[i] = start + j
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = every_position or j == n - 1
                i += 1
            self._lib.llama_memory_seq_rm(self._memory, seq, start, -1)
        batch.n_tokens = i
        return self._run(batch, i if every_position else len(group))

    def decode(
        self, slots: Sequence[int], tokens: Sequence[int], lengths: Sequence[int]
    ) -> torch.Tensor:
        """Write tokens[i] at position lengths[i] of slot slots[i]; logits (len(slots), V)."""
        batch = self._tokens
        for i, (slot, token, length) in enumerate(zip(slots, tokens, lengths, strict=True)):
            batch.token[i] = token
            batch.pos[i] = length
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = slot
            batch.logits[i] = True
        batch.n_tokens = len(slots)
        return self._run(batch, len(slots))

    def _run(self, batch: Any, outputs: int) -> torch.Tensor:
        status = self._lib.llama_decode(self._ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama.cpp's decode failed (status {status})")
        logits = np.ctypeslib.as_array(self._lib.llama_get_logits(self._ctx), (outputs, self.vocab))
        return torch.from_numpy(logits.copy())  # llama.cpp reuses its buffer on the next call

    # --- K/V between slots ---
    def move(self, source: int, target: int, length: int) -> None:
        """Positions [0, length) of `source` become `target`'s whole K/V."""
        # Between KV streams llama.cpp's seq_cp copies a whole stream (max_len cells, ~190 MB
        # for SmolLM2 at 8192); the sequence's own state holds only the cells it uses.
        lib, ctx = self._lib, self._ctx
        lib.llama_memory_seq_rm(self._memory, target, -1, -1)
        if length == 0:
            return
        size = lib.llama_state_seq_get_size(ctx, source)
        if len(self._state) < size:
            self._state = bytearray(size)
        state = (ctypes.c_uint8 * size).from_buffer(self._state)
        lib.llama_state_seq_get_data(ctx, state, size, source)
        if lib.llama_state_seq_set_data(ctx, state, size, target) != size:
            raise RuntimeError(f"llama.cpp could not copy sequence {source} into {target}")
        lib.llama_memory_seq_rm(self._memory, target, length, -1)

    def exchange(self, a: int, b: int, length_a: int, length_b: int) -> None:
        """Slot a's first length_a positions go to b and b's first length_b to a."""
        self.move(a, self.spare, length_a)
        self.move(b, a, length_b)
        self.move(self.spare, b, length_a)
        self._lib.llama_memory_seq_rm(self._memory, self.spare, -1, -1)

    def close(self) -> None:
        lib = self._lib
        lib.llama_batch_free(self._tokens)
        lib.llama_batch_free(self._embeds)
        lib.llama_free(self._ctx)
        lib.llama_model_free(self._model)


def _log_llama_cpp(level: int, text: bytes, user_data: Any) -> None:
    """llama.cpp's own log lines: its errors and warnings to ours, its chatter dropped."""
    if level in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
        message = text.decode(errors="replace").rstrip()
        if message:
            log.log(logging.ERROR if level == 4 else logging.WARNING, "llama.cpp: %s", message)
