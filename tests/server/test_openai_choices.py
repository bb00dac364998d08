"""OpenAI's `n` through the official client against a real `xllm serve` on the tiny random
model: n choices from one prompt, prefilled once (xllm_prefill_tokens_total), seeded per choice,
usage over all choices, and the 4xx of impossible requests."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.servers import wait_until

NO_EOS = {"ignore_eos": True, "top_k": 0, "repetition_penalty": 1.0}


@pytest.fixture(scope="module")
def small(start_server):
    """4 KV slots, so that n beyond them is refused."""
    return start_server("--max-batch", "4", "--max-queue", "4")


@pytest.fixture(scope="module")
def client(small) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{small.url}/v1", api_key="unused", max_retries=0)


def prefilled(server) -> float:
    return server.metric("xllm_prefill_tokens_total")


def computed(usage) -> int:
    """The prompt positions a reply's prefill had to compute (those not reused from a slot)."""
    details = usage.prompt_tokens_details
    return usage.prompt_tokens - ((details.cached_tokens or 0) if details else 0)


def test_n_samples_distinct_choices_from_one_prefill(small, client):
    messages = [{"role": "user", "content": "n choices: tell me about the blue square"}]
    before = prefilled(small)
    reply = client.chat.completions.create(
        model="m", messages=messages, n=4, temperature=1.0, max_tokens=12, extra_body=NO_EOS
    )
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    answers = [c.message.content for c in reply.choices]
    assert len(set(answers)) == 4, answers
    # the prompt was prefilled once, not four times
    assert prefilled(small) - before == computed(reply.usage) > 0
    # usage: the prompt once, every choice's tokens
    assert reply.usage.completion_tokens == 4 * 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 4 * 12


def test_n_with_a_seed_repeats_and_each_choice_has_its_own(client):
    def answers() -> list[str]:
        reply = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "seeded"}],
            n=3,
            temperature=1.0,
            seed=11,
            max_tokens=10,
            extra_body=NO_EOS,
        )
        return [c.message.content for c in reply.choices]

    first = answers()
    assert answers() == first
    assert len(set(first)) == 3
    # choice 0 is the request with that seed alone
    alone = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "seeded"}],
        temperature=1.0,
        seed=11,
        max_tokens=10,
        extra_body=NO_EOS,
    )
    assert alone.choices[0].message.content == first[0]


def test_greedy_choices_equal_the_single_answer(client):
    kwargs = {
        "model": "m",
        "messages": [{"role": "user", "content": "greedy"}],
        "temperature": 0,
        "max_tokens": 16,
        "logprobs": True,
        "extra_body": NO_EOS,
    }
    one = client.chat.completions.create(**kwargs).choices[0]
    many = client.chat.completions.create(n=3, **kwargs).choices
    assert {c.message.content for c in many} == {one.message.content}
    tokens = [e.token for e in one.logprobs.content]
    assert all([e.token for e in c.logprobs.content] == tokens for c in many)


def test_streamed_choices_match_and_usage_counts_all(small, client):
    before = prefilled(small)
    stream = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "stream several"}],
        n=3,
        temperature=1.0,
        seed=5,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=NO_EOS,
    )
    text, finish, usage = ["", "", ""], [None] * 3, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text[choice.index] += choice.delta.content or ""
            finish[choice.index] = choice.finish_reason or finish[choice.index]
    assert finish == ["length"] * 3
    assert usage is not None and usage.completion_tokens == 3 * 8
    assert prefilled(small) - before == computed(usage) > 0
    whole = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "stream several"}],
        n=3,
        temperature=1.0,
        seed=5,
        max_tokens=8,
        extra_body=NO_EOS,
    )
    assert text == [c.message.content for c in whole.choices]


def test_completions_n_per_prompt(client):
    reply = client.completions.create(
        model="m", prompt=["one", "two"], n=2, max_tokens=6, temperature=1.0, seed=3
    )
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    singles = [
        client.completions.create(model="m", prompt=p, max_tokens=6, temperature=1.0, seed=3)
        for p in ("one", "two")
    ]
    assert reply.choices[0].text == singles[0].choices[0].text
    assert reply.choices[2].text == singles[1].choices[0].text
    prompt_tokens = sum(s.usage.prompt_tokens for s in singles)
    assert reply.usage.prompt_tokens == prompt_tokens


def test_impossible_n_is_a_clear_4xx(client):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError, match="KV slots"):
        client.chat.completions.create(model="m", messages=messages, n=5)
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="m", messages=messages, n=17)
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="m", messages=messages, n=0)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="m", messages=messages, n=2, max_tokens=10**6)


def test_places_are_given_back(client):
    # 4 slots and 4 queue places: a choice that kept its place would make the third a 429
    for _ in range(3):
        reply = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], n=4, max_tokens=2
        )
        assert len(reply.choices) == 4


def test_a_stream_of_choices_left_early_gives_its_places_back(small, client):
    stream = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "left early"}],
        n=4,
        max_tokens=200,
        stream=True,
        extra_body=NO_EOS,
    )
    next(iter(stream))
    stream.close()

    def idle() -> bool:
        running = small.metric("xllm_num_requests_running")
        return running == 0 and small.metric("xllm_num_requests_waiting") == 0

    wait_until(idle, what="all four choices to leave the engine and give their places back")
    # 4 slots and 4 queue places: two n=4 requests at once need all 8 (a leaked place: 429)
    with ThreadPoolExecutor(2) as pool:
        replies = [
            pool.submit(
                client.chat.completions.create,
                model="m",
                messages=[{"role": "user", "content": f"after {i}"}],
                n=4,
                max_tokens=2,
            )
            for i in range(2)
        ]
        assert [len(r.result().choices) for r in replies] == [4, 4]
