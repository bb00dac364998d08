"""Overload and disconnects: 429 with Retry-After, places given back, nothing lost."""

from __future__ import annotations

import asyncio
import json

import httpx

from tests.server.reliability import (
    long_stream,
    ready_and_idle,
    stream,
)
from tests.servers import wait_until


def test_40_concurrent_streams_against_a_queue_of_8(busy):
    """4 slots + 8 queued = 12 places: the rest get 429 + Retry-After; every accepted stream
    ends with its full answer and [DONE]; no 5xx."""

    async def main():
        async with httpx.AsyncClient(base_url=busy.url, timeout=120) as client:
            return await asyncio.gather(
                *(stream(client, data=long_stream(160, prompt=f"s{i}")) for i in range(40))
            )

    results = asyncio.run(main())
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 429}, statuses
    accepted = [events for status, _, events in results if status == 200]
    refused = [(headers, events) for status, headers, events in results if status == 429]
    assert len(accepted) >= 12 and refused, statuses
    for headers, (body,) in refused:
        assert int(headers["retry-after"]) >= 1
        assert body["error"]["code"] == 429 and body["error"]["type"] == "rate_limit_exceeded"
    for events in accepted:
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert last["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 160
    ready_and_idle(busy)


def test_clients_dropping_while_queued_give_their_places_back(busy):
    """Beyond the 8 dropped running streams of test_chat.py: clients that leave while still
    waiting for a slot (streaming or not) free their places at once."""
    engine = busy.engine

    async def main():
        async with httpx.AsyncClient(base_url=busy.url, timeout=60) as client:
            holders = [
                asyncio.create_task(stream(client, data=long_stream(500, prompt=f"h{i}")))
                for i in range(4)
            ]
            while engine.num_running < 4:
                await asyncio.sleep(0.01)

            async def wait_in_queue(i: int) -> None:
                data = long_stream(50, prompt=f"q{i}")
                if i % 2:  # half of them not streaming
                    data = {"prompt": f"q{i}", "max_tokens": "50"}
                async with httpx.AsyncClient(base_url=busy.url, timeout=60) as impatient:
                    await impatient.post("/chat", data=data)

            queued = [asyncio.create_task(wait_in_queue(i)) for i in range(6)]
            while engine.num_in_system < 10:  # all six are waiting for a slot
                await asyncio.sleep(0.01)
            assert engine.num_running == 4
            for task in queued:  # the clients give up: their connections close
                task.cancel()
            await asyncio.gather(*queued, return_exceptions=True)
            # The six places come back while the four holders still run (they have 500 tokens
            # to go): no slot was needed to notice the clients had left.
            await asyncio.to_thread(
                wait_until,
                lambda: engine.num_in_system == 4 or engine.num_running < 4,
                what="the queued places to be given back",
            )
            assert engine.num_in_system == engine.num_running == 4
            for task in holders:
                task.cancel()
            await asyncio.gather(*holders, return_exceptions=True)

    generated = busy.metric("xllm_generated_tokens_total")
    asyncio.run(main())
    ready_and_idle(busy)
    # The holders were cut short when their clients left, not run to their 500 tokens.
    assert busy.metric("xllm_generated_tokens_total") - generated < 4 * 500
