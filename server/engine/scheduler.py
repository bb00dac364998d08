"""Iteration-level scheduling state: which sequence holds which KV slot and what runs next.

Pure bookkeeping, no tensors and no threads: the worker asks it, at every iteration, whom to
admit into free slots, which prefill chunk to run, and which sequences decode together.
"""

from __future__ import annotations

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
    free_slots: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.free_slots = list(range(self.num_slots - 1, -1, -1))  # pop() hands out slot 0 first

    def add(self, item: T) -> Scheduled[T]:
        entry = Scheduled(item)
        self.waiting.append(entry)
        return entry

    def admit(self) -> list[Scheduled[T]]:
        """Move waiting entries into free slots, oldest first."""
        admitted = []
        while self.waiting and self.free_slots:
            entry = self.waiting.popleft()
            entry.slot = self.free_slots.pop()
            entry.phase = Phase.PREFILL
            self.running.append(entry)
            admitted.append(entry)
        return admitted

    def next_prefill(self) -> tuple[Scheduled[T], int, int] | None:
        """The oldest prefilling entry and its next chunk as (entry, start, end)."""
        for entry in self.running:
            if entry.phase is Phase.PREFILL:
                end = min(entry.prefilled + self.prefill_chunk, entry.prompt_len)
                return entry, entry.prefilled, end
        return None

    def decoding(self) -> list[Scheduled[T]]:
        return [e for e in self.running if e.phase is Phase.DECODE]

    def finish(self, entry: Scheduled[T]) -> None:
        """Release an entry wherever it is; its slot is free for the next iteration."""
        if entry in self.running:
            self.running.remove(entry)
            self.free_slots.append(entry.slot)
        elif entry in self.waiting:
            self.waiting.remove(entry)
        entry.slot = -1

    @property
    def used_positions(self) -> int:
        return sum(e.length for e in self.running)
