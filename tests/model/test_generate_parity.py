"""Decoding (xllm.model.generate) against HF `generate`, plus sampling, stops and lengths."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from xllm.model.checkpoint import load_model
from xllm.model.detokenize import IncrementalDetokenizer, SequenceState, eos_token_ids
from xllm.model.generate import CompileOptions, TorchSlots, generate, prefill
from xllm.model.kv_cache import SlotKVCache
from xllm.model.sampling import SamplingParams, sample_next, sampling_params
from xllm.model.xllm import PromptEmbeddings

STEPS = 24


def multimodal_prompt(model, media, text: str, seed: int, audio_seconds: float) -> PromptEmbeddings:
    """A prompt with an image and an audio clip spliced in (embeddings (L, H))."""
    items = [
        model.prepare("image", media.image(seed=seed)),
        model.prepare("audio", media.waveform(audio_seconds, seed=seed)),
    ]
    with torch.inference_mode():
        return model.prompt_embeddings([("user", text)], items)


@pytest.fixture(scope="module")
def multimodal_prompts(tiny_model, media_dir) -> list[PromptEmbeddings]:
    return [
        multimodal_prompt(tiny_model, media_dir, "What is in <image>? Hear <audio>.", 0, 1.0),
        multimodal_prompt(tiny_model, media_dir, "Describe the picture.", 1, 0.4),
        multimodal_prompt(tiny_model, media_dir, "Hello!", 2, 0.2),
    ]


@pytest.fixture(scope="module")
def prompts(multimodal_prompts) -> list[torch.Tensor]:
    """The prompts' embeddings (L, H), as `generate` takes them."""
    return [p.embeds for p in multimodal_prompts]


def hf_greedy(llm, embeds: torch.Tensor, steps: int = STEPS, **kwargs) -> list[int]:
    """HF's own greedy decoding; EOS is banned for `steps` tokens like min_tokens does."""
    with torch.inference_mode():
        out = llm.generate(
            inputs_embeds=embeds[None],
            attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long),
            do_sample=False,
            max_new_tokens=steps,
            min_new_tokens=steps,
            **kwargs,
        )
    return out[0, -steps:].tolist()


def ours(model, embeds: torch.Tensor, **kwargs) -> list:
    return list(generate(model.llm, model.tokenizer, embeds, SamplingParams(**kwargs)))


def test_prompts_differ_and_media_are_in_them(tiny_model, multimodal_prompts) -> None:
    assert len({len(p) for p in multimodal_prompts}) == 3
    table = tiny_model.llm.get_input_embeddings().weight
    for prompt in multimodal_prompts:
        assert prompt.embeds.shape[1] == table.shape[1]
        spans = prompt.layout.spans
        assert [length for _, length, _, _ in spans] == [
            t.shape[0] for item in prompt.encoded for _, t in item
        ]
        spliced = torch.zeros(len(prompt), dtype=torch.bool)
        for start, length, media, segment in spans:
            # The interface's output itself stands at the span, not a token's embedding.
            _, vectors = prompt.encoded[media][segment]
            torch.testing.assert_close(prompt.embeds[start : start + length], vectors.to(table))
            spliced[start : start + length] = True
        ids = torch.tensor(prompt.layout.token_ids)
        torch.testing.assert_close(prompt.embeds[~spliced], table[ids[~spliced]])


# HF then penalises only generated tokens, which is what xllm does (the prompt is embeddings).
@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty`")
@pytest.mark.parametrize(("chunk", "penalty"), [(512, 1.0), (7, 1.0), (512, 1.5)])
def test_greedy_equals_hf_generate(tiny_model, prompts, chunk: int, penalty: float) -> None:
    embeds = prompts[0]
    expected = hf_greedy(tiny_model.llm, embeds, repetition_penalty=penalty)
    params = SamplingParams(max_tokens=STEPS, min_tokens=STEPS, repetition_penalty=penalty)
    deltas = list(
        generate(tiny_model.llm, tiny_model.tokenizer, embeds, params, prefill_chunk=chunk)
    )
    assert [d.token for d in deltas] == expected
    assert len(set(expected)) > 3  # a real sequence, not one token repeated
    if penalty != 1.0:
        assert expected != hf_greedy(tiny_model.llm, embeds)  # the penalty is really applied
    assert [d.finish_reason for d in deltas] == [None] * (STEPS - 1) + ["length"]


@pytest.mark.parametrize("compile", [None, CompileOptions(backend="aot_eager")])
def test_slot_batch_equals_hf_generate_per_prompt(
    tiny_model, tiny_model_dir, prompts, compile: CompileOptions | None
) -> None:
    """Continuous batching: A starts alone, B joins, B leaves, C reuses B's slot; all greedy.

    Decode steps run over the slot prefix [0, B): slot 1 stays free (a masked row) and, compiled,
    B and kv_len are padded to buckets (4 rows, 256 of the 1024 positions) as on a GPU.
    """
    llm, device = tiny_model.llm, tiny_model.device
    budget = [3 + 2 * STEPS + 4, STEPS, STEPS]  # A outlives B and then runs beside C
    expected = [hf_greedy(llm, p, n) for p, n in zip(prompts, budget, strict=True)]
    if compile is not None:  # compiling switches the model's attention: not the shared one
        llm = load_model(tiny_model_dir, device="cpu", dtype="float32").llm
    eos = sorted(eos_token_ids(llm, tiny_model.tokenizer))
    slots = TorchSlots(llm, num_slots=4, max_len=1024, device=device, compile=compile)
    decoder = slots.decode
    shapes = set()

    slot_of = {0: 2, 1: 0, 2: 0}  # prompt C (2) reuses prompt B's (1) slot after B is done
    tokens: dict[int, list[int]] = {}
    logits: dict[int, torch.Tensor] = {}

    def join(i: int) -> None:
        logits[i] = prefill(slots, prompts[i], slot_of[i], chunk=16)
        tokens[i] = []

    def step() -> list[int]:
        running = [i for i in tokens if len(tokens[i]) < budget[i]]
        new = sample_next(
            torch.cat([logits[i] for i in running]),
            [SamplingParams(max_tokens=budget[i], min_tokens=budget[i]) for i in running],
            [tokens[i] for i in running],
            [None] * len(running),
            eos,
        )
        for i, t in zip(running, new, strict=True):
            tokens[i].append(t)
        held = [slot_of[i] for i in running]
        lengths = [prompts[i].shape[0] + len(tokens[i]) - 1 for i in running]
        shapes.add(decoder.shape_for(held, lengths))
        out = decoder(held, new, lengths)
        for row, i in enumerate(running):
            logits[i] = out[row : row + 1]
        return running

    join(0)
    for _ in range(3):
        assert step() == [0]
    join(1)
    while len(tokens[1]) < STEPS:
        assert step() == [0, 1]
    join(2)  # the shortest prompt, into a slot holding B's longer stale K/V
    while len(tokens[2]) < STEPS:
        assert step() == [0, 2]
    while len(tokens[0]) < budget[0]:
        assert step() == [0]
    for i in range(3):
        assert tokens[i] == expected[i], f"prompt {i}"
    if compile is not None:
        assert shapes == {(4, 256)}
    else:
        assert {rows for rows, _ in shapes} == {3} and len(shapes) > 50  # exact kv_len per step


def test_cache_update_writes_in_place_and_returns_views() -> None:
    """A step's K/V land in the slots' buffers and attention reads views of them: no copy."""
    cache = SlotKVCache(
        2,
        num_slots=4,
        max_len=32,
        kv_heads=2,
        head_dim=8,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    cache.bind(1, torch.tensor([[5], [7]]), kv_len=8)  # rows: slots 1 and 2
    new = torch.randn(2, 2, 1, 8)  # (B, kv_heads, q, head_dim)
    keys, values = cache.update(new, -new, layer_idx=1)
    assert keys.shape == (2, 2, 8, 8)
    assert keys.data_ptr() == cache.keys[1][1].data_ptr()  # slot 1 starts the view
    assert values.data_ptr() == cache.values[1][1].data_ptr()
    assert torch.equal(cache.keys[1][1, :, 5], new[0, :, 0])
    assert torch.equal(cache.values[1][2, :, 7], -new[1, :, 0])
    assert cache.keys[1][[0, 3]].abs().sum() == 0  # other slots untouched
    cache.move(2, 0, length=8)
    assert torch.equal(cache.keys[1][0, :, 7], new[1, :, 0])


def test_decode_step_reads_nothing_back_from_the_device(tiny_model, prompts, monkeypatch) -> None:
    """Lengths come from the host: a step never waits for the device (CUDA graphs need that)."""
    llm = tiny_model.llm
    slots = TorchSlots(llm, num_slots=2, max_len=128, device=tiny_model.device)
    prefill(slots, prompts[2], 1, chunk=16)
    decoder = slots.decode

    def host_sync(*args, **kwargs):
        raise AssertionError("the decode step read a value back from the device")

    for method in ("item", "tolist", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, method, host_sync)
    logits = decoder([1], [5], [prompts[2].shape[0]])
    monkeypatch.undo()
    assert logits.shape == (1, llm.config.vocab_size) and bool(torch.isfinite(logits).all())


def test_sampling_is_reproducible_with_a_seed(tiny_model, prompts) -> None:
    embeds = prompts[1]
    common = {"max_tokens": 20, "min_tokens": 20, "temperature": 1.5}
    first = [d.token for d in ours(tiny_model, embeds, seed=123, **common)]
    again = [d.token for d in ours(tiny_model, embeds, seed=123, **common)]
    other = [d.token for d in ours(tiny_model, embeds, seed=124, **common)]
    greedy = [d.token for d in ours(tiny_model, embeds, max_tokens=20, min_tokens=20)]
    assert first == again
    assert first != other
    assert first != greedy
    # top_k=1 leaves only the argmax: sampling is then greedy whatever the seed.
    top1 = [d.token for d in ours(tiny_model, embeds, seed=5, top_k=1, **common)]
    assert top1 == greedy


def test_text_is_the_detokenized_tokens(tiny_model, prompts) -> None:
    deltas = ours(tiny_model, prompts[0], max_tokens=30, min_tokens=30)
    text = "".join(d.text for d in deltas)
    tokens = [d.token for d in deltas]
    # The answer's leading newlines (GLM's template puts one after <|assistant|>) are dropped.
    assert text == tiny_model.tokenizer.decode(tokens, skip_special_tokens=True).lstrip("\n")
    assert text.strip()


def test_leading_newline_of_the_answer_is_dropped(tiny_model) -> None:
    from xllm.model.detokenize import IncrementalDetokenizer, SequenceState
    from xllm.model.sampling import SamplingParams

    newline = tiny_model.tokenizer("\n", add_special_tokens=False)["input_ids"]
    word = tiny_model.tokenizer("Red.", add_special_tokens=False)["input_ids"]
    state = SequenceState(
        SamplingParams(max_tokens=10), frozenset(), IncrementalDetokenizer(tiny_model.tokenizer)
    )
    emitted = "".join(state.append(t) for t in newline + word + newline + word)
    assert emitted == state.text == "Red.\nRed."
    # ... and does not trigger a "\n" stop string.
    stop = SequenceState(
        SamplingParams(max_tokens=10, stop=("\n",)),
        frozenset(),
        IncrementalDetokenizer(tiny_model.tokenizer),
    )
    emitted = ""
    for token in newline + word + newline + word:
        emitted += stop.append(token)
        if stop.finish_reason:
            break
    assert emitted == "Red." and stop.finish_reason == "stop"


def test_stop_strings_cut_the_text(tiny_model, prompts) -> None:
    full_deltas = ours(tiny_model, prompts[0], max_tokens=40, min_tokens=40)
    full = "".join(d.text for d in full_deltas)
    assert len(full) > 20, full
    tried = 0
    # Stops starting at several offsets, so some straddle token boundaries.
    for offset in (6, 9, 13, 17):
        stop = full[offset : offset + 3]
        if not stop.strip():
            continue
        tried += 1
        deltas = ours(tiny_model, prompts[0], max_tokens=40, min_tokens=40, stop=(stop, "@@@"))
        text = "".join(d.text for d in deltas)
        assert text == full[: full.find(stop)]
        assert stop not in text
        assert deltas[-1].finish_reason == "stop"
        assert all(d.finish_reason is None for d in deltas[:-1])
        assert len(deltas) < 40
    assert tried >= 2


@contextmanager
def eos_always_wins(llm, eos: list[int]):
    """Make EOS the argmax at every step, so that only min_tokens can hold it back."""

    def hook(_module, _inputs, output):
        output = output.clone()
        output[..., eos] += 1e4
        return output

    handle = llm.lm_head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_min_tokens_suppresses_eos(tiny_model, prompts) -> None:
    llm = tiny_model.llm
    eos = sorted(eos_token_ids(llm, tiny_model.tokenizer))
    assert tiny_model.tokenizer.eos_token_id in eos
    with eos_always_wins(llm, eos):
        plain = ours(tiny_model, prompts[2], max_tokens=10)
        held = ours(tiny_model, prompts[2], max_tokens=10, min_tokens=5)
    assert len(plain) == 1 and plain[0].token in eos
    assert plain[0].finish_reason == "stop" and plain[0].text == ""
    assert len(held) == 6
    assert all(d.token not in eos for d in held[:5])
    assert held[5].token in eos and held[5].finish_reason == "stop"


def test_ignore_eos_runs_to_max_tokens(tiny_model, prompts) -> None:
    llm = tiny_model.llm
    eos = sorted(eos_token_ids(llm, tiny_model.tokenizer))
    with eos_always_wins(llm, eos):
        deltas = ours(tiny_model, prompts[2], max_tokens=4, ignore_eos=True)
    assert [d.token in eos for d in deltas] == [True] * 4
    assert deltas[-1].finish_reason == "length"


@pytest.mark.parametrize("max_tokens", [1, 5])
def test_max_tokens_gives_length(tiny_model, prompts, max_tokens: int) -> None:
    deltas = ours(tiny_model, prompts[1], max_tokens=max_tokens, min_tokens=max_tokens)
    assert len(deltas) == max_tokens
    assert deltas[-1].finish_reason == "length"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("min_tokens", 600),
        ("temperature", -1.0),
        ("top_p", 0.0),
        ("top_k", -1),
        ("repetition_penalty", 0.0),
    ],
)
def test_bad_sampling_parameters_name_the_field(tiny_model, field: str, value) -> None:
    with pytest.raises(ValueError, match=field):
        sampling_params(tiny_model.config.sampling, **{field: value})


def test_stop_must_not_be_empty(tiny_model) -> None:
    with pytest.raises(ValueError, match="stop"):
        sampling_params(tiny_model.config.sampling, stop=("",))


def replay(tokenizer, text: str, **params) -> tuple[list[str], SequenceState]:
    """Feed the tokens of `text` to a SequenceState one by one; return the deltas."""
    state = SequenceState(
        SamplingParams(**{"max_tokens": 100, **params}),
        frozenset({tokenizer.eos_token_id}),
        IncrementalDetokenizer(tokenizer),
    )
    deltas = []
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        deltas.append(state.append(token))
        if state.finish_reason:
            break
    return deltas, state


def test_streamed_text_never_splits_a_character(tiny_model) -> None:
    text = "你好，很高兴见到你。The circle is red."
    deltas, state = replay(tiny_model.tokenizer, text)
    assert "".join(deltas) == text == state.text
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas  # some tokens are partial characters: nothing is emitted for them


def test_a_reply_cut_inside_a_character_keeps_what_it_has(tiny_model) -> None:
    # max_tokens ends between the tokens of one character: the stream ends with what a decode of
    # all the tokens shows (U+FFFD for the incomplete character), nothing silently dropped.
    tokenizer = tiny_model.tokenizer
    text = "ab 你好"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    cuts = [n for n in range(1, len(ids)) if tokenizer.decode(ids[:n]).endswith("\ufffd")]
    assert cuts, "the test needs a character split across tokens"
    deltas, state = replay(tokenizer, text, max_tokens=cuts[0])
    assert state.finish_reason == "length"
    assert "".join(deltas) == state.text == tokenizer.decode(ids[: cuts[0]])


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        ("circle", "The "),
        ("e is r", "The circl"),  # straddles several tokens
        ("red.", "The circle is "),
        ("高兴", "你好，很"),  # inside multi-token characters
    ],
)
def test_stop_string_in_a_token_stream(tiny_model, stop: str, expected: str) -> None:
    text = "你好，很高兴见到你。" if "高" in stop else "The circle is red. The square is green."
    deltas, state = replay(tiny_model.tokenizer, text, stop=(stop,))
    assert state.finish_reason == "stop"
    assert "".join(deltas) == state.text == expected


def test_held_stop_prefix_is_released(tiny_model) -> None:
    # "red" starts like the stop "red!" but the stop never completes: nothing may be lost.
    text = "The circle is red"
    deltas, state = replay(tiny_model.tokenizer, text, stop=("red!",), max_tokens=100)
    n = len(tiny_model.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert "".join(deltas) == "The circle is "  # "red" is held: it may still become the stop
    assert state.finish_reason is None
    deltas, state = replay(tiny_model.tokenizer, text, stop=("red!",), max_tokens=n)
    assert state.finish_reason == "length"
    assert "".join(deltas) == state.text == text  # at the end, the held text is flushed
