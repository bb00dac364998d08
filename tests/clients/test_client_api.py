"""XLLMClient and AsyncXLLMClient against a real server on the tiny random model."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.media import SAMPLE_RATE, make_png, speech_with_pauses, to_wav
from xllm.clients import (
    AsyncXLLMClient,
    ChatResult,
    StreamDelta,
    Transcription,
    TranscriptSegment,
    XLLMClient,
    XLLMConnectionError,
    XLLMError,
)

GREEDY = {"temperature": 0.0, "max_tokens": 8, "ignore_eos": True}


@pytest.fixture(scope="module")
def client(server_url: str):
    with XLLMClient(server_url) as client:
        yield client


def test_probes_and_models(client: XLLMClient) -> None:
    health, ready = client.health(), client.ready()
    assert health and health.status == "ok"
    assert ready and ready.status == "ready" and ready.http_status == 200
    models = client.models()
    assert [m.id for m in models] == ["xllm-tiny"]


def test_chat(client: XLLMClient) -> None:
    result = client.chat("What is in the image?", **GREEDY)
    assert isinstance(result, ChatResult)
    assert result.model == "xllm-tiny" and result.id
    assert result.finish_reason == "length"
    assert result.usage.completion_tokens == 8
    assert result.usage.total_tokens == result.usage.prompt_tokens + 8
    assert result.text


def test_stream_joins_to_the_complete_reply(client: XLLMClient) -> None:
    complete = client.chat("describe the picture", **GREEDY)
    deltas = list(client.chat_stream("describe the picture", **GREEDY))
    assert all(isinstance(d, StreamDelta) for d in deltas)
    assert "".join(d.delta for d in deltas) == complete.text
    assert len({d.id for d in deltas}) == 1
    last = deltas[-1]
    assert last.finish_reason == "length" and last.usage is not None
    counts = (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens)
    assert counts == (complete.usage.prompt_tokens, 8, complete.usage.total_tokens)
    assert last.usage.cached_tokens > 0  # the same prompt again: its K/V were still there
    assert all(d.finish_reason is None and d.usage is None for d in deltas[:-1])


def test_messages_and_stop(client: XLLMClient) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "What shape is this?"},
    ]
    result = client.chat(messages=messages, stop=["[END]"], seed=1, top_k=5, **GREEDY)
    assert (
        result.usage.prompt_tokens
        > client.chat("What shape is this?", **GREEDY).usage.prompt_tokens
    )


def test_async_chat_and_stream(server_url: str) -> None:
    async def main() -> tuple[ChatResult, list[StreamDelta], bool]:
        async with AsyncXLLMClient(server_url) as client:
            ready = await client.ready()
            result, deltas = await asyncio.gather(
                client.chat("hello", **GREEDY),
                _collect(client.chat_stream("hello", **GREEDY)),
            )
            return result, deltas, bool(ready)

    async def _collect(stream) -> list[StreamDelta]:
        return [delta async for delta in stream]

    result, deltas, ready = asyncio.run(main())
    assert ready
    assert "".join(d.delta for d in deltas) == result.text
    usage = deltas[-1].usage
    assert deltas[-1].finish_reason == "length" and usage is not None
    # the same counts; cached_tokens may differ (one may reuse the other's prompt K/V)
    assert (usage.prompt_tokens, usage.total_tokens) == (
        result.usage.prompt_tokens,
        result.usage.total_tokens,
    )


def test_image_audio_video_upload(
    client: XLLMClient, tmp_path, png_bytes: bytes, wav_bytes: bytes, mp4_bytes: bytes
) -> None:
    image_path = tmp_path / "square.png"
    image_path.write_bytes(png_bytes)
    text_only = client.chat("Look: and listen: and watch:", **GREEDY)
    result = client.chat(
        "Look: <image> and listen: <audio> and watch: <video>",
        images=[image_path],  # a path
        audios=[wav_bytes],  # raw bytes
        videos=[("clip.mp4", mp4_bytes)],  # (filename, bytes)
        **GREEDY,
    )
    assert result.finish_reason == "length" and result.usage.completion_tokens == 8
    # Each media item adds its soft tokens to the prompt.
    assert result.usage.prompt_tokens > text_only.usage.prompt_tokens + 3
    streamed = client.chat_stream(
        "Look: <image> and listen: <audio> and watch: <video>",
        images=[str(image_path)],
        audios=[wav_bytes],
        videos=[mp4_bytes],
        **GREEDY,
    )
    assert "".join(d.delta for d in streamed) == result.text


def test_errors_map_to_xllm_error(client: XLLMClient, png_bytes: bytes) -> None:
    with pytest.raises(XLLMError) as corrupt:
        client.chat("What is this?", images=[b"definitely not an image"])
    assert corrupt.value.status == 400 and corrupt.value.type == "invalid_request_error"
    assert "image" in corrupt.value.message

    with pytest.raises(XLLMError) as bad_temperature:
        client.chat("hi", temperature=-1)
    assert bad_temperature.value.status == 422 and bad_temperature.value.type == "invalid_parameter"
    assert "temperature" in bad_temperature.value.message

    with pytest.raises(XLLMError) as mismatch:  # two <image> placeholders, one image
        client.chat("<image> <image>", images=[png_bytes])
    assert mismatch.value.status == 400

    with pytest.raises(XLLMError) as in_stream:  # the stream raises on first iteration
        next(iter(client.chat_stream("What is this?", images=[b"\x89PNG broken"])))
    assert in_stream.value.status == 400


def test_client_side_argument_errors(client: XLLMClient) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        client.chat()
    with pytest.raises(ValueError, match="exactly one"):
        client.chat("hi", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(TypeError, match="temprature"):
        client.chat("hi", temprature=0.5)  # type: ignore[call-arg]
    with pytest.raises(FileNotFoundError):
        client.chat("hi", images=["/no/such/file.png"])


def test_unreachable_server_raises_connection_error(dead_url: str) -> None:
    with XLLMClient(dead_url, timeout=5) as client:
        with pytest.raises(XLLMConnectionError) as info:
            client.chat("hi")
        assert info.value.status is None
        with pytest.raises(XLLMConnectionError):
            list(client.chat_stream("hi"))


def test_a_stream_can_be_abandoned(client: XLLMClient) -> None:
    stream = client.chat_stream("hello", temperature=0.0, max_tokens=64, ignore_eos=True)
    first = next(stream)
    stream.close()  # what `break` in a for loop does: the connection is closed, the slot freed
    assert first.delta and first.finish_reason is None
    assert client.chat("hello", **GREEDY).finish_reason == "length"


def test_transcribe_gives_the_utterance_segments(client: XLLMClient, server_url: str) -> None:
    speech, sounds = speech_with_pauses(["a red circle", "the shape moves up"], pause_s=1.0)
    result = client.transcribe(("two.wav", to_wav(speech)), language="en")
    assert isinstance(result, Transcription)
    assert result.duration == pytest.approx(speech.size / SAMPLE_RATE, abs=1e-3)
    assert len(result.segments) == len(sounds) == 2
    for segment, (start, end) in zip(result.segments, sounds, strict=True):
        assert isinstance(segment, TranscriptSegment)
        assert segment.start - 1e-3 <= start and end <= segment.end + 1e-3  # ms-rounded times
    assert result.text == " ".join(s.text for s in result.segments if s.text)

    async def transcribe_async() -> Transcription:
        async with AsyncXLLMClient(server_url) as aclient:
            return await aclient.transcribe(("two.wav", to_wav(speech)))

    assert asyncio.run(transcribe_async()) == result
    with pytest.raises(XLLMError) as refused:
        client.transcribe(("image.png", make_png()))
    assert refused.value.status == 415


def test_chat_with_a_response_format(client: XLLMClient, server_url: str) -> None:
    schema = {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "blue"]}, "n": {"type": "integer"}},
        "required": ["colour", "n"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}
    finished = 0
    for seed in range(4):
        result = client.chat(
            "colour?", temperature=1.0, seed=seed, max_tokens=40, response_format=fmt
        )
        if result.finish_reason == "stop":
            answer = json.loads(result.text)
            assert set(answer) == {"colour", "n"} and answer["colour"] in ("red", "blue")
            finished += 1
    assert finished
    streamed = "".join(
        d.delta for d in client.chat_stream("hi", max_tokens=20, response_format=fmt)
    )
    assert streamed.startswith('{"colour":"')
    with pytest.raises(XLLMError, match="response_format") as info:
        client.chat("hi", response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    assert info.value.status == 400
    not_json = httpx.post(f"{server_url}/chat", data={"prompt": "hi", "response_format": "{"})
    assert not_json.status_code == 400 and "response_format" in not_json.text
