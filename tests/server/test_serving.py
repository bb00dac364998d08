"""The serving layer without HTTP: rules it maps from the layers below it."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from tests.media import make_wav
from xllm.model.config import SamplingDefaults
from xllm.model.media import MediaLimits
from xllm.server.errors import ServingError
from xllm.server.serving import ChatInput, ChatService, MediaInput, ServingLimits


class VisionOnlyPreparer:
    """A preparer whose model takes no audio: its `prepare` refuses, as MediaPreparer's does."""

    config = SimpleNamespace(sampling=SamplingDefaults(), image_interface=None, name="vision")
    modalities = ("image", "video")

    def prepare(self, kind, media):
        raise ValueError(f"this model does not take {kind} input (it takes: image, video)")


class Places:
    """Just the engine's admission: counts the places claimed and given back."""

    max_model_len = 1024
    config = SimpleNamespace(max_batch=1)
    num_waiting = 0

    def __init__(self) -> None:
        self.claimed = 0

    def reserve(self) -> None:
        self.claimed += 1

    def release(self) -> None:
        self.claimed -= 1


def test_a_kind_the_model_does_not_take_is_the_preparers_400_and_frees_its_place():
    engine = Places()
    with ThreadPoolExecutor(1) as executor:
        service = ChatService(
            VisionOnlyPreparer(),  # type: ignore[arg-type]
            engine,  # type: ignore[arg-type]
            ServingLimits(MediaLimits()),
            executor,
            None,  # type: ignore[arg-type]
            "vision",
            None,  # type: ignore[arg-type]
        )
        chat = ChatInput(
            [("user", "<audio> what is it?")], [MediaInput("audio", make_wav())], {}, "r"
        )
        with pytest.raises(ServingError) as refused:
            asyncio.run(service.start(chat))
    assert refused.value.status == 400
    assert "does not take audio input" in refused.value.message
    assert engine.claimed == 0
