"""LRU cache of encoder + interface outputs keyed by media content hash, bounded in bytes; pinned
outputs (those of media handles, /v1/files) stay outside the LRU until released."""

from __future__ import annotations

from collections import OrderedDict

from xllm.model.xllm import EncodedMedia


def encoded_bytes(item: EncodedMedia) -> int:
    return sum(t.numel() * t.element_size() for _, t in item)


class EncoderCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[str, EncodedMedia] = OrderedDict()
        self.pinned: dict[str, EncodedMedia] = {}  # bounded by the handles' quotas, not here
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> EncodedMedia | None:
        pinned = self.pinned.get(key)
        if pinned is not None:
            self.hits += 1
            return pinned
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item

    def __contains__(self, key: str) -> bool:
        """Held (pinned or in the LRU); a look that is no use: no hit or miss counted."""
        return key in self.pinned or key in self._items

    def put(self, key: str, item: EncodedMedia) -> None:
        size = encoded_bytes(item)
        if size > self.max_bytes or key in self._items:
            return
        self._items[key] = item
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self.bytes -= encoded_bytes(evicted)

    def pin(self, key: str, item: EncodedMedia) -> None:
        """Keep the output until `unpin`."""
        self.pinned[key] = item
        if key in self._items:
            self.bytes -= encoded_bytes(self._items.pop(key))

    def unpin(self, key: str) -> None:
        """Back into the LRU (the next request with the same content may still use it)."""
        item = self.pinned.pop(key, None)
        if item is not None:
            self.put(key, item)

    def __len__(self) -> int:
        return len(self._items)
