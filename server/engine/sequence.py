"""`Sequence`: one request inside the engine, from its arrival to its last event.

The API side's `EngineRequest` (what to generate) and `RequestHandle` (where its events go)
travel with it; the scheduler owns its scheduling state (phase, slot, positions) and the model
runner its generation state (prompt embeddings, sampler, tokens so far). Torch-free at import
time, so that the scheduler that moves sequences about stays pure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import llguidance
    import torch

    from xllm.model.detokenize import SequenceState
    from xllm.server.engine.contract import EventSink
    from xllm.server.engine.events import EngineRequest, TokenLogprobs
    from xllm.server.engine.prefix_cache import Key


class Phase(Enum):
    WAITING = "waiting"  # queued, no slot yet
    PREFILL = "prefill"  # has a slot; prompt being written into it, chunk by chunk
    DECODE = "decode"  # generating, one token per iteration
    FORK = "fork"  # has a slot; waits for its leader's prompt, then copies its K/V


@dataclass(eq=False)  # identity: a sequence is itself, whatever its fields say
class Sequence:
    request: EngineRequest
    handle: EventSink
    key: int = -1  # the admission's key for the handle (see AdmissionControl.track)

    # --- scheduling state: changed by the Scheduler only ---
    phase: Phase = Phase.WAITING
    slot: int = -1
    prompt_len: int = 0  # set once the prompt is laid out
    prefilled: int = 0  # prompt positions already in the slot
    length: int = 0  # positions in the slot (prompt + generated)
    # OpenAI's n: the leader (choice 0) prefills the prompt for its followers (the other
    # choices), admitted with it; they copy its K/V once its prompt is complete
    leader: Sequence | None = None
    followers: list[Sequence] = field(default_factory=list)

    # --- generation state: the ModelRunner's ---
    state: SequenceState | None = None
    embeds: torch.Tensor | None = None  # (L, H) prompt embeddings until prefill is done
    generator: torch.Generator | None = None
    next_token: int | None = None  # sampled, not yet written into the cache
    matcher: llguidance.LLMatcher | None = None  # request.grammar's state, when it has one
    last_token_at: float = 0.0
    # seconds per stage (see FinishEvent.stages), and when its prompt was laid out (encoded)
    stages: dict[str, float] = field(default_factory=dict)
    laid_out_at: float = 0.0
    # usage details of its prompt: positions per media kind (set once it is laid out), and the
    # positions whose K/V were reused rather than prefilled
    media_tokens: dict[str, int] = field(default_factory=dict)
    cached_tokens: int = 0
    # request.prompt_logprobs only: the prompt's ids and its tokens' logprobs so far
    prompt_ids: list[int] | None = None
    prompt_entries: list[TokenLogprobs] = field(default_factory=list)
    # with prefix reuse on: the keys of its prompt's positions (see prefix_cache.py)
    prompt_keys: list[Key] | None = None

    def written_keys(self) -> list[Key]:
        """The keys of the positions in its slot: the prompt's so far, then generated tokens."""
        assert self.prompt_keys is not None
        written = max(0, self.length - self.prompt_len)
        generated = self.state.tokens[:written] if self.state is not None else []
        return self.prompt_keys[: self.length] + list(generated)

    @property
    def scores_prompt(self) -> bool:
        """Its prompt's own logprobs are asked for: its prefill keeps every position's logits,
        so it runs alone in its prefill forward."""
        return self.prompt_ids is not None
