"""X-LLM: frozen encoders -> trainable X2L interfaces -> a frozen LLM's input embeddings.

Pipeline for a request (each step batched across all media items given together):
    step 1: media decoded (xllm.model.media) and preprocessed (`prepare`: pixels, log-mel windows),
            from bytes in one call: `MediaPreparer.prepare_bytes` / `prepare_file`;
    step 2: frozen encoders: BLIP-2 ViT over images and video frames, Whisper over audio windows;
    step 3: X2L interfaces: Q-Former + projection (image), Q-Former with video queries + temporal
            embeddings + projection (video), C-Former or frame stacking + projection (speech);
    step 4: prompt layout (xllm.model.prompt) and embeddings with the media spans filled in
            (steps 2-4 for one request: `prompt_embeddings`);
    step 5: decoding (xllm.model.generate).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from xllm.model.config import Modality, ModelConfigError, XLLMConfig
from xllm.model.encoders.speech import SpeechEncoder
from xllm.model.encoders.vision import VisionEncoder
from xllm.model.preprocess import MediaPreparer, PreparedMedia
from xllm.model.prompt import (
    MediaSegment,
    Message,
    PromptLayout,
    bind_media,
    build_layout,
    embed_layout,
)
from xllm.model.x2l.cformer import CFormer
from xllm.model.x2l.projector import FrameStackProjector
from xllm.model.x2l.qformer import ImageInterface, VideoInterface, build_qformer
from xllm.model.x2l.transcript_prior import TranscriptPrior, WhisperPieces

if TYPE_CHECKING:
    from xllm.model.media import DecodedVideo


# Encoded media: one (kind, (length, H) embeddings) per tagged segment, in prompt order.
EncodedMedia = list[tuple[Modality, torch.Tensor]]


@dataclass
class PromptEmbeddings:
    """One request's prompt as the LLM reads it (`XLLM.prompt_embeddings`)."""

    layout: PromptLayout  # token ids (T,) with the media spans
    embeds: torch.Tensor  # (T, H) on the LLM's device, in its dtype: what `generate` takes
    encoded: list[EncodedMedia]  # per media item, its tagged segments (length, H)

    def __len__(self) -> int:
        return len(self.layout)  # T: the prompt's length in tokens


class XLLM(nn.Module):
    def __init__(
        self,
        config: XLLMConfig,
        llm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        vision: VisionEncoder | None = None,
        speech: SpeechEncoder | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.llm = llm
        self.tokenizer = tokenizer
        self.vision = vision
        self.speech = speech
        self.preparer = MediaPreparer(
            config,
            vision.processor if vision is not None else None,
            speech.features if speech is not None else None,
        )
        llm_hidden = llm.get_input_embeddings().weight.shape[1]
        self.image_interface: ImageInterface | None = None
        self.video_interface: VideoInterface | None = None
        self.speech_interface: CFormer | FrameStackProjector | None = None
        self.transcript_prior: TranscriptPrior | None = None
        if vision is not None and config.image_interface is not None:
            ic = config.image_interface
            self.image_interface = ImageInterface(
                build_qformer(ic.qformer, vision.hidden_size), ic.num_query_tokens, llm_hidden
            )
            # Video has its own Q-Former of the same shape (a deviation from X-LLM, which shares
            # the image one): see xllm.model.x2l.qformer.
            self.video_interface = VideoInterface(
                build_qformer(ic.qformer, vision.hidden_size),
                ic.num_query_tokens,
                ic.max_frames,
                llm_hidden,
            )
        if speech is not None and config.speech_interface is not None:
            sc = config.speech_interface
            if sc.type == "cformer":
                self.speech_interface = CFormer(
                    speech.hidden_size,
                    llm_hidden,
                    sc.hidden_size,
                    sc.num_layers,
                    sc.num_heads,
                    sc.weight_kernel_size,
                    sc.cif_threshold,
                )
            else:
                self.speech_interface = FrameStackProjector(
                    speech.hidden_size,
                    llm_hidden,
                    sc.stack_frames,
                    sc.mlp_hidden_size,
                    residual=sc.transcript_prior_top_k > 0,
                    quote=self._embed_texts(sc.quote) if sc.quote else None,
                )
            if sc.transcript_prior_top_k:
                self.transcript_prior = TranscriptPrior(
                    self.whisper_pieces, sc.transcript_prior_top_k
                )

    def _embed_texts(self, texts: Sequence[str]) -> tuple[torch.Tensor, ...]:
        """Each text -> the frozen LLM's input embeddings of its tokens (K_i, H)."""
        table = self.llm.get_input_embeddings().weight
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return tuple(table[torch.tensor(i, dtype=torch.long, device=table.device)] for i in ids)

    @functools.cached_property
    def whisper_pieces(self) -> WhisperPieces:
        """The LLM tokens of each of Whisper's text tokens, built once from the two tokenizers
        (~1.4 s for Whisper-base and SmolLM2), for the transcript prior and speech stage 1."""
        assert self.speech is not None, "a model without speech has no Whisper pieces"
        return speech_pieces(self.speech, self.tokenizer)

    # --- which parameters are the X2L interfaces (the only weights xllm trains and stores) ---
    def interfaces(self) -> dict[str, nn.Module]:
        found = {
            "image_interface": self.image_interface,
            "video_interface": self.video_interface,
            "speech_interface": self.speech_interface,
        }
        return {name: module for name, module in found.items() if module is not None}

    def interface_state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for name, module in self.interfaces().items():
            for key, value in module.state_dict().items():
                state[f"{name}.{key}"] = value
        return state

    @property
    def modalities(self) -> tuple[Modality, ...]:
        return self.preparer.modalities

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    @property
    def max_model_len(self) -> int:
        config = self.llm.config.get_text_config()
        return int(getattr(config, "max_position_embeddings", 2048))

    # --- step 1: preprocessing (thread-safe, CPU, no model weights touched) ---
    def prepare(
        self, kind: Modality, media: Image.Image | np.ndarray | DecodedVideo
    ) -> PreparedMedia:
        return self.preparer.prepare(kind, media)

    # --- steps 2 and 3: encoders and interfaces, batched over all items ---
    def encode(self, items: Sequence[PreparedMedia]) -> list[EncodedMedia]:
        """Prepared media -> per item, its tagged embedding segments (length, llm_hidden)."""
        out: list[EncodedMedia] = [[] for _ in items]
        visual = [i for i, it in enumerate(items) if it.pixels is not None]
        if visual:
            assert self.vision is not None and self.image_interface is not None
            assert self.video_interface is not None
            pixels = torch.cat([items[i].pixels for i in visual]).to(self.device)
            # The encoders may run in half precision (GPU); the interfaces keep float32 weights.
            patches = self.vision(pixels).to(_dtype_of(self.image_interface))
            patches = patches.split([items[i].pixels.shape[0] for i in visual])
            images = [j for j, i in enumerate(visual) if items[i].kind == "image"]
            if images:
                tokens = self.image_interface(torch.cat([patches[j] for j in images]))  # (N, Q, H)
                for j, t in zip(images, tokens, strict=True):
                    out[visual[j]].append(("image", t))
            for j, i in enumerate(visual):
                if items[i].kind == "video":
                    out[i].append(("video", self.video_interface(patches[j])))
        sound = [i for i, it in enumerate(items) if it.audio_features is not None]
        if sound:
            assert self.speech_interface is not None
            tokens = self.speech_tokens(self.speech_frames([items[i] for i in sound]))
            if isinstance(self.speech_interface, FrameStackProjector):  # its quote tokens
                tokens = [self.speech_interface.enclose(t) for t in tokens]
            for i, t in zip(sound, tokens, strict=True):
                out[i].append(("audio", t))  # after the video's frames when from a video track
        return out

    def speech_frames(self, items: Sequence[PreparedMedia]) -> list[torch.Tensor]:
        """Items with audio features -> their frozen speech-encoder frames [(T_i, De)], batched,
        in the speech interface's dtype (the encoder may run in half precision on a GPU)."""
        assert self.speech is not None and self.speech_interface is not None
        features = torch.cat([it.audio_features for it in items]).to(self.device)
        frames = self.speech.encode_clips(
            features,
            [it.audio_features.shape[0] for it in items],
            [it.audio_frames for it in items],
        )
        dtype = _dtype_of(self.speech_interface)
        return [f.to(dtype) for f in frames]

    def speech_tokens(self, frames: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Speech-encoder outputs [(T_i, De)] -> the LLM's tokens for each clip [(N_i, H)]: the
        speech interface, added to the transcript prior when the model has one."""
        assert self.speech is not None and self.speech_interface is not None
        tokens, _ = self.speech_interface(list(frames))
        if self.transcript_prior is None:
            return tokens
        assert self.speech.transcriber is not None
        head = self.speech.transcriber.decoder.embed_tokens.weight
        table = self.llm.get_input_embeddings().weight
        return [
            t + self.transcript_prior(f, head, table).to(t.dtype)
            for t, f in zip(tokens, frames, strict=True)
        ]

    # --- step 4: prompt ---
    def layout(
        self,
        messages: Sequence[Message],
        encoded: Sequence[EncodedMedia],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[dict] | None = None,
    ) -> PromptLayout:
        segments = [[MediaSegment(kind, t.shape[0]) for kind, t in item] for item in encoded]
        return build_layout(
            self.tokenizer,
            messages,
            segments,
            self.config.tags,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
        )

    def embed(self, layout: PromptLayout, encoded: Sequence[EncodedMedia]) -> torch.Tensor:
        """(L, H) prompt embeddings on the LLM's device, in its dtype."""
        media = [[t for _, t in item] for item in encoded]
        return embed_layout(self.llm.get_input_embeddings(), layout, media)

    # --- steps 2 to 4 for one request ---
    def prompt_embeddings(
        self,
        turns: Sequence[tuple[str, str]],
        media: Sequence[PreparedMedia],
        *,
        add_generation_prompt: bool = True,
    ) -> PromptEmbeddings:
        """(role, text) turns + the request's prepared media -> its prompt embeddings.

        The media bind to the turns' placeholders in order (`bind_media`, before any encoding),
        are encoded in one batch, and fill their spans of the layout. Gradients flow unless the
        caller runs this under `torch.inference_mode()`. Raises `PromptError` when media and
        placeholders do not match.
        """
        messages = bind_media(turns, [item.kind for item in media])
        encoded = self.encode(media)
        layout = self.layout(messages, encoded, add_generation_prompt=add_generation_prompt)
        return PromptEmbeddings(layout, self.embed(layout, encoded), encoded)


def speech_pieces(speech: SpeechEncoder, tokenizer: PreTrainedTokenizerBase) -> WhisperPieces:
    """The LLM tokens of each of Whisper's text tokens (needs the decoder and its tokenizer)."""
    transcriber = speech.transcriber
    if transcriber is None or transcriber.tokenizer is None:
        raise ModelConfigError(
            "reading Whisper's written pieces (speech_states 'decoder') needs a whole Whisper "
            "checkpoint with its tokenizer.json"
        )
    return WhisperPieces(transcriber.tokenizer, tokenizer, transcriber.end_of_text)


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype
