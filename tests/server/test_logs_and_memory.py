"""Logs (JSON, request ids, never prompts or media) and resident memory over 1,000 requests."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time

import httpx

from tests.media import make_mp4, make_png, make_wav
from tests.server.reliability import (
    MB,
    assert_error,
    idle,
    peak_growth_mb,
    rss_kb,
)
from tests.servers import wait_until


def test_logs_are_json_with_request_ids_and_never_prompts_or_media(server):
    secret = "zebra-prompt-7f3a9c"  # must never reach the log
    image = make_png(color=(17, 71, 117))
    files = [("image", ("s.png", image, "image/png"))]
    given = "reliability-log-check-1"
    r = httpx.post(
        f"{server.url}/chat",
        data={"prompt": f"{secret} <image>", "max_tokens": "2"},
        files=files,
        headers={"X-Request-ID": given},
        timeout=60,
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == given
    assert r.json()["id"] == given
    body = {"messages": [{"role": "user", "content": f"{secret} again"}], "max_tokens": 2}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"X-Request-ID": "oa-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "oa-1"
    # An id that is not a plain token (log injection, overlong) is replaced by a fresh one.
    for bad in ('"}, {"level": "error', "x" * 300, "a b"):
        r = httpx.get(f"{server.url}/health", headers={"X-Request-ID": bad})
        assert r.headers["x-request-id"] != bad and len(r.headers["x-request-id"]) == 32
    last = {"X-Request-ID": "reliability-log-check-last"}
    r = httpx.post(
        f"{server.url}/chat", data={"prompt": secret, "max_tokens": "99999"}, headers=last
    )
    assert_error(r, 400)
    # The access-log line is written after the response: wait for the last request's line.
    wait_until(lambda: last["X-Request-ID"] in server.log_text(), what="the access-log line")
    text = server.log_text(whole=True)
    entries = []
    for line in text.splitlines():
        if line.strip().startswith("{"):
            entries.append(json.loads(line))  # every structured line parses
    access = {e["request_id"]: e for e in entries if e.get("logger") == "xllm.access"}
    assert access[given]["status"] == 200 and access[given]["path"] == "/chat"
    assert {"method", "duration_ms", "time", "level"} <= set(access[given])
    assert access["oa-1"]["path"] == "/v1/chat/completions"
    assert secret not in text
    assert base64.b64encode(image).decode()[:40] not in text and "zebra" not in text


# --- memory --------------------------------------------------------------------------------------
def mixed_request(i: int, mp4: bytes) -> tuple[str, dict]:
    """The i-th request of a mixed load: every route, every media kind, streams, errors, drops."""
    kind = i % 10
    small = {"max_tokens": "3", "ignore_eos": "true"}
    if kind == 0:
        return "/chat", {"data": {"prompt": f"text {i}", **small}}
    if kind == 1:
        return "/chat", {"data": {"prompt": f"stream {i}", "stream": "true", **small}}
    if kind == 2:  # a new image every time: the encoder cache must evict, not grow
        png = make_png((32 + i % 17, 32), (i % 256, (7 * i) % 256, 90))
        return "/chat", {
            "data": {"prompt": "<image>?", **small},
            "files": [("image", ("a.png", png))],
        }
    if kind == 3:
        wav = make_wav(0.5, freq=200 + i % 500)
        return "/chat", {
            "data": {"prompt": "<audio>?", **small},
            "files": [("audio", ("a.wav", wav))],
        }
    if kind == 4:
        return "/chat", {
            "data": {"prompt": "<video>?", **small},
            "files": [("video", ("a.mp4", mp4))],
        }
    if kind == 5:
        uri = "data:image/png;base64," + base64.b64encode(make_png(color=(i % 256, 1, 2))).decode()
        content = [
            {"type": "text", "text": f"q{i}"},
            {"type": "image_url", "image_url": {"url": uri}},
        ]
        body = {
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 3,
            "stream": i % 20 == 5,
        }
        return "/v1/chat/completions", {"json": body}
    if kind == 6:  # undecodable media: 400
        return "/chat", {
            "data": {"prompt": "x"},
            "files": [("image", ("a.png", random.Random(i).randbytes(2048)))],
        }
    if kind == 7:  # too long for the context: 400
        return "/chat", {"data": {"prompt": "x", "max_tokens": "100000"}}
    if kind == 8:  # a client that drops its stream after the first event
        return "drop", {
            "data": {
                "prompt": f"drop {i}",
                "stream": "true",
                "max_tokens": "200",
                "ignore_eos": "true",
            }
        }
    return "/chat", {"data": {"prompt": "x", "temperature": "-1"}}  # 422


async def run_mixed(url: str, first: int, count: int, mp4: bytes, concurrency: int = 8) -> dict:
    statuses: dict[int, int] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(first, first + count):
        queue.put_nowait(i)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            path, kwargs = mixed_request(queue.get_nowait(), mp4)
            if path == "drop":
                async with client.stream("POST", "/chat", **kwargs) as r:
                    async for _ in r.aiter_lines():
                        break
                status = r.status_code
            else:
                r = await client.post(path, **kwargs)
                status = r.status_code
            statuses[status] = statuses.get(status, 0) + 1

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return statuses


def test_resident_memory_stays_flat_over_1000_mixed_requests(server):
    """VmRSS of the server process and of its engine process after a warm-up, then after 1,000
    more mixed requests (every route and media kind, streams, drops, 400/422 errors; prefix
    reuse on, as by default): under 64 MB of growth each."""
    mp4 = make_mp4(frames=4, fps=4)
    pids = {"server": server.process.pid, "engine": server.engine_pid()}
    asyncio.run(run_mixed(server.url, 0, 100, mp4))  # warm-up: allocator pools, caches, threads
    idle(server)
    before = {name: rss_kb(pid) for name, pid in pids.items()}
    hits = server.metric("xllm_prefix_cache_hits_total")
    start = time.monotonic()
    statuses = asyncio.run(run_mixed(server.url, 200, 1000, mp4))
    elapsed = time.monotonic() - start
    idle(server)  # dropped streams end on the server after their clients have gone
    growth_mb = {name: (rss_kb(pid) - before[name]) / 1024 for name, pid in pids.items()}
    print(
        f"\n1000 mixed requests in {elapsed:.0f} s: {statuses}; RSS growth "
        + ", ".join(f"{name} {mb:+.1f} MB" for name, mb in growth_mb.items())
    )
    assert sum(statuses.values()) == 1000
    assert not [s for s in statuses if s >= 500], statuses
    assert server.metric("xllm_prefix_cache_hits_total") > hits  # reuse was at work
    assert all(mb < 64 for mb in growth_mb.values()), growth_mb


def test_512_mb_streamed_upload_is_cut_off_without_being_buffered(server):
    """test_errors.py checks the 413; this checks what it cost: the server stops reading near
    the limit (4 MB here) and its peak memory does not follow the body."""
    sent = 0

    def body():
        nonlocal sent
        yield b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        for _ in range(512):
            sent += MB
            yield b"\0" * MB

    headers = {"content-type": "multipart/form-data; boundary=x"}  # chunked: no Content-Length
    send = lambda: httpx.post(f"{server.url}/chat", content=body(), headers=headers, timeout=60)  # noqa: E731
    r, growth = peak_growth_mb(server, send)
    assert r.status_code == 413
    print(f"\nsent {sent // MB} MB, peak RSS +{growth:.1f} MB")
    assert sent < 64 * MB, f"{sent // MB} MB went out before the server stopped reading"
    assert growth < 64, f"peak RSS rose {growth:.0f} MB"
