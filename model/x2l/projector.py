"""SLAM-ASR's frame-stacking projector: the simple, strong alternative speech interface."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class FrameStackProjector(nn.Module):
    """Encoder frames (T, De) -> LLM tokens (ceil(T / k), H): each frame layer-normed, k frames
    stacked, a 2-layer MLP.

    The LayerNorm is BLIP-2's `ln_vision` / SALMONN's `ln_speech` on frozen features: Whisper's
    decoder states are ~75x the norm of SmolLM2's embeddings with a few dimensions offset far
    from zero, and fed raw, the MLP gave every token nearly the same large vector.
    """

    def __init__(
        self,
        encoder_hidden: int,
        llm_hidden: int,
        stack_frames: int = 5,
        mlp_hidden: int = 2048,
        residual: bool = False,
        quote: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        super().__init__()
        self.stack_frames = stack_frames
        self.norm = nn.LayerNorm(encoder_hidden)
        self.mlp = nn.Sequential(
            nn.Linear(encoder_hidden * stack_frames, mlp_hidden),
            nn.GELU(),
            nn.Linear(mlp_hidden, llm_hidden),
        )
        if residual:  # a correction added to a prior (TranscriptPrior): it starts at nothing
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)
        # Learned tokens around every clip (prompt tuning), (K_open, H) and (K_close, H): they
        # start as the LLM's embeddings of an opening and a closing text, e.g. quotation marks.
        self.opening: nn.Parameter | None = None
        self.closing: nn.Parameter | None = None
        if quote is not None:
            self.opening = nn.Parameter(quote[0].detach().clone().float())
            self.closing = nn.Parameter(quote[1].detach().clone().float())

    def stack(self, frames: torch.Tensor) -> torch.Tensor:
        k = self.stack_frames
        pad = (-frames.shape[0]) % k
        frames = F.pad(
            frames, (0, 0, 0, pad)
        )  # repeat nothing: zero frames complete the last group
        return frames.reshape(-1, k * frames.shape[-1])

    def enclose(self, tokens: torch.Tensor) -> torch.Tensor:
        """A clip's tokens (N, H) -> (K_open + N + K_close, H) between the learned quote tokens
        (unchanged without them)."""
        if self.opening is None or self.closing is None:
            return tokens
        return torch.cat([self.opening.to(tokens.dtype), tokens, self.closing.to(tokens.dtype)])

    def forward(
        self, frames: list[torch.Tensor], target_lens: list[int] | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Same signature as the C-Former; there is no quantity, so it returns zeros."""
        tokens = [self.mlp(self.stack(self.norm(f))) for f in frames]
        return tokens, torch.zeros(len(frames), device=tokens[0].device if tokens else None)
