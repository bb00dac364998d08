"""LRU cache of encoder + interface outputs keyed by media content hash, bounded in bytes."""

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
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> EncodedMedia | None:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item

    def put(self, key: str, item: EncodedMedia) -> None:
        size = encoded_bytes(item)
        if size > self.max_bytes or key in self._items:
            return
        self._items[key] = item
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self.bytes -= encoded_bytes(evicted)

    def __len__(self) -> int:
        return len(self._items)
