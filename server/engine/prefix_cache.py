"""Prefix reuse over the KV slots: what each free slot still holds, and where a new prompt's
longest written prefix lies.

A slot's K/V at position p depends on the inputs at positions 0..p only, so a new prompt whose
first n inputs equal the first n written into a slot can take those n positions as they are.
An input is keyed by its token id, or, inside a media span, by (the media item's content hash,
segment, offset), so that two different images never match however alike their token ids (the
span's placeholder ids are all the same pad).

Pure bookkeeping like the scheduler that owns it: it remembers the keys of the positions a
finished sequence wrote (kept while its slot is free, the slot's K/V untouched), finds the
longest match among those records and the running sequences, and, when a slot with a record is
about to be written (the scheduler gives out the lowest free slots, so that running sequences
stay in a slot prefix), moves the record into the free slot least worth keeping: an empty one,
else the least recently used, when that one is older. Nothing is kept beyond the slots
themselves: the KV budget is the slots', and the least recently used record goes first.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from xllm.model.prompt import PromptLayout

# A token id, or (media content hash, segment index, offset in the segment)
Key = int | tuple[str, int, int]

BLOCK = 64  # positions compared per list comparison in common_prefix


def prompt_keys(layout: PromptLayout, digests: Sequence[str]) -> list[Key]:
    """The keys of a laid-out prompt: token ids, media span positions keyed by content hash
    (digests[i] is media item i's)."""
    keys: list[Key] = list(layout.token_ids)
    for start, length, index, segment in layout.spans:
        digest = digests[index]
        keys[start : start + length] = [(digest, segment, offset) for offset in range(length)]
    return keys


def common_prefix(a: Sequence[Key], b: Sequence[Key], limit: int) -> int:
    """How many leading keys a and b share, at most `limit` (compared a block at a time)."""
    limit = min(limit, len(a), len(b))
    n = 0
    while n + BLOCK <= limit and a[n : n + BLOCK] == b[n : n + BLOCK]:
        n += BLOCK
    while n < limit and a[n] == b[n]:
        n += 1
    return n


class Match(NamedTuple):
    """A prompt's first `length` positions are held in `slot`."""

    slot: int
    length: int


class Copy(NamedTuple):
    """K/V positions 0..length-1 of slot `source` to be copied into slot `target`."""

    source: int
    target: int
    length: int


@dataclass
class PrefixCache:
    max_len: int  # positions per slot; the last one is the decode step's scratch position
    records: dict[int, list[Key]] = field(default_factory=dict)  # free slot -> its written keys
    _used: dict[int, int] = field(default_factory=dict)  # free slot -> when it was last written
    _clock: itertools.count = field(default_factory=itertools.count)

    def keep(self, slot: int, keys: list[Key]) -> None:
        """A finished sequence's slot is free; it holds the K/V of `keys` (but for the scratch
        position, which decode steps write in every row not decoding)."""
        keys = keys[: self.max_len - 1]
        if keys:
            self.records[slot] = keys
            self._used[slot] = next(self._clock)

    def touch(self, slot: int) -> None:
        """The slot's record was just read: the last to give up."""
        if slot in self._used:
            self._used[slot] = next(self._clock)

    def transfer(self, source: int, target: int) -> None:
        """The source slot's K/V went to the target slot: so does its record."""
        if source in self.records:
            self.records[target] = self.records.pop(source)
            self._used[target] = self._used.pop(source)

    def drop(self, slot: int) -> None:
        """The slot is about to be written by someone else."""
        self.records.pop(slot, None)
        self._used.pop(slot, None)

    def relocate(self, slot: int, free: Iterable[int]) -> Copy | None:
        """The slot is about to be written: its record moves to the free slot least worth
        keeping (the lowest empty one, else the least recently used) if that one is worth less;
        the copy to make, or None (then the record is gone)."""
        if slot not in self.records:
            return None
        slots = sorted(s for s in free if s != slot)
        empty = [s for s in slots if s not in self.records]
        target = empty[0] if empty else min(slots, key=self._used.__getitem__, default=None)
        if target is None or self._used.get(target, -1) > self._used[slot]:
            self.drop(slot)
            return None
        keys, used = self.records[slot], self._used[slot]
        self.drop(slot)
        self.records[target], self._used[target] = keys, used
        return Copy(slot, target, len(keys))

    def longest(
        self,
        keys: Sequence[Key],
        limit: int,
        own: int,
        running: Iterable[tuple[int, Sequence[Key]]],
    ) -> Match | None:
        """The longest holder of keys' first positions (at most `limit`): a record (of a slot
        nobody writes: a free one, or one a sequence not yet placed took; the slot `own` first,
        since it needs no copy) or a running sequence's (slot, written keys). None when nothing
        matches."""
        best: Match | None = None
        slots = sorted(self.records, key=lambda slot: slot != own)
        candidates = [(slot, self.records[slot]) for slot in slots]
        for slot, held in [*candidates, *running]:
            length = common_prefix(keys, held, limit)
            if length > 0 and (best is None or length > best.length):
                best = Match(slot, length)
        return best
