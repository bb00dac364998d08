#!/usr/bin/env python3
"""Greedy answers of a quantized LLM against the same model in bf16, and the decode time per
token of each, in process on the CPU.

    python bench/quantize_agreement.py --model DIR --quantize int8 nf4 [--threads 1]
    python bench/quantize_agreement.py --model DIR --llamacpp none int8 [--threads 1]

DIR is any model directory (text prompts only: `{"llm": {"pretrained": "llm"}}` is the default
model's LLM alone). The prompts are the 20 of tests/recipes/test_default_model.py. Prints one JSON
line per path: identical answers, answers agreeing (word F1 >= 0.5) and ms per generated token.
`--llamacpp` paths run the same LLM on llama.cpp (`--llm-backend llamacpp`): none is its bf16
copy, int8 its Q8_0 copy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.recipes.test_default_model import PROMPTS
from xllm.model.checkpoint import load_model
from xllm.model.generate import generate
from xllm.model.llamacpp import LlamaCppSlots, gguf_weights_for
from xllm.model.recipes.heldout import word_f1
from xllm.model.sampling import SamplingParams


def answers(
    model_dir: Path, max_tokens: int, quantize: str, llamacpp: bool = False
) -> tuple[list[str], float]:
    """Greedy answers to PROMPTS and the mean decode time per generated token (ms)."""
    model = load_model(
        model_dir, device="cpu", dtype="bfloat16", quantize="none" if llamacpp else quantize
    )
    slots = None
    if llamacpp:
        weights = gguf_weights_for(torch.bfloat16, quantize)
        slots = LlamaCppSlots(model.llm, 1, 2048, weights, torch.get_num_threads())
    texts, tokens, seconds = [], 0, 0.0
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    for prompt in PROMPTS:
        with torch.inference_mode():
            embeds = model.prompt_embeddings([("user", prompt)], []).embeds
            start = time.perf_counter()
            deltas = list(generate(model.llm, model.tokenizer, embeds, params, slots=slots))
        seconds += time.perf_counter() - start
        tokens += len(deltas)
        texts.append("".join(d.text for d in deltas))
    return texts, seconds / tokens * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--quantize", nargs="*", choices=["nf4", "int8"], default=[])
    parser.add_argument("--llamacpp", nargs="*", choices=["none", "int8"], default=[])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reference, ms = answers(args.model, args.max_tokens, "none")
    print(json.dumps({"path": "bf16", "ms_per_token": round(ms, 1)}))
    paths = [(q, q, False) for q in args.quantize]
    paths += [(f"llamacpp-{gguf_weights_for(torch.bfloat16, q)}", q, True) for q in args.llamacpp]
    for name, quantize, llamacpp in paths:
        got, ms = answers(args.model, args.max_tokens, quantize, llamacpp)
        f1 = [word_f1(a, b) for a, b in zip(reference, got, strict=True)]
        print(
            json.dumps(
                {
                    "path": name,
                    "identical": sum(a == b for a, b in zip(reference, got, strict=True)),
                    "agreeing": sum(score >= 0.5 for score in f1),
                    "prompts": len(reference),
                    "ms_per_token": round(ms, 1),
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
