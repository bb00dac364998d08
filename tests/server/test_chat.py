"""POST /chat and the OpenAI API against a real server process, with real clients."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import subprocess

import httpx
import openai
import pytest

from tests.media import make_mp4, make_png, make_wav
from tests.servers import wait_until

GREEDY = {"temperature": "0", "max_tokens": "16", "ignore_eos": "true"}


def sse_events(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


def chat(server, data: dict, files: list | None = None, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}/chat", data=data, files=files, timeout=60, **kwargs)


def test_chat_multipart_with_all_media(server, media_bytes):
    files = [
        ("image", ("a.png", media_bytes["png"], "image/png")),
        ("audio", ("a.wav", media_bytes["wav"], "audio/wav")),
        ("video", ("a.mp4", media_bytes["mp4"], "video/mp4")),
    ]
    r = chat(server, {"prompt": "Compare <image>, <audio> and <video>.", **GREEDY}, files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "model", "text", "finish_reason", "usage"}
    assert body["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 16
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 16
    # The tiny model has 8 image queries and 8 per video frame: media really reached the prompt.
    text_only = chat(server, {"prompt": "Compare , and .", **GREEDY}).json()
    assert body["usage"]["prompt_tokens"] > text_only["usage"]["prompt_tokens"] + 8 + 8


def test_stream_equals_non_stream_and_ends_with_done(server, media_bytes):
    files = [("image", ("a.png", media_bytes["png"], "image/png"))]
    plain = chat(server, {"prompt": "What is this?", **GREEDY}, files).json()
    r = chat(server, {"prompt": "What is this?", "stream": "true", **GREEDY}, files)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert "".join(p["delta"] for p in parsed) == plain["text"]
    assert parsed[-1]["finish_reason"] == "length"
    # The second request reuses the first one's prompt K/V: only cached_tokens may differ.
    usage, expected = parsed[-1]["usage"], plain["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1
    usage["prompt_tokens_details"]["cached_tokens"] = expected["prompt_tokens_details"][
        "cached_tokens"
    ]
    assert usage == expected
    assert all("finish_reason" not in p for p in parsed[:-1])


def test_messages_history_and_urlencoded(server, media_bytes):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Look: <image>"},
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": "And this one? <image>"},
    ]
    files = [
        ("image", ("a.png", media_bytes["png"], "image/png")),
        ("image", ("b.png", make_png(color=(0, 0, 255)), "image/png")),
    ]
    r = chat(server, {"messages": json.dumps(messages), **GREEDY}, files)
    assert r.status_code == 200, r.text
    # Text-only, urlencoded (curl -d prompt=hi).
    r = httpx.post(
        f"{server.url}/chat",
        content="prompt=hi&max_tokens=3",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 3


def test_stop_strings_repeatable_or_json(server):
    base = chat(server, {"prompt": "Say something.", **GREEDY}).json()["text"]
    stop = base[3:5] if len(base) >= 5 else base[-1:]
    for data in ({"stop": stop}, {"stop": json.dumps([stop, "zzz"])}):
        r = chat(server, {"prompt": "Say something.", **GREEDY, **data})
        assert r.status_code == 200, r.text
        text = r.json()["text"]
        assert stop not in text and r.json()["finish_reason"] == "stop"
        assert base.startswith(text)
    r = chat(server, {"prompt": "x", "stop": "[1, 2]"})
    assert r.status_code == 422
    # Not a JSON list: a literal stop string.
    assert chat(server, {"prompt": "x", "stop": "[END]", "max_tokens": "3"}).status_code == 200


def test_greedy_identical_alone_and_in_batch_of_32(server):
    png, wav, mp4 = make_png(), make_wav(freq=300), make_mp4(frames=4, fps=4)

    def request(i: int) -> tuple[dict, list]:
        files = []
        if i % 4 == 1:
            files = [("image", ("a.png", make_png(color=(i * 7 % 255, 50, 90)), "image/png"))]
        elif i % 4 == 2:
            files = [("audio", ("a.wav", make_wav(freq=200 + 10 * i), "audio/wav"))]
        elif i % 4 == 3:
            files = [("video", ("a.mp4", mp4, "video/mp4")), ("image", ("b.png", png, "image/png"))]
        data = {"prompt": f"Question {i}: what is it?", "max_tokens": "12", "ignore_eos": "true"}
        return data, files

    async def run(concurrent: bool) -> list[str]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:

            async def one(i: int) -> str:
                data, files = request(i)
                r = await client.post("/chat", data=data, files=files or None)
                assert r.status_code == 200, r.text
                return r.json()["text"]

            if concurrent:
                return await asyncio.gather(*(one(i) for i in range(32)))
            return [await one(i) for i in range(32)]

    alone = asyncio.run(run(concurrent=False))
    together = asyncio.run(run(concurrent=True))
    assert together == alone
    assert wav  # media of every kind was part of the batch


def test_32_concurrent_streams_with_mixed_media_complete(server):
    mp4 = make_mp4(frames=3, fps=3)

    async def stream(client: httpx.AsyncClient, i: int) -> list[str]:
        files = [
            [("image", ("a.png", make_png(color=(i, 2 * i, 100)), "image/png"))],
            [("audio", ("a.wav", make_wav(freq=250 + i), "audio/wav"))],
            [("video", ("a.mp4", mp4, "video/mp4"))],
            [],
        ][i % 4]
        data = {"prompt": f"stream {i}", "stream": "true", "max_tokens": "20", "ignore_eos": "true"}
        async with client.stream("POST", "/chat", data=data, files=files or None) as r:
            assert r.status_code == 200
            return [line async for line in r.aiter_lines() if line.startswith("data: ")]

    async def main() -> list[list[str]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*(stream(client, i) for i in range(32)))

    results = asyncio.run(main())
    assert len(results) == 32
    for events in results:
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == 20


def test_dropped_streams_free_their_slots_without_running_to_the_end(server):
    async def drop_after_two_events(i: int) -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            data = {
                "prompt": f"long {i}",
                "stream": "true",
                "max_tokens": "1500",
                "ignore_eos": "true",
            }
            async with client.stream("POST", "/chat", data=data) as r:
                seen = 0
                async for line in r.aiter_lines():
                    seen += line.startswith("data: ")
                    if seen >= 2:
                        break  # leaving the block closes the connection mid-stream

    async def main() -> None:
        await asyncio.gather(*(drop_after_two_events(i) for i in range(8)))

    generated = server.metric("xllm_generated_tokens_total")
    asyncio.run(main())
    wait_until(lambda: server.metric("xllm_num_requests_running") == 0, what="free slots")
    # Cut short when their clients left: far from the 8 x 1,500 tokens they asked for.
    assert server.metric("xllm_generated_tokens_total") - generated < 8 * 1500 / 2


def test_dropped_non_streaming_request_is_cancelled(server):
    body = b"prompt=long&max_tokens=1500&ignore_eos=true"
    generated = server.metric("xllm_generated_tokens_total")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            b"POST /chat HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        wait_until(lambda: server.metric("xllm_num_requests_running") == 1, what="the request")
    # The client has gone before its answer: the slot is freed, the answer never finished.
    wait_until(lambda: server.metric("xllm_num_requests_running") == 0, what="a free slot")
    assert server.metric("xllm_generated_tokens_total") - generated < 1500


def test_openai_client_unchanged(server, media_bytes):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    models = client.models.list()
    assert models.data[0].id == "xllm-tiny"
    image_uri = "data:image/png;base64," + base64.b64encode(media_bytes["png"]).decode()
    video_uri = "data:video/mp4;base64," + base64.b64encode(media_bytes["mp4"]).decode()
    content = [
        {"type": "text", "text": "What is in these?"},
        {"type": "image_url", "image_url": {"url": image_uri}},
        {
            "type": "input_audio",
            "input_audio": {"data": base64.b64encode(media_bytes["wav"]).decode(), "format": "wav"},
        },
        {"type": "video_url", "video_url": {"url": video_uri}},
    ]
    extra = {"top_k": 0, "ignore_eos": True}
    done = client.chat.completions.create(
        model="xllm-tiny",
        messages=[{"role": "user", "content": content}],
        max_tokens=10,
        temperature=0,
        extra_body=extra,
    )
    assert done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 10
    stream = client.chat.completions.create(
        model="xllm-tiny",
        messages=[{"role": "user", "content": content}],
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == done.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 10
    # Same request through /chat: same greedy answer.
    files = [
        ("image", ("a.png", media_bytes["png"], "image/png")),
        ("audio", ("a.wav", media_bytes["wav"], "audio/wav")),
        ("video", ("a.mp4", media_bytes["mp4"], "video/mp4")),
    ]
    r = chat(
        server,
        {
            "prompt": "What is in these?<image><audio><video>",
            "max_tokens": "10",
            "ignore_eos": "true",
        },
        files,
    )
    assert r.json()["text"] == text


def test_openai_remote_media_off_is_400(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError, match="remote media"):
        client.chat.completions.create(
            model="m",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}
                    ],
                }
            ],
        )
    with pytest.raises(openai.BadRequestError, match="scheme"):
        client.chat.completions.create(
            model="m",
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}],
                }
            ],
        )


def test_curl_streams_with_file_upload(server, tmp_path):
    image = tmp_path / "cat.png"
    image.write_bytes(make_png())
    out = subprocess.run(
        [
            "curl",
            "-sN",
            "-F",
            "prompt=What is in the image?",
            "-F",
            f"image=@{image}",
            "-F",
            "stream=true",
            "-F",
            "max_tokens=5",
            f"{server.url}/chat",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    events = sse_events(out.stdout)
    assert events[-1] == "[DONE]" and len(events) >= 2


def test_metrics_exports_the_contract(server):
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "xllm_num_requests_running",
        "xllm_num_requests_waiting",
        "xllm_time_to_first_token_seconds",
        "xllm_inter_token_latency_seconds",
        "xllm_e2e_request_latency_seconds",
        "xllm_request_queue_time_seconds",
        "xllm_encoder_seconds",
        "xllm_media_decode_seconds",
        "xllm_media_preprocess_seconds",
        "xllm_generated_tokens_total",
        "xllm_prompt_tokens_total",
        "xllm_requests_total",
        "xllm_kv_cache_usage_ratio",
    ):
        assert f"\n{name}" in text or text.startswith(name) or f"# TYPE {name}" in text, name


@pytest.mark.parametrize(("kind", "name"), [("image", "png"), ("audio", "wav"), ("video", "mp4")])
def test_media_stage_histograms_count_each_item(server, media_bytes, kind, name):
    stages = ("xllm_media_decode_seconds_count", "xllm_media_preprocess_seconds_count")
    before = [server.metric(stage, modality=kind) for stage in stages]
    files = [(kind, (f"a.{name}", media_bytes[name])) for _ in range(2)]
    r = httpx.post(
        f"{server.url}/chat", data={"prompt": "what is it?", "max_tokens": "2"}, files=files
    )
    assert r.status_code == 200, r.text
    after = [server.metric(stage, modality=kind) for stage in stages]
    assert [b - a for a, b in zip(before, after, strict=True)] == [2, 2]
