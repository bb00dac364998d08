"""Step 1 of X-LLM, without model weights: decoded media -> encoder inputs (`PreparedMedia`).

The server prepares media in its API process while the model (and its weights) runs in the
engine process, so this part holds only the config and the encoders' processors. `XLLM.prepare`
is the same object's `prepare`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from transformers import BlipImageProcessorPil

from xllm.model.config import Modality, XLLMConfig, resolve
from xllm.model.encoders.speech import SpeechFeatures

if TYPE_CHECKING:
    from xllm.model.media import DecodedVideo


@dataclass
class PreparedMedia:
    """A media item ready for the encoders (CPU tensors, made off the model thread)."""

    kind: Modality
    digest: str  # content hash of the decoded media: the encoder-output cache key
    pixels: torch.Tensor | None = None  # image (1, 3, S, S) or video frames (T, 3, S, S)
    audio_features: torch.Tensor | None = None  # log-mel windows (W, n_mels, window_frames)
    audio_frames: int = 0  # encoder frames that cover real audio


class MediaPreparer:
    """Decoded media -> `PreparedMedia`: pixels for the vision tower, log-mel windows for speech.

    Thread-safe and CPU-only. It takes images and video when it has an image processor and the
    config an image interface, audio likewise. Video keeps at most the video interface's
    `max_frames` frames; a video's audio track is prepared too when the model hears audio.
    """

    def __init__(
        self,
        config: XLLMConfig,
        image_processor: BlipImageProcessorPil | None,
        speech_features: SpeechFeatures | None,
    ) -> None:
        self.config = config
        # A processor without its interface is unused: the model cannot take that input.
        self.image_processor = image_processor if config.image_interface else None
        self.speech_features = speech_features if config.speech_interface else None

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> MediaPreparer:
        """The preprocessors of a model directory, without loading any weights."""
        model_dir = Path(model_dir)
        config = XLLMConfig.load(model_dir)
        image_processor = speech_features = None
        if "image" in config.modalities:
            assert config.vision is not None
            vision = resolve(model_dir, config.vision, "vision")
            image_processor = BlipImageProcessorPil.from_pretrained(vision)
        if "audio" in config.modalities:
            assert config.speech is not None
            speech_features = SpeechFeatures.from_pretrained(
                resolve(model_dir, config.speech, "speech")
            )
        return cls(config, image_processor, speech_features)

    @property
    def modalities(self) -> tuple[Modality, ...]:
        found: list[Modality] = []
        if self.image_processor is not None:
            found += ["image", "video"]
        if self.speech_features is not None:
            found.append("audio")
        return tuple(found)

    @property
    def max_frames(self) -> int:
        assert self.config.image_interface is not None
        return self.config.image_interface.max_frames

    def prepare(
        self, kind: Modality, media: Image.Image | np.ndarray | DecodedVideo
    ) -> PreparedMedia:
        if kind not in self.modalities:
            raise ValueError(
                f"this model does not take {kind} input "
                f"(it takes: {', '.join(self.modalities) or 'text only'})"
            )
        if kind == "image":
            assert isinstance(media, Image.Image)
            return PreparedMedia(
                kind, _digest(kind, media.tobytes(), media.size), pixels=self._pixels([media])
            )
        if kind == "audio":
            assert self.speech_features is not None and isinstance(media, np.ndarray)
            features, frames = self.speech_features(media)
            return PreparedMedia(
                kind, _digest(kind, media.tobytes()), audio_features=features, audio_frames=frames
            )
        assert not isinstance(media, (Image.Image, np.ndarray))
        frames = media.frames[: self.max_frames]
        parts: list[bytes | tuple] = [f.tobytes() for f in frames]
        item = PreparedMedia(kind, "", pixels=self._pixels(frames))
        if media.audio is not None and len(media.audio) and self.speech_features is not None:
            item.audio_features, item.audio_frames = self.speech_features(media.audio)
            parts.append(media.audio.tobytes())
        item.digest = _digest(kind, *parts)
        return item

    def _pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """RGB images of any size -> pixel_values (N, 3, S, S), float32."""
        assert self.image_processor is not None
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]


def _digest(kind: str, *parts: bytes | tuple) -> str:
    h = hashlib.blake2b(kind.encode(), digest_size=16)
    for part in parts:
        h.update(part if isinstance(part, bytes) else repr(part).encode())
    return h.hexdigest()
