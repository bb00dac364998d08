"""`usage.prompt_tokens_details` through the official `openai` client against a real `xllm serve`
on the tiny random model: the media counts are the prompt's media-span lengths by kind (laid
out here by the model itself), in chat completions (streamed too) and completions."""

from __future__ import annotations

import base64

import openai
import pytest
import torch

from tests.media import make_png, make_wav
from xllm.model.media import MediaLimits


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def span_lengths(model, text: str, media: list[tuple[str, bytes]]) -> dict[str, int]:
    """The prompt positions each kind's spans take, by the model's own layout."""
    prepared = [model.preparer.prepare_bytes(kind, data, MediaLimits()) for kind, data in media]
    with torch.inference_mode():
        prompt = model.prompt_embeddings([("user", text)], prepared)
    kinds = [[kind for kind, _ in item] for item in prompt.encoded]
    counts: dict[str, int] = {}
    for _, length, index, segment in prompt.layout.spans:
        kind = kinds[index][segment]
        counts[kind] = counts.get(kind, 0) + length
    return counts


def media_counts(usage) -> dict[str, int]:
    """The media positions of a reply's usage by kind; its cached positions are checked to be a
    count within the prompt (how many depends on what earlier requests left to reuse)."""
    details = usage.prompt_tokens_details.to_dict()
    assert set(details) == {"cached_tokens", "audio_tokens", "image_tokens", "video_tokens"}
    assert 0 <= details["cached_tokens"] <= usage.prompt_tokens
    return {kind: details[f"{kind}_tokens"] for kind in ("audio", "image", "video")}


def image_audio_message(png: bytes, wav: bytes) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare "},
                {
                    "type": "image_url",
                    "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()},
                },
                {"type": "text", "text": " and "},
                {
                    "type": "input_audio",
                    "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"},
                },
            ],
        }
    ]


def test_media_counts_equal_the_span_lengths(client, tiny_model):
    png, wav = make_png(), make_wav(2.0)
    want = span_lengths(tiny_model, "Compare <image> and <audio>", [("image", png), ("audio", wav)])
    assert want["image"] == 8 and want["audio"] > 0  # the tiny model: 8 image queries

    reply = client.chat.completions.create(
        model="m", messages=image_audio_message(png, wav), max_tokens=4, temperature=0
    )
    assert media_counts(reply.usage) == {"audio": want["audio"], "image": 8, "video": 0}

    stream = client.chat.completions.create(
        model="m",
        messages=image_audio_message(png, wav),
        max_tokens=4,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    last = list(stream)[-1].usage
    assert last is not None and last.prompt_tokens == reply.usage.prompt_tokens
    assert media_counts(last) == media_counts(reply.usage)


def test_text_prompts_have_zero_media(client):
    reply = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    zeros = {"audio": 0, "image": 0, "video": 0}
    assert media_counts(reply.usage) == zeros

    completion = client.completions.create(model="m", prompt=["a", "b c"], max_tokens=2)
    assert media_counts(completion.usage) == zeros
    chunks = list(
        client.completions.create(
            model="m",
            prompt=["a", "b c"],
            max_tokens=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.prompt_tokens == completion.usage.prompt_tokens
    assert media_counts(chunks[-1].usage) == zeros
