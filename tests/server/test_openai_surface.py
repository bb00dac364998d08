"""The OpenAI surface through the official `openai` client against a real `xllm serve` on the
tiny random model: presence/frequency penalties, chat logprobs, /v1/completions."""

from __future__ import annotations

import math
from collections import Counter

import httpx
import openai
import pytest

MESSAGES = [{"role": "user", "content": "tell me a long story about a red circle"}]
# deterministic and long: greedy, no EOS, no repetition penalty from the model's defaults
GREEDY = {"temperature": 0, "seed": 7}
NO_EOS = {"ignore_eos": True, "top_k": 0, "repetition_penalty": 1.0}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def chat_tokens(client: openai.OpenAI, max_tokens: int = 48, **kwargs) -> list[bytes]:
    """The generated tokens (their bytes, by logprobs) of a greedy, EOS-free chat answer."""
    reply = client.chat.completions.create(
        model="m",
        messages=MESSAGES,
        max_tokens=max_tokens,
        logprobs=True,
        extra_body=NO_EOS,
        **GREEDY,
        **kwargs,
    )
    assert reply.choices[0].logprobs is not None
    return [bytes(entry.bytes) for entry in reply.choices[0].logprobs.content]


# --- presence / frequency penalties ---
def test_frequency_penalty_stops_repeats(client):
    plain = Counter(chat_tokens(client))
    assert max(plain.values()) > 3, "the tiny model's greedy answer repeats tokens"
    penalised = Counter(chat_tokens(client, frequency_penalty=2.0))
    assert max(penalised.values()) < max(plain.values())
    # a negative penalty rewards repeats: the most repeated token repeats more
    rewarded = Counter(chat_tokens(client, frequency_penalty=-2.0))
    assert max(rewarded.values()) >= max(plain.values())


def test_presence_penalty_brings_new_tokens(client):
    plain = set(chat_tokens(client))
    assert len(set(chat_tokens(client, presence_penalty=2.0))) > len(plain)
    assert len(set(chat_tokens(client, presence_penalty=-2.0))) <= len(plain)


def test_zero_penalties_change_nothing(client):
    assert chat_tokens(client, presence_penalty=0, frequency_penalty=0) == chat_tokens(client)


def test_penalties_on_post_chat(server):
    def tokens(**extra: str) -> int:
        data = {"prompt": "hello", "max_tokens": "48", "temperature": "0", "ignore_eos": "true"}
        data |= {"top_k": "0", "repetition_penalty": "1"}
        r = httpx.post(f"{server.url}/chat", data=data | extra, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["text"]

    assert tokens(frequency_penalty="2") != tokens()
    r = httpx.post(f"{server.url}/chat", data={"prompt": "hi", "presence_penalty": "3"})
    assert r.status_code == 422


def test_penalty_out_of_range_is_422(client):
    for name in ("presence_penalty", "frequency_penalty"):
        with pytest.raises(openai.UnprocessableEntityError):
            client.chat.completions.create(model="m", messages=MESSAGES, **{name: 3})
        with pytest.raises(openai.UnprocessableEntityError):
            client.completions.create(model="m", prompt="a", **{name: -2.5})


# --- chat logprobs ---
def test_logprobs_argmax_is_the_greedy_token(client):
    reply = client.chat.completions.create(
        model="m",
        messages=MESSAGES,
        max_tokens=12,
        logprobs=True,
        top_logprobs=20,
        extra_body=NO_EOS,
        **GREEDY,
    )
    choice = reply.choices[0]
    content = choice.logprobs.content
    assert len(content) == reply.usage.completion_tokens == 12
    for entry in content:
        assert len(entry.top_logprobs) == 20
        best = max(entry.top_logprobs, key=lambda t: t.logprob)
        assert best.token == entry.token and best.logprob == pytest.approx(entry.logprob)
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        assert sum(math.exp(v) for v in values) <= 1 + 1e-4
        whole = bytes(entry.bytes).decode("utf-8", "replace") == entry.token
        assert whole or entry.token.startswith("bytes:\\x")
    # the answer's text is its tokens' (the template's leading newline aside)
    answer = b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace")
    assert answer.lstrip("\n") == choice.message.content


def test_logprobs_without_top_logprobs(client):
    reply = client.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=4, logprobs=True, extra_body=NO_EOS, **GREEDY
    )
    assert [e.top_logprobs for e in reply.choices[0].logprobs.content] == [[]] * 4
    plain = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=4)
    assert plain.choices[0].logprobs is None


def test_streamed_logprobs_match_the_whole_reply(client):
    kwargs = {"max_tokens": 16, "logprobs": True, "top_logprobs": 3, "extra_body": NO_EOS}
    whole = client.chat.completions.create(model="m", messages=MESSAGES, **kwargs, **GREEDY)
    stream = client.chat.completions.create(
        model="m", messages=MESSAGES, stream=True, **kwargs, **GREEDY
    )
    entries, text = [], ""
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.logprobs is not None:
                assert choice.logprobs.content, "a chunk with logprobs has entries"
                entries += choice.logprobs.content
    assert text == whole.choices[0].message.content
    assert [(e.token, e.top_logprobs[0].token) for e in entries] == [
        (e.token, e.top_logprobs[0].token) for e in whole.choices[0].logprobs.content
    ]


def test_sampled_logprobs_are_of_the_sampled_token(client):
    reply = client.chat.completions.create(
        model="m",
        messages=MESSAGES,
        max_tokens=16,
        temperature=1.5,
        seed=3,
        logprobs=True,
        top_logprobs=5,
        extra_body=NO_EOS,
    )
    for entry in reply.choices[0].logprobs.content:
        assert entry.logprob <= 0
        listed = {t.token: t.logprob for t in entry.top_logprobs}
        if entry.token in listed:
            assert listed[entry.token] == pytest.approx(entry.logprob)
        else:  # not among the 5 most likely: less likely than each of them
            assert entry.logprob <= min(listed.values()) + 1e-6


def test_bad_logprobs_requests_are_4xx(client):
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="m", messages=MESSAGES, logprobs=True, top_logprobs=21)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.chat.completions.create(model="m", messages=MESSAGES, top_logprobs=2)
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="m", prompt="a", logprobs=6)


# --- /v1/completions ---
def test_completion_of_a_string_prompt(client):
    reply = client.completions.create(
        model="m", prompt="the red circle", max_tokens=8, extra_body=NO_EOS, **GREEDY
    )
    assert reply.object == "text_completion"
    assert [c.index for c in reply.choices] == [0]
    assert reply.choices[0].finish_reason == "length" and reply.choices[0].text
    assert reply.usage.completion_tokens == 8 and reply.usage.prompt_tokens > 0
    again = client.completions.create(
        model="m", prompt="the red circle", max_tokens=8, extra_body=NO_EOS, **GREEDY
    )
    assert again.choices[0].text == reply.choices[0].text


def test_completion_default_max_tokens_is_16(client):
    reply = client.completions.create(model="m", prompt="a", extra_body=NO_EOS)
    assert reply.usage.completion_tokens == 16


def test_completion_of_a_list_gives_a_choice_per_prompt_in_order(client):
    prompts = ["the red circle", "a blue square moves", "hello"]
    single = [
        client.completions.create(model="m", prompt=p, max_tokens=6, extra_body=NO_EOS, **GREEDY)
        .choices[0]
        .text
        for p in prompts
    ]
    reply = client.completions.create(
        model="m", prompt=prompts, max_tokens=6, extra_body=NO_EOS, **GREEDY
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.text for c in reply.choices] == single
    assert reply.usage.completion_tokens == 18


def test_completion_stop_and_echo(client):
    base = client.completions.create(
        model="m", prompt="the red circle", max_tokens=12, extra_body=NO_EOS, **GREEDY
    )
    text = base.choices[0].text
    stop = text[3:5]
    cut = client.completions.create(
        model="m", prompt="the red circle", max_tokens=12, stop=stop, extra_body=NO_EOS, **GREEDY
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]
    echoed = client.completions.create(
        model="m", prompt="the red circle", max_tokens=12, echo=True, extra_body=NO_EOS, **GREEDY
    )
    assert echoed.choices[0].text == "the red circle" + text


def test_completion_logprobs_legacy_format(client):
    reply = client.completions.create(
        model="m", prompt="the red circle", max_tokens=6, logprobs=3, extra_body=NO_EOS, **GREEDY
    )
    choice = reply.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    offsets = lp.text_offset
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] <= len(choice.text)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and logprob <= 0
        assert max(top, key=top.get) == token  # greedy: the most likely one


PROMPT = "the red circle moves to the left of the blue square"


def echo_logprobs(client: openai.OpenAI, prompt: str = PROMPT):
    return client.completions.create(
        model="m",
        prompt=prompt,
        max_tokens=4,
        echo=True,
        logprobs=2,
        extra_body=NO_EOS,
        **GREEDY,
    )


def test_echo_with_logprobs_scores_the_prompt(client):
    reply = echo_logprobs(client)
    plain = client.completions.create(
        model="m", prompt=PROMPT, max_tokens=4, logprobs=2, extra_body=NO_EOS, **GREEDY
    )
    choice, lp = reply.choices[0], reply.choices[0].logprobs
    prompt_tokens = reply.usage.prompt_tokens
    assert choice.text == PROMPT + plain.choices[0].text
    assert len(lp.tokens) == prompt_tokens + 4
    assert "".join(lp.tokens[:prompt_tokens]) == PROMPT
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing scores it
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    for token, logprob, top in zip(
        lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True
    ):
        assert len(top) == 2 and max(top.values()) >= logprob - 1e-5
        if token in top:
            assert top[token] == pytest.approx(logprob, abs=1e-5)
    # the generated tokens' are those of the same request without echo
    assert lp.tokens[prompt_tokens:] == plain.choices[0].logprobs.tokens
    assert lp.token_logprobs[prompt_tokens:] == pytest.approx(
        plain.choices[0].logprobs.token_logprobs
    )
    assert lp.text_offset[:prompt_tokens] == [
        len("".join(lp.tokens[:i])) for i in range(prompt_tokens)
    ]


def test_prompt_logprobs_do_not_depend_on_prefill_chunks(client, start_server):
    chunked = start_server("--prefill-chunk", "16")  # the smallest allowed
    small = openai.OpenAI(base_url=f"{chunked.url}/v1", api_key="unused", max_retries=0)
    prompt = " and ".join([PROMPT] * 4)
    whole, pieces = echo_logprobs(client, prompt), echo_logprobs(small, prompt)
    assert whole.usage.prompt_tokens > 2 * 16, "the prompt spans several chunks"
    whole, pieces = whole.choices[0], pieces.choices[0]
    assert pieces.text == whole.text and pieces.logprobs.tokens == whole.logprobs.tokens
    assert pieces.logprobs.token_logprobs[1:] == pytest.approx(
        whole.logprobs.token_logprobs[1:], abs=1e-4
    )


def test_completion_bad_prompts_are_4xx(client):
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.completions.create(model="m", prompt=[])
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.completions.create(model="m", prompt="")


def test_completion_stream(client):
    prompts = ["the red circle", "hello"]
    whole = client.completions.create(
        model="m", prompt=prompts, max_tokens=10, logprobs=2, extra_body=NO_EOS, **GREEDY
    )
    stream = client.completions.create(
        model="m",
        prompt=prompts,
        max_tokens=10,
        logprobs=2,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=NO_EOS,
        **GREEDY,
    )
    texts, tokens, offsets, finish, usage = ["", ""], [[], []], [[], []], [None, None], None
    for chunk in stream:
        assert chunk.object == "text_completion"
        if chunk.usage is not None:
            assert not chunk.choices
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.logprobs is not None:
                tokens[choice.index] += choice.logprobs.tokens
                offsets[choice.index] += choice.logprobs.text_offset
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    assert texts == [c.text for c in whole.choices]
    assert tokens == [c.logprobs.tokens for c in whole.choices]
    assert offsets == [c.logprobs.text_offset for c in whole.choices]
    assert finish == ["length", "length"]
    assert usage is not None and usage.completion_tokens == 20


@pytest.mark.parametrize("logprobs", [None, 2])
def test_completion_stream_echo(client, logprobs):
    kwargs = {"prompt": ["the red circle", "hello"], "max_tokens": 6, "extra_body": NO_EOS}
    kwargs |= {"echo": True, "logprobs": logprobs, **GREEDY}
    whole = client.completions.create(model="m", **kwargs)
    texts, tokens, offsets = ["", ""], [[], []], [[], []]
    for chunk in client.completions.create(model="m", stream=True, **kwargs):
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.logprobs is not None:
                tokens[c.index] += c.logprobs.tokens
                offsets[c.index] += c.logprobs.text_offset
    assert texts == [c.text for c in whole.choices] and texts[0].startswith("the red circle")
    if logprobs:
        assert tokens == [c.logprobs.tokens for c in whole.choices]
        assert offsets == [c.logprobs.text_offset for c in whole.choices]
