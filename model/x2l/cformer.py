"""S2L interface, the C-Former: CIF compresses 50 Hz encoder frames to about one vector per token.

Continuous integrate-and-fire (Dong & Xu, 2020): a weight alpha_t in (0, 1) is predicted for every
frame; weights are accumulated in time and each time the running sum crosses the threshold a
vector is "fired": the alpha-weighted sum of the frames since the last fire. The frame on which
the sum crosses is split: the part of its weight that completes the current fire goes to it, the
rest starts the next. A quantity loss |sum(alpha) - target_len| teaches the weights to fire once
per transcript token; at inference the number of fires is round(sum(alpha)).
"""

from __future__ import annotations

import torch
from torch import nn


def cif_weights(alpha: torch.Tensor, num_fires: int) -> torch.Tensor:
    """Integration matrix W (num_fires, T) with fires = W @ frames.

    W[k, t] is the share of frame t's weight that falls in fire k, i.e. the overlap of the frame's
    interval [cumsum_{t-1}, cumsum_t] with [k, k + 1]; it is differentiable in alpha. A last fire
    whose interval is only partly covered (the tail) gets what is there.
    """
    cum = torch.cumsum(alpha, dim=0)  # (T,)
    prev = cum - alpha
    k = torch.arange(num_fires, device=alpha.device, dtype=alpha.dtype)[:, None]  # (N, 1)
    upper = torch.minimum(cum[None, :], k + 1)
    lower = torch.maximum(prev[None, :], k)
    return (upper - lower).clamp(min=0)


def cif(
    frames: torch.Tensor, alpha: torch.Tensor, target_len: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """frames (T, D), alpha (T,) -> (fires (N, D), quantity (scalar sum of alpha)).

    Training (target_len given): alpha is rescaled to sum to target_len, so exactly target_len
    vectors fire and the LM sees one per token. Inference: N = round(sum(alpha)), at least 1.
    """
    quantity = alpha.sum()
    if target_len is not None:
        alpha = alpha * (target_len / quantity.clamp(min=1e-6))
        num_fires = target_len
    else:
        num_fires = max(1, int(torch.round(quantity).item()))
    return cif_weights(alpha, num_fires) @ frames, quantity


def quantity_loss(quantity: torch.Tensor, target_len: int | torch.Tensor) -> torch.Tensor:
    return (quantity - target_len).abs()


class CFormer(nn.Module):
    """Encoder frames (T, De) -> LLM tokens (N, H) with N ~ number of spoken tokens."""

    def __init__(
        self,
        encoder_hidden: int,
        llm_hidden: int,
        hidden_size: int = 512,
        num_layers: int = 2,
        num_heads: int = 8,
        weight_kernel_size: int = 3,
        cif_threshold: float = 1.0,
    ) -> None:
        super().__init__()
        self.cif_threshold = cif_threshold
        # Per-frame firing weight from a little local context (a conv over time).
        self.weight_conv = nn.Conv1d(
            encoder_hidden, encoder_hidden, weight_kernel_size, padding=weight_kernel_size // 2
        )
        self.weight_out = nn.Linear(encoder_hidden, 1)
        self.input_proj = nn.Linear(encoder_hidden, hidden_size)
        layer = nn.TransformerEncoderLayer(
            hidden_size, num_heads, 4 * hidden_size, dropout=0.0, batch_first=True, norm_first=True
        )
        self.stack = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden_size)
        self.projection = nn.Linear(hidden_size, llm_hidden)

    def firing_weights(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (T, De) -> alpha (T,) in (0, 1), divided by the firing threshold."""
        context = torch.relu(self.weight_conv(frames.T[None]))[0].T  # (T, De)
        return torch.sigmoid(self.weight_out(context)).squeeze(-1) / self.cif_threshold

    def compress(
        self, frames: torch.Tensor, target_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """frames (T, De) -> (CIF outputs (N, hidden), quantity)."""
        return cif(self.input_proj(frames), self.firing_weights(frames), target_len)

    def encode_fires(self, fires: list[torch.Tensor]) -> list[torch.Tensor]:
        """CIF outputs [(N_i, hidden)] -> contextualised token states [(N_i, hidden)], batched."""
        lengths = [f.shape[0] for f in fires]
        padded = nn.utils.rnn.pad_sequence(fires, batch_first=True)  # (B, N_max, hidden)
        pad_mask = (
            torch.arange(padded.shape[1], device=padded.device)[None, :]
            >= torch.tensor(lengths, device=padded.device)[:, None]
        )
        states = self.norm(self.stack(padded, src_key_padding_mask=pad_mask))
        return [s[:n] for s, n in zip(states, lengths, strict=True)]

    def forward(
        self, frames: list[torch.Tensor], target_lens: list[int] | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """[(T_i, De)] -> ([(N_i, H)] LLM tokens, quantities (B,))."""
        targets = target_lens or [None] * len(frames)
        compressed = [self.compress(f, t) for f, t in zip(frames, targets, strict=True)]
        states = self.encode_fires([c[0] for c in compressed])
        quantities = torch.stack([c[1] for c in compressed])
        return [self.projection(s) for s in states], quantities
