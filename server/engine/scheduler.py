"""Iteration-level scheduling state: which sequence holds which KV slot and what runs next.

Pure bookkeeping, no tensors and no threads: the worker asks it, at every iteration, whom to
admit into free slots, which prefill chunk to run, and which sequences decode together.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Generic, TypeVar

T = TypeVar("T")


class Phase(Enum):
    WAITING = "waiting"  # queued, no slot yet
    PREFILL = "prefill"  # has a slot; prompt being written into it, chunk by chunk
    DECODE = "decode"  # generating, one token per iteration


@dataclass
class Scheduled(Generic[T]):
    item: T
    phase: Phase = Phase.WAITING
    slot: int = -1
    prompt_len: int = 0
    prefilled: int = 0  # prompt positions already in the slot
    length: int = 0  # positions in the slot (prompt + generated)


@dataclass
class Scheduler(Generic[T]):
    num_slots: int
    prefill_chunk: int
    waiting: deque[Scheduled[T]] = field(default_factory=deque)
    running: list[Scheduled[T]] = field(default_factory=list)  # PREFILL and DECODE, by age
    free_slots: list[int] = field(default_factory=list)  # a heap: the lowest free slot first

    def __post_init__(self) -> None:
        self.free_slots = list(range(self.num_slots))  # ascending: already a heap

    def add(self, item: T) -> Scheduled[T]:
        entry = Scheduled(item)
        self.waiting.append(entry)
        return entry

    def admit(self) -> list[Scheduled[T]]:
        """Move waiting entries into free slots, oldest first."""
        admitted = []
        while self.waiting and self.free_slots:
            entry = self.waiting.popleft()
            entry.slot = heapq.heappop(self.free_slots)
            entry.phase = Phase.PREFILL
            self.running.append(entry)
            admitted.append(entry)
        return admitted

    def next_prefills(self) -> list[tuple[Scheduled[T], int, int]]:
        """This iteration's prefill chunks as (entry, start, end), oldest entry first.

        Chunks are always [k * prefill_chunk, min((k + 1) * prefill_chunk, prompt_len)), so a
        prompt is cut the same way whatever runs beside it (its numerics do not depend on the
        load). Together they hold at most prefill_chunk positions (the first one always goes):
        a burst of short prompts is prefilled in one iteration, a long one a chunk at a time.
        """
        chunks = []
        budget = self.prefill_chunk
        for entry in self.running:
            if entry.phase is not Phase.PREFILL:
                continue
            end = min(entry.prefilled + self.prefill_chunk, entry.prompt_len)
            if chunks and end - entry.prefilled > budget:
                break
            chunks.append((entry, entry.prefilled, end))
            budget -= end - entry.prefilled
        return chunks

    def compact(self) -> list[tuple[Scheduled[T], int]]:
        """Move entries out of slots >= len(running) into free lower ones, so the running entries
        hold slots 0..len(running)-1 and a decode batch over a slot prefix wastes no rows.

        Returns (entry, its old slot) per move; the caller copies the slot's contents.
        """
        moves = []
        count = len(self.running)
        for entry in sorted(self.running, key=lambda e: e.slot, reverse=True):
            if entry.slot < count:
                break
            old_slot, entry.slot = entry.slot, heapq.heappop(self.free_slots)
            heapq.heappush(self.free_slots, old_slot)
            moves.append((entry, old_slot))
        return moves

    def decoding(self) -> list[Scheduled[T]]:
        return [e for e in self.running if e.phase is Phase.DECODE]

    def finish(self, entry: Scheduled[T]) -> None:
        """Release an entry wherever it is; its slot is free for the next iteration."""
        if entry in self.running:
            self.running.remove(entry)
            heapq.heappush(self.free_slots, entry.slot)
        elif entry in self.waiting:
            self.waiting.remove(entry)
        entry.slot = -1

    @property
    def used_positions(self) -> int:
        return sum(e.length for e in self.running)
