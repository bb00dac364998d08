"""The OpenAI request a query becomes, and the remote backend's retry and error handling."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from xllm.model.evaluation.backends import BackendError, Query, RemoteBackend, openai_messages


@pytest.fixture
def files(tmp_path: Path, media) -> dict[str, Path]:
    aiff = tmp_path / "speech.aiff"
    sf.write(aiff, np.zeros(800, np.float32), 8000, format="AIFF")
    return {"png": media.png("a.png"), "wav": media.wav("b.wav", seconds=0.1), "aiff": aiff}


def test_parts_follow_the_placeholders(files) -> None:
    query = Query(
        (("system", "Be brief."), ("user", "<image> What is it? <audio> Answer.")),
        (("image", files["png"]), ("audio", files["wav"])),
    )
    system, user = openai_messages(query)
    assert system == {"role": "system", "content": "Be brief."}
    kinds = [part["type"] for part in user["content"]]
    assert kinds == ["image_url", "text", "input_audio", "text"]
    assert user["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    audio = user["content"][2]["input_audio"]
    assert audio["format"] == "wav"
    assert base64.b64decode(audio["data"]) == files["wav"].read_bytes()


def test_unplaced_media_go_first_and_odd_audio_becomes_wav(files) -> None:
    query = Query((("user", "Transcribe the audio."),), (("audio", files["aiff"]),))
    (user,) = openai_messages(query)
    audio, text = user["content"]
    assert text == {"type": "text", "text": "Transcribe the audio."}
    assert audio["input_audio"]["format"] == "wav"  # AIFF is not an input_audio format
    assert base64.b64decode(audio["input_audio"]["data"])[:4] == b"RIFF"


def backend(handler, **kwargs) -> RemoteBackend:
    return RemoteBackend(
        "http://server",
        "key",
        model_name="m",
        backoff=0.0,
        transport=httpx.MockTransport(handler),
        **kwargs,
    )


def completion(text: str) -> httpx.Response:
    return httpx.Response(200, json={"choices": [{"message": {"content": text}}]})


def test_busy_answers_are_retried_and_rows_fail_alone() -> None:
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append({"auth": request.headers.get("authorization"), **body})
        text = body["messages"][0]["content"]
        if text == "bad":
            return httpx.Response(400, json={"error": {"message": "bad media"}})
        if len([s for s in seen if s["messages"][0]["content"] == text]) == 1:
            return httpx.Response(503, headers={"Retry-After": "0"}, json={})
        return completion(text.upper())

    queries = [Query((("user", "hello"),)), Query((("user", "bad"),))]
    answers = backend(handler).answer_all(queries, max_tokens=7)
    assert answers[0].text == "HELLO" and answers[0].error is None
    assert answers[1].text is None and "400" in (answers[1].error or "")
    first = seen[0]
    assert first["auth"] == "Bearer key" and first["model"] == "m"
    assert first["max_tokens"] == 7 and first["temperature"] == 0


def test_refused_key_stops_the_run() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": {"message": "no"}})

    with pytest.raises(BackendError, match="API key"):
        backend(handler).answer_all([Query((("user", "hi"),))], max_tokens=4)


def test_unreachable_server_stops_the_run() -> None:
    with pytest.raises(BackendError, match="cannot reach"):
        RemoteBackend("http://127.0.0.1:9", None)
