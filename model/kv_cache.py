"""`SlotKVCache`: preallocated K/V buffers (layers x slots x kv_heads x max_len x head_dim) with
static shapes; every sequence owns one slot, so sequences join and leave a running batch freely.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache


class SlotKVCache(Cache):
    """Static K/V slots driven through HF's Cache interface.

    Before each forward, `bind` says which contiguous slots the batch rows are (row b is slot
    first_slot + b) and at which positions their new tokens go; each attention layer then calls
    `update`, which writes the new K/V there and returns views of the rows' K/V up to `kv_len`
    (no copy; masking of stale positions is the caller's 4-D mask).
    """

    is_compileable = False  # HF generate must not compile it: SlotDecoder does

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        max_len: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__(layers=[])
        shape = (num_slots, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots = num_slots
        self.max_len = max_len
        self._first_slot = 0
        self._rows = torch.zeros(0, 1, dtype=torch.long, device=device)
        self._positions = torch.zeros(0, 1, dtype=torch.long, device=device)
        self._kv_len = 0

    @classmethod
    def for_model(
        cls, llm: PreTrainedModel, num_slots: int, max_len: int, device: torch.device
    ) -> SlotKVCache:
        layers, kv_heads, head_dim = kv_shape(llm)
        return cls(layers, num_slots, max_len, kv_heads, head_dim, kv_cache_dtype(llm), device)

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @property
    def scratch_position(self) -> int:
        """Where rows that are not decoding write their K/V during a decode step.

        Safe for every slot: a sequence holds at most max_len - 1 positions before its last
        decode step, and that step writes position max_len - 1 itself before reading it.
        """
        return self.max_len - 1

    def bind(self, first_slot: int, positions: torch.Tensor, kv_len: int) -> None:
        """Rows are slots first_slot.. first_slot + B - 1; positions (B, q) where the new tokens
        go; kv_len (host-known, >= every row's last position + 1) the K/V length attended."""
        self._first_slot, self._positions, self._kv_len = first_slot, positions, kv_len
        self._rows = torch.arange(positions.shape[0], device=positions.device)[:, None]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states: (B, kv_heads, q, head_dim); buffers: (slots, kv_heads, max_len, head_dim)
        batch = slice(self._first_slot, self._first_slot + key_states.shape[0])
        keys, values = self.keys[layer_idx][batch], self.values[layer_idx][batch]  # views
        keys[self._rows, :, self._positions] = key_states.transpose(1, 2).to(keys.dtype)
        values[self._rows, :, self._positions] = value_states.transpose(1, 2).to(values.dtype)
        return keys[:, :, : self._kv_len], values[:, :, : self._kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len

    def move(self, source: int, target: int, length: int) -> None:
        """Copy a sequence's first `length` positions from slot `source` to slot `target`."""
        for buffers in (self.keys, self.values):
            for layer in buffers:
                layer[target, :, :length] = layer[source, :, :length]

    def exchange(self, a: int, b: int, length_a: int, length_b: int) -> None:
        """Slot a's first length_a positions go to slot b, and b's first length_b to a."""
        for buffers in (self.keys, self.values):
            for layer in buffers:
                held = layer[b, :, :length_b].clone()
                layer[b, :, :length_a] = layer[a, :, :length_a]
                layer[a, :, :length_b] = held

    def mark_static_addresses(self) -> None:
        """CUDA graphs replay fixed addresses: tell dynamo the buffers never move, so their
        in-place updates stay inside the captured graph."""
        for buffer in self.keys + self.values:
            torch._dynamo.mark_static_address(buffer)


def kv_shape(llm: PreTrainedModel) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of the LLM's K/V."""
    config = llm.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_hidden_layers, kv_heads, head_dim


def kv_cache_dtype(llm: PreTrainedModel) -> torch.dtype:
    """The LLM's compute dtype (float32 for quantized embeddings)."""
    dtype = llm.get_input_embeddings().weight.dtype
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def kv_bytes_per_position(llm: PreTrainedModel) -> int:
    """K and V of one position in every layer, in bytes (what one slot position costs)."""
    layers, kv_heads, head_dim = kv_shape(llm)
    element = torch.empty(0, dtype=kv_cache_dtype(llm)).element_size()
    return 2 * layers * kv_heads * head_dim * element
