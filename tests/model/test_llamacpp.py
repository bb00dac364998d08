"""The llama.cpp backend (model/llamacpp.py) against the PyTorch one, on a tiny random Llama.

float32 weights and K/V on both sides: the same function, so the same logits to float
tolerance; then what the engine does with slots (chunked prefill, copies, exchanges, reuse of a
slot that held a longer sequence) checked against prefilling from scratch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from xllm.model.checkpoint import load_model
from xllm.model.config import ModelConfigError
from xllm.model.generate import TorchSlots
from xllm.model.llamacpp import LlamaCppSlots, gguf_weights_for
from xllm.model.xllm import XLLM

PROMPTS = ["What shape is it?", "Count to three.", "Hello there, how are you today?"]


@pytest.fixture(scope="module")
def tiny_llama_model(tiny_llama_model_dir: Path) -> XLLM:
    return load_model(tiny_llama_model_dir, device="cpu", dtype="float32")


def prompt(model: XLLM, text: str) -> torch.Tensor:
    with torch.inference_mode():
        return model.prompt_embeddings([("user", text)], []).embeds  # (q, H)


def both(model: XLLM, slots: int = 4, max_len: int = 96) -> tuple[TorchSlots, LlamaCppSlots]:
    reference = TorchSlots(model.llm, slots, max_len, torch.device("cpu"))
    return reference, LlamaCppSlots(model.llm, slots, max_len, "f32", threads=1)


def test_prefill_and_batched_decode_give_the_torch_logits(tiny_llama_model: XLLM) -> None:
    reference, llamacpp = both(tiny_llama_model)
    embeds = [prompt(tiny_llama_model, text) for text in PROMPTS]
    # a run of chunks in consecutive slots 1..3, as the scheduler hands it over
    chunks = [(e, 0) for e in embeds]
    expected = reference.prefill(1, chunks)
    got = llamacpp.prefill(1, chunks)
    assert got.shape == expected.shape == (3, tiny_llama_model.llm.config.vocab_size)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)
    # calls that hold one prompt each: the same logits as the one call for all three
    longest = max(e.shape[0] for e in embeds)
    one_each = LlamaCppSlots(tiny_llama_model.llm, 4, 96, "f32", 1, max_tokens_per_call=longest)
    torch.testing.assert_close(one_each.prefill(1, chunks), got, atol=1e-5, rtol=1e-5)
    one_each.close()

    slots, lengths = [1, 2, 3], [e.shape[0] for e in embeds]
    tokens = expected.argmax(-1).tolist()
    for _ in range(6):  # the rows decode together, each at its own length
        expected = reference.decode(slots, tokens, lengths)
        got = llamacpp.decode(slots, tokens, lengths)
        torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)
        tokens, lengths = expected.argmax(-1).tolist(), [n + 1 for n in lengths]
    llamacpp.close()


def test_every_position_logits_score_a_prompt(tiny_llama_model: XLLM) -> None:
    reference, llamacpp = both(tiny_llama_model)
    embeds = prompt(tiny_llama_model, PROMPTS[2])
    expected = reference.prefill(0, [(embeds, 0)], every_position=True)
    got = llamacpp.prefill(0, [(embeds, 0)], every_position=True)
    assert got.shape == expected.shape == (1, embeds.shape[0], expected.shape[-1])
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)
    llamacpp.close()


def test_slot_operations_give_what_a_fresh_prefill_gives(tiny_llama_model: XLLM) -> None:
    _, slots = both(tiny_llama_model)
    long, short = prompt(tiny_llama_model, PROMPTS[2]), prompt(tiny_llama_model, PROMPTS[0])
    n = long.shape[0]
    fresh = slots.prefill(0, [(long, 0)])

    # chunked prefill (the scheduler's prefill_chunk)
    slots.prefill(1, [(long[:5], 0)])
    torch.testing.assert_close(slots.prefill(1, [(long[5:], 5)]), fresh, atol=0, rtol=0)

    # prefix reuse: the first 7 positions copied from slot 0, the rest prefilled
    slots.move(0, 2, 7)
    torch.testing.assert_close(slots.prefill(2, [(long[7:], 7)]), fresh, atol=0, rtol=0)

    # a slot that held a longer sequence serves a shorter prompt: nothing stale is attended
    alone = slots.prefill(3, [(short, 0)])
    reused = slots.prefill(1, [(short, 0)])
    torch.testing.assert_close(reused, alone, atol=0, rtol=0)

    # compaction's exchange: slot 0's sequence (n + 1 positions) goes to slot 3, slot 3's
    # short prompt to slot 0
    m = short.shape[0]
    token = int(fresh.argmax())
    next_token = int(slots.decode([0], [token], [n]).argmax())
    slots.exchange(0, 3, n + 1, m)
    moved = slots.decode([3], [next_token], [n + 1])
    slots.decode([2], [token], [n])  # slot 2 holds the same prompt: the same two steps there
    torch.testing.assert_close(moved, slots.decode([2], [next_token], [n + 1]), atol=0, rtol=0)
    last = short[-1:]  # slot 0 holds the short prompt: its last position again gives its logits
    torch.testing.assert_close(slots.prefill(0, [(last, m - 1)]), alone)
    slots.close()


def test_smaller_weight_types_stay_close_to_float32(tiny_llama_model: XLLM) -> None:
    embeds = prompt(tiny_llama_model, PROMPTS[1])
    exact = TorchSlots(tiny_llama_model.llm, 1, 64, torch.device("cpu")).prefill(0, [(embeds, 0)])
    for weights in ("bf16", "q8_0"):
        slots = LlamaCppSlots(tiny_llama_model.llm, 1, 64, weights, threads=1)
        got = slots.prefill(0, [(embeds, 0)])
        slots.close()
        similarity = torch.nn.functional.cosine_similarity(got, exact).item()
        assert 0.99 < similarity < 1.0, (weights, similarity)


def test_weight_types_follow_dtype_and_quantize() -> None:
    assert gguf_weights_for(torch.bfloat16, "none") == "bf16"
    assert gguf_weights_for(torch.float32, "none") == "f32"
    assert gguf_weights_for(torch.bfloat16, "int8") == "q8_0"
    with pytest.raises(ModelConfigError, match="none or int8"):
        gguf_weights_for(torch.bfloat16, "nf4")


def test_a_non_llama_llm_is_refused_with_what_to_use(tiny_model: XLLM) -> None:
    with pytest.raises(ModelConfigError, match=r"Llama-architecture.*--llm-backend torch"):
        LlamaCppSlots(tiny_model.llm, 2, 64, "f32", threads=1)


def test_the_written_gguf_has_no_vocabulary_and_llama_cpp_names(
    tiny_llama_model: XLLM, tmp_path: Path
) -> None:
    import gguf

    from xllm.model.convert.gguf_export import write_llama_gguf

    path = write_llama_gguf(tiny_llama_model.llm, tmp_path / "llm.gguf", "bf16")
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.model"].contents() == "none"
    names = {tensor.name: tensor.tensor_type for tensor in reader.tensors}
    assert "output.weight" not in names  # tied embeddings: llama.cpp reuses token_embd
    assert names["blk.1.attn_q.weight"] == gguf.GGMLQuantizationType.BF16
    assert names["blk.1.attn_norm.weight"] == gguf.GGMLQuantizationType.F32


def test_no_gguf_file_outlives_the_start(tiny_llama_model: XLLM, tmp_path: Path, monkeypatch):
    """llama.cpp maps the GGUF; its name is gone at once, so a killed server leaves no file."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    slots = LlamaCppSlots(tiny_llama_model.llm, 1, 64, "bf16", threads=1)
    assert list(tmp_path.iterdir()) == []
    embeds = prompt(tiny_llama_model, PROMPTS[0])
    assert torch.isfinite(slots.prefill(0, [(embeds, 0)])).all()  # the mapping still serves
    slots.close()
