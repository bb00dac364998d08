"""The serving layer without HTTP: rules it maps from the layers below it."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.media import make_wav
from xllm.model.media import MediaLimits
from xllm.model.preprocess import MediaPreparer
from xllm.server.errors import ServingError
from xllm.server.serving import ChatInput, ChatService, MediaInput, ServingLimits


class Places:
    """Just the engine's admission: counts the places ever claimed."""

    max_model_len = 1024
    config = SimpleNamespace(max_batch=1)
    num_waiting = 0

    def __init__(self) -> None:
        self.claimed = 0

    def reserve(self) -> None:
        self.claimed += 1

    def release(self) -> None: ...


def test_a_kind_the_model_does_not_take_is_refused_before_a_place_or_a_decode(
    tiny_model_dir: Path,
) -> None:
    full = MediaPreparer.from_pretrained(tiny_model_dir)
    vision_only = MediaPreparer(full.config, full.image_processor, None)  # hears no audio
    decoded: list[str] = []
    prepare_bytes = vision_only.prepare_bytes

    def spy(kind, data, *args, **kwargs):
        decoded.append(kind)
        return prepare_bytes(kind, data, *args, **kwargs)

    vision_only.prepare_bytes = spy  # type: ignore[method-assign]
    engine = Places()
    with ThreadPoolExecutor(1) as executor:
        service = ChatService(
            vision_only,
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
    assert engine.claimed == 0 and decoded == []  # no place taken, not a byte decoded
