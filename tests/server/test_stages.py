"""Where a request's time went: every stage of a media request moves its histogram, and its
access-log line carries its stage seconds."""

from __future__ import annotations

import base64
import json
import logging

import httpx
import pytest

from tests.media import make_png
from tests.server.test_remote_media import PUBLIC, FakeInternet, png_reply
from tests.servers import InProcessServer, wait_until

ENGINE_STAGES = {"queue", "encode", "prefill", "first_token", "decode"}


def image_body(url: str) -> dict:
    part = {"type": "image_url", "image_url": {"url": url}}
    content = [part, {"type": "text", "text": "What is in the image?"}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 3}


def access_entry(log_text: str, request_id: str) -> dict:
    for line in log_text.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("logger") == "xllm.access" and entry.get("request_id") == request_id:
                return entry
    raise AssertionError(f"no access-log line for {request_id}")


def test_an_image_request_moves_each_stage_and_logs_its_seconds(server):
    stages = [
        ("xllm_media_decode_seconds_count", {"modality": "image"}),
        ("xllm_media_preprocess_seconds_count", {"modality": "image"}),
        ("xllm_request_media_prepare_seconds_count", {"modality": "image"}),
        ("xllm_request_queue_time_seconds_count", {}),
        ("xllm_request_encode_time_seconds_count", {"modality": "image"}),
        ("xllm_request_prefill_time_seconds_count", {}),
        ("xllm_time_to_first_token_seconds_count", {}),
        ("xllm_request_decode_time_seconds_count", {}),
    ]
    before = [server.metric(name, **labels) for name, labels in stages]
    data = base64.b64encode(make_png(color=(3, 141, 59))).decode()
    request_id = "stages-image-1"
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json=image_body(f"data:image/png;base64,{data}"),
        headers={"X-Request-ID": request_id},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    after = [server.metric(name, **labels) for name, labels in stages]
    moved = {name: b - a for (name, _), a, b in zip(stages, before, after, strict=True)}
    assert moved == {name: 1 for name, _ in stages}

    wait_until(lambda: request_id in server.log_text(), what="the access-log line")
    seconds = access_entry(server.log_text(whole=True), request_id)["stages_ms"]
    assert set(seconds) == {"image_decode", "image_preprocess", "media_prepare", *ENGINE_STAGES}
    assert all(value >= 0 for value in seconds.values())
    assert seconds["image_decode"] + seconds["image_preprocess"] <= seconds["media_prepare"]
    # the stages inside the engine happen one after another within the time to first token
    assert seconds["queue"] + seconds["encode"] + seconds["prefill"] <= seconds["first_token"]


def test_a_text_request_is_encoded_as_text_and_logs_no_media_stage(server):
    before = server.metric("xllm_request_encode_time_seconds_count", modality="text")
    request_id = "stages-text-1"
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json=body,
        headers={"X-Request-ID": request_id},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert server.metric("xllm_request_encode_time_seconds_count", modality="text") == before + 1
    wait_until(lambda: request_id in server.log_text(), what="the access-log line")
    assert set(access_entry(server.log_text(whole=True), request_id)["stages_ms"]) == ENGINE_STAGES


def test_a_remote_image_moves_the_fetch_stage(tiny_model, monkeypatch, caplog):
    net = FakeInternet(monkeypatch, {"media.example": [PUBLIC]}, {"media.example": png_reply})
    with InProcessServer(tiny_model, allow_remote_media="media.example") as server:
        server.runtime.service.fetcher.transport = net.transport()
        request_id = "stages-fetch-1"
        with caplog.at_level(logging.INFO, logger="xllm.access"):
            r = httpx.post(
                f"{server.url}/v1/chat/completions",
                json=image_body("https://media.example/cat.png"),
                headers={"X-Request-ID": request_id},
                timeout=60,
            )
            assert r.status_code == 200, r.text
            assert server.metric("xllm_media_fetch_seconds_count", modality="image") == 1
            wait_until(
                lambda: any(getattr(e, "request_id", None) == request_id for e in caplog.records),
                what="the access-log line",
            )
    (record,) = [e for e in caplog.records if getattr(e, "request_id", None) == request_id]
    assert {"image_fetch", "image_decode", "image_preprocess", "media_prepare"} <= set(
        record.stages_ms
    )
    assert len(net.requests) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_every_choice_of_a_request_counts_once_in_its_log_line(server, stream):
    request_id = f"stages-n-{stream}"
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        "n": 2,
        "stream": stream,
    }
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json=body,
        headers={"X-Request-ID": request_id},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    wait_until(lambda: request_id in server.log_text(), what="the access-log line")
    assert set(access_entry(server.log_text(whole=True), request_id)["stages_ms"]) == ENGINE_STAGES
