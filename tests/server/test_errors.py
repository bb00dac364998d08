"""Every error status of the HTTP contract, produced against real server processes."""

from __future__ import annotations

import json
import os
import signal
import threading

import httpx

from tests.media import make_png
from tests.servers import wait_until


def post(url: str, **kwargs) -> httpx.Response:
    return httpx.post(url, timeout=60, **kwargs)


def assert_error(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert set(body) == {"message", "type", "code"} and body["code"] == status
    for word in words:
        assert word in body["message"], body["message"]
    return body


def test_400_malformed_or_undecodable(server):
    url = f"{server.url}/chat"
    assert_error(
        post(
            url,
            data={"prompt": "hi"},
            files=[("image", ("a.png", b"\x89PNG\r\n\x1a\nbroken", "image/png"))],
        ),
        400,
    )
    assert_error(post(url, data={"messages": "not json"}), 400, "messages")
    assert_error(post(url, data={"messages": json.dumps([{"role": "robot", "content": "x"}])}), 400)
    # two placeholders, one image
    files = [("image", ("a.png", make_png(), "image/png"))]
    assert_error(post(url, data={"prompt": "<image> and <image>"}, files=files), 400, "placeholder")
    assert_error(
        post(
            f"{server.url}/v1/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        ),
        400,
    )
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}
                ],
            }
        ]
    }
    assert_error(post(f"{server.url}/v1/chat/completions", json=body), 400, "base64")


def test_400_prompt_beyond_context_names_both_numbers(server):
    r = post(f"{server.url}/chat", data={"prompt": "hello", "max_tokens": "5000"})
    body = assert_error(r, 400, "5000", "2048")
    assert "context" in body["message"]


def test_413_upload_limits(server):
    url = f"{server.url}/chat"
    big = b"\0" * (5 * 2**20)  # the shared server allows 4 MB
    assert_error(
        post(url, data={"prompt": "hi"}, files=[("image", ("a.png", big, "image/png"))]),
        413,
        "bytes",
    )

    def chunks():  # no Content-Length: the limit must hold while the body streams in
        yield b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        for _ in range(512):  # 512 MB if nobody stops it
            yield b"\0" * 2**20

    r = post(url, content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413
    files = [("image", (f"{i}.png", make_png(), "image/png")) for i in range(5)]
    assert_error(post(url, data={"prompt": "hi"}, files=files), 413, "media items")


def test_415_unsupported_media_type(server):
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>'
    r = post(
        f"{server.url}/chat",
        data={"prompt": "hi"},
        files=[("image", ("a.svg", svg, "image/svg+xml"))],
    )
    assert_error(r, 415)


def test_422_invalid_parameters(server):
    url = f"{server.url}/chat"
    assert_error(post(url, data={"prompt": "hi", "temperature": "-1"}), 422, "temperature")
    assert_error(post(url, data={"prompt": "hi", "max_tokens": "lots"}), 422, "max_tokens")
    assert_error(post(url, data={"prompt": "hi", "top_p": "0"}), 422)
    assert_error(
        post(url, data={"prompt": "hi", "min_tokens": "9", "max_tokens": "3"}), 422, "min_tokens"
    )
    assert_error(post(url, data={}), 422, "prompt")
    assert_error(post(f"{server.url}/v1/chat/completions", json={"messages": []}), 422)


def test_401_without_the_api_key(start_server, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nsecond-key\n")
    server = start_server("--api-key", "sekrit", "--api-key-file", str(keys))
    url = f"{server.url}/chat"
    assert_error(post(url, data={"prompt": "hi"}), 401)
    assert_error(post(url, data={"prompt": "hi"}, headers={"Authorization": "Bearer wrong"}), 401)
    assert (
        post(
            url,
            data={"prompt": "hi", "max_tokens": "2"},
            headers={"Authorization": "Bearer sekrit"},
        ).status_code
        == 200
    )
    assert (
        post(
            url,
            data={"prompt": "hi", "max_tokens": "2"},
            headers={"Authorization": "Bearer second-key"},
        ).status_code
        == 200
    )
    assert_error(httpx.get(f"{server.url}/v1/models"), 401)
    for open_route in ("/health", "/ready", "/metrics"):
        assert httpx.get(server.url + open_route).status_code == 200


def test_429_when_the_queue_is_full_and_504_on_timeout(start_server):
    server = start_server("--max-batch", "1", "--max-queue", "0", "--request-timeout", "3")
    long = {"prompt": "hold", "max_tokens": "2000", "ignore_eos": "true", "stream": "true"}
    engine = server.engine_pid()
    events: list[str] = []

    def hold_the_slot() -> None:
        with httpx.stream("POST", f"{server.url}/chat", data=long, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and not events:
                    # The first token is out: stop the engine, so that this stream cannot end
                    # before --request-timeout whatever the machine's speed (the stall watchdog,
                    # 300 s by default, stays out of it).
                    os.kill(engine, signal.SIGSTOP)
                if line.startswith("data: "):
                    events.append(line)

    holder = threading.Thread(target=hold_the_slot)
    holder.start()
    try:
        wait_until(lambda: events or not holder.is_alive(), what="the held stream's first token")
        assert events, "the held stream ended without a token"
        r = post(f"{server.url}/chat", data={"prompt": "hi"})
        assert_error(r, 429)
        assert int(r.headers["retry-after"]) >= 1
        holder.join(30)
    finally:
        os.kill(engine, signal.SIGCONT)
    # The held stream ran into --request-timeout: an explicit error event, then [DONE].
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][6:])["error"]
    assert error["code"] == 504 and "timed out" in error["message"]
    assert not any('"finish_reason"' in e for e in events)  # it never ended on its own


def test_503_when_the_model_cannot_load(start_server, tmp_path):
    server = start_server(model_dir=tmp_path / "missing", ready=503)
    assert httpx.get(f"{server.url}/health").status_code == 200
    ready = httpx.get(f"{server.url}/ready")
    assert ready.status_code == 503 and "not found" in ready.json()["status"]
    assert_error(post(f"{server.url}/chat", data={"prompt": "hi"}), 503, "failed to load")
    assert "Traceback" not in server.log_text(whole=True)  # the user's to fix: one line


def test_sigterm_drains_running_streams_then_exits_0(start_server):
    server = start_server("--drain-timeout", "300")  # a bound on a hang, never reached
    lines: list[str] = []
    data = {"prompt": "drain", "max_tokens": "600", "ignore_eos": "true", "stream": "true"}

    def stream() -> None:
        with httpx.stream("POST", f"{server.url}/chat", data=data, timeout=60) as r:
            lines.extend(line for line in r.iter_lines() if line.startswith("data: "))

    reader = threading.Thread(target=stream)
    reader.start()
    wait_until(lambda: server.metric("xllm_num_requests_running") >= 1, what="the stream")
    # The engine is held still while the server is told to stop, so that the stream is running
    # through the checks below on any machine; then it goes on and must finish in full.
    engine = server.engine_pid()
    os.kill(engine, signal.SIGSTOP)
    try:
        server.process.send_signal(signal.SIGTERM)
        wait_until(
            lambda: httpx.get(f"{server.url}/ready").status_code == 503, what="draining to begin"
        )
        assert_error(post(f"{server.url}/chat", data={"prompt": "late"}), 503)
    finally:
        os.kill(engine, signal.SIGCONT)
    reader.join(60)
    assert server.process.wait(30) == 0
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["usage"]["completion_tokens"] == 600
