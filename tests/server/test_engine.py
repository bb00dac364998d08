"""The engine in-process: scheduling, encoder cache, faults, batch-invariant decoding."""

from __future__ import annotations

import asyncio

import pytest
import torch

from xllm.model.checkpoint import load_model
from xllm.model.generate import SamplingParams, generate
from xllm.model.prompt import bind_media
from xllm.server.engine.encoder_cache import EncoderCache
from xllm.server.engine.events import EngineRequest, ErrorEvent, FinishEvent, RequestHandle
from xllm.server.engine.scheduler import Phase, Scheduler
from xllm.server.engine.worker import Engine, EngineConfig, EngineFull


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir, device="cpu")


def test_scheduler_admits_oldest_first_and_reuses_slots():
    scheduler: Scheduler[str] = Scheduler(num_slots=2, prefill_chunk=4)
    entries = [scheduler.add(name) for name in "abc"]
    admitted = scheduler.admit()
    assert [e.item for e in admitted] == ["a", "b"] and [e.slot for e in admitted] == [0, 1]
    assert entries[2].phase is Phase.WAITING
    entries[0].prompt_len = 10
    assert scheduler.next_prefill() == (entries[0], 0, 4)
    entries[0].prefilled = 8
    assert scheduler.next_prefill() == (entries[0], 8, 10)
    scheduler.finish(entries[0])
    assert [e.item for e in scheduler.admit()] == ["c"] and entries[2].slot == 0


def test_encoder_cache_is_bounded_in_bytes():
    cache = EncoderCache(max_bytes=3 * 64 * 4)  # room for three (16, 4) float32 tensors
    for key in "abcd":
        cache.put(key, [("image", torch.zeros(16, 4))])
    assert len(cache) == 3 and cache.bytes <= cache.max_bytes
    assert cache.get("a") is None and cache.get("d") is not None


async def run_requests(engine: Engine, prompts: list[str], params: SamplingParams) -> list:
    loop = asyncio.get_running_loop()
    handles = []
    for i, prompt in enumerate(prompts):
        engine.reserve()
        handle = RequestHandle(f"r{i}", loop)
        messages = bind_media([("user", prompt)], [])
        engine.submit(
            EngineRequest(f"r{i}", messages, [], SamplingParams(**vars(params)), True), handle
        )
        handles.append(handle)
    results = []
    for handle in handles:
        tokens = []
        while True:
            event = await handle.next_event()
            if isinstance(event, ErrorEvent):
                results.append(event)
                break
            tokens.append(event)
            if isinstance(event, FinishEvent):
                results.append(tokens)
                break
    return results


def test_engine_matches_single_request_generate(model):
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    prompts = [f"prompt number {i}" for i in range(5)]
    engine = Engine(model, EngineConfig(max_batch=4, max_queue=4, prefill_chunk=3))
    engine.start()
    try:
        results = asyncio.run(run_requests(engine, prompts, params))
    finally:
        engine.shutdown()
    for prompt, events in zip(prompts, results, strict=True):
        layout = model.layout(bind_media([("user", prompt)], []), [])
        with torch.inference_mode():
            embeds = model.embed(layout, [])
        expected = [d.token for d in generate(model.llm, model.tokenizer, embeds, params)]
        assert [e.token for e in events[:-1]] == expected[:-1]
        assert events[-1].usage.completion_tokens == 12


def test_queue_bound_and_fault_isolation(model):
    engine = Engine(model, EngineConfig(max_batch=2, max_queue=1))
    engine.start()
    try:
        for _ in range(3):
            engine.reserve()
        with pytest.raises(EngineFull):
            engine.reserve()
        for _ in range(3):
            engine.release()

        calls = {"decode": 0}

        def fail_second_decode(where: str) -> None:
            if where == "decode":
                calls["decode"] += 1
                if calls["decode"] == 2:
                    raise RuntimeError("injected fault")

        engine.fault_injector = fail_second_decode
        params = SamplingParams(max_tokens=6, ignore_eos=True)
        first = asyncio.run(run_requests(engine, ["a", "b"], params))
        failed = [r for r in first if isinstance(r, ErrorEvent)]
        assert failed and all("injected fault" in r.message for r in failed)
        # A request outside the failing step (if any) completed in full.
        assert all(
            r[-1].usage.completion_tokens == 6 for r in first if not isinstance(r, ErrorEvent)
        )
        # The engine keeps serving after the fault.
        second = asyncio.run(run_requests(engine, ["c"], params))
        assert isinstance(second[0][-1], FinishEvent)
        assert engine.alive and engine.num_in_system == 0
    finally:
        engine.shutdown()


def test_nan_logits_are_reported_not_streamed(model):
    engine = Engine(model, EngineConfig(max_batch=2, max_queue=1))
    head = model.llm.lm_head
    original = head.forward
    head.forward = lambda x: original(x) * float("nan")
    engine.start()
    try:
        result = asyncio.run(run_requests(engine, ["x"], SamplingParams(max_tokens=4)))
        assert isinstance(result[0], ErrorEvent) and "NaN" in result[0].message
    finally:
        head.forward = original
        engine.shutdown()


def test_media_of_requests_admitted_together_is_encoded_in_one_batch(model):
    from PIL import Image

    calls: list[int] = []
    original = model.vision.forward

    def counting(pixels):
        calls.append(pixels.shape[0])
        return original(pixels)

    model.vision.forward = counting
    engine = Engine(model, EngineConfig(max_batch=4, max_queue=4))
    images = [model.prepare("image", Image.new("RGB", (40, 30), (i * 40, 0, 0))) for i in range(4)]

    async def submit_all() -> list:
        loop = asyncio.get_running_loop()
        handles = []
        for i, image in enumerate(images + images[:1]):  # the fifth repeats the first image
            engine.reserve()
            handle = RequestHandle(f"m{i}", loop)
            messages = bind_media([("user", "what is it?")], ["image"])
            params = SamplingParams(max_tokens=2, ignore_eos=True)
            engine.submit(EngineRequest(f"m{i}", messages, [image], params, True), handle)
            handles.append(handle)
        engine.start()  # everything is queued before the worker's first iteration
        return [await drain(h) for h in handles]

    async def drain(handle):
        while not isinstance(event := await handle.next_event(), FinishEvent | ErrorEvent):
            pass
        return event

    try:
        results = asyncio.run(submit_all())
    finally:
        model.vision.forward = original
        engine.shutdown()
    assert all(isinstance(r, FinishEvent) for r in results)
    assert calls == [4]  # four slots admitted together: one vision call for four images
    assert engine.encoder_cache.hits == 1  # the fifth request reused the first one's encoding
