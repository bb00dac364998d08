"""Iteration-level scheduling: which sequence holds which KV slot and what runs next.

Pure bookkeeping, no tensors and no threads, in the manner of vLLM v1's scheduler: it owns
every transition of a sequence's scheduling state. Each engine iteration:

    admit()                 waiting sequences get the free slots (their prompts are laid out)
    place(sequence)         with prefix reuse: a laid-out prompt starts after the longest
                            prefix the slots hold (copied into its slot unless there already)
    plan = schedule()       compactions + this iteration's prefill chunks, in runs of
                            consecutive slots (one forward each)
    update(plan, written)   the chunks written advance their sequences; completed prompts
                            start decoding
    decode_batch()          the sequences that decode one token now
    update_decoded(batch)   their new token is in the cache
    finish(sequence)        wherever it is, when it ends (done, failed or cancelled)

The choices of one prompt (OpenAI's n) are admitted together: the leader with its followers,
which hold slots in phase FORK until the leader's prompt is complete, then decode from a copy
of its K/V (one prefill for n choices).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from xllm.server.engine.prefix_cache import Copy, PrefixCache
from xllm.server.engine.sequence import Phase, Sequence


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt positions [start, end) of a sequence, written into its slot in one forward."""

    sequence: Sequence
    start: int
    end: int

    @property
    def completes_prompt(self) -> bool:
        return self.end >= self.sequence.prompt_len


@dataclass
class StepPlan:
    # (sequence, its old slot): already given its new, lower slot; copy the K/V first
    moves: list[tuple[Sequence, int]]
    # prefill chunks in runs of consecutive slots (ascending), one forward per run; a sequence
    # that scores its prompt runs alone
    prefill_runs: list[list[PrefillChunk]]
    # prefix reuse: a move's new slot -> the positions it held (a record), which go to the old
    # slot (the two slots' K/V are exchanged)
    exchanged: dict[int, int] = field(default_factory=dict)


@dataclass
class Scheduler:
    num_slots: int
    prefill_chunk: int
    waiting: deque[Sequence] = field(default_factory=deque)
    running: list[Sequence] = field(default_factory=list)  # PREFILL and DECODE, by age
    free_slots: list[int] = field(default_factory=list)  # a heap: the lowest free slot first
    prefix_cache: PrefixCache | None = None  # None: no prefix reuse

    def __post_init__(self) -> None:
        self.free_slots = list(range(self.num_slots))  # ascending: already a heap

    def _take_slot(self) -> int:
        """The lowest free slot (running sequences stay low: see compact). With prefix reuse
        what it holds stays valid until the taker is placed (or drops it)."""
        return heapq.heappop(self.free_slots)

    def _vacate(self, slot: int, keep_clear: Iterable[int] = ()) -> list[Copy]:
        """The slot is about to be written: with prefix reuse its record, if any, moves to the
        free slot least worth keeping (not those in keep_clear), when that is worth less."""
        cache = self.prefix_cache
        if cache is None:
            return []
        clear = set(keep_clear)
        copy = cache.relocate(slot, [s for s in self.free_slots if s not in clear])
        return [copy] if copy is not None else []

    def add(self, sequence: Sequence) -> Sequence:
        self.waiting.append(sequence)
        return sequence

    def admit(
        self, budget: int | None = None, cost: Callable[[Sequence], int] | None = None
    ) -> list[Sequence]:
        """Move waiting sequences into free slots, oldest first. With a budget, the admitted
        sequences' `cost` (their media's encoder inputs) stays within it: the oldest one that
        would pass it waits for the next iteration, unless it comes first (a video larger than
        the budget is encoded alone rather than never)."""
        admitted = []
        spent = 0
        # a leader only when there is a slot for each of its followers too (they take theirs
        # in phase FORK and are not returned: their prompt is the leader's)
        while self.waiting and len(self.free_slots) > len(self.waiting[0].followers):
            if budget is not None and cost is not None:
                spent += cost(self.waiting[0])
                if admitted and spent > budget:
                    break
            sequence = self.waiting.popleft()
            sequence.slot = self._take_slot()
            sequence.phase = Phase.PREFILL
            self.running.append(sequence)
            admitted.append(sequence)
            for follower in sequence.followers:
                follower.slot = self._take_slot()
                if self.prefix_cache is not None:
                    self.prefix_cache.drop(follower.slot)  # written from now on
                follower.phase = Phase.FORK
                self.running.append(follower)
        return admitted

    def place(self, sequence: Sequence) -> list[Copy]:
        """Prefix reuse for an admitted sequence whose prompt is laid out (`prompt_keys` set):
        its first positions held by a slot nobody writes (a free one, its own, or one another
        sequence admitted with it has not written yet) or by a running sequence are not
        prefilled again. Returns the copies to make, in order, before anything is written: what
        its own slot held moves aside (unless the sequence goes on from all of it), then the
        matched positions come into its slot (unless they are there). Keeps one position to
        prefill (the first token's logits); a sequence scoring its prompt prefills it all."""
        cache = self.prefix_cache
        if cache is None:
            return []
        match, slot = None, sequence.slot
        if sequence.prompt_keys is not None and not sequence.scores_prompt:
            running = [
                (s.slot, s.written_keys())
                for s in self.running
                if s is not sequence and s.length > 0 and s.prompt_keys is not None
            ]
            keys, limit = sequence.prompt_keys, sequence.prompt_len - 1
            match = cache.longest(keys, limit, slot, running)
        copies: list[Copy] = []
        held = cache.records.get(slot)
        if held is not None and not (match and match.slot == slot and match.length == len(held)):
            copies += self._vacate(slot, keep_clear=[match.slot] if match else [])
        cache.drop(slot)  # written from now on
        if match is None:
            return copies
        if match.slot != slot:
            copies.append(Copy(match.slot, slot, match.length))
            cache.touch(match.slot)
        sequence.prefilled = sequence.length = sequence.cached_tokens = match.length
        return copies

    def schedule(self) -> StepPlan:
        """This iteration's plan: compactions first (the slots the chunks name are the new ones),
        then the prefill chunks grouped into runs."""
        exchanged: dict[int, int] = {}
        moves = self.compact(exchanged)
        return StepPlan(moves, consecutive_runs(self.next_prefills()), exchanged)

    def update(self, plan: StepPlan, written: Iterable[PrefillChunk]) -> list[Sequence]:
        """Apply the prefill results: the chunks `written` (those of failed runs are not, and
        their sequences were finished) advance their sequences. Returns the sequences whose
        prompt is now complete, in order, each leader followed by its followers (whose slots
        must get a copy of its K/V); they decode from now on."""
        completed = []
        for chunk in written:
            sequence = chunk.sequence
            sequence.prefilled = sequence.length = chunk.end
            if chunk.completes_prompt:
                sequence.phase = Phase.DECODE
                completed.append(sequence)
                for follower in sequence.followers:
                    follower.phase = Phase.DECODE
                    follower.prompt_len = sequence.prompt_len
                    follower.prefilled = follower.length = sequence.length
                    completed.append(follower)
                sequence.followers = []
        return completed

    def next_prefills(self) -> list[PrefillChunk]:
        """This iteration's prefill chunks, oldest sequence first.

        Chunks are always [c + k * prefill_chunk, min(c + (k + 1) * prefill_chunk, prompt_len))
        where c is the prefix found cached, so a prompt is cut the same way whatever runs beside
        it (its numerics do not depend on the load).
        Together they hold at most prefill_chunk positions (the first one always goes):
        a burst of short prompts is prefilled in one iteration, a long one a chunk at a time.
        """
        chunks: list[PrefillChunk] = []
        budget = self.prefill_chunk
        for sequence in self.running:
            if sequence.phase is not Phase.PREFILL:
                continue
            end = min(sequence.prefilled + self.prefill_chunk, sequence.prompt_len)
            if chunks and end - sequence.prefilled > budget:
                break
            chunks.append(PrefillChunk(sequence, sequence.prefilled, end))
            budget -= end - sequence.prefilled
        return chunks

    def compact(self, exchanged: dict[int, int] | None = None) -> list[tuple[Sequence, int]]:
        """Move sequences out of slots >= len(running) into free lower ones, so the running
        sequences hold slots 0..len(running)-1 and a decode batch over a slot prefix wastes no
        rows. Returns (sequence, its old slot) per move; the caller copies the slot's contents.
        With prefix reuse and `exchanged` given, what a lower slot held goes up to the old slot
        instead (new slot -> its length in `exchanged`: the caller exchanges the two).
        """
        moves = []
        count = len(self.running)
        for sequence in sorted(self.running, key=lambda s: s.slot, reverse=True):
            if sequence.slot < count:
                break
            old_slot, sequence.slot = sequence.slot, self._take_slot()
            cache = self.prefix_cache
            if cache is not None:
                held = cache.records.get(sequence.slot)
                if held is not None and exchanged is not None:
                    exchanged[sequence.slot] = len(held)
                    cache.transfer(sequence.slot, old_slot)
                cache.drop(sequence.slot)
            heapq.heappush(self.free_slots, old_slot)
            moves.append((sequence, old_slot))
        return moves

    def decode_batch(self) -> list[Sequence]:
        """The sequences that decode one token this iteration: every one generating."""
        return [s for s in self.running if s.phase is Phase.DECODE and s.next_token is not None]

    def update_decoded(self, batch: Iterable[Sequence]) -> None:
        """The decode step wrote each sequence's pending token into its slot."""
        for sequence in batch:
            sequence.length += 1

    def finish(self, sequence: Sequence, keep: bool = True) -> None:
        """Release a sequence wherever it is; its slot is free for the next iteration. With
        prefix reuse the slot's positions are remembered unless keep=False (a failed step may
        have left them unfit)."""
        if sequence in self.running:
            self.running.remove(sequence)
            heapq.heappush(self.free_slots, sequence.slot)
            if keep and self.prefix_cache is not None and sequence.prompt_keys is not None:
                self.prefix_cache.keep(sequence.slot, sequence.written_keys())
        elif sequence in self.waiting:
            self.waiting.remove(sequence)
        if sequence.leader is not None and sequence in sequence.leader.followers:
            sequence.leader.followers.remove(sequence)
        sequence.slot = -1

    @property
    def used_positions(self) -> int:
        return sum(s.length for s in self.running)


def consecutive_runs(chunks: list[PrefillChunk]) -> list[list[PrefillChunk]]:
    """Split chunks into runs whose slots follow each other (one prefill forward per run); a
    sequence that scores its prompt (logits at every position) runs alone."""
    runs: list[list[PrefillChunk]] = []
    for chunk in sorted(chunks, key=lambda c: c.sequence.slot):
        previous = runs[-1][-1].sequence if runs else None
        current = chunk.sequence
        if (
            previous is not None
            and previous.slot + 1 == current.slot
            and not previous.scores_prompt
            and not current.scores_prompt
        ):
            runs[-1].append(chunk)
        else:
            runs.append([chunk])
    return runs
