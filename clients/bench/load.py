"""The load generator: streaming `POST /chat` requests (or, with OpenAI options such as `n` or
`response_format`, `POST /v1/chat/completions`) at a fixed concurrency or as Poisson arrivals,
every SSE event timed on arrival. `api="openai"` loads any OpenAI-API server (llama.cpp's,
vLLM's) the same way: streamed chat completions that name a model, tokens counted from the
streamed chunks when the server sends no usage."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from xllm.clients.bench.report import RequestResult
from xllm.clients.bench.workload import MIME, BenchRequest


def _form(request: BenchRequest, max_tokens: int):
    """The /chat form: url-encoded for text, multipart when there are files (as curl sends)."""
    import aiohttp

    form = aiohttp.FormData(
        {
            "prompt": request.prompt,
            "stream": "true",
            "max_tokens": str(max_tokens),
            "ignore_eos": "true",
            "temperature": "0",
        }
    )
    for item in request.media:
        mime = MIME.get(Path(item.filename).suffix.lower(), "application/octet-stream")
        form.add_field(item.kind, item.data, filename=item.filename, content_type=mime)
    return form


def _chat_completion(request: BenchRequest, max_tokens: int, options: dict[str, Any]) -> dict:
    """The same request as an OpenAI chat completion (media as data URIs / input_audio), with
    `options` (n, response_format, temperature) on top; usage in the last chunk."""
    import base64

    parts: list[dict[str, Any]] = []
    for item in request.media:
        suffix = Path(item.filename).suffix.lower()
        data = base64.b64encode(item.data).decode()
        if item.kind == "audio":
            audio = {"data": data, "format": suffix.lstrip(".")}
            parts.append({"type": "input_audio", "input_audio": audio})
        else:
            url = f"data:{MIME.get(suffix, 'application/octet-stream')};base64,{data}"
            key = "image_url" if item.kind == "image" else "video_url"
            parts.append({"type": key, key: {"url": url}})
    parts.append({"type": "text", "text": request.prompt})
    # text alone as a plain string: some servers' chat templates take no content parts
    content = parts if request.media else request.prompt
    return {
        "messages": [{"role": "user", "content": content}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        **options,
    }


def _error_message(status: int, body: bytes) -> str:
    import json

    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body[:200].decode("utf-8", "replace")
    return f"HTTP {status}: {message}"


async def send_one(
    session,
    url: str,
    request: BenchRequest,
    max_tokens: int,
    headers: dict,
    openai: dict[str, Any] | None = None,
    api: str = "xllm",
):
    """One streaming POST /chat (with `openai` options: POST /v1/chat/completions); every SSE
    event timed on arrival (both end with an event that carries the usage). With api "openai"
    a server need not send usage: the chunks with text are counted, one token each."""
    import json
    import time

    import aiohttp

    result = RequestResult(request.index, request.kind)
    if openai is None:
        endpoint, body = f"{url}/chat", {"data": _form(request, max_tokens)}
    else:
        body = {"json": _chat_completion(request, max_tokens, openai)}
        endpoint = f"{url}/v1/chat/completions"
    result.start = time.perf_counter()
    last: float | None = None
    chunks = 0  # chunks with text (api "openai": the tokens when no usage comes)
    try:
        async with session.post(endpoint, headers=headers, **body) as response:
            if response.status != 200:
                result.error = _error_message(response.status, await response.read())
                return result
            async for raw in response.content:  # one line per iteration
                now = time.perf_counter()
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                event = json.loads(payload)
                if "error" in event:
                    error = event["error"]
                    message = error.get("message", error) if isinstance(error, dict) else error
                    result.error = f"stream error: {message}"
                    return result
                text = any(
                    (c.get("delta") or {}).get("content") for c in event.get("choices") or []
                )
                chunks += text
                # api "openai": only chunks with text are timed (not the role's nor the
                # usage's), as `vllm bench serve` times them
                if api != "openai" or text:
                    if last is None:
                        result.ttft = now - result.start
                    else:
                        result.itl.append(now - last)
                    last = now
                usage = event.get("usage")
                if usage is not None:
                    result.e2e = now - result.start
                    result.prompt_tokens = int(usage.get("prompt_tokens", 0))
                    result.completion_tokens = int(usage.get("completion_tokens", 0))
        if api == "openai" and result.e2e is None and last is not None:
            result.e2e, result.completion_tokens = last - result.start, chunks
        if result.e2e is None:
            result.error = "the stream ended without a final event (usage)"
        else:
            result.ok = True
    except (TimeoutError, aiohttp.ClientError) as exc:
        result.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    except ValueError as exc:  # a malformed event
        result.error = f"bad SSE event: {exc}"
    return result


async def run_load(
    requests: list[BenchRequest],
    *,
    url: str,
    max_tokens: int,
    concurrency: int | None,
    request_rate: float | None,
    seed: int,
    api_key: str | None = None,
    timeout: float = 600.0,
    warmup: list[BenchRequest] | None = None,
    progress: bool = True,
    openai: dict[str, Any] | None = None,
    api: str = "xllm",
    metrics: list[str | None] | None = None,
) -> tuple[list[RequestResult], float]:
    """Send the requests; returns their results (in request order) and the run's duration.
    With `metrics` (a list) the server's /metrics text (None if it has none) is appended to it
    just before the measured requests and just after them.

    aiohttp, not httpx (as `vllm bench serve`): the load generator shares the machine with the
    server, so its per-chunk cost adds to the TTFT it reports (figures: docs/PERFORMANCE.md)."""
    import asyncio
    import random
    import time

    import aiohttp
    from tqdm import tqdm

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    connector = aiohttp.TCPConnector(limit=0)  # no connection cap: --concurrency is the cap
    timeouts = aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 30.0))
    results: list[RequestResult | None] = [None] * len(requests)
    async with aiohttp.ClientSession(connector=connector, timeout=timeouts) as session:
        for request in warmup or []:
            done = await send_one(session, url, request, max_tokens, headers, openai, api)
            if not done.ok:
                raise RuntimeError(f"warm-up request failed: {done.error}")
        if metrics is not None:
            metrics.append(await _metrics_text(session, url))
        bar = tqdm(total=len(requests), desc="bench", unit="req", disable=not progress)
        gate = asyncio.Semaphore(concurrency) if concurrency else None

        async def one(position: int) -> None:
            if gate is not None:
                async with gate:
                    results[position] = await send_one(
                        session, url, requests[position], max_tokens, headers, openai, api
                    )
            else:
                results[position] = await send_one(
                    session, url, requests[position], max_tokens, headers, openai, api
                )
            bar.update(1)

        start = time.perf_counter()
        if request_rate is None or math.isinf(request_rate):
            await asyncio.gather(*(one(i) for i in range(len(requests))))
        else:
            rng = random.Random(seed)
            tasks = []
            due = start
            for i in range(len(requests)):
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i)))
                due += rng.expovariate(request_rate)
            await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
        if metrics is not None:
            metrics.append(await _metrics_text(session, url))
    return [r for r in results if r is not None], duration


async def _metrics_text(session, url: str) -> str | None:
    """GET /metrics (Prometheus text), or None when the server has none."""
    import aiohttp

    try:
        async with session.get(f"{url}/metrics") as response:
            return await response.text() if response.status == 200 else None
    except aiohttp.ClientError:
        return None
