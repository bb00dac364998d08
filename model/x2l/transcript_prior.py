"""The LLM's own embeddings of what Whisper wrote: the starting point of a decoder-state interface.

Whisper's decoder states (speech_states "decoder") each write one word piece through Whisper's
output layer. `TranscriptPrior` turns a state into the frozen LLM's input embedding of that piece
(the mean of its LLM tokens' embeddings when the LLM splits it), averaged over Whisper's top-k
candidates with their probabilities, so an uncertain piece stays a blend. The trainable
projector only adds a correction (`FrameStackProjector(residual=True)`), which starts at zero:
before any training the LLM reads a spoken sentence nearly as the typed one.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase


class WhisperPieces:
    """Whisper text token id -> the LLM's token ids for the same text.

    `table` (V, L): row v holds the LLM ids of Whisper token v's text, padded with -1; V is
    Whisper's text vocabulary (the ids below end-of-text in every Whisper tokenizer).
    """

    def __init__(
        self,
        whisper_tokenizer: PreTrainedTokenizerBase,
        llm_tokenizer: PreTrainedTokenizerBase,
        text_vocab: int,
    ) -> None:
        texts = whisper_tokenizer.batch_decode([[v] for v in range(text_vocab)])
        ids = llm_tokenizer(texts, add_special_tokens=False)["input_ids"]
        width = max(1, max(len(p) for p in ids))
        self.table = torch.full((text_vocab, width), -1, dtype=torch.long)
        for v, piece in enumerate(ids):
            self.table[v, : len(piece)] = torch.tensor(piece, dtype=torch.long)

    def __getitem__(self, token: int) -> list[int]:
        """The LLM ids of Whisper token `token`'s text (empty for a piece of no text and for
        Whisper's special tokens: end-of-text, language, task, timestamps)."""
        if not 0 <= token < self.table.shape[0]:
            return []
        return [i for i in self.table[token].tolist() if i >= 0]


def piece_embeddings(
    table: torch.Tensor, tokens: torch.Tensor, llm_embeddings: torch.Tensor
) -> torch.Tensor:
    """Whisper tokens (...) -> the LLM's embedding of each one's text (..., H), float32: the mean
    of its LLM tokens' embeddings (zeros for a token of no text). `table`: `WhisperPieces.table`."""
    ids = table[tokens.to(table.device)].to(llm_embeddings.device)  # (..., L), -1 padded
    present = (ids >= 0).float()
    embeds = llm_embeddings[ids.clamp(min=0)].float() * present[..., None]  # (..., L, H)
    return embeds.sum(-2) / present.sum(-1, keepdim=True).clamp(min=1)


class TranscriptPrior(nn.Module):
    """Decoder states (N, D) -> (N, H): the LLM embedding of each state's written piece.

    For state h, Whisper's logits over its text vocabulary are h @ W^T (W: its output layer, tied
    to its token embeddings); the top-k candidates' probabilities are renormalised over the k;
    each candidate contributes the mean LLM embedding of its pieces. No trainable weights: the
    piece table is rebuilt from the two tokenizers on load and never stored.
    """

    def __init__(self, pieces: WhisperPieces, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.register_buffer("pieces", pieces.table, persistent=False)

    def forward(
        self, states: torch.Tensor, whisper_output: torch.Tensor, llm_embeddings: torch.Tensor
    ) -> torch.Tensor:
        """states (N, D); whisper_output (V_w, D); llm_embeddings (V_l, H) -> (N, H) float32."""
        text_vocab = self.pieces.shape[0]
        logits = states.float() @ whisper_output[:text_vocab].float().T  # (N, V)
        top = logits.topk(self.top_k, dim=-1)
        weights = top.values.softmax(-1)  # (N, k)
        per_candidate = piece_embeddings(self.pieces, top.indices, llm_embeddings)  # (N, k, H)
        return (weights[..., None] * per_candidate).sum(-2)
