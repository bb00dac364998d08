"""I2L and V2L interfaces: BLIP-2's Q-Former turns encoder patches into a few query tokens.

Images and video frames each have their own `Blip2QFormerModel`, learned queries and projection
into the LLM; video adds learned frame-position embeddings. X-LLM shares the image Q-Former with
video and trains only the video queries and projection; xllm gives video its own Q-Former
(initialised from the image one at stage 2 video, see `init_video_from_image`) and trains its
cross-attention too: through the frozen image Q-Former the toy-world model stayed at chance
on the direction of motion (its cross-attention was trained to pool colour and shape, not place).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel


def build_qformer(qformer_kwargs: dict, vision_hidden: int) -> Blip2QFormerModel:
    config = Blip2QFormerConfig(**{**qformer_kwargs, "encoder_hidden_size": vision_hidden})
    return Blip2QFormerModel(config)


class ImageInterface(nn.Module):
    """patches (N, P, Dv) -> LLM tokens (N, Q, H), Q = num_query_tokens."""

    def __init__(self, qformer: Blip2QFormerModel, num_query_tokens: int, llm_hidden: int) -> None:
        super().__init__()
        hidden = qformer.config.hidden_size
        self.qformer = qformer
        # BLIP-2 names this parameter `query_tokens` with shape (1, Q, hidden).
        self.query_tokens = nn.Parameter(torch.randn(1, num_query_tokens, hidden) * 0.02)
        self.projection = nn.Linear(hidden, llm_hidden)

    @property
    def num_query_tokens(self) -> int:
        return self.query_tokens.shape[1]

    def query(self, patches: torch.Tensor, query_tokens: torch.Tensor) -> torch.Tensor:
        """Q-Former over patches (N, P, Dv) with queries (1, Q, Dq) -> (N, Q, Dq)."""
        queries = query_tokens.expand(patches.shape[0], -1, -1)
        mask = torch.ones(patches.shape[:2], dtype=torch.long, device=patches.device)
        return self.qformer(
            query_embeds=queries, encoder_hidden_states=patches, encoder_attention_mask=mask
        ).last_hidden_state

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.projection(self.query(patches, self.query_tokens))


class VideoInterface(ImageInterface):
    """frame patches (T, P, Dv) of one clip -> LLM tokens (T * Q, H), frames in time order.

    Each frame is queried on its own (by this interface's own Q-Former and video queries); frame
    t's query outputs get the learned temporal embedding t before the projection.
    """

    def __init__(
        self,
        qformer: Blip2QFormerModel,
        num_query_tokens: int,
        max_frames: int,
        llm_hidden: int,
    ) -> None:
        super().__init__(qformer, num_query_tokens, llm_hidden)
        self.frame_position = nn.Embedding(max_frames, qformer.config.hidden_size)
        nn.init.zeros_(self.frame_position.weight)  # starts as the image path, learns order

    @property
    def max_frames(self) -> int:
        return self.frame_position.num_embeddings

    def forward(self, frame_patches: torch.Tensor) -> torch.Tensor:
        frames = frame_patches.shape[0]
        if frames > self.max_frames:
            raise ValueError(
                f"video has {frames} frames; this model takes at most {self.max_frames}"
            )
        tokens = self.query(frame_patches, self.query_tokens)  # (T, Q, Dq)
        positions = torch.arange(frames, device=tokens.device)
        tokens = tokens + self.frame_position(positions)[:, None, :]
        return self.projection(tokens).reshape(-1, self.projection.out_features)
