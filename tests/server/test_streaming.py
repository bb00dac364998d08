"""SSE writes: events that are already waiting go out in one write, one `data:` line each."""

from __future__ import annotations

import asyncio
import json

from xllm.server.engine.events import FinishEvent, RequestHandle, TokenEvent, Usage
from xllm.server.routers.chat import chat_event_stream
from xllm.server.serving import Generation


def test_waiting_events_are_written_together_and_each_keeps_its_line():
    async def main() -> list[str]:
        handle = RequestHandle("r1", asyncio.get_running_loop())
        generation = Generation(handle, TokenEvent("A", 1), None, None)
        for text, token in (("b", 2), ("", 3), ("c", 4)):  # token 3 completes no character yet
            handle.push(TokenEvent(text, token))
        handle.push(FinishEvent("length", "d", Usage(5, 5)))
        await asyncio.sleep(0)  # the mailbox delivers the burst
        return [chunk async for chunk in chat_event_stream(generation)]

    writes = asyncio.run(main())
    assert len(writes) == 3  # the first token, the four waiting events, [DONE]
    lines = [line[6:] for line in "".join(writes).split("\n\n") if line]
    deltas = [json.loads(line)["delta"] for line in lines[:-1]]
    assert deltas == ["A", "b", "c", "d"] and lines[-1] == "[DONE]"
    assert writes[1].count("data: ") == 3
