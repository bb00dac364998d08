"""`sample` / `penalised` on hand-made logits: OpenAI's penalties, logprobs of the distribution
sampled from, and rows that ask for nothing paying nothing."""

from __future__ import annotations

import pytest
import torch

from xllm.model import sampling
from xllm.model.sampling import SamplingParams, make_generator, penalised, sample

VOCAB = 12


def reference_penalty(logits: torch.Tensor, params: SamplingParams, history: list[int]):
    """One row, one token at a time: HF's repetition penalty, then OpenAI's formula."""
    out = logits.clone()
    for token in set(history):
        score = out[token]
        out[token] = (
            score * params.repetition_penalty if score < 0 else score / params.repetition_penalty
        )
        out[token] -= params.presence_penalty + params.frequency_penalty * history.count(token)
    return out


def test_penalties_follow_openai_and_hf_per_row():
    torch.manual_seed(0)
    logits = torch.randn(4, VOCAB)
    params = [
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(),  # untouched
        SamplingParams(repetition_penalty=1.3, frequency_penalty=-1.0),
        SamplingParams(presence_penalty=-2.0),
    ]
    histories = [[1, 1, 3], [1, 2], [0, 5, 5, 5, 7], [11]]
    out = penalised(logits, params, histories, eos_ids=[])
    for row in range(4):
        expected = reference_penalty(logits[row], params[row], histories[row])
        torch.testing.assert_close(out[row], expected)
    assert torch.equal(out[1], logits[1])


def test_zero_penalties_return_the_logits_themselves():
    logits = torch.randn(2, VOCAB)
    params = [SamplingParams(), SamplingParams(presence_penalty=0.0, frequency_penalty=0.0)]
    assert penalised(logits, params, [[1, 2], [3]], eos_ids=[]) is logits


def test_frequency_penalty_grows_with_the_count():
    logits = torch.zeros(1, VOCAB)
    out = penalised(logits, [SamplingParams(frequency_penalty=1.0)], [[4, 4, 4, 2]], eos_ids=[])
    assert out[0, 4].item() == -3.0 and out[0, 2].item() == -1.0 and out[0, 0].item() == 0.0


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.5])
def test_logprobs_cover_the_sampled_distribution(temperature: float):
    torch.manual_seed(1)
    logits = torch.randn(3, VOCAB) * 3
    params = [
        SamplingParams(temperature=temperature, top_k=4, top_p=0.5, logprobs=VOCAB),
        SamplingParams(temperature=temperature),  # did not ask
        SamplingParams(temperature=temperature, logprobs=2),
    ]
    gens = [make_generator(5) for _ in params]
    out = sample(logits, params, [[], [], []], gens, eos_ids=[])
    assert out.logprobs[1] is None
    full = out.logprobs[0]
    assert len(full.top_ids) == VOCAB and sorted(full.top_ids) == list(range(VOCAB))
    # the whole vocabulary, after temperature, before top-k / top-p: a distribution
    assert sum(torch.tensor(full.top_logprobs).exp()).item() == pytest.approx(1.0, abs=1e-5)
    expected = torch.log_softmax(logits[0] / (temperature or 1.0), dim=-1)
    assert full.logprob == pytest.approx(expected[out.tokens[0]].item(), abs=1e-5)
    assert list(full.top_logprobs) == sorted(full.top_logprobs, reverse=True)
    two = out.logprobs[2]
    assert len(two.top_ids) == 2 and all(v <= 0 for v in two.top_logprobs)
    if temperature == 0:
        assert [lp.top_ids[0] for lp in (full, two)] == [out.tokens[0], out.tokens[2]]


def test_logprobs_with_zero_alternatives_and_suppressed_eos():
    logits = torch.randn(1, VOCAB)
    params = [SamplingParams(min_tokens=3, logprobs=VOCAB)]
    out = sample(logits, params, [[]], [None], eos_ids=[0])
    assert out.logprobs[0].top_logprobs[-1] == sampling.MIN_LOGPROB  # EOS: finite, for JSON
    none = sample(logits, [SamplingParams(logprobs=0)], [[]], [None], eos_ids=[])
    assert none.logprobs[0].top_ids == () and none.logprobs[0].logprob <= 0


def test_rows_that_do_not_ask_compute_no_logprobs(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("logprobs computed for a batch that asked for none")

    monkeypatch.setattr(sampling, "token_logprobs", fail)
    logits = torch.randn(4, VOCAB)
    out = sample(logits, [SamplingParams()] * 4, [[]] * 4, [None] * 4, eos_ids=[])
    assert out.logprobs == [None] * 4


@pytest.mark.parametrize(
    ("field", "value"),
    [("presence_penalty", 2.5), ("frequency_penalty", -3.0), ("logprobs", 21), ("logprobs", -1)],
)
def test_out_of_range_values_are_refused(field: str, value):
    with pytest.raises(ValueError, match=field.replace("logprobs", "top_logprobs")):
        SamplingParams(**{field: value}).validate()


def test_prompt_logprobs_score_each_next_token():
    torch.manual_seed(2)
    logits = torch.randn(5, VOCAB)
    targets = [3, 1, 4, 1]  # the tokens after positions 0..3 (position 4 predicts the answer)
    out = sampling.prompt_logprobs(logits, targets, k=2)
    expected = torch.log_softmax(logits, dim=-1)
    assert len(out) == 4
    for position, (target, entry) in enumerate(zip(targets, out, strict=True)):
        assert entry.logprob == pytest.approx(expected[position, target].item(), abs=1e-5)
        assert entry.top_ids[0] == expected[position].argmax().item() and len(entry.top_ids) == 2
    assert sampling.prompt_logprobs(logits, [], k=2) == []


def test_each_range_is_what_validate_checks():
    """The HTTP schemas take their bounds from the same Range objects (server/protocol.py,
    server/routers/chat.py); here the ranges and `validate` agree at their edges."""
    assert 0.5 in sampling.TOP_P and 1 in sampling.TOP_P and 0 not in sampling.TOP_P
    assert sampling.TOP_P.bounds == {"gt": 0, "le": 1}
    edges = {
        "max_tokens": (1, 0),
        "temperature": (0.0, -0.1),
        "top_p": (1.0, 0.0),
        "top_k": (0, -1),
        "repetition_penalty": (0.01, 0.0),
        "presence_penalty": (sampling.PENALTY_LIMIT, sampling.PENALTY_LIMIT + 0.1),
        "logprobs": (sampling.MAX_TOP_LOGPROBS, sampling.MAX_TOP_LOGPROBS + 1),
    }
    for name, (allowed, refused) in edges.items():
        SamplingParams(**{name: allowed}).validate()
        with pytest.raises(ValueError, match="top_logprobs" if name == "logprobs" else name):
            SamplingParams(**{name: refused}).validate()
