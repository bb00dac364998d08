"""The engine in-process: scheduling, encoder cache, faults, batch-invariant decoding."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

from tests.server.faults import inject_faults
from xllm.model.checkpoint import load_model
from xllm.model.generate import generate
from xllm.model.kv_cache import kv_bytes_per_position
from xllm.model.prompt import bind_media
from xllm.model.sampling import SamplingParams
from xllm.server.engine import config as engine_config
from xllm.server.engine.admission import EngineFull
from xllm.server.engine.config import EngineConfig, slots_for_memory
from xllm.server.engine.contract import EngineObserver
from xllm.server.engine.encoder_cache import EncoderCache
from xllm.server.engine.events import EngineRequest, ErrorEvent, FinishEvent, RequestHandle
from xllm.server.engine.scheduler import PrefillChunk, Scheduler
from xllm.server.engine.sequence import Phase, Sequence
from xllm.server.engine.worker import Engine


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir, device="cpu")


def sequences(*names: str) -> list[Sequence]:
    """Bare sequences for the scheduler, which reads only their scheduling state."""
    return [Sequence(SimpleNamespace(request_id=name), None) for name in names]  # type: ignore[arg-type]


def names(sequences: list[Sequence]) -> list[str]:
    return [s.request.request_id for s in sequences]


def test_scheduler_admits_oldest_first_and_reuses_slots():
    scheduler = Scheduler(num_slots=2, prefill_chunk=4)
    entries = [scheduler.add(s) for s in sequences("a", "b", "c")]
    admitted = scheduler.admit()
    assert names(admitted) == ["a", "b"] and [e.slot for e in admitted] == [0, 1]
    assert entries[2].phase is Phase.WAITING
    entries[0].prompt_len = entries[1].prompt_len = 10
    assert scheduler.next_prefills() == [PrefillChunk(entries[0], 0, 4)]
    entries[0].prefilled = 8
    assert scheduler.next_prefills() == [PrefillChunk(entries[0], 8, 10)]
    scheduler.finish(entries[0])
    assert names(scheduler.admit()) == ["c"] and entries[2].slot == 0


def test_an_encoder_budget_admits_oldest_first_within_it():
    """Costs are the sequences' encoder inputs: within the budget, in order; the oldest that
    would pass it waits (no overtaking), unless it is the first, which goes in alone."""
    scheduler = Scheduler(num_slots=8, prefill_chunk=4)
    cost = dict(zip("abcdefg", [1, 2, 0, 2, 5, 1, 0], strict=True))
    for s in sequences(*"abcdefg"):
        scheduler.add(s)

    def admit() -> list[str]:
        return names(scheduler.admit(3, lambda s: cost[s.request.request_id]))

    assert admit() == ["a", "b", "c"]  # 1 + 2 + 0; d (2 more) waits
    assert admit() == ["d"]  # e (5) waits behind it, though f (1) would fit
    assert admit() == ["e"]  # over the budget alone: encoded alone rather than never
    assert admit() == ["f", "g"]
    assert names(scheduler.admit()) == []


def test_prefill_chunks_share_one_budget_per_iteration_and_keep_their_boundaries():
    scheduler = Scheduler(num_slots=4, prefill_chunk=8)
    a, b, c, d = (scheduler.add(s) for s in sequences(*"abcd"))
    scheduler.admit()
    a.prompt_len, b.prompt_len, c.prompt_len, d.prompt_len = 3, 4, 20, 1
    # Short prompts go together; c's chunk (8) no longer fits the 1 position left, and d,
    # younger, waits behind it (oldest first).
    assert scheduler.next_prefills() == [PrefillChunk(a, 0, 3), PrefillChunk(b, 0, 4)]
    a.phase = b.phase = Phase.DECODE
    # Alone, a long prompt is cut at multiples of prefill_chunk, one chunk per iteration.
    assert scheduler.next_prefills() == [PrefillChunk(c, 0, 8)]
    c.prefilled = 16
    assert scheduler.next_prefills() == [PrefillChunk(c, 16, 20), PrefillChunk(d, 0, 1)]


def test_scheduler_compacts_running_entries_into_the_lowest_slots():
    scheduler = Scheduler(num_slots=4, prefill_chunk=4)
    a, b, c, d = (scheduler.add(s) for s in sequences(*"abcd"))
    scheduler.admit()
    scheduler.finish(a)
    scheduler.finish(c)
    assert scheduler.compact() == [(d, 3)]  # d moves from slot 3 to slot 0; b stays in 1
    assert (b.slot, d.slot) == (1, 0) and scheduler.compact() == []
    (e,) = sequences("e")
    scheduler.add(e)
    scheduler.admit()
    assert e.slot == 2  # the lowest free slot, not the latest freed


def test_the_plan_groups_consecutive_slots_and_update_applies_the_written_chunks():
    scheduler = Scheduler(num_slots=4, prefill_chunk=8)
    a, b, c, d = (scheduler.add(s) for s in sequences(*"abcd"))
    scheduler.admit()
    a.prompt_len, b.prompt_len, c.prompt_len, d.prompt_len = 2, 2, 2, 12
    c.prompt_ids = [1, 2]  # c scores its prompt: it runs alone
    plan = scheduler.schedule()
    assert plan.moves == []
    assert [[chunk.sequence for chunk in run] for run in plan.prefill_runs] == [[a, b], [c]]
    # b's run failed (its sequences finished); a's and c's chunks were written.
    written = [plan.prefill_runs[0][0], plan.prefill_runs[1][0]]
    scheduler.finish(b)
    assert scheduler.update(plan, written) == [a, c]
    assert (a.phase, a.prefilled, a.length) == (Phase.DECODE, 2, 2)
    assert scheduler.decode_batch() == []  # nothing sampled for them yet
    a.next_token = c.next_token = 7
    # Next iteration: d (slot 3) moves into b's slot 1 first; its chunk names the new slot.
    plan = scheduler.schedule()
    assert plan.moves == [(d, 3)] and d.slot == 1
    assert plan.prefill_runs == [[PrefillChunk(d, 0, 8)]]
    assert scheduler.update(plan, plan.prefill_runs[0]) == []
    assert (d.phase, d.prefilled, d.length) == (Phase.PREFILL, 8, 8)
    batch = scheduler.decode_batch()
    assert batch == [a, c]
    scheduler.update_decoded(batch)
    assert (a.length, c.length, scheduler.used_positions) == (3, 3, 14)


GiB = 2**30


def test_kv_slots_fit_the_share_of_gpu_memory():
    # 80 GiB card, 20 GiB in use (model, other processes): 0.9 x 80 - 20 - 2 reserved = 50 GiB
    fit = dict(free_bytes=60 * GiB, total_bytes=80 * GiB, utilization=0.9, reserve_bytes=2 * GiB)
    assert slots_for_memory(**fit, slot_bytes=GiB) == 50
    assert slots_for_memory(**fit, slot_bytes=3 * GiB) == 16  # whole slots only
    with pytest.raises(ValueError, match="less than one slot"):
        slots_for_memory(**{**fit, "utilization": 0.25}, slot_bytes=GiB)  # share < in use


def test_gpu_memory_utilization_leaves_the_cpu_engine_alone(model, caplog):
    with caplog.at_level("INFO", logger="xllm.engine"):
        engine = Engine(model, EngineConfig(max_batch=3, gpu_memory_utilization=0.5))
    assert engine.config.max_batch == 3 and engine.runner.slots.num_slots == 3
    assert engine.runner.slots.bytes == 3 * engine.max_model_len * kv_bytes_per_position(model.llm)
    assert "does not apply on the CPU" in caplog.text


def test_kv_slots_fit_the_kv_memory_budget(model):
    slot = 64 * kv_bytes_per_position(model.llm)
    engine = Engine(
        model, EngineConfig(max_batch=8, max_model_len=64, kv_cache_memory_bytes=3 * slot)
    )
    assert (
        engine.config.max_batch == engine.runner.slots.num_slots == 3
    )  # whole slots in the budget
    assert engine.runner.slots.bytes == 3 * slot
    with pytest.raises(ValueError, match="less than one slot"):
        Engine(model, EngineConfig(max_model_len=64, kv_cache_memory_bytes=slot - 1))


def test_the_cpu_default_kv_budget_is_a_share_of_available_memory(model, monkeypatch, caplog):
    slot = 64 * kv_bytes_per_position(model.llm)
    available = int(5 * slot / engine_config.CPU_KV_SHARE)  # room for 5 slots in the default share
    monkeypatch.setattr(engine_config, "available_memory_bytes", lambda: available)
    with caplog.at_level("INFO", logger="xllm.engine"):
        engine = Engine(model, EngineConfig(max_batch=32, max_model_len=64))
    assert engine.config.max_batch == engine.runner.slots.num_slots == 5
    assert "KV cache sized from memory" in caplog.text
    roomy = Engine(model, EngineConfig(max_batch=4, max_model_len=64))
    assert roomy.config.max_batch == 4  # never more than max_batch


def test_encoder_cache_is_bounded_in_bytes():
    cache = EncoderCache(max_bytes=3 * 64 * 4)  # room for three (16, 4) float32 tensors
    for key in "abcd":
        cache.put(key, [("image", torch.zeros(16, 4))])
    assert len(cache) == 3 and cache.bytes <= cache.max_bytes
    assert cache.get("a") is None and cache.get("d") is not None


async def run_requests(
    engine: Engine, prompts: list[str], params: SamplingParams, *, start: bool = False
) -> list:
    """Submit every prompt, then (start=True) start the engine, which admits them together."""
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
    if start:
        engine.start()
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


@pytest.mark.parametrize(
    ("prefill_chunk", "prefill_batch"),
    [(3, 1), (256, 4)],  # chunked, one prompt per forward; the 4 admitted prompts in one forward
)
def test_engine_matches_single_request_generate(model, monkeypatch, prefill_chunk, prefill_batch):
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    prompts = [f"prompt number {i}" for i in range(5)]
    engine = Engine(model, EngineConfig(max_batch=4, max_queue=4, prefill_chunk=prefill_chunk))
    rows_per_prefill = []
    prefill = engine.runner.slots.prefill

    def counting(first_slot, chunks, every_position=False):
        rows_per_prefill.append(len(chunks))
        return prefill(first_slot, chunks, every_position)

    monkeypatch.setattr(engine.runner.slots, "prefill", counting)
    results = asyncio.run(run_requests(engine, prompts, params, start=True))
    engine.shutdown()
    assert max(rows_per_prefill) == prefill_batch
    for prompt, events in zip(prompts, results, strict=True):
        layout = model.layout(bind_media([("user", prompt)], []), [])
        with torch.inference_mode():
            embeds = model.embed(layout, [])
        expected = [d.token for d in generate(model.llm, model.tokenizer, embeds, params)]
        assert [e.token for e in events[:-1]] == expected[:-1]
        assert events[-1].usage.completion_tokens == 12


def test_first_tokens_are_reported_before_the_decode_step(model):
    """An iteration that completes prompts reports right after their prefill, before the decode
    step (in the engine process a report is what sends the queued events: a new request's first
    token does not wait for the running requests' decode forward)."""
    log: list[str] = []

    class Recording(EngineObserver):
        def first_token(self, seconds: float) -> None:
            log.append("first token")

        def step(self, running: int, waiting: int, kv_usage: float) -> None:
            log.append("report")

    engine = Engine(model, EngineConfig(max_batch=2, max_queue=2), Recording())
    inject_faults(engine, log.append)  # called with "prefill" / "decode" before each forward
    engine.start()
    try:
        params = SamplingParams(max_tokens=4, ignore_eos=True)
        asyncio.run(run_requests(engine, ["a", "b"], params))
    finally:
        engine.shutdown()
    firsts = [i for i, entry in enumerate(log) if entry == "first token"]
    assert len(firsts) == 2
    for i in firsts:
        assert log[i + 1 :].index("report") < log[i + 1 :].index("decode"), log


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

        inject_faults(engine, fail_second_decode)
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


@pytest.mark.parametrize(("budget", "batches"), [(None, [4]), (3, [3, 1]), (2, [2, 2])])
def test_media_of_requests_admitted_together_is_encoded_in_one_batch(model, budget, batches):
    """Requests admitted in one iteration share one vision call; --max-encoder-batch splits a
    burst into iterations of at most that many images (a cached image costs nothing)."""
    from PIL import Image

    calls: list[int] = []
    original = model.vision.forward

    def counting(pixels):
        calls.append(pixels.shape[0])
        return original(pixels)

    model.vision.forward = counting
    engine = Engine(model, EngineConfig(max_batch=4, max_queue=4, max_encoder_batch=budget))
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
    assert calls == batches  # four slots: four new images, then the fifth request's repeat
    assert (
        engine.runner.encoder_cache.hits == 1
    )  # the fifth request reused the first one's encoding


async def run_each(engine: Engine, prompts: list[str], max_tokens: list[int]) -> list[list[int]]:
    """Submit every prompt at once (greedy, ignore_eos); each one's streamed tokens."""
    loop = asyncio.get_running_loop()
    handles = []
    for i, (prompt, n) in enumerate(zip(prompts, max_tokens, strict=True)):
        engine.reserve()
        handle = RequestHandle(f"r{i}", loop)
        params = SamplingParams(max_tokens=n, ignore_eos=True)
        messages = bind_media([("user", prompt)], [])
        engine.submit(EngineRequest(f"r{i}", messages, [], params, True), handle)
        handles.append(handle)
    tokens: list[list[int]] = []
    for handle in handles:
        events = []
        while not isinstance(event := await handle.next_event(), FinishEvent | ErrorEvent):
            events.append(event.token)
        assert isinstance(event, FinishEvent), event
        tokens.append(events)
    return tokens


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_engine_decodes_the_same_tokens(model, tiny_model_dir, backend: str):
    """Staggered lengths through 4 slots: requests join freed slots, later ones are compacted
    into lower slots, and the compiled engine (bucketed static shapes) streams what the plain
    one does, token for token."""
    prompts = [f"prompt number {i}" for i in range(6)]
    max_tokens = [2, 14, 3, 14, 4, 10]

    def run(engine: Engine) -> list[list[int]]:
        engine.start()
        try:
            return asyncio.run(run_each(engine, prompts, max_tokens))
        finally:
            engine.shutdown()

    plain = run(Engine(model, EngineConfig(max_batch=4, prefill_chunk=5)))
    compiled_model = load_model(tiny_model_dir, device="cpu")  # compiling switches its attention
    config = EngineConfig(max_batch=4, prefill_chunk=5, compile=True, compile_backend=backend)
    engine = Engine(compiled_model, config)
    shapes: list[tuple[int, int]] = []
    moves: list = []
    shape_for, compact = engine.runner.slots.decode.shape_for, engine.scheduler.compact

    def recording_shape_for(*args) -> tuple[int, int]:
        shapes.append(shape_for(*args))
        return shapes[-1]

    def recording_compact(*args) -> list:
        done = compact(*args)
        moves.extend(done)
        return done

    engine.runner.slots.decode.shape_for = recording_shape_for  # type: ignore[method-assign]
    engine.scheduler.compact = recording_compact  # type: ignore[method-assign]
    compiled = run(engine)
    assert compiled == plain
    assert [len(t) + 1 for t in plain] == max_tokens  # the last token comes with FinishEvent
    assert moves, "a request should have been moved into a lower slot"
    assert {rows for rows, _ in shapes} <= {1, 2, 4} and {kv for _, kv in shapes} == {256}


def test_the_llamacpp_backend_decodes_the_torch_backends_tokens(tiny_llama_model_dir):
    """The same staggered requests (slots freed and joined, compaction's moves, prefix copies
    of the shared "prompt number" start) through llama.cpp and through PyTorch, both float32:
    token for token the same."""
    prompts = [f"prompt number {i}" for i in range(6)]
    max_tokens = [2, 14, 3, 14, 4, 10]
    model = load_model(tiny_llama_model_dir, device="cpu", dtype="float32")

    def run(backend: str) -> tuple[list[list[int]], int, int]:
        config = EngineConfig(max_batch=4, prefill_chunk=5, llm_backend=backend)  # type: ignore[arg-type]
        engine = Engine(model, config)
        engine.start()
        try:
            tokens = asyncio.run(run_each(engine, prompts, max_tokens))
            return tokens, engine.kv_cache_bytes, engine.max_model_len
        finally:
            engine.shutdown()

    torch_tokens, _, _ = run("torch")
    llamacpp_tokens, kv_bytes, max_len = run("llamacpp")
    assert llamacpp_tokens == torch_tokens
    assert [len(t) + 1 for t in torch_tokens] == max_tokens
    # float32 K/V of 4 slots and the exchange's spare, every layer
    config = model.llm.config
    per_position = config.num_hidden_layers * 2 * config.num_key_value_heads * 16 * 4
    assert kv_bytes == 5 * max_len * per_position
