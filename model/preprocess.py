"""Step 1 of X-LLM, without model weights: media -> encoder inputs (`PreparedMedia`).

The server prepares media in its API process while the model (and its weights) runs in the
engine process, so this part holds only the config and the encoders' processors. `XLLM.prepare`
is the same object's `prepare`. `MediaPreparer.prepare_bytes` / `prepare_file` are the one way in
from raw media: they pick the decoder for the kind, sample video as the model was trained, and
time both stages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import BlipImageProcessorPil

from xllm.model.config import Modality, XLLMConfig, resolve
from xllm.model.encoders.speech import SpeechFeatures
from xllm.model.media import (
    DecodedVideo,
    MediaLimits,
    decode_audio,
    decode_image,
    decode_video,
    load_media_file,
)
from xllm.model.media.limits import DEFAULT_LIMITS


@dataclasses.dataclass
class PreparedMedia:
    """A media item ready for the encoders (CPU tensors, made off the model thread)."""

    kind: Modality
    digest: str  # content hash of the decoded media: the encoder-output cache key
    pixels: torch.Tensor | None = None  # image (1, 3, S, S) or video frames (T, 3, S, S)
    audio_features: torch.Tensor | None = None  # log-mel windows (W, n_mels, window_frames)
    audio_frames: int = 0  # encoder frames that cover real audio
    # Seconds spent by `MediaPreparer.prepare_bytes` / `prepare_file`: bytes -> decoded media,
    # then decoded media -> these tensors (the server's media_decode / media_preprocess metrics).
    decode_seconds: float = 0.0
    preprocess_seconds: float = 0.0

    @property
    def encoder_inputs(self) -> int:
        """What its encoding costs, counted as the encoders batch: images and video frames
        through the vision tower, windows through the speech encoder."""
        frames = 0 if self.pixels is None else self.pixels.shape[0]
        windows = 0 if self.audio_features is None else self.audio_features.shape[0]
        return frames + windows


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

    @property
    def video_sampling(self) -> dict[str, float | int]:
        """`decode_video`'s fps / max_frames, as the video interface was trained; empty (the
        decoder's defaults) for a model without one."""
        interface = self.config.image_interface
        if interface is None:
            return {}
        return {"fps": interface.video_fps, "max_frames": interface.max_frames}

    def check_kind(self, kind: str) -> None:
        """The one rule for which media a model takes: ValueError naming what it does take."""
        if kind not in self.modalities:
            raise ValueError(
                f"this model does not take {kind} input "
                f"(it takes: {', '.join(self.modalities) or 'text only'})"
            )

    def prepare_bytes(
        self,
        kind: Modality,
        data: bytes,
        limits: MediaLimits = DEFAULT_LIMITS,
        *,
        video_audio: bool = True,
    ) -> PreparedMedia:
        """Untrusted bytes of `kind` -> `PreparedMedia`, with the seconds each stage took.

        `video_audio=False` leaves a video's audio track out (training stage 2 sees frames only).
        Raises `ValueError` for a kind this model does not take (before decoding anything), and
        `MediaError` for bytes that do not decode within `limits`.
        """
        self.check_kind(kind)
        start = time.perf_counter()
        if kind == "image":
            decoded: Image.Image | np.ndarray | DecodedVideo = decode_image(data, limits)
        elif kind == "audio":
            decoded = decode_audio(data, limits)
        elif kind == "video":
            decoded = decode_video(data, limits, **self.video_sampling)  # type: ignore[arg-type]
        else:
            raise ValueError(f"unknown media kind {kind!r}; expected image, audio or video")
        return self._prepare_timed(kind, decoded, start, video_audio)

    def prepare_file(
        self,
        path: str | os.PathLike[str],
        kind: Modality,
        limits: MediaLimits = DEFAULT_LIMITS,
        *,
        video_audio: bool = True,
    ) -> PreparedMedia:
        """`prepare_bytes` for a local file; its `MediaError`s name the path."""
        self.check_kind(kind)
        start = time.perf_counter()
        decoded = load_media_file(path, kind, limits, **self.video_sampling)
        return self._prepare_timed(kind, decoded, start, video_audio)

    def _prepare_timed(
        self,
        kind: Modality,
        decoded: Image.Image | np.ndarray | DecodedVideo,
        start: float,
        video_audio: bool,
    ) -> PreparedMedia:
        if isinstance(decoded, DecodedVideo) and not video_audio:
            decoded = dataclasses.replace(decoded, audio=None)
        decoded_at = time.perf_counter()
        prepared = self.prepare(kind, decoded)
        prepared.decode_seconds = decoded_at - start
        prepared.preprocess_seconds = time.perf_counter() - decoded_at
        return prepared

    def prepare(
        self, kind: Modality, media: Image.Image | np.ndarray | DecodedVideo
    ) -> PreparedMedia:
        """Decoded media -> `PreparedMedia` (untimed; `prepare_bytes` is the way in from bytes)."""
        self.check_kind(kind)
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
