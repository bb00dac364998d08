"""Prefix reuse: a prompt's positions that a KV slot still holds are not prefilled again, the
greedy tokens are those of a full prefill, and media never match other media."""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch

from tests.media import make_png
from xllm.model.media import MediaLimits
from xllm.model.prompt import PromptLayout, bind_media
from xllm.model.sampling import SamplingParams
from xllm.model.xllm import PreparedMedia
from xllm.server.engine.config import EngineConfig
from xllm.server.engine.events import (
    EngineRequest,
    ErrorEvent,
    FinishEvent,
    RequestHandle,
    Usage,
)
from xllm.server.engine.prefix_cache import Copy, PrefixCache, common_prefix, prompt_keys
from xllm.server.engine.scheduler import Scheduler
from xllm.server.engine.sequence import Sequence
from xllm.server.engine.worker import Engine

SYSTEM = "You are a careful assistant. " * 6
Turns = list[tuple[str, str]]


@dataclass
class Reply:
    tokens: list[int]
    text: str
    usage: Usage


def ask_sequence(keys: list, slot: int = -1) -> Sequence:
    """A laid-out sequence for the scheduler: its prompt's keys."""
    sequence = Sequence(SimpleNamespace(request_id="x"), None)  # type: ignore[arg-type]
    sequence.prompt_keys, sequence.prompt_len = keys, len(keys)
    return sequence


def test_keys_of_media_positions_are_the_content_hash_not_the_pad_id():
    layout = PromptLayout(token_ids=[1, 2, 0, 0, 0, 3], spans=[(2, 3, 0, 0)])
    keys = prompt_keys(layout, ["aaa"])
    assert keys == [1, 2, ("aaa", 0, 0), ("aaa", 0, 1), ("aaa", 0, 2), 3]
    other = prompt_keys(layout, ["bbb"])
    assert common_prefix(keys, other, 100) == 2  # the same pads, another image: stops at it
    long = list(range(200))
    assert common_prefix(long, [*long[:150], -1], 1000) == 150
    assert common_prefix(long, long, 77) == 77


def finished(scheduler: Scheduler, *sequences: Sequence) -> None:
    """Each sequence, placed and prefilled in full, finishes (in this order)."""
    for sequence in sequences:
        scheduler.place(sequence)
        sequence.prefilled = sequence.length = sequence.prompt_len
        scheduler.finish(sequence)


def test_a_prompt_starts_after_the_longest_prefix_a_slot_holds():
    scheduler = Scheduler(num_slots=3, prefill_chunk=4, prefix_cache=PrefixCache(max_len=64))
    a, b = (scheduler.add(ask_sequence(list(range(start, start + 10)))) for start in (0, 100))
    scheduler.admit()
    finished(scheduler, a, b)  # slot 0 holds 0..9, slot 1 100..109
    c = scheduler.add(ask_sequence([*range(100, 110), 7, 7]))  # b's chat goes on
    scheduler.admit()
    assert c.slot == 0  # the lowest free slot: what it holds moves aside to the empty one
    assert scheduler.place(c) == [Copy(0, 2, 10), Copy(1, 0, 10)]
    assert (c.prefilled, c.length, c.cached_tokens) == (10, 10, 10)
    assert sorted(scheduler.prefix_cache.records) == [1, 2]  # b's and a's, still usable
    # A running sequence's positions are copied too; what slot 1 held replaces the least
    # recently used record (a's, in slot 2).
    c.prefilled = c.length = 11
    d = scheduler.add(ask_sequence([*range(100, 110), 7, 9]))
    scheduler.admit()
    assert d.slot == 1 and scheduler.place(d) == [Copy(1, 2, 10), Copy(0, 1, 11)]
    assert d.cached_tokens == 11 and scheduler.prefix_cache.records[2] == list(range(100, 110))
    # The whole prompt held in its own slot: no copy, and one position is still prefilled, for
    # the first token's logits.
    scheduler.finish(c)
    e = scheduler.add(ask_sequence([*range(100, 110), 7, 7]))
    scheduler.admit()
    assert e.slot == 0 and scheduler.place(e) == [] and e.cached_tokens == 11


def test_compaction_exchanges_what_its_target_held_and_lru_records_go_first():
    scheduler = Scheduler(num_slots=3, prefill_chunk=4, prefix_cache=PrefixCache(max_len=64))
    a, b, c = (scheduler.add(ask_sequence([start, 1, 2])) for start in (10, 20, 30))
    scheduler.admit()
    for sequence in (a, b, c):
        scheduler.place(sequence)
        sequence.prefilled = sequence.length = 3
    scheduler.finish(a)  # slot 0 holds a's
    plan = scheduler.schedule()  # c (slot 2) moves down into slot 0, a's K/V up into slot 2
    assert plan.moves == [(c, 2)] and plan.exchanged == {0: 3}
    assert scheduler.prefix_cache.records == {2: [10, 1, 2]}
    scheduler.finish(b)  # slot 1 holds b's, the most recent
    d = scheduler.add(ask_sequence([40, 1, 2]))
    scheduler.admit()
    # d writes slot 1: b's record replaces a's, the least recently used
    assert d.slot == 1 and scheduler.place(d) == [Copy(1, 2, 3)]
    assert scheduler.prefix_cache.records == {2: [20, 1, 2]}
    # A failed sequence leaves no record (its K/V may be unfit); scratch position never kept.
    scheduler.finish(d, keep=False)
    assert list(scheduler.prefix_cache.records) == [2]
    cache = PrefixCache(max_len=4)
    cache.keep(0, [1, 2, 3, 4])
    assert cache.records[0] == [1, 2, 3]


async def run_together(engine: Engine, requests: list[tuple[Turns, list]], max_tokens: int):
    """Submit the requests at once (greedy, ignore_eos); each one's Reply."""
    loop = asyncio.get_running_loop()
    handles = []
    for i, (turns, media) in enumerate(requests):
        engine.reserve()
        handle = RequestHandle(f"r{i}", loop)
        messages = bind_media(turns, [item.kind for item in media])
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        engine.submit(EngineRequest(f"r{i}", messages, media, params, True), handle)
        handles.append(handle)
    return [await collect(handle) for handle in handles]


async def collect(handle: RequestHandle) -> Reply:
    tokens, text = [], ""
    while True:
        event = await handle.next_event()
        assert not isinstance(event, ErrorEvent), event
        tokens.append(event.token) if not isinstance(event, FinishEvent) else None
        text += event.text
        if isinstance(event, FinishEvent):
            return Reply(tokens, text, event.usage)


FIRSTS: list[Turns] = [[("system", SYSTEM), ("user", f"question {i}")] for i in range(3)]
FRESH: Turns = [("system", SYSTEM), ("user", "something else")]


def conversation(model, prefill_chunk: int, prefix_cache: bool) -> list[list[Reply]]:
    """Three rounds: three chats sharing a system prompt start together; they go on (their
    history resent) beside a new chat; a long request runs while one sharing its prompt joins."""
    config = EngineConfig(max_batch=4, prefill_chunk=prefill_chunk, prefix_cache=prefix_cache)
    engine = Engine(model, config)
    engine.start()
    try:
        firsts = FIRSTS
        round1 = asyncio.run(run_together(engine, [(t, []) for t in firsts], 6))
        seconds = [
            [*turns, ("assistant", reply.text), ("user", "and then?")]
            for turns, reply in zip(firsts, round1, strict=True)
        ]
        round2 = asyncio.run(run_together(engine, [(t, []) for t in [*seconds, FRESH]], 6))

        async def beside_a_running_one() -> list[Reply]:
            loop = asyncio.get_running_loop()
            engine.reserve()
            long = RequestHandle("long", loop)
            messages = bind_media(seconds[0], [])
            params = SamplingParams(max_tokens=24, ignore_eos=True)
            engine.submit(EngineRequest("long", messages, [], params, True), long)
            first = await long.next_event()  # it is decoding now
            joined = await run_together(engine, [(seconds[0][:-1], [])], 6)
            rest = await collect(long)
            return [Reply([first.token, *rest.tokens], first.text + rest.text, rest.usage), *joined]

        round3 = asyncio.run(beside_a_running_one())
        return [round1, round2, round3]
    finally:
        engine.shutdown()


def token_ids(model, turns: Turns) -> list[int]:
    return model.layout(bind_media(turns, []), []).token_ids


@pytest.mark.parametrize("prefill_chunk", [5, 256])  # chunked prefill; one forward per round
def test_greedy_tokens_are_the_same_with_and_without_reuse(tiny_model, prefill_chunk):
    reused = conversation(tiny_model, prefill_chunk, prefix_cache=True)
    plain = conversation(tiny_model, prefill_chunk, prefix_cache=False)
    assert [[r.tokens for r in replies] for replies in reused] == [
        [r.tokens for r in replies] for replies in plain
    ]
    round1, round2, round3 = reused
    assert all(r.usage.cached_tokens == 0 for r in round1)  # admitted together: nothing held
    shared = common_prefix(*(token_ids(tiny_model, t) for t in (FIRSTS[0], FRESH)), 10**6)
    # The chat's first turn was held, up to its generation prompt's last tokens (re-tokenized
    # with the reply after them); the other chats share less (they differ at "question i").
    for reply, first in zip(round2[:3], round1, strict=True):
        assert reply.usage.cached_tokens >= first.usage.prompt_tokens - 4
    assert round2[3].usage.cached_tokens == shared  # the system prompt, shared by every chat
    assert round3[1].usage.cached_tokens == round3[1].usage.prompt_tokens - 1  # a running one
    assert all(r.usage.cached_tokens == 0 for replies in plain for r in replies)


def test_reuse_stops_before_another_image(tiny_model, media_dir):
    model = tiny_model

    def image(seed: int) -> PreparedMedia:
        return model.prepare("image", media_dir.image(seed))

    turns: Turns = [("system", SYSTEM), ("user", "<image> what is in the picture?")]
    first, other = image(0), image(1)
    messages = bind_media(turns, ["image"])
    with torch.inference_mode():
        layout = model.layout(messages, model.encode([first]))
    span_start = layout.spans[0][0]
    engine = Engine(model, EngineConfig(max_batch=2))
    engine.start()
    try:
        replies = [
            asyncio.run(run_together(engine, [(turns, [item])], 4))[0]
            for item in (first, other, first)
        ]
    finally:
        engine.shutdown()
    assert replies[0].usage.cached_tokens == 0
    assert replies[1].usage.cached_tokens == span_start  # the text before the image only
    # the first image again: its slot was given up last (LRU kept it), all but one position held
    assert replies[2].usage.cached_tokens == len(layout) - 1
    assert replies[2].tokens == replies[0].tokens


def image_message(text: str, png: bytes) -> list[dict]:
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    return [
        {"role": "system", "content": SERVER_SYSTEM},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": text},
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": " in one word"},
            ],
        },
    ]


SERVER_SYSTEM = "Prefix reuse over HTTP. " + SYSTEM


def test_a_repeated_request_reports_cached_tokens_and_answers_the_same(server, tiny_model):
    """Through the official client and /chat, against a real server: the second time the whole
    prompt but its last position is reused and the greedy reply is the same; another image
    after the same text reuses the text before the image, nothing of the image."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    red, blue = make_png(color=(200, 30, 30)), make_png(color=(30, 30, 200))
    hits = server.metric("xllm_prefix_cache_hits_total")

    def ask(png: bytes):
        return client.chat.completions.create(
            model="m",
            messages=image_message("Name the colour of ", png),
            max_tokens=6,
            temperature=0,
            extra_body={"ignore_eos": True},
        )

    first, again, other = ask(red), ask(red), ask(blue)
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    turns = [("system", SERVER_SYSTEM), ("user", "Name the colour of <image> in one word")]
    prepared = tiny_model.preparer.prepare_bytes("image", blue, MediaLimits())
    with torch.inference_mode():
        layout = tiny_model.prompt_embeddings(turns, [prepared]).layout
    assert other.usage.prompt_tokens_details.cached_tokens == layout.spans[0][0]
    assert server.metric("xllm_prefix_cache_hits_total") - hits >= layout.spans[0][0] * 2
    assert server.metric("xllm_prefix_cache_queries_total") >= 3 * len(layout)

    # /chat: the same conversation as a form, twice
    form = {
        "messages": json.dumps(
            [
                {"role": "system", "content": SERVER_SYSTEM},
                {"role": "user", "content": "hi <image>"},
            ]
        ),
        "max_tokens": "4",
        "temperature": "0",
    }
    replies = [
        httpx.post(f"{server.url}/chat", data=form, files={"image": red}, timeout=60).json()
        for _ in range(2)
    ]
    assert replies[0]["text"] == replies[1]["text"]
    usage = replies[1]["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1


def test_many_requests_through_few_slots_decode_the_same_with_and_without_reuse(tiny_model):
    """Twelve chats sharing prefixes of every length go through three slots in staggered waves:
    records move aside, compaction exchanges slots, running sequences lend their K/V, and every
    token is the one a full prefill gives."""
    prompts = [
        [("system", SYSTEM[: 40 + 17 * (i % 4)]), ("user", f"question {i % 5} " * (1 + i % 3))]
        for i in range(12)
    ]
    max_tokens = [2 + (5 * i) % 11 for i in range(12)]

    def run(prefix_cache: bool) -> tuple[list[list[int]], dict[str, int]]:
        engine = Engine(
            tiny_model, EngineConfig(max_batch=3, prefill_chunk=7, prefix_cache=prefix_cache)
        )
        counts = {"copy": 0, "exchange": 0}
        copy, exchange = engine.runner.copy, engine.runner.slots.exchange

        def counting_copy(*args) -> None:  # prefix copies (not compaction's moves)
            counts["copy"] += 1
            copy(*args)

        def counting_exchange(*args) -> None:
            counts["exchange"] += 1
            exchange(*args)

        engine.runner.copy = counting_copy  # type: ignore[method-assign]
        engine.runner.slots.exchange = counting_exchange  # type: ignore[method-assign]
        engine.start()

        async def waves() -> list[Reply]:
            replies: list[Reply] = []
            for start in range(0, 12, 4):  # four at a time into three slots: one waits
                batch = [
                    run_together_one(engine, prompts[i], max_tokens[i])
                    for i in range(start, start + 4)
                ]
                replies += await asyncio.gather(*batch)
            return replies

        try:
            replies = asyncio.run(waves())
        finally:
            engine.shutdown()
        return [r.tokens for r in replies], counts

    reused, counts = run(prefix_cache=True)
    plain, _ = run(prefix_cache=False)
    assert reused == plain
    assert counts["copy"] > 0 and counts["exchange"] > 0, counts


async def run_together_one(engine: Engine, turns: Turns, max_tokens: int) -> Reply:
    (reply,) = await run_together(engine, [(turns, [])], max_tokens)
    return reply
